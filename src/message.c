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
 * A send, in any of the four forms PROTOCOL.md section 2 accepts, turned
 * into one validated message. The chat socket and REST both use it, and
 * both store the result with the same parley_post_message() call.
 */

#include <sys/types.h>

#include <math.h>
#include <string.h>

#include "parley.h"

#define METADATA_MAX		2048

static const char *message_types[] = {
	"TEXT", "LOCATION", "IMAGE", "FILE", "SYSTEM", NULL
};

static int	message_fail(struct message_in *, const char *, const char *);
static const char *message_string(yajl_val, const char *, int *);
static int	message_metadata(struct message_in *, yajl_val);
static int	message_number_in(yajl_val, const char *, double, double);
static void	message_trim(struct message_in *, const char *);
static void	message_render_string(struct kore_buf *, PGresult *, int,
		    int, const char *);

/* Whether `type` names a message type (the compatibility form's type). */
int
message_is_type(const char *type)
{
	int		i;

	for (i = 0; message_types[i] != NULL; i++) {
		if (!strcmp(type, message_types[i]))
			return (1);
	}

	return (0);
}

/*
 * Validate the send in `root`. On failure m->error and m->detail say why
 * (a protocol error code); m->client_id is kept when it was valid, for
 * the error's ref. `service` allows SYSTEM messages.
 */
int
message_parse(yajl_val root, int service, struct message_in *m)
{
	const char	*type, *content, *mtype;
	int		bad;

	memset(m, 0, sizeof(*m));

	bad = 0;
	type = message_string(root, "type", &bad);
	if (bad)
		return (message_fail(m, "invalid_payload", "type is a string"));

	if ((content = message_string(root, "client_id", &bad)) != NULL) {
		if (strlen(content) < 1 || strlen(content) > PARLEY_CLIENT_ID_MAX)
			return (message_fail(m, "invalid_payload",
			    "client_id is 1-64 bytes"));
		(void)kore_strlcpy(m->client_id, content, sizeof(m->client_id));
		m->has_client_id = 1;
	}
	if (bad)
		return (message_fail(m, "invalid_payload",
		    "client_id is a string"));

	/* {"message":"Hello","type":"TEXT"}: type is the message type. */
	if (type != NULL && message_is_type(type)) {
		mtype = type;
		content = message_string(root, "message", &bad);
	} else {
		if (type != NULL && strcmp(type, "message") &&
		    strcmp(type, "send_message"))
			return (message_fail(m, "unknown_type",
			    "unknown event type"));
		mtype = message_string(root, "message_type", &bad);
		if (bad)
			return (message_fail(m, "invalid_payload",
			    "message_type is a string"));
		content = message_string(root, "content", &bad);
		if (content == NULL && !bad)
			content = message_string(root, "text", &bad);
		if (content == NULL && !bad)
			content = message_string(root, "message", &bad);
	}
	if (bad)
		return (message_fail(m, "invalid_payload",
		    "the message text is a string"));

	if (mtype == NULL)
		mtype = "TEXT";
	if (!message_is_type(mtype))
		return (message_fail(m, "invalid_payload",
		    "unknown message type"));
	(void)kore_strlcpy(m->type, mtype, sizeof(m->type));

	if (!strcmp(m->type, "SYSTEM") && !service)
		return (message_fail(m, "forbidden_type",
		    "SYSTEM messages are for the service API"));

	if (!message_metadata(m, root))
		return (KORE_RESULT_ERROR);

	message_trim(m, content != NULL ? content : "");

	if (m->content_len == 0 && (!strcmp(m->type, "TEXT") ||
	    !strcmp(m->type, "SYSTEM")))
		return (message_fail(m, "empty_message", "the message is empty"));

	if (json_utf8_length((const u_int8_t *)m->content, m->content_len) >
	    (size_t)parley_cfg.max_message_chars)
		return (message_fail(m, "message_too_long",
		    "the message is too long"));

	return (KORE_RESULT_OK);
}

void
message_cleanup(struct message_in *m)
{
	kore_free(m->content);
	kore_free(m->metadata);
	m->content = NULL;
	m->metadata = NULL;
}

static int
message_fail(struct message_in *m, const char *code, const char *detail)
{
	message_cleanup(m);
	m->error = code;
	m->detail = detail;
	return (KORE_RESULT_ERROR);
}

/* A string member; *bad is set when it is there but not a string. */
static const char *
message_string(yajl_val root, const char *name, int *bad)
{
	const char	*path[] = { name, NULL };
	yajl_val	v;

	if ((v = yajl_tree_get(root, path, yajl_t_any)) == NULL ||
	    YAJL_IS_NULL(v))
		return (NULL);

	if (!YAJL_IS_STRING(v)) {
		*bad = 1;
		return (NULL);
	}

	return (v->u.string);
}

/* Optional object of at most 2 KiB; some types require keys in it. */
static int
message_metadata(struct message_in *m, yajl_val root)
{
	const char	*path[] = { "metadata", NULL };
	const char	*url;
	struct kore_buf	buf;
	yajl_val	md;
	int		bad;

	md = yajl_tree_get(root, path, yajl_t_any);
	if (md != NULL && YAJL_IS_NULL(md))
		md = NULL;

	if (md != NULL && !YAJL_IS_OBJECT(md))
		return (message_fail(m, "invalid_payload",
		    "metadata is an object"));

	if (!strcmp(m->type, "LOCATION")) {
		if (md == NULL || !message_number_in(md, "lat", -90, 90) ||
		    !message_number_in(md, "lng", -180, 180))
			return (message_fail(m, "invalid_payload",
			    "LOCATION needs metadata lat (-90..90) and "
			    "lng (-180..180)"));
	}

	if (!strcmp(m->type, "IMAGE") || !strcmp(m->type, "FILE")) {
		bad = 0;
		url = md != NULL ? message_string(md, "url", &bad) : NULL;
		if (url == NULL || (strncmp(url, "https://", 8) &&
		    (url[0] != '/' || url[1] == '/' || url[1] == '\0')))
			return (message_fail(m, "invalid_payload",
			    "IMAGE and FILE need metadata url: https://... "
			    "or a path starting with one /"));
	}

	if (md == NULL)
		return (KORE_RESULT_OK);

	kore_buf_init(&buf, 256);
	if (!json_serialize(&buf, md) || buf.offset > METADATA_MAX) {
		kore_buf_cleanup(&buf);
		return (message_fail(m, "invalid_payload",
		    "metadata is at most 2 KiB of JSON whose numbers fit a "
		    "double"));
	}

	m->metadata = kore_strdup(kore_buf_stringify(&buf, NULL));
	kore_buf_cleanup(&buf);

	return (KORE_RESULT_OK);
}

static int
message_number_in(yajl_val obj, const char *name, double min, double max)
{
	const char	*path[] = { name, NULL };
	yajl_val	v;
	double		d;

	if ((v = yajl_tree_get(obj, path, yajl_t_any)) == NULL ||
	    !YAJL_IS_NUMBER(v))
		return (0);

	d = YAJL_IS_INTEGER(v) ? (double)v->u.number.i : v->u.number.d;
	return (isfinite(d) && d >= min && d <= max);
}

/*
 * A page of history from rows [from, to) of res (parley_history's
 * columns): the message objects, oldest first, and has_more from the row
 * whose `extra` column marks it as the one past the page.
 */
void
message_page(struct kore_buf *body, PGresult *res, int from, int to)
{
	int		i, more, first;

	more = 0;
	first = 1;

	UTIL_BUF_LITERAL(body, "{\"messages\":[");
	for (i = from; i < to; i++) {
		if (*PQgetvalue(res, i, MESSAGE_COLUMNS) == 't') {
			more = 1;
			continue;
		}
		if (!first)
			UTIL_BUF_LITERAL(body, ",");
		first = 0;
		message_render(body, res, i);
	}
	kore_buf_appendf(body, "],\"has_more\":%s}", more ? "true" : "false");
}

/*
 * Append the message object of PROTOCOL.md for row `row` of `res`, whose
 * first MESSAGE_COLUMNS columns are parley_history()'s: id,
 * conversation_id, sender_id, sender_name, content, type, metadata (JSON
 * text), client_id, timestamp, is_read. Live frames get the same object
 * from parley_message_json() in SQL; a test holds the two to each other.
 */
void
message_render(struct kore_buf *buf, PGresult *res, int row)
{
	const char	*ts;
	size_t		len;
	int		col;

	len = 256;
	for (col = 0; col < MESSAGE_COLUMNS; col++)
		len += PQgetlength(res, row, col);
	util_buf_reserve(buf, len);

	UTIL_BUF_LITERAL(buf, "{\"id\":");
	kore_buf_append(buf, PQgetvalue(res, row, 0), PQgetlength(res, row, 0));
	UTIL_BUF_LITERAL(buf, ",\"conversation_id\":");
	kore_buf_append(buf, PQgetvalue(res, row, 1), PQgetlength(res, row, 1));
	message_render_string(buf, res, row, 2, ",\"sender_id\":");
	message_render_string(buf, res, row, 3, ",\"sender_name\":");
	message_render_string(buf, res, row, 4, ",\"message_text\":");
	message_render_string(buf, res, row, 4, ",\"content\":");
	message_render_string(buf, res, row, 5, ",\"message_type\":");

	UTIL_BUF_LITERAL(buf, ",\"metadata\":");
	if (PQgetisnull(res, row, 6))
		UTIL_BUF_LITERAL(buf, "null");
	else
		kore_buf_append(buf, PQgetvalue(res, row, 6),
		    PQgetlength(res, row, 6));

	message_render_string(buf, res, row, 7, ",\"client_id\":");

	/* The timestamp is ASCII, under both of its names. */
	ts = PQgetvalue(res, row, 8);
	len = PQgetlength(res, row, 8);
	UTIL_BUF_LITERAL(buf, ",\"timestamp\":\"");
	kore_buf_append(buf, ts, len);
	UTIL_BUF_LITERAL(buf, "\",\"created_at\":\"");
	kore_buf_append(buf, ts, len);
	UTIL_BUF_LITERAL(buf, "\"");
	if (*PQgetvalue(res, row, 9) == 't')
		UTIL_BUF_LITERAL(buf, ",\"is_read\":true}");
	else
		UTIL_BUF_LITERAL(buf, ",\"is_read\":false}");
}

/* `key` (,"name":) and the column as a JSON string, or null. */
static void
message_render_string(struct kore_buf *buf, PGresult *res, int row, int col,
    const char *key)
{
	kore_buf_append(buf, key, strlen(key));
	if (PQgetisnull(res, row, col))
		UTIL_BUF_LITERAL(buf, "null");
	else
		json_append_string(buf, PQgetvalue(res, row, col),
		    PQgetlength(res, row, col));
}

/* Content without surrounding whitespace (ASCII and U+00A0). */
static void
message_trim(struct message_in *m, const char *s)
{
	const char	*end;

	for (;;) {
		if (*s == ' ' || (*s >= '\t' && *s <= '\r'))
			s++;
		else if ((u_int8_t)s[0] == 0xc2 && (u_int8_t)s[1] == 0xa0)
			s += 2;
		else
			break;
	}

	end = s + strlen(s);
	for (;;) {
		if (end > s && (end[-1] == ' ' ||
		    (end[-1] >= '\t' && end[-1] <= '\r')))
			end--;
		else if (end - s >= 2 && (u_int8_t)end[-2] == 0xc2 &&
		    (u_int8_t)end[-1] == 0xa0)
			end -= 2;
		else
			break;
	}

	m->content_len = (size_t)(end - s);
	m->content = kore_malloc(m->content_len + 1);
	memcpy(m->content, s, m->content_len);
	m->content[m->content_len] = '\0';
}
