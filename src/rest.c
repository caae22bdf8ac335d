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
 * What every REST endpoint shares: the JSON error object, method and
 * identity checks, request bodies, and the one shape all of them have:
 * validate, call one SQL function, answer with the JSON it returned. The
 * request sleeps while its query runs and is woken by the db callback.
 */

#include <sys/types.h>

#include <ctype.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "parley.h"

struct rest_call {
	struct db_query		*query;
	int			done;
	int			status;
	int			ok_status;
	rest_finish_fn		finish;
	void			*ctx;
	void			(*release)(void *);
	struct kore_buf		*body;
	const void		*kept;
	size_t			kept_len;
};

static struct rest_call	*rest_call_new(struct http_request *);
static void	rest_call_free(struct http_request *);
static void	rest_query_done(struct db_result *, void *);
static char	*rest_param(struct http_request *, const char *);
static int	rest_digits(const char *);
static int	rest_id_value(const char *, int64_t, char *, size_t);

void
rest_reply(struct http_request *req, int status, const void *body, size_t len)
{
	http_response_header(req, "content-type", "application/json");
	http_response_header(req, "cache-control", "no-store");
	http_response(req, status, body, len);
}

void
rest_error(struct http_request *req, int status, const char *code,
    const char *message)
{
	struct kore_buf		buf;

	kore_buf_init(&buf, 128);
	rest_error_body(&buf, code, message);
	rest_reply(req, status, buf.data, buf.offset);
	kore_buf_cleanup(&buf);
}

/* 405 unless the method is one of `allowed` (HTTP_METHOD_* bits). */
int
rest_method(struct http_request *req, int allowed)
{
	if (req->method & allowed)
		return (KORE_RESULT_OK);

	rest_error(req, HTTP_STATUS_METHOD_NOT_ALLOWED, "method_not_allowed",
	    "this method is not allowed here");
	return (KORE_RESULT_ERROR);
}

/*
 * The caller's identity, answered with 401 when the token is missing or
 * bad and 403 when it is the wrong kind (REST_USER, REST_SERVICE).
 */
int
rest_identity(struct http_request *req, int need, struct identity *id)
{
	if (auth_request(req, 0, id) != AUTH_OK) {
		rest_error(req, HTTP_STATUS_UNAUTHORIZED, "unauthenticated",
		    "a valid access token is required");
		return (KORE_RESULT_ERROR);
	}

	if ((need == REST_USER && id->service) ||
	    (need == REST_SERVICE && !id->service)) {
		rest_error(req, HTTP_STATUS_FORBIDDEN, "forbidden",
		    need == REST_USER ? "this endpoint is for user tokens" :
		    "this endpoint is for service tokens");
		return (KORE_RESULT_ERROR);
	}

	return (KORE_RESULT_OK);
}

/*
 * Parse the JSON object body. No body at all yields an empty object;
 * a body needs Content-Type application/json (415), must fit the limit
 * (413), parse (400 invalid_json) and be an object (400 invalid_payload).
 */
int
rest_body(struct http_request *req, yajl_val *out)
{
	const char	*ctype;
	size_t		len;

	/*
	 * Kore rewinds the body buffer once it is complete (offset 0, for
	 * http_body_read()); the bytes stay and the length is kept apart.
	 */
	*out = NULL;
	len = req->http_body != NULL ? req->http_body_length : 0;

	if (len == 0) {
		*out = yajl_tree_parse("{}", NULL, 0);
		return (KORE_RESULT_OK);
	}

	if (!http_request_header(req, "content-type", &ctype) ||
	    strncasecmp(ctype, "application/json", 16) ||
	    (ctype[16] != '\0' && ctype[16] != ';' && ctype[16] != ' ')) {
		rest_error(req, HTTP_STATUS_UNSUPPORTED_MEDIA_TYPE,
		    "unsupported_media_type",
		    "request bodies must be application/json");
		return (KORE_RESULT_ERROR);
	}

	if (len > REST_BODY_MAX) {
		rest_error(req, HTTP_STATUS_REQUEST_ENTITY_TOO_LARGE,
		    "payload_too_large", "the request body is too large");
		return (KORE_RESULT_ERROR);
	}

	if ((*out = json_parse(req->http_body->data, len)) == NULL) {
		rest_error(req, HTTP_STATUS_BAD_REQUEST, "invalid_json",
		    "the body is not valid JSON");
		return (KORE_RESULT_ERROR);
	}

	if (!YAJL_IS_OBJECT(*out)) {
		yajl_tree_free(*out);
		*out = NULL;
		rest_error(req, HTTP_STATUS_BAD_REQUEST, "invalid_payload",
		    "the body must be a JSON object");
		return (KORE_RESULT_ERROR);
	}

	if (json_has_nul(req->http_body->data, len)) {
		yajl_tree_free(*out);
		*out = NULL;
		rest_error(req, HTTP_STATUS_BAD_REQUEST, "invalid_payload",
		    "strings may not contain U+0000");
		return (KORE_RESULT_ERROR);
	}

	return (KORE_RESULT_OK);
}

/*
 * Run one query for this request and answer with its result: by default
 * the text of row 0, column 0 with `ok_status`; `finish` (optional) may
 * pick another status or body. Returns what the handler must return.
 */
int
rest_query(struct http_request *req, int ok_status, const char *sql,
    int nparams, const char *const *params, rest_finish_fn finish)
{
	struct rest_call	*call;
	struct db_query		*q;

	call = rest_call_new(req);
	call->ok_status = ok_status;
	call->finish = finish;

	/* The callback may run at once when the database is down. */
	q = db_query(sql, nparams, params, rest_query_done, req);
	if (call->done)
		return (rest_resume(req));

	call->query = q;
	http_request_sleep(req);
	return (KORE_RESULT_RETRY);
}

/*
 * Sleep until rest_answer(), for a request that something else answers
 * (a batched call); release(ctx), when given, runs when the request ends,
 * answered or not.
 */
int
rest_wait(struct http_request *req, void *ctx, void (*release)(void *))
{
	struct rest_call	*call;

	call = rest_call_new(req);
	call->ctx = ctx;
	call->release = release;

	http_request_sleep(req);
	return (KORE_RESULT_RETRY);
}

/* Where a waiting request's answer goes, before rest_answer(). */
struct kore_buf *
rest_answer_body(struct http_request *req)
{
	struct rest_call	*call;

	call = http_state_get(req);
	return (call->body);
}

void
rest_answer(struct http_request *req, int status)
{
	struct rest_call	*call;

	call = http_state_get(req);
	call->done = 1;
	call->status = status;
	http_request_wakeup(req);
}

/*
 * Answer with bytes the waiter keeps (until its release runs), rather
 * than a copy of them in the body.
 */
void
rest_answer_kept(struct http_request *req, int status, const void *data,
    size_t len)
{
	struct rest_call	*call;

	call = http_state_get(req);
	call->kept = data;
	call->kept_len = len;
	rest_answer(req, status);
}

/* Called again by Kore after the wakeup: send what the query produced. */
int
rest_resume(struct http_request *req)
{
	struct rest_call	*call;

	call = http_state_get(req);
	if (!call->done)
		return (KORE_RESULT_RETRY);

	if (call->kept != NULL)
		rest_reply(req, call->status, call->kept, call->kept_len);
	else
		rest_reply(req, call->status, call->body->data,
		    call->body->offset);
	return (KORE_RESULT_OK);
}

static void
rest_query_done(struct db_result *r, void *arg)
{
	struct http_request	*req = arg;
	struct rest_call	*call;
	int			status;

	call = http_state_get(req);
	call->query = NULL;

	if (!r->ok) {
		status = r->status;
		rest_error_body(call->body, r->code, r->message);
	} else if (call->finish != NULL) {
		status = call->finish(r, call->ok_status, call->body);
	} else if (PQntuples(r->res) == 1 && PQnfields(r->res) >= 1) {
		status = call->ok_status;
		kore_buf_append(call->body, PQgetvalue(r->res, 0, 0),
		    PQgetlength(r->res, 0, 0));
	} else {
		status = HTTP_STATUS_INTERNAL_ERROR;
		rest_error_body(call->body, "internal", "empty result");
	}

	rest_answer(req, status);
}

static struct rest_call *
rest_call_new(struct http_request *req)
{
	struct rest_call	*call;

	call = http_state_create(req, sizeof(*call), rest_call_free);
	call->body = kore_buf_alloc(256);

	return (call);
}

static void
rest_call_free(struct http_request *req)
{
	struct rest_call	*call;

	call = http_state_get(req);
	if (!call->done)
		db_cancel(call->query);
	if (call->release != NULL)
		call->release(call->ctx);
	kore_buf_free(call->body);
	http_state_cleanup(req);
}

void
rest_error_body(struct kore_buf *buf, const char *code, const char *message)
{
	kore_buf_reset(buf);
	kore_buf_appendf(buf, "{\"error\":{\"code\":");
	json_append_string(buf, code, strlen(code));
	kore_buf_appendf(buf, ",\"message\":");
	json_append_string(buf, message, strlen(message));
	kore_buf_appendf(buf, "}}");
}

/* Every path no route claims: JSON 404 whatever the token. */
int
rest_not_found(struct http_request *req)
{
	rest_error(req, HTTP_STATUS_NOT_FOUND, "not_found", "no such resource");
	return (KORE_RESULT_OK);
}

/*
 * Validating REST input. Every helper that rejects something answers
 * 400 invalid_payload itself and returns KORE_RESULT_ERROR, so handlers
 * only return KORE_RESULT_OK when a helper fails.
 */
int
rest_invalid(struct http_request *req, const char *message)
{
	rest_error(req, HTTP_STATUS_BAD_REQUEST, "invalid_payload", message);
	return (KORE_RESULT_ERROR);
}

/*
 * The paging parameters of a list: `limit` (a positive integer, `def`
 * when absent, clamped to `max`: a number past 64 bits is just large),
 * `before` (an id, or with REST_PAGE_CURSOR the list's opaque cursor) and
 * with REST_PAGE_AFTER `after` (an id; 0 is "from the start", as on the
 * socket). Ids come back in canonical decimal, ready as query parameters.
 */
int
rest_page(struct http_request *req, int64_t def, int64_t max, int flags,
    struct rest_page *page)
{
	char		*v, *digits;
	int64_t		n;
	int		ok;

	memset(page, 0, sizeof(*page));

	n = def;
	if ((v = rest_param(req, "limit")) != NULL) {
		if ((ok = rest_digits(v))) {
			digits = v + strspn(v, "0");
			if (*digits == '\0')
				ok = 0;
			else if (strlen(digits) > 18)
				n = max;
			else
				ok = util_parse_int64(digits, 1, INT64_MAX, &n);
		}
		kore_free(v);
		if (!ok)
			return (rest_invalid(req,
			    "limit must be a positive integer"));
		if (n > max)
			n = max;
	}
	(void)snprintf(page->limit, sizeof(page->limit), "%lld",
	    (long long)n);

	if ((v = rest_param(req, "before")) != NULL) {
		if (flags & REST_PAGE_CURSOR) {
			ok = *v != '\0' &&
			    strspn(v, "0123456789_-") == strlen(v) &&
			    kore_strlcpy(page->before_buf, v,
			    sizeof(page->before_buf)) <
			    sizeof(page->before_buf);
		} else {
			ok = rest_id_value(v, 1, page->before_buf,
			    sizeof(page->before_buf));
		}
		kore_free(v);
		if (!ok)
			return (rest_invalid(req, (flags & REST_PAGE_CURSOR) ?
			    "before must be a next_before cursor" :
			    "before must be a positive integer"));
		page->before = page->before_buf;
	}

	if ((flags & REST_PAGE_AFTER) &&
	    (v = rest_param(req, "after")) != NULL) {
		ok = rest_id_value(v, 0, page->after_buf,
		    sizeof(page->after_buf));
		kore_free(v);
		if (!ok)
			return (rest_invalid(req,
			    "after must be a non-negative integer"));
		page->after = page->after_buf;
	}

	return (KORE_RESULT_OK);
}

/* A true/false query parameter; *out is left alone when it is absent. */
int
rest_param_bool(struct http_request *req, const char *name, int *out)
{
	char		*v, msg[96];
	int		ok;

	if ((v = rest_param(req, name)) == NULL)
		return (KORE_RESULT_OK);

	ok = 1;
	if (!strcmp(v, "true") || !strcmp(v, "1"))
		*out = 1;
	else if (!strcmp(v, "false") || !strcmp(v, "0"))
		*out = 0;
	else
		ok = 0;
	kore_free(v);

	if (!ok) {
		(void)snprintf(msg, sizeof(msg), "%s must be true or false",
		    name);
		return (rest_invalid(req, msg));
	}

	return (KORE_RESULT_OK);
}

/*
 * The path's id, in decimal. The route's regex only lets digits through;
 * 0, or a number past 64 bits, is no id: 404 whatever the token, like a
 * path no route takes, so handlers check it before the token.
 */
int
rest_path_id(struct http_request *req, char *buf, size_t len)
{
	int64_t		id;

	if (!util_path_id(req, &id)) {
		(void)rest_not_found(req);
		return (KORE_RESULT_ERROR);
	}

	(void)snprintf(buf, len, "%lld", (long long)id);
	return (KORE_RESULT_OK);
}

/* A member of a JSON object; JSON null counts as absent. */
yajl_val
rest_member(yajl_val obj, const char *name)
{
	const char	*path[] = { name, NULL };
	yajl_val	v;

	if (obj == NULL || !YAJL_IS_OBJECT(obj))
		return (NULL);

	v = yajl_tree_get(obj, path, yajl_t_any);
	return (v != NULL && YAJL_IS_NULL(v) ? NULL : v);
}

/* A user id in JSON: a string of 1-64 bytes, or an integer (7 is "7"). */
int
rest_user_id(yajl_val v, char *out, size_t len)
{
	size_t		n;

	if (v != NULL && YAJL_IS_INTEGER(v)) {
		(void)snprintf(out, len, "%lld", YAJL_GET_INTEGER(v));
		return (KORE_RESULT_OK);
	}

	if (v == NULL || !YAJL_IS_STRING(v))
		return (KORE_RESULT_ERROR);

	n = strlen(v->u.string);
	if (n < 1 || n > PARLEY_USER_ID_MAX || n >= len)
		return (KORE_RESULT_ERROR);

	(void)kore_strlcpy(out, v->u.string, len);
	return (KORE_RESULT_OK);
}

/*
 * A send message_parse() refused, as REST answers it: 403 for a type the
 * caller may not send, 400 otherwise. unknown_type is a socket event
 * code; over REST a body that names another event is just invalid.
 */
void
rest_message_error(struct http_request *req, const struct message_in *m)
{
	if (!strcmp(m->error, "forbidden_type")) {
		rest_error(req, HTTP_STATUS_FORBIDDEN, m->error, m->detail);
	} else if (!strcmp(m->error, "unknown_type")) {
		rest_error(req, HTTP_STATUS_BAD_REQUEST, "invalid_payload",
		    "type names another event, not a message");
	} else {
		rest_error(req, HTTP_STATUS_BAD_REQUEST, m->error, m->detail);
	}
}

/*
 * A rest_finish_fn for functions returning (created boolean, body text):
 * `ok_status` (201) when something was created, 200 when an existing one
 * was found.
 */
int
rest_finish_created(struct db_result *r, int ok_status, struct kore_buf *body)
{
	if (PQntuples(r->res) != 1 || PQnfields(r->res) != 2 ||
	    PQgetisnull(r->res, 0, 0) || PQgetisnull(r->res, 0, 1)) {
		rest_error_body(body, "internal", "empty result");
		return (HTTP_STATUS_INTERNAL_ERROR);
	}

	kore_buf_append(body, PQgetvalue(r->res, 0, 1),
	    PQgetlength(r->res, 0, 1));

	return (!strcmp(PQgetvalue(r->res, 0, 0), "t") ? ok_status :
	    HTTP_STATUS_OK);
}

/*
 * The URL-decoded value of query parameter `name`, NULL when absent. A
 * value never decodes longer than the query string, so a buffer of that
 * size tells a long value from a missing one (util_query_get cannot).
 */
static char *
rest_param(struct http_request *req, const char *name)
{
	char		*buf;
	size_t		len;

	if (req->query_string == NULL)
		return (NULL);

	len = strlen(req->query_string) + 1;
	buf = kore_malloc(len);
	if (!util_query_get(req, name, buf, len)) {
		kore_free(buf);
		return (NULL);
	}

	return (buf);
}

/* Decimal digits only: no sign, space, point or exponent. */
static int
rest_digits(const char *s)
{
	if (*s == '\0')
		return (0);

	for (; *s != '\0'; s++) {
		if (!isdigit((unsigned char)*s))
			return (0);
	}

	return (1);
}

static int
rest_id_value(const char *s, int64_t min, char *out, size_t len)
{
	int64_t		id;

	if (!rest_digits(s) || !util_parse_int64(s, min, INT64_MAX, &id))
		return (KORE_RESULT_ERROR);

	(void)snprintf(out, len, "%lld", (long long)id);
	return (KORE_RESULT_OK);
}
