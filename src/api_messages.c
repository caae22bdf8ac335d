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
		    struct kore_buf *, void *);
static int	messages_latest_page(struct db_result *, int,
		    struct kore_buf *, void *);
static int	messages_render(struct db_result *, int, int,
		    struct kore_buf *);
static int	messages_send(struct http_request *,
		    const struct identity *, const char *);
static int	messages_sender(struct http_request *, yajl_val,
		    const struct identity *, const struct message_in *,
		    char *, size_t, const char **, const char **);

static const char	history_sql[] =
    "SELECT * FROM parley_history($1, $2, $3, $4, $5)";

static const char	latest_sql[] =
    "SELECT * FROM parley_latest_page($1, $2, $3, $4)";

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
	    messages_history_page, NULL));
}

/*
 * The latest page, from this worker's copy when the database says nothing
 * it was made from changed (pages.c).
 */
static int
messages_latest(struct http_request *req, const struct identity *id,
    const char *cid, const struct rest_page *page)
{
	struct page		*kept;
	const char		*params[4];
	int64_t			conv, limit;

	if (!util_parse_int64(cid, 1, INT64_MAX, &conv) ||
	    !util_parse_int64(page->limit, 1, INT_MAX, &limit))
		return (rest_invalid(req, "bad conversation id or limit"));

	kept = pages_get(conv, (int)limit);
	params[0] = cid;
	params[1] = id->service ? NULL : id->user_id;
	params[2] = page->limit;
	params[3] = kept->stamp;

	return (rest_query(req, HTTP_STATUS_OK, latest_sql, 4, params,
	    messages_latest_page, kept));
}

static int
messages_history_page(struct db_result *r, int ok_status,
    struct kore_buf *body, void *unused)
{
	if (PQnfields(r->res) != MESSAGE_COLUMNS + 1) {
		rest_error_body(body, "internal", "unexpected result");
		return (HTTP_STATUS_INTERNAL_ERROR);
	}

	return (messages_render(r, 0, ok_status, body));
}

/*
 * parley_latest_page's header row (unchanged?, the stamp), then, unless
 * unchanged, the page's rows: kept for the next request.
 */
static int
messages_latest_page(struct db_result *r, int ok_status,
    struct kore_buf *body, void *arg)
{
	struct page	*kept = arg;
	const char	*stamp;
	int		status;

	if (PQnfields(r->res) != MESSAGE_COLUMNS + 2 ||
	    PQntuples(r->res) < 1 ||
	    PQgetisnull(r->res, 0, MESSAGE_COLUMNS + 1)) {
		rest_error_body(body, "internal", "unexpected result");
		return (HTTP_STATUS_INTERNAL_ERROR);
	}

	stamp = PQgetvalue(r->res, 0, MESSAGE_COLUMNS + 1);
	if (kept->stamp != NULL &&
	    *PQgetvalue(r->res, 0, MESSAGE_COLUMNS) == 't') {
		kore_buf_append(body, kept->body, kept->len);
		metrics_page(1);
		return (ok_status);
	}

	status = messages_render(r, 1, ok_status, body);
	pages_put(kept, stamp, body->data, body->offset);
	metrics_page(0);

	return (status);
}

/* History rows from `from` on, oldest first: the page, and has_more. */
static int
messages_render(struct db_result *r, int from, int ok_status,
    struct kore_buf *body)
{
	int		i, n, more, first;

	more = 0;
	first = 1;
	n = PQntuples(r->res);

	UTIL_BUF_LITERAL(body, "{\"messages\":[");
	for (i = from; i < n; i++) {
		if (*PQgetvalue(r->res, i, MESSAGE_COLUMNS) == 't') {
			more = 1;
			continue;
		}
		if (!first)
			UTIL_BUF_LITERAL(body, ",");
		first = 0;
		message_render(body, r->res, i);
	}
	kore_buf_appendf(body, "],\"has_more\":%s}", more ? "true" : "false");

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
		    params, rest_finish_created, NULL);
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
