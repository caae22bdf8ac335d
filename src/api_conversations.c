/*
 * Copyright (c) 2026 The Parley developers.
 *
 * Permission to use, copy, modify, and distribute this software for any
 * purpose with or without fee is hereby granted, provided that the above
 * copyright notice and this permission notice appear in all copies.
 *
 * THE SOFTWARE IS PROVIDED "AS IS" AND THE AUTHOR DISCLAIMS ALL WARRANTIES
 * WITH REGARD TO THIS SOFTWARE INCLUDING ALL IMPLIED WARRANTIES OF
 * MERCHANTABILITY AND FITNESS. IN NO EVENT SHALL THE AUTHOR BE LIABLE FOR
 * ANY SPECIAL, DIRECT, INDIRECT, OR CONSEQUENTIAL DAMAGES OR ANY DAMAGES
 * WHATSOEVER RESULTING FROM LOSS OF USE, DATA OR PROFITS, WHETHER IN AN
 * ACTION OF CONTRACT, NEGLIGENCE OR OTHER TORTIOUS ACTION, ARISING OUT OF
 * OR IN CONNECTION WITH THE USE OR PERFORMANCE OF THIS SOFTWARE.
 */

/*
 * Conversations over REST (PROTOCOL.md sections 4, 5 and 8): the list,
 * get-or-create, one conversation (read it, mute it) and the read
 * position. Their messages are in api_messages.c.
 */

#include <sys/types.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "parley.h"

#define CONVERSATION_MEMBERS_MAX	256
#define CONVERSATION_TITLE_MAX		256	/* code points */
#define CONVERSATION_ROLE_MAX		64	/* bytes, like user ids */
#define CONVERSATION_KIND_MAX		64
#define CONVERSATION_REF_MAX		256

/* A validated POST /api/conversations body; strings point into the tree. */
struct conversation_in {
	struct kore_buf		members;	/* [{"id","role"}] for SQL */
	const char		*title;
	const char		*kind;
	const char		*ref;
	char			ref_buf[24];
	struct message_in	system;
	int			has_system;
};

int	api_conversations(struct http_request *);
int	api_conversation(struct http_request *);
int	api_conversation_read(struct http_request *);

static int	conversations_list(struct http_request *,
		    const struct identity *);
static int	conversations_create(struct http_request *,
		    const struct identity *);
static int	conversation_get(struct http_request *,
		    const struct identity *, const char *);
static int	conversation_mute(struct http_request *,
		    const struct identity *, const char *);
static int	conversation_parse(struct http_request *, yajl_val,
		    const struct identity *, struct conversation_in *);
static int	conversation_members(struct http_request *, yajl_val,
		    const struct identity *, struct kore_buf *);
static int	conversation_context(struct http_request *, yajl_val,
		    struct conversation_in *);
static int	conversation_system(struct http_request *, yajl_val,
		    const struct identity *, struct conversation_in *);
static int	conversation_id_cmp(const void *, const void *);

static const char	list_sql[] =
    "SELECT parley_list_conversations($1, $2, $3)";

static const char	create_sql[] =
    "SELECT * FROM parley_rest_create_conversation($1, $2, $3, $4, $5, "
    "$6, $7)";

static const char	get_sql[] =
    "SELECT parley_get_conversation($1, $2, $3)";

static const char	mute_sql[] =
    "SELECT parley_set_muted($1, $2, $3)";

/*
 * parley_mark_read() also says where the position went and whether it
 * moved; the REST answer is the count alone.
 */
static const char	read_sql[] =
    "SELECT json_build_object('unread_count', r -> 'unread_count')::text "
    "FROM (SELECT parley_mark_read($1, $2, $3)::json) AS s(r)";

/* GET: the caller's list (user tokens). POST: get-or-create (both). */
int
api_conversations(struct http_request *req)
{
	struct identity		id;

	if (http_state_exists(req))
		return (rest_resume(req));

	if (!rest_method(req, HTTP_METHOD_GET | HTTP_METHOD_POST) ||
	    !rest_identity(req, req->method == HTTP_METHOD_GET ?
	    REST_USER : REST_ANY, &id))
		return (KORE_RESULT_OK);

	if (req->method == HTTP_METHOD_GET)
		return (conversations_list(req, &id));

	return (conversations_create(req, &id));
}

/* GET: one conversation (a service may read any). PATCH: mute it. */
int
api_conversation(struct http_request *req)
{
	struct identity		id;
	char			cid[24];

	if (http_state_exists(req))
		return (rest_resume(req));

	if (!rest_method(req, HTTP_METHOD_GET | HTTP_METHOD_PATCH) ||
	    !rest_path_id(req, cid, sizeof(cid)) ||
	    !rest_identity(req, req->method == HTTP_METHOD_GET ?
	    REST_ANY : REST_USER, &id))
		return (KORE_RESULT_OK);

	if (req->method == HTTP_METHOD_GET)
		return (conversation_get(req, &id, cid));

	return (conversation_mute(req, &id, cid));
}

/* Move the caller's read position: {"message_id":N}, or to the latest. */
int
api_conversation_read(struct http_request *req)
{
	struct identity		id;
	yajl_val		root, v;
	const char		*params[3];
	char			cid[24], mid[24];

	if (http_state_exists(req))
		return (rest_resume(req));

	if (!rest_method(req, HTTP_METHOD_POST) ||
	    !rest_path_id(req, cid, sizeof(cid)) ||
	    !rest_identity(req, REST_USER, &id) ||
	    !rest_body(req, &root))
		return (KORE_RESULT_OK);

	v = rest_member(root, "message_id");
	if (v != NULL && (!YAJL_IS_INTEGER(v) || YAJL_GET_INTEGER(v) < 1)) {
		yajl_tree_free(root);
		(void)rest_invalid(req,
		    "message_id must be a positive integer");
		return (KORE_RESULT_OK);
	}

	if (v != NULL)
		(void)snprintf(mid, sizeof(mid), "%lld", YAJL_GET_INTEGER(v));
	yajl_tree_free(root);

	params[0] = cid;
	params[1] = id.user_id;
	params[2] = v != NULL ? mid : NULL;

	return (rest_query(req, HTTP_STATUS_OK, read_sql, 3, params, NULL));
}

static int
conversations_list(struct http_request *req, const struct identity *id)
{
	struct rest_page	page;
	const char		*params[3];

	if (!rest_page(req, 20, 100, REST_PAGE_CURSOR, &page))
		return (KORE_RESULT_OK);

	params[0] = id->user_id;
	params[1] = page.limit;
	params[2] = page.before;

	return (rest_query(req, HTTP_STATUS_OK, list_sql, 3, params, NULL));
}

/* 201 with a new conversation, 200 with the one that already existed. */
static int
conversations_create(struct http_request *req, const struct identity *id)
{
	struct conversation_in	in;
	yajl_val		root;
	const char		*params[7];
	int			ret;

	if (!rest_body(req, &root))
		return (KORE_RESULT_OK);

	memset(&in, 0, sizeof(in));
	kore_buf_init(&in.members, 256);

	ret = KORE_RESULT_OK;
	if (conversation_parse(req, root, id, &in)) {
		params[0] = id->service ? NULL : id->user_id;
		params[1] = id->service ? NULL : id->name;
		params[2] = kore_buf_stringify(&in.members, NULL);
		params[3] = in.title;
		params[4] = in.kind;
		params[5] = in.ref;
		params[6] = in.has_system ? in.system.content : NULL;
		ret = rest_query(req, HTTP_STATUS_CREATED, create_sql, 7,
		    params, rest_finish_created);
	}

	message_cleanup(&in.system);
	kore_buf_cleanup(&in.members);
	yajl_tree_free(root);

	return (ret);
}

/* Reading marks read (with a read_receipt) unless ?mark_read=false. */
static int
conversation_get(struct http_request *req, const struct identity *id,
    const char *cid)
{
	const char	*params[3];
	int		mark_read;

	mark_read = 1;
	if (!rest_param_bool(req, "mark_read", &mark_read))
		return (KORE_RESULT_OK);

	/* A service has no read position: it only ever looks. */
	params[0] = cid;
	params[1] = id->service ? NULL : id->user_id;
	params[2] = mark_read && !id->service ? "true" : "false";

	return (rest_query(req, HTTP_STATUS_OK, get_sql, 3, params, NULL));
}

static int
conversation_mute(struct http_request *req, const struct identity *id,
    const char *cid)
{
	yajl_val	root, muted;
	const char	*params[3];

	if (!rest_body(req, &root))
		return (KORE_RESULT_OK);

	muted = rest_member(root, "muted");
	if (muted == NULL || (!YAJL_IS_TRUE(muted) && !YAJL_IS_FALSE(muted))) {
		yajl_tree_free(root);
		(void)rest_invalid(req, "muted must be a boolean");
		return (KORE_RESULT_OK);
	}

	params[0] = cid;
	params[1] = id->user_id;
	params[2] = YAJL_IS_TRUE(muted) ? "true" : "false";
	yajl_tree_free(root);

	return (rest_query(req, HTTP_STATUS_OK, mute_sql, 3, params, NULL));
}

static int
conversation_parse(struct http_request *req, yajl_val root,
    const struct identity *id, struct conversation_in *in)
{
	yajl_val	v;

	if (!conversation_members(req, rest_member(root, "participants"),
	    id, &in->members))
		return (KORE_RESULT_ERROR);

	if ((v = rest_member(root, "title")) != NULL) {
		if (!YAJL_IS_STRING(v) ||
		    json_utf8_length((const u_int8_t *)v->u.string,
		    strlen(v->u.string)) > CONVERSATION_TITLE_MAX)
			return (rest_invalid(req,
			    "title is a string of at most 256 characters"));
		in->title = v->u.string;
	}

	if (!conversation_context(req, rest_member(root, "context"), in))
		return (KORE_RESULT_ERROR);

	return (conversation_system(req, rest_member(root, "system_message"),
	    id, in));
}

/*
 * participants: user ids or {"id","role"}, rewritten as the
 * [{"id","role"}] parley_create_conversation() takes. The members are
 * counted here, duplicates merged and the caller added, so that an
 * oversized list never reaches the database.
 */
static int
conversation_members(struct http_request *req, yajl_val list,
    const struct identity *id, struct kore_buf *out)
{
	char		uid[PARLEY_USER_ID_MAX + 1], **ids;
	yajl_val	v, role;
	size_t		i, n, count, len;
	int		ok;

	if (list == NULL || !YAJL_IS_ARRAY(list) || list->u.array.len == 0)
		return (rest_invalid(req,
		    "participants must be a non-empty array"));

	ids = kore_calloc(list->u.array.len + 1, sizeof(*ids));
	ok = KORE_RESULT_OK;
	n = 0;

	kore_buf_append(out, "[", 1);
	for (i = 0; i < list->u.array.len; i++) {
		v = list->u.array.values[i];
		role = NULL;
		if (YAJL_IS_OBJECT(v)) {
			role = rest_member(v, "role");
			v = rest_member(v, "id");
		}

		if (!rest_user_id(v, uid, sizeof(uid))) {
			ok = rest_invalid(req, "a participant is a user id "
			    "(a string of 1-64 bytes or an integer) or "
			    "{\"id\":...,\"role\":...}");
			break;
		}

		if (role != NULL && (!YAJL_IS_STRING(role) ||
		    (len = strlen(role->u.string)) < 1 ||
		    len > CONVERSATION_ROLE_MAX)) {
			ok = rest_invalid(req,
			    "a role is a string of 1-64 bytes");
			break;
		}

		kore_buf_appendf(out, "%s{\"id\":", i > 0 ? "," : "");
		json_append_string(out, uid, strlen(uid));
		kore_buf_append(out, ",\"role\":", 8);
		if (role != NULL)
			json_append_string(out, role->u.string,
			    strlen(role->u.string));
		else
			kore_buf_append(out, "null", 4);
		kore_buf_append(out, "}", 1);

		ids[n++] = kore_strdup(uid);
	}
	kore_buf_append(out, "]", 1);

	if (ok) {
		if (!id->service)
			ids[n++] = kore_strdup(id->user_id);
		qsort(ids, n, sizeof(*ids), conversation_id_cmp);
		for (count = 0, i = 0; i < n; i++) {
			if (i == 0 || strcmp(ids[i], ids[i - 1]))
				count++;
		}
		if (count > CONVERSATION_MEMBERS_MAX)
			ok = rest_invalid(req,
			    "a conversation has at most 256 members");
	}

	for (i = 0; i < n; i++)
		kore_free(ids[i]);
	kore_free(ids);

	return (ok);
}

/* context: {"kind": 1-64 bytes, "ref": 1-256 bytes or an integer}. */
static int
conversation_context(struct http_request *req, yajl_val ctx,
    struct conversation_in *in)
{
	yajl_val	kind, ref;
	size_t		len;

	if (ctx == NULL)
		return (KORE_RESULT_OK);

	kind = rest_member(ctx, "kind");
	if (kind == NULL || !YAJL_IS_STRING(kind) ||
	    (len = strlen(kind->u.string)) < 1 || len > CONVERSATION_KIND_MAX)
		return (rest_invalid(req, "context is {\"kind\":\"...\","
		    "\"ref\":\"...\"} with kind a string of 1-64 bytes"));
	in->kind = kind->u.string;

	/* A ref is optional: {"kind":"support"} keys one per member set. */
	if ((ref = rest_member(ctx, "ref")) == NULL)
		return (KORE_RESULT_OK);

	if (YAJL_IS_INTEGER(ref)) {
		(void)snprintf(in->ref_buf, sizeof(in->ref_buf), "%lld",
		    YAJL_GET_INTEGER(ref));
		in->ref = in->ref_buf;
	} else if (YAJL_IS_STRING(ref) && (len = strlen(ref->u.string)) >= 1 &&
	    len <= CONVERSATION_REF_MAX) {
		in->ref = ref->u.string;
	} else {
		return (rest_invalid(req, "context ref is a string of "
		    "1-256 bytes or an integer"));
	}

	return (KORE_RESULT_OK);
}

/*
 * The service's optional system_message is held to the rules of a SYSTEM
 * send (trimmed, not empty, not too long): message_parse() checks it as
 * the two-member object {"message_type":"SYSTEM","content":...} built
 * here on the stack.
 */
static int
conversation_system(struct http_request *req, yajl_val v,
    const struct identity *id, struct conversation_in *in)
{
	struct yajl_val_s	obj, type, content;
	const char		*keys[2];
	yajl_val		values[2];
	char			system[] = "SYSTEM";

	if (v == NULL)
		return (KORE_RESULT_OK);

	if (!id->service) {
		rest_error(req, HTTP_STATUS_FORBIDDEN, "forbidden_type",
		    "system_message is for the service API");
		return (KORE_RESULT_ERROR);
	}

	if (!YAJL_IS_STRING(v))
		return (rest_invalid(req, "system_message is a string"));

	memset(&type, 0, sizeof(type));
	type.type = yajl_t_string;
	type.u.string = system;

	memset(&content, 0, sizeof(content));
	content.type = yajl_t_string;
	content.u.string = v->u.string;

	keys[0] = "message_type";
	keys[1] = "content";
	values[0] = &type;
	values[1] = &content;

	memset(&obj, 0, sizeof(obj));
	obj.type = yajl_t_object;
	obj.u.object.keys = keys;
	obj.u.object.values = values;
	obj.u.object.len = 2;

	if (!message_parse(&obj, 1, &in->system)) {
		rest_message_error(req, &in->system);
		return (KORE_RESULT_ERROR);
	}

	in->has_system = 1;
	return (KORE_RESULT_OK);
}

/* Byte order, as the database compares member ids (collate "C"). */
static int
conversation_id_cmp(const void *a, const void *b)
{
	return (strcmp(*(char *const *)a, *(char *const *)b));
}
