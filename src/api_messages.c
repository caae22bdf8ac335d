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
 * A conversation's messages over REST (PROTOCOL.md sections 4, 5, 8):
 * history pages, and sends in any socket form. A send is stored by the
 * same parley_post_message() as a socket send, whose trigger broadcasts
 * it once committed, so REST sends reach sockets like any other.
 */

#include <sys/types.h>

#include <limits.h>
#include <stdint.h>
#include <string.h>

#include "parley.h"

int	api_messages(struct http_request *);

static int	messages_history(struct http_request *,
		    const struct identity *, const char *);
static int	messages_latest(struct http_request *,
		    const struct identity *, const char *,
		    const struct rest_page *);
static int	messages_history_page(struct db_result *, int,
		    struct kore_buf *);
static int	messages_send(struct http_request *,
		    const struct identity *, const char *);
static int	messages_sender(struct http_request *, yajl_val,
		    const struct identity *, const struct message_in *,
		    char *, size_t, const char **, const char **);

static const char	history_sql[] =
    "SELECT * FROM parley_history($1, $2, $3, $4, $5)";

static const char	send_sql[] =
    "SELECT * FROM parley_rest_post_message($1, $2, $3, $4, $5, $6, $7)";

/* GET: a page of history (a service may read any). POST: a send. */
int
api_messages(struct http_request *req)
{
	struct identity		id;
	char			cid[24];

	if (http_state_exists(req))
		return (rest_resume(req));

	if (!rest_method(req, HTTP_METHOD_GET | HTTP_METHOD_POST) ||
	    !rest_path_id(req, cid, sizeof(cid)) ||
	    !rest_identity(req, REST_ANY, &id))
		return (KORE_RESULT_OK);

	if (req->method == HTTP_METHOD_GET)
		return (messages_history(req, &id, cid));

	return (messages_send(req, &id, cid));
}

/* Oldest first; ?before=, ?after= (0: from the start) and ?limit=. */
static int
messages_history(struct http_request *req, const struct identity *id,
    const char *cid)
{
	struct rest_page	page;
	const char		*params[5];

	if (!rest_page(req, 50, 200, REST_PAGE_AFTER, &page))
		return (KORE_RESULT_OK);

	if (page.before == NULL && page.after == NULL)
		return (messages_latest(req, id, cid, &page));

	params[0] = cid;
	params[1] = id->service ? NULL : id->user_id;
	params[2] = page.before;
	params[3] = page.after;
	params[4] = page.limit;

	return (rest_query(req, HTTP_STATUS_OK, history_sql, 5, params,
	    messages_history_page));
}

/* The latest page: batched, and answered from memory when unchanged. */
static int
messages_latest(struct http_request *req, const struct identity *id,
    const char *cid, const struct rest_page *page)
{
	int64_t		conv, limit;

	if (!util_parse_int64(cid, 1, INT64_MAX, &conv) ||
	    !util_parse_int64(page->limit, 1, INT_MAX, &limit)) {
		(void)rest_invalid(req, "bad conversation id or limit");
		return (KORE_RESULT_OK);
	}

	return (latest_page(req, conv, id->service ? NULL : id->user_id,
	    (int)limit));
}

/* parley_history's rows, oldest first: the page, and whether more exist. */
static int
messages_history_page(struct db_result *r, int ok_status,
    struct kore_buf *body)
{
	if (PQnfields(r->res) != MESSAGE_COLUMNS + 1) {
		rest_error_body(body, "internal", "unexpected result");
		return (HTTP_STATUS_INTERNAL_ERROR);
	}

	message_page(body, r->res, 0, PQntuples(r->res));
	return (ok_status);
}

/* 201 with the stored message, 200 with the original for a repeat. */
static int
messages_send(struct http_request *req, const struct identity *id,
    const char *cid)
{
	struct message_in	m;
	yajl_val		root;
	char			sender[PARLEY_USER_ID_MAX + 1];
	const char		*params[7];
	int			ret;

	if (!rest_body(req, &root))
		return (KORE_RESULT_OK);

	if (!message_parse(root, id->service, &m)) {
		rest_message_error(req, &m);
		yajl_tree_free(root);
		return (KORE_RESULT_OK);
	}

	ret = KORE_RESULT_OK;
	if (messages_sender(req, root, id, &m, sender, sizeof(sender),
	    &params[1], &params[2])) {
		params[0] = cid;
		params[3] = m.type;
		params[4] = m.content;
		params[5] = m.metadata;
		params[6] = m.has_client_id ? m.client_id : NULL;
		ret = rest_query(req, HTTP_STATUS_CREATED, send_sql, 7,
		    params, rest_finish_created);
	}

	message_cleanup(&m);
	yajl_tree_free(root);

	return (ret);
}

/*
 * Who sends, as (*sender, *name) for parley_rest_post_message(): a user
 * sends as themselves, with the display name of their token. A service
 * sends SYSTEM (no sender) or names in sender_id the participant it
 * sends for (no name: the database checks that they are one).
 */
static int
messages_sender(struct http_request *req, yajl_val root,
    const struct identity *id, const struct message_in *m, char *buf,
    size_t len, const char **sender, const char **name)
{
	yajl_val	v;

	if (!id->service) {
		*sender = id->user_id;
		*name = id->name;
		return (KORE_RESULT_OK);
	}

	*sender = NULL;
	*name = NULL;
	v = rest_member(root, "sender_id");

	if (!strcmp(m->type, "SYSTEM")) {
		if (v != NULL)
			return (rest_invalid(req,
			    "a SYSTEM message has no sender_id"));
		return (KORE_RESULT_OK);
	}

	if (!rest_user_id(v, buf, len))
		return (rest_invalid(req, "a service send needs sender_id, "
		    "the user id of a participant, unless it is SYSTEM"));

	*sender = buf;
	return (KORE_RESULT_OK);
}
