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
 * Notifications over REST (PROTOCOL.md sections 4 and 5): the user's
 * list, reads and preferences, and the service call that posts one. The
 * database pushes what is stored or read to the notification sockets.
 */

#include <sys/types.h>

#include <string.h>

#include "parley.h"

#define NOTIFICATION_TYPE_MAX		64
#define NOTIFICATION_PAYLOAD_MAX	8192
#define PREFERENCES_TYPES_MAX		256

int	api_notifications(struct http_request *);
int	api_notification_read(struct http_request *);
int	api_notifications_read_all(struct http_request *);
int	api_notification_preferences(struct http_request *);

static int	notifications_list(struct http_request *,
		    const struct identity *);
static int	notifications_post(struct http_request *);
static int	notification_payload(struct http_request *, yajl_val,
		    struct kore_buf *);
static int	notification_disabled(struct http_request *, yajl_val,
		    struct kore_buf *);
static int	notification_type_valid(yajl_val);

/* The flat frame's envelope keys sit beside the payload's own. */
static const char *payload_reserved[] = {
	"type", "id", "created_at", "read", "replay", NULL
};

static const char	list_sql[] =
    "SELECT parley_list_notifications($1, $2, $3, $4)";

static const char	post_sql[] =
    "SELECT parley_post_notification($1, $2, $3)";

static const char	read_sql[] =
    "SELECT parley_read_notification($1, $2)";

static const char	read_all_sql[] =
    "SELECT parley_read_all_notifications($1)";

static const char	prefs_get_sql[] =
    "SELECT parley_get_preferences($1)";

static const char	prefs_put_sql[] =
    "SELECT parley_set_preferences($1, $2)";

/* GET: the caller's list (user tokens). POST: store one (services). */
int
api_notifications(struct http_request *req)
{
	struct identity		id;

	if (http_state_exists(req))
		return (rest_resume(req));

	if (!rest_method(req, HTTP_METHOD_GET | HTTP_METHOD_POST) ||
	    !rest_identity(req, req->method == HTTP_METHOD_GET ?
	    REST_USER : REST_SERVICE, &id))
		return (KORE_RESULT_OK);

	if (req->method == HTTP_METHOD_GET)
		return (notifications_list(req, &id));

	return (notifications_post(req));
}

int
api_notification_read(struct http_request *req)
{
	struct identity		id;
	const char		*params[2];
	char			nid[24];

	if (http_state_exists(req))
		return (rest_resume(req));

	if (!rest_method(req, HTTP_METHOD_POST) ||
	    !rest_path_id(req, nid, sizeof(nid)) ||
	    !rest_identity(req, REST_USER, &id))
		return (KORE_RESULT_OK);

	params[0] = id.user_id;
	params[1] = nid;

	return (rest_query(req, HTTP_STATUS_OK, read_sql, 2, params, NULL));
}

int
api_notifications_read_all(struct http_request *req)
{
	struct identity		id;
	const char		*params[1];

	if (http_state_exists(req))
		return (rest_resume(req));

	if (!rest_method(req, HTTP_METHOD_POST) ||
	    !rest_identity(req, REST_USER, &id))
		return (KORE_RESULT_OK);

	params[0] = id.user_id;

	return (rest_query(req, HTTP_STATUS_OK, read_all_sql, 1, params,
	    NULL));
}

/* GET, or PUT {"disabled_types":[...]} to replace the list. */
int
api_notification_preferences(struct http_request *req)
{
	struct identity		id;
	struct kore_buf		types;
	yajl_val		root;
	const char		*params[2];
	int			ret;

	if (http_state_exists(req))
		return (rest_resume(req));

	if (!rest_method(req, HTTP_METHOD_GET | HTTP_METHOD_PUT) ||
	    !rest_identity(req, REST_USER, &id))
		return (KORE_RESULT_OK);

	params[0] = id.user_id;
	if (req->method == HTTP_METHOD_GET)
		return (rest_query(req, HTTP_STATUS_OK, prefs_get_sql, 1,
		    params, NULL));

	if (!rest_body(req, &root))
		return (KORE_RESULT_OK);

	ret = KORE_RESULT_OK;
	kore_buf_init(&types, 128);
	if (notification_disabled(req, rest_member(root, "disabled_types"),
	    &types)) {
		params[1] = kore_buf_stringify(&types, NULL);
		ret = rest_query(req, HTTP_STATUS_OK, prefs_put_sql, 2,
		    params, NULL);
	}

	kore_buf_cleanup(&types);
	yajl_tree_free(root);

	return (ret);
}

/* Newest first; ?limit= (max 100), ?before=ID, ?unread=true. */
static int
notifications_list(struct http_request *req, const struct identity *id)
{
	struct rest_page	page;
	const char		*params[4];
	int			unread;

	unread = 0;
	if (!rest_page(req, 50, 100, 0, &page) ||
	    !rest_param_bool(req, "unread", &unread))
		return (KORE_RESULT_OK);

	params[0] = id->user_id;
	params[1] = page.limit;
	params[2] = page.before;
	params[3] = unread ? "true" : "false";

	return (rest_query(req, HTTP_STATUS_OK, list_sql, 4, params, NULL));
}

/* {"user_id","type","payload"}: stored, pushed live, 201 with it. */
static int
notifications_post(struct http_request *req)
{
	struct kore_buf		payload;
	yajl_val		root, type;
	char			uid[PARLEY_USER_ID_MAX + 1];
	const char		*params[3];
	int			ret;

	if (!rest_body(req, &root))
		return (KORE_RESULT_OK);

	ret = KORE_RESULT_OK;
	kore_buf_init(&payload, 256);
	type = rest_member(root, "type");

	if (!rest_user_id(rest_member(root, "user_id"), uid, sizeof(uid))) {
		(void)rest_invalid(req, "user_id is a user id (a string of "
		    "1-64 bytes or an integer)");
	} else if (!notification_type_valid(type)) {
		(void)rest_invalid(req,
		    "type is a string matching ^[a-z0-9_.]{1,64}$");
	} else if (notification_payload(req, rest_member(root, "payload"),
	    &payload)) {
		params[0] = uid;
		params[1] = type->u.string;
		params[2] = kore_buf_stringify(&payload, NULL);
		ret = rest_query(req, HTTP_STATUS_CREATED, post_sql, 3,
		    params, NULL);
	}

	kore_buf_cleanup(&payload);
	yajl_tree_free(root);

	return (ret);
}

/* An object (absent: {}) of at most 8 KiB, without the envelope keys. */
static int
notification_payload(struct http_request *req, yajl_val v,
    struct kore_buf *out)
{
	size_t		i, k;

	if (v == NULL) {
		kore_buf_append(out, "{}", 2);
		return (KORE_RESULT_OK);
	}

	if (!YAJL_IS_OBJECT(v))
		return (rest_invalid(req, "payload must be a JSON object"));

	for (i = 0; i < v->u.object.len; i++) {
		for (k = 0; payload_reserved[k] != NULL; k++) {
			if (!strcmp(v->u.object.keys[i], payload_reserved[k]))
				return (rest_invalid(req, "payload may not use "
				    "the keys type, id, created_at, read, "
				    "replay"));
		}
	}

	if (!json_serialize(out, v))
		return (rest_invalid(req, "payload numbers must fit a double"));
	if (out->offset > NOTIFICATION_PAYLOAD_MAX)
		return (rest_invalid(req, "payload is larger than 8 KiB"));

	return (KORE_RESULT_OK);
}

/* disabled_types: an array of at most 256 notification types. */
static int
notification_disabled(struct http_request *req, yajl_val v,
    struct kore_buf *out)
{
	size_t		i;

	if (v == NULL || !YAJL_IS_ARRAY(v) ||
	    v->u.array.len > PREFERENCES_TYPES_MAX)
		return (rest_invalid(req,
		    "disabled_types must be an array of at most 256 types"));

	for (i = 0; i < v->u.array.len; i++) {
		if (!notification_type_valid(v->u.array.values[i]))
			return (rest_invalid(req, "each disabled type matches "
			    "^[a-z0-9_.]{1,64}$"));
	}

	(void)json_serialize(out, v);		/* strings only */
	return (KORE_RESULT_OK);
}

/* A type matches ^[a-z0-9_.]{1,64}$ in full. */
static int
notification_type_valid(yajl_val v)
{
	size_t		len;

	if (v == NULL || !YAJL_IS_STRING(v))
		return (0);

	len = strlen(v->u.string);
	return (len >= 1 && len <= NOTIFICATION_TYPE_MAX &&
	    strspn(v->u.string, "abcdefghijklmnopqrstuvwxyz0123456789_.") ==
	    len);
}
