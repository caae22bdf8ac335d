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
 * The chat socket, /ws/chat/{conversation_id}/ (PROTOCOL.md section 2):
 * sends, typing and reads. Each is one call of a stored function; what the
 * other sockets see comes back through the bus, never from here.
 */

#include <sys/types.h>

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "parley.h"

#define TYPING_EXPIRE_MS	6000
#define TYPING_RELAY_MS		1000
#define CHAT_CATCHUP_LIMIT	500

int	ws_chat(struct http_request *);

static int	chat_send(struct session *, yajl_val, u_int64_t);
static void	chat_ack(struct session *, const char *);
static int	chat_read(struct session *, yajl_val);
static void	chat_read_done(struct db_result *, void *);
static int	chat_typing(struct session *, yajl_val);
static void	chat_emit_typing(struct session *, int);
static const char *chat_error_code(int, const char *);
static void	chat_catch_up(struct session *, int64_t);
static void	chat_caught_up(struct db_result *, void *);
static void	chat_state_catch_up(struct session *, int64_t);
static void	chat_state_caught_up(struct db_result *, void *);
static int	chat_catch_up_answered(struct session *, struct db_result *);

int
ws_chat(struct http_request *req)
{
	int64_t		id;

	if (!util_path_id(req, &id))
		return (rest_not_found(req));

	return (ws_handshake(req, SESSION_CHAT, id));
}

/* Ready is out: replay from `after`, or go live from the latest id. */
void
chat_opened(struct session *s, const char *frame)
{
	const char	*path[] = { "last_message_id", NULL };
	yajl_val	ready, v;
	int64_t		last;

	last = 0;
	ready = json_parse(frame, strlen(frame));
	if (ready != NULL &&
	    (v = yajl_tree_get(ready, path, yajl_t_any)) != NULL &&
	    YAJL_IS_INTEGER(v))
		last = v->u.number.i;
	yajl_tree_free(ready);

	if (s->after >= 0) {
		ws_sync(s, s->after, 200);
		return;
	}

	chat_go_live(s, last);
}

/*
 * The socket has every message up to `last` (its ready frame, or its
 * replay): send what was held back meanwhile and go live. Unless the
 * LISTEN came back since that was asked: what was stored in between and
 * before the LISTEN was back reached no socket here, and the catch-up of
 * the conversation (bus_up) is for sockets already live. It is fetched
 * first, live frames still held back, then the read receipts and presence
 * of that time.
 */
void
chat_go_live(struct session *s, int64_t last)
{
	if (s->bus_ups != bus_ups()) {
		s->state_ups = s->bus_ups;
		s->bus_ups = bus_ups();
		chat_catch_up(s, last);
		return;
	}

	hub_hold_release(s, last);
	ws_event_done(s);
}

static void
chat_catch_up(struct session *s, int64_t after)
{
	const char	*params[3];
	char		conv[24], a[24], limit[16];

	s->sync_after = after;

	(void)snprintf(conv, sizeof(conv), "%lld",
	    (long long)s->conversation_id);
	(void)snprintf(a, sizeof(a), "%lld", (long long)after);
	(void)snprintf(limit, sizeof(limit), "%d", CHAT_CATCHUP_LIMIT);
	params[0] = conv;
	params[1] = a;
	params[2] = limit;

	ws_query(s, "SELECT id, frame FROM parley_catchup($1, $2, $3)", 3,
	    params, chat_caught_up);
}

/* A full page: there may be more. */
static void
chat_caught_up(struct db_result *r, void *arg)
{
	struct session	*s = arg;
	int64_t		id, last;
	int		i, n;

	if (!chat_catch_up_answered(s, r))
		return;

	last = s->sync_after;
	n = PQntuples(r->res);
	for (i = 0; i < n && s->state == SESSION_OPEN; i++) {
		if (!util_parse_int64(PQgetvalue(r->res, i, 0), 1, INT64_MAX,
		    &id))
			continue;
		last = id;
		if (id > s->last_seq) {
			s->last_seq = id;
			ws_send(s, PQgetvalue(r->res, i, 1),
			    PQgetlength(r->res, i, 1));
		}
	}

	if (s->state != SESSION_OPEN)
		return;

	if (n == CHAT_CATCHUP_LIMIT)
		chat_catch_up(s, last);
	else
		chat_state_catch_up(s, last);
}

/* The read receipts and presence of the window, after its messages. */
static void
chat_state_catch_up(struct session *s, int64_t last)
{
	const char	*params[2];
	char		conv[24];

	s->sync_after = last;
	params[1] = bus_since(s->state_ups);
	if (params[1][0] == '\0') {
		chat_go_live(s, last);
		return;
	}

	(void)snprintf(conv, sizeof(conv), "%lld",
	    (long long)s->conversation_id);
	params[0] = conv;
	ws_query(s, "SELECT skip_user, frame FROM "
	    "parley_conversation_catchup($1, $2)", 2, params,
	    chat_state_caught_up);
}

/* Read receipts, and presence but the user's own, as the bus sends them. */
static void
chat_state_caught_up(struct db_result *r, void *arg)
{
	struct session	*s = arg;
	int		i;

	if (!chat_catch_up_answered(s, r))
		return;

	for (i = 0; i < PQntuples(r->res) && s->state == SESSION_OPEN; i++) {
		if (PQgetisnull(r->res, i, 0) ||
		    strcmp(PQgetvalue(r->res, i, 0), s->ident.user_id)) {
			ws_send(s, PQgetvalue(r->res, i, 1),
			    PQgetlength(r->res, i, 1));
		}
	}

	if (s->state == SESSION_OPEN)
		chat_go_live(s, s->sync_after);
}

/* A catch-up that cannot be had closes the socket: its client comes back. */
static int
chat_catch_up_answered(struct session *s, struct db_result *r)
{
	s->query = NULL;
	if (!r->ok || PQnfields(r->res) != 2) {
		ws_close(s, WS_CLOSE_TRY_AGAIN, "try_again_later");
		return (0);
	}

	return (1);
}

int
chat_event(struct session *s, const char *type, yajl_val root, u_int64_t recv)
{
	if (!strcmp(type, "message") || !strcmp(type, "send_message") ||
	    message_is_type(type))
		return (chat_send(s, root, recv));

	if (!strcmp(type, "typing"))
		return (chat_typing(s, root));

	if (!strcmp(type, "read"))
		return (chat_read(s, root));

	ws_error(s, "unknown_type", "unknown event type", NULL);
	return (WS_EVENT_DONE);
}

/* The client forgot to say it stopped typing. */
void
chat_typing_expired(struct session *s)
{
	s->typing_until = 0;
	chat_emit_typing(s, 0);
}

static int
chat_send(struct session *s, yajl_val root, u_int64_t recv)
{
	struct message_in	m;

	if (!message_parse(root, 0, &m)) {
		ws_error(s, m.error, m.detail,
		    m.has_client_id ? m.client_id : NULL);
		return (WS_EVENT_DONE);
	}

	(void)kore_strlcpy(s->send_ref, m.has_client_id ? m.client_id : "",
	    sizeof(s->send_ref));
	s->send_received = recv;

	batch_send(s, &m);
	message_cleanup(&m);

	return (WS_EVENT_WAIT);
}

/*
 * The send's batch came back: body is parley_post_message's answer when
 * status is 200, else code and message say why it was refused.
 */
void
chat_sent(struct session *s, int status, const char *body, const char *code,
    const char *message)
{
	if (status == HTTP_STATUS_OK) {
		chat_ack(s, body);
	} else {
		ws_error(s, chat_error_code(status, code), message,
		    s->send_ref[0] != '\0' ? s->send_ref : NULL);
	}

	ws_event_done(s);
}

/*
 * The message is committed: acknowledge it to this socket only. Its
 * broadcast, to this socket too, comes through the bus. `body` is
 * parley_send_ack()'s {"status","message_id","timestamp"}.
 */
static void
chat_ack(struct session *s, const char *body)
{
	const char	*status_path[] = { "status", NULL };
	const char	*id_path[] = { "message_id", NULL };
	const char	*ts_path[] = { "timestamp", NULL };
	struct kore_buf	buf;
	yajl_val	root, status, id, ts;

	root = json_parse(body, strlen(body));
	status = yajl_tree_get(root, status_path, yajl_t_string);
	id = yajl_tree_get(root, id_path, yajl_t_number);
	ts = yajl_tree_get(root, ts_path, yajl_t_string);
	if (root == NULL || status == NULL || id == NULL || ts == NULL) {
		yajl_tree_free(root);
		ws_error(s, "internal", "unexpected answer from the database",
		    s->send_ref[0] != '\0' ? s->send_ref : NULL);
		return;
	}

	if (!strcmp(status->u.string, "created"))
		metrics_message_stored();
	metrics_send_latency((kore_time_ms() - s->send_received) * 1000);

	kore_buf_init(&buf, 128);
	kore_buf_appendf(&buf, "{\"type\":\"ack\",\"client_id\":");
	if (s->send_ref[0] != '\0')
		json_append_string(&buf, s->send_ref, strlen(s->send_ref));
	else
		kore_buf_appendf(&buf, "null");
	kore_buf_appendf(&buf, ",\"message_id\":%s,\"timestamp\":",
	    id->u.number.r);
	json_append_string(&buf, ts->u.string, strlen(ts->u.string));
	kore_buf_appendf(&buf, "}");

	ws_send(s, buf.data, buf.offset);
	kore_buf_cleanup(&buf);
	yajl_tree_free(root);
}

/* Socket error codes for a failed call (PROTOCOL.md section 2). */
static const char *
chat_error_code(int status, const char *code)
{
	switch (status) {
	case HTTP_STATUS_BAD_REQUEST:
	case HTTP_STATUS_CONFLICT:
		return (code);
	case HTTP_STATUS_FORBIDDEN:
	case HTTP_STATUS_NOT_FOUND:
		return ("forbidden");
	default:
		return ("internal");
	}
}

static int
chat_read(struct session *s, yajl_val root)
{
	const char	*params[3];
	char		conv[24], id[24];
	int64_t		message_id;

	if (!ws_int_field(root, "message_id", 0, INT64_MAX, &message_id)) {
		ws_error(s, "invalid_payload",
		    "message_id is a message id", NULL);
		return (WS_EVENT_DONE);
	}

	(void)snprintf(conv, sizeof(conv), "%lld",
	    (long long)s->conversation_id);
	(void)snprintf(id, sizeof(id), "%lld", (long long)message_id);
	params[0] = conv;
	params[1] = s->ident.user_id;
	params[2] = message_id == -1 ? NULL : id;

	ws_query(s, "SELECT parley_mark_read($1, $2, $3)", 3, params,
	    chat_read_done);

	return (WS_EVENT_WAIT);
}

/* The read_receipt comes through the bus, to this socket too. */
static void
chat_read_done(struct db_result *r, void *arg)
{
	struct session	*s = arg;

	s->query = NULL;
	if (!r->ok)
		ws_error(s, chat_error_code(r->status, r->code), r->message,
		    NULL);

	ws_event_done(s);
}

/*
 * Typing is relayed at most once a second while it goes on, and expires
 * six seconds after the last is_typing:true.
 */
static int
chat_typing(struct session *s, yajl_val root)
{
	const char	*path[] = { "is_typing", NULL };
	yajl_val	v;
	u_int64_t	now;

	v = yajl_tree_get(root, path, yajl_t_any);
	if (v == NULL || !(YAJL_IS_TRUE(v) || YAJL_IS_FALSE(v))) {
		ws_error(s, "invalid_payload", "is_typing is a boolean", NULL);
		return (WS_EVENT_DONE);
	}

	now = kore_time_ms();
	if (YAJL_IS_TRUE(v)) {
		if (s->typing_until == 0 ||
		    now - s->typing_relayed >= TYPING_RELAY_MS) {
			s->typing_relayed = now;
			chat_emit_typing(s, 1);
		}
		s->typing_until = now + TYPING_EXPIRE_MS;
	} else if (s->typing_until != 0) {
		s->typing_until = 0;
		chat_emit_typing(s, 0);
	}

	return (WS_EVENT_DONE);
}

/* Not stored: a NOTIFY through the database, like everything else. */
static void
chat_emit_typing(struct session *s, int typing)
{
	const char	*params[3];
	char		conv[24];

	(void)snprintf(conv, sizeof(conv), "%lld",
	    (long long)s->conversation_id);
	params[0] = conv;
	params[1] = s->ident.user_id;
	params[2] = typing ? "t" : "f";

	(void)db_query("SELECT parley_emit_typing($1, $2, $3)", 3, params,
	    NULL, NULL);
}
