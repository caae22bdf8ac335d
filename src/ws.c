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
 * What the chat and notification sockets share, and what Kore leaves to
 * the application (DESIGN.md): the Origin check, tokens and the subprotocol
 * answer at the handshake; close codes; frame, rate and output limits;
 * server pings, idle and token-expiry closes; ordered processing of each
 * socket's events; the drain on SIGTERM.
 */

#include <sys/types.h>
#include <sys/time.h>

#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "parley.h"

#define WS_EVENTS_MAX		64
#define WS_SWEEP_MS		1000
#define WS_NODE_BEAT_MS		10000
#define WS_BALANCE_MS		20
#define WS_CLOSE_GRACE_MS	10000
#define WS_SYNC_DEFAULT		200
#define WS_SYNC_MAX		500

static int	ws_event(struct session *, const char *, yajl_val, u_int64_t);
static void	ws_pong(struct session *);
static void	ws_auth(struct session *, yajl_val);
static void	ws_synced(struct db_result *, void *);
static void	ws_replay(struct session *, PGresult *, int,
		    struct kore_buf *);
static int	ws_origin_allowed(struct http_request *);
static int	ws_offers_parley(struct http_request *);
static void	ws_reject(struct session *, int);
static int	ws_rate_ok(struct session *, u_int64_t, yajl_val);
static int	ws_is_send(struct session *, const char *);
static void	ws_process(struct session *);
static size_t	ws_pending_bytes(struct connection *);
static const char *ws_ref(yajl_val);
static void	ws_unregister(struct session *);
static void	ws_sweep(void *, u_int64_t);
static void	ws_node_beat(void *, u_int64_t);
static void	ws_run_loop(u_int64_t, int (*)(void));
static int	ws_sends_pending(void);
static void	ws_balance(void *, u_int64_t);
static int	ws_queries_pending(void);

void	ws_on_connect(struct connection *);
void	ws_on_message(struct connection *, u_int8_t, const void *, size_t);
void	ws_on_disconnect(struct connection *);

char				ws_node[64];
static TAILQ_HEAD(, session)	ws_sessions;
static u_int64_t		ws_next_id;
static int			ws_is_draining;
static struct kore_buf		ws_frame;

void
ws_init(void)
{
	TAILQ_INIT(&ws_sessions);
	kore_buf_init(&ws_frame, 1024);

	/* This worker's name in the database's socket registry. */
	(void)snprintf(ws_node, sizeof(ws_node), "%d-%llu-%08x",
	    (int)getpid(), (unsigned long long)kore_time_ms(), arc4random());

	(void)kore_timer_add(ws_sweep, WS_SWEEP_MS, NULL, 0);
	(void)kore_timer_add(ws_node_beat, WS_NODE_BEAT_MS, NULL, 0);
	(void)kore_timer_add(ws_balance, WS_BALANCE_MS, NULL, 0);
}

/*
 * The handshake of both sockets. Origin is checked before the upgrade
 * (HTTP 403); identity and access are checked after it, so that failures
 * can carry the protocol's close codes.
 */
int
ws_handshake(struct http_request *req, int kind, int64_t conversation_id)
{
	struct session	*s;
	const char	*key, *version;
	char		buf[32];
	int64_t		after;

	if (!rest_method(req, HTTP_METHOD_GET))
		return (KORE_RESULT_OK);

	if (ws_is_draining) {
		rest_error(req, HTTP_STATUS_SERVICE_UNAVAILABLE, "unavailable",
		    "the server is shutting down");
		return (KORE_RESULT_OK);
	}

	if (!ws_origin_allowed(req)) {
		metrics_rejected(METRICS_REJECT_ORIGIN);
		rest_error(req, HTTP_STATUS_FORBIDDEN, "forbidden",
		    "this origin may not open sockets");
		return (KORE_RESULT_OK);
	}

	after = -1;
	if (util_query_get(req, "after", buf, sizeof(buf)) &&
	    !util_parse_int64(buf, 0, INT64_MAX, &after)) {
		metrics_rejected(METRICS_REJECT_BAD_REQUEST);
		rest_error(req, HTTP_STATUS_BAD_REQUEST, "invalid_payload",
		    "after must be a message id (0 or more)");
		return (KORE_RESULT_OK);
	}

	/*
	 * What kore_websocket_handshake refuses, refused here first: it would
	 * answer a bare 400 and leave the connection, kept alive, with a
	 * session nobody frees.
	 */
	if (!http_request_header(req, "sec-websocket-key", &key) ||
	    !http_request_header(req, "sec-websocket-version", &version) ||
	    strcmp(version, "13")) {
		metrics_rejected(METRICS_REJECT_BAD_REQUEST);
		http_response_header(req, "sec-websocket-version", "13");
		rest_error(req, HTTP_STATUS_BAD_REQUEST, "invalid_payload",
		    "this is a WebSocket endpoint (version 13)");
		return (KORE_RESULT_OK);
	}

	s = kore_calloc(1, sizeof(*s));
	s->kind = kind;
	s->conversation_id = conversation_id;
	s->after = after;
	/*
	 * A chat client has every message up to `after`: none of them is held
	 * for it (thousands may still be arriving live as it opens).
	 */
	if (kind == SESSION_CHAT && after > 0)
		s->last_seq = after;
	s->c = req->owner;
	TAILQ_INIT(&s->events);
	TAILQ_INIT(&s->held);
	s->auth = auth_request(req, TOKEN_SOURCE_SOCKET, &s->ident);

	/* Answer "parley", never the token, when the client offers it. */
	if (ws_offers_parley(req))
		http_response_header(req, "sec-websocket-protocol", "parley");

	req->owner->hdlr_extra = s;
	kore_websocket_handshake(req, "ws_on_connect", "ws_on_message",
	    "ws_on_disconnect");

	return (KORE_RESULT_OK);
}

void
ws_on_connect(struct connection *c)
{
	struct session	*s = c->hdlr_extra;

	s->id = ++ws_next_id;
	s->state = SESSION_OPENING;
	s->refilled = kore_time_ms();
	s->pinged = s->refilled;
	s->tokens = parley_cfg.rate_messages * 3;
	TAILQ_INSERT_TAIL(&ws_sessions, s, all_list);
	metrics_socket_open(s->kind, 1);
	ws_balance(NULL, 0);

	if (s->auth != AUTH_OK || s->ident.service) {
		ws_reject(s, s->auth);
		return;
	}

	/* Message frames are held back until the ready frame is out. */
	s->behind = 1;
	s->bus_ups = bus_ups();
	hub_add(s);

	batch_open(s);
}

/*
 * The socket's registration is answered (batch_open): refuse it with the
 * matching close code, or send its ready frame and let its kind go on.
 */
void
ws_opened(struct session *s, int status, const char *ready, const char *code,
    const char *message)
{
	/* Closed while opening (hub_conversation_close): stays closed. */
	if (s->state == SESSION_CLOSED)
		return;

	if (status != HTTP_STATUS_OK) {
		switch (status) {
		case HTTP_STATUS_NOT_FOUND:
		case HTTP_STATUS_FORBIDDEN:
			metrics_rejected(METRICS_REJECT_FORBIDDEN);
			ws_close(s, WS_CLOSE_FORBIDDEN, "forbidden");
			break;
		case 429:
			metrics_rejected(METRICS_REJECT_TOO_MANY);
			ws_close(s, WS_CLOSE_TOO_MANY, "too_many_connections");
			break;
		default:
			ws_close(s, WS_CLOSE_TRY_AGAIN, "try_again_later");
			break;
		}
		return;
	}

	s->registered = 1;
	s->state = SESSION_OPEN;
	ws_send(s, ready, strlen(ready));

	/* The write found the connection gone: the session is on its way out. */
	if (s->state != SESSION_OPEN)
		return;

	if (s->kind == SESSION_CHAT)
		chat_opened(s, ready);
	else
		notify_opened(s);
}

void
ws_on_message(struct connection *c, u_int8_t op, const void *data, size_t len)
{
	struct session		*s = c->hdlr_extra;
	struct ws_event		*ev;
	yajl_val		root, v;
	const char		*path[] = { "type", NULL };
	u_int64_t		now;

	if (s->state == SESSION_CLOSED)
		return;

	if (op == WEBSOCKET_OP_BINARY) {
		ws_close(s, WS_CLOSE_UNSUPPORTED, "binary_not_supported");
		return;
	}

	if (len > parley_cfg.max_frame_bytes) {
		ws_close(s, WS_CLOSE_TOO_BIG, "message_too_big");
		return;
	}

	if ((root = json_parse(data, len)) == NULL) {
		ws_error(s, "invalid_json", "the frame is not valid JSON", NULL);
		return;
	}

	v = yajl_tree_get(root, path, yajl_t_any);
	if (!YAJL_IS_OBJECT(root) || v == NULL || !YAJL_IS_STRING(v)) {
		yajl_tree_free(root);
		ws_error(s, "invalid_payload",
		    "an event is a JSON object with a string type", NULL);
		return;
	}

	if (json_has_nul(data, len)) {
		ws_error(s, "invalid_payload",
		    "strings may not contain U+0000", ws_ref(root));
		yajl_tree_free(root);
		return;
	}

	now = kore_time_ms();
	if (ws_is_send(s, v->u.string) && !ws_rate_ok(s, now, root)) {
		yajl_tree_free(root);
		return;
	}

	if (s->nevents >= WS_EVENTS_MAX || ws_is_draining) {
		yajl_tree_free(root);
		ws_error(s, ws_is_draining ? "internal" : "rate_limited",
		    ws_is_draining ? "the server is shutting down" :
		    "too many events waiting", NULL);
		return;
	}

	ev = kore_malloc(sizeof(*ev));
	ev->root = root;
	ev->received = now;
	TAILQ_INSERT_TAIL(&s->events, ev, list);
	s->nevents++;

	ws_process(s);
}

void
ws_on_disconnect(struct connection *c)
{
	struct session		*s = c->hdlr_extra;
	struct ws_event		*ev;

	if (s == NULL || s->id == 0)
		return;

	if (s->state != SESSION_CLOSED)
		hub_remove(s);
	s->state = SESSION_CLOSED;

	TAILQ_REMOVE(&ws_sessions, s, all_list);
	metrics_socket_open(s->kind, -1);

	db_cancel(s->query);
	s->query = NULL;
	batch_forget(s);

	while ((ev = TAILQ_FIRST(&s->events)) != NULL) {
		TAILQ_REMOVE(&s->events, ev, list);
		yajl_tree_free(ev->root);
		kore_free(ev);
	}

	ws_unregister(s);
}

/*
 * Take the socket out of the database's registry (presence, the socket
 * cap) as soon as it is closing, batched (batch_close). A draining worker
 * forgets all of its sockets at once instead (ws_drain).
 */
static void
ws_unregister(struct session *s)
{
	if (!s->registered || ws_is_draining)
		return;
	s->registered = 0;
	batch_close(s->id, s->typing_until != 0);
}

/* Send one JSON text frame. */
void
ws_send(struct session *s, const void *json, size_t len)
{
	kore_buf_reset(&ws_frame);
	ws_frame_build(&ws_frame, WEBSOCKET_OP_TEXT, json, len);
	ws_send_frame(s, ws_frame.data, ws_frame.offset);
}

/*
 * Queue a framed message. Kore queues without bound, so a socket whose
 * unsent output passes the limit is a slow consumer: it is closed and
 * reconnects with `after`.
 */
void
ws_send_frame(struct session *s, const u_int8_t *frame, size_t len)
{
	struct connection	*c = s->c;

	if (s->state == SESSION_CLOSED || c->state != CONN_STATE_ESTABLISHED)
		return;

	if (ws_pending_bytes(c) + len > parley_cfg.max_output_bytes) {
		ws_close(s, WS_CLOSE_SLOW, "slow_consumer");
		return;
	}

	net_send_queue(c, frame, len);
	metrics_frames_sent(1);
	if (!net_send_flush(c))
		kore_connection_disconnect(c);
}

/* A server frame: FIN, opcode, unmasked length, payload (RFC 6455 5.2). */
void
ws_frame_build(struct kore_buf *buf, u_int8_t op, const void *data, size_t len)
{
	u_int8_t	hdr[10];
	size_t		hlen;

	hdr[0] = 0x80 | op;
	if (len < 126) {
		hdr[1] = (u_int8_t)len;
		hlen = 2;
	} else if (len <= 0xffff) {
		hdr[1] = 126;
		hdr[2] = (len >> 8) & 0xff;
		hdr[3] = len & 0xff;
		hlen = 4;
	} else {
		hdr[1] = 127;
		for (hlen = 0; hlen < 8; hlen++)
			hdr[2 + hlen] = (len >> (56 - 8 * hlen)) & 0xff;
		hlen = 10;
	}

	kore_buf_append(buf, hdr, hlen);
	if (len > 0)
		kore_buf_append(buf, data, len);
}

/*
 * Close with a status code and reason (Kore closes without one). What is
 * queued before the close frame still goes out, the slow consumer's output
 * included: nothing more is added, and a client that does not read it all
 * within WS_CLOSE_GRACE_MS is cut off by the sweep.
 */
void
ws_close(struct session *s, int code, const char *reason)
{
	struct connection	*c = s->c;
	u_int8_t		payload[125];
	size_t			rlen;

	if (s->state == SESSION_CLOSED)
		return;

	if (s->user != NULL || s->conv != NULL)
		hub_remove(s);
	s->state = SESSION_CLOSED;
	s->closed_at = kore_time_ms();
	ws_unregister(s);

	if (c->state != CONN_STATE_ESTABLISHED ||
	    (c->flags & CONN_WS_CLOSE_SENT))
		return;

	payload[0] = (code >> 8) & 0xff;
	payload[1] = code & 0xff;
	rlen = strlen(reason);
	if (rlen > sizeof(payload) - 2)
		rlen = sizeof(payload) - 2;
	memcpy(payload + 2, reason, rlen);

	c->flags |= CONN_WS_CLOSE_SENT;
	kore_buf_reset(&ws_frame);
	ws_frame_build(&ws_frame, WEBSOCKET_OP_CLOSE, payload, rlen + 2);
	net_send_queue(c, ws_frame.data, ws_frame.offset);
	c->flags |= CONN_CLOSE_EMPTY;
	if (!net_send_flush(c))
		kore_connection_disconnect(c);
}

/* {"type":"error",...}; ref is the refused send's client_id or null. */
void
ws_error(struct session *s, const char *code, const char *message,
    const char *ref)
{
	struct kore_buf		buf;

	kore_buf_init(&buf, 128);
	kore_buf_appendf(&buf, "{\"type\":\"error\",\"code\":\"%s\","
	    "\"message\":", code);
	json_append_string(&buf, message, strlen(message));
	kore_buf_appendf(&buf, ",\"ref\":");
	if (ref != NULL)
		json_append_string(&buf, ref, strlen(ref));
	else
		kore_buf_appendf(&buf, "null");
	kore_buf_appendf(&buf, "}");

	ws_send(s, buf.data, buf.offset);
	kore_buf_cleanup(&buf);
}

/* The event that was waiting on a query is done: take the next one. */
/*
 * The socket's query. Its callback may run before db_query returns (the
 * database failed at once) and start the next event's query: s->query is
 * then that one's, not overwritten.
 */
void
ws_query(struct session *s, const char *sql, int nparams,
    const char *const *params, db_cb cb)
{
	struct db_query		*q;

	if ((q = db_query(sql, nparams, params, cb, s)) != NULL)
		s->query = q;
}

void
ws_event_done(struct session *s)
{
	s->query = NULL;
	ws_process(s);
}

/*
 * SIGTERM: refuse new sockets, let the sends already accepted reach the
 * database and be acknowledged, then close every socket with 1001 and
 * forget this worker's sockets in the registry. Bounded by
 * PARLEY_DRAIN_TIMEOUT.
 */
void
ws_drain(void)
{
	struct session	*s, *next;
	const char	*params[1];
	u_int64_t	deadline;

	ws_is_draining = 1;
	deadline = kore_time_ms() + parley_cfg.drain_timeout_ms;

	ws_run_loop(deadline, ws_sends_pending);

	for (s = TAILQ_FIRST(&ws_sessions); s != NULL; s = next) {
		next = TAILQ_NEXT(s, all_list);
		ws_close(s, WS_CLOSE_GOING_AWAY, "going_away");
	}

	params[0] = ws_node;
	(void)db_query("SELECT parley_node_gone($1)", 1, params, NULL, NULL);
	ws_run_loop(deadline, ws_queries_pending);
}

/* Turn Kore's event loop ourselves until `busy` says done or time is up. */
static void
ws_run_loop(u_int64_t deadline, int (*busy)(void))
{
	u_int64_t	now;

	while ((now = kore_time_ms()) < deadline && busy()) {
		kore_platform_event_wait(20);
		kore_timer_run(kore_time_ms());
		http_process();
		kore_connection_prune(KORE_CONNECTION_PRUNE_DISCONNECT);
	}
}

/* A closed socket's queued events will never run: nothing to wait for. */
static int
ws_sends_pending(void)
{
	struct session	*s;

	TAILQ_FOREACH(s, &ws_sessions, all_list) {
		if (s->query != NULL || s->batch_item != NULL ||
		    (s->state == SESSION_OPEN && !TAILQ_EMPTY(&s->events)))
			return (1);
	}

	return (0);
}

static int
ws_queries_pending(void)
{
	return (db_inflight() > 0);
}

static void
ws_process(struct session *s)
{
	struct ws_event		*ev;
	const char		*path[] = { "type", NULL };
	yajl_val		type;
	int			r;

	while (s->state == SESSION_OPEN && s->query == NULL &&
	    s->batch_item == NULL && (ev = TAILQ_FIRST(&s->events)) != NULL) {
		TAILQ_REMOVE(&s->events, ev, list);
		s->nevents--;

		type = yajl_tree_get(ev->root, path, yajl_t_string);
		r = ws_event(s, type->u.string, ev->root, ev->received);

		yajl_tree_free(ev->root);
		kore_free(ev);

		/* The answer may have come already (database down). */
		if (r == WS_EVENT_WAIT &&
		    (s->query != NULL || s->batch_item != NULL))
			return;
	}
}

/* Events both sockets know; the rest belong to the socket's kind. */
static int
ws_event(struct session *s, const char *type, yajl_val root, u_int64_t recv)
{
	int64_t		after, limit;

	if (!strcmp(type, "ping")) {
		ws_pong(s);
		return (WS_EVENT_DONE);
	}

	if (!strcmp(type, "auth")) {
		ws_auth(s, root);
		return (WS_EVENT_DONE);
	}

	if (!strcmp(type, "sync")) {
		if (!ws_int_field(root, "after", 0, INT64_MAX, &after) ||
		    !ws_int_field(root, "limit", 1, INT64_MAX, &limit)) {
			ws_error(s, "invalid_payload",
			    "after and limit are whole numbers", NULL);
			return (WS_EVENT_DONE);
		}
		ws_sync(s, after == -1 ? 0 : after,
		    limit == -1 ? WS_SYNC_DEFAULT : limit);
		return (WS_EVENT_WAIT);
	}

	if (s->kind == SESSION_CHAT)
		return (chat_event(s, type, root, recv));

	return (notify_event(s, type, root, recv));
}

/*
 * An optional integer member within [min, max]; -1 when absent. Returns
 * 0 when it is there but not such an integer.
 */
int
ws_int_field(yajl_val root, const char *name, int64_t min, int64_t max,
    int64_t *out)
{
	const char	*path[] = { name, NULL };
	yajl_val	v;

	*out = -1;
	if ((v = yajl_tree_get(root, path, yajl_t_any)) == NULL ||
	    YAJL_IS_NULL(v))
		return (1);

	if (!YAJL_IS_INTEGER(v) || v->u.number.i < min ||
	    v->u.number.i > max)
		return (0);

	*out = v->u.number.i;
	return (1);
}

static void
ws_pong(struct session *s)
{
	struct kore_buf		buf;
	struct timeval		tv;
	struct tm		tm;
	char			ts[32];

	(void)gettimeofday(&tv, NULL);
	(void)gmtime_r(&tv.tv_sec, &tm);
	(void)strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);

	kore_buf_init(&buf, 64);
	kore_buf_appendf(&buf, "{\"type\":\"pong\",\"ts\":\"%s.%03dZ\"}", ts,
	    (int)(tv.tv_usec / 1000));
	ws_send(s, buf.data, buf.offset);
	kore_buf_cleanup(&buf);
}

/* A fresh token for the same user keeps an open socket alive. */
static void
ws_auth(struct session *s, yajl_val root)
{
	const char		*path[] = { "token", NULL };
	struct identity		id;
	struct kore_buf		buf;
	yajl_val		tok;

	tok = yajl_tree_get(root, path, yajl_t_string);
	if (tok == NULL || auth_verify(tok->u.string, &id) != AUTH_OK ||
	    id.service || strcmp(id.user_id, s->ident.user_id)) {
		ws_error(s, "invalid_token",
		    "the token is invalid, expired or for another user", NULL);
		return;
	}

	s->ident.exp = id.exp;

	kore_buf_init(&buf, 64);
	kore_buf_appendf(&buf, "{\"type\":\"auth_ok\",\"exp\":%lld}",
	    (long long)id.exp);
	ws_send(s, buf.data, buf.offset);
	kore_buf_cleanup(&buf);
}

/*
 * Replay what the socket missed: stored messages (chat) or notifications
 * after `after`, oldest first, with "replay":true, then "synced". Live
 * message frames are held back meanwhile, and released after the replay
 * without repeating what it sent.
 */
void
ws_sync(struct session *s, int64_t after, int64_t limit)
{
	const char	*params[3];
	char		key[24], a[24], l[24];

	if (limit > WS_SYNC_MAX)
		limit = WS_SYNC_MAX;

	s->behind = 1;
	s->bus_ups = bus_ups();
	s->sync_after = after;
	s->sync_limit = limit;

	/*
	 * A chat replay is a page of history (rendered here like REST's, the
	 * row past it saying has_more); notifications come as frames, one
	 * more than asked saying has_more.
	 */
	(void)snprintf(a, sizeof(a), "%lld", (long long)after);
	(void)snprintf(l, sizeof(l), "%lld",
	    (long long)limit + (s->kind == SESSION_CHAT ? 0 : 1));
	params[1] = a;
	params[2] = l;

	if (s->kind == SESSION_CHAT) {
		(void)snprintf(key, sizeof(key), "%lld",
		    (long long)s->conversation_id);
		params[0] = key;
		ws_query(s, "SELECT * FROM "
		    "parley_history($1, NULL, NULL, $2, $3)", 3, params,
		    ws_synced);
	} else {
		params[0] = s->ident.user_id;
		ws_query(s, "SELECT id, frame FROM "
		    "parley_notification_sync($1, $2, $3)", 3, params,
		    ws_synced);
	}
}

static void
ws_synced(struct db_result *r, void *arg)
{
	struct session		*s = arg;
	struct kore_buf		buf;
	int64_t			last;
	int			i, n, more;

	s->query = NULL;
	if (!r->ok || PQnfields(r->res) != (s->kind == SESSION_CHAT ?
	    MESSAGE_COLUMNS + 1 : 2)) {
		ws_error(s, "internal", "the replay failed; try again", NULL);
		hub_hold_drop(s);
		ws_event_done(s);
		return;
	}

	more = 0;
	last = s->sync_after;
	n = PQntuples(r->res);
	kore_buf_init(&buf, 1024);
	for (i = 0; i < n && s->state == SESSION_OPEN; i++) {
		/*
		 * The row past the page; or the replay's frames wait unsent
		 * past half the output bound: the client reads slower than a
		 * page is queued, and all of it would close the socket (4029)
		 * though it reads. Either way it asks again from `last`.
		 */
		if ((s->kind == SESSION_CHAT ?
		    *PQgetvalue(r->res, i, MESSAGE_COLUMNS) == 't' :
		    i == s->sync_limit) || (i > 0 &&
		    ws_pending_bytes(s->c) > parley_cfg.max_output_bytes / 2)) {
			more = 1;
			break;
		}
		ws_replay(s, r->res, i, &buf);
		(void)util_parse_int64(PQgetvalue(r->res, i, 0), 0, INT64_MAX,
		    &last);
	}

	kore_buf_reset(&buf);
	kore_buf_appendf(&buf, "{\"type\":\"synced\",\"%s\":%lld,"
	    "\"has_more\":%s}", s->kind == SESSION_CHAT ?
	    "last_message_id" : "last_notification_id", (long long)last,
	    more ? "true" : "false");
	ws_send(s, buf.data, buf.offset);
	kore_buf_cleanup(&buf);

	if (s->state != SESSION_OPEN)
		return;

	/* With more to come the client asks again; held frames would repeat. */
	if (more) {
		hub_hold_drop(s);
	} else if (s->kind == SESSION_CHAT) {
		chat_go_live(s, last);
		return;
	} else {
		hub_hold_release(s, 0);
	}

	ws_event_done(s);
}

/*
 * Send row `row` of a replay: a message event marked as one (built in
 * buf), or the notification frame as it came.
 */
static void
ws_replay(struct session *s, PGresult *res, int row, struct kore_buf *buf)
{
	if (s->kind != SESSION_CHAT) {
		ws_send(s, PQgetvalue(res, row, 1), PQgetlength(res, row, 1));
		return;
	}

	kore_buf_reset(buf);
	UTIL_BUF_LITERAL(buf, "{\"type\":\"message\",\"message\":");
	message_render(buf, res, row);
	UTIL_BUF_LITERAL(buf, ",\"replay\":true}");
	ws_send(s, buf->data, buf->offset);
}

static void
ws_reject(struct session *s, int auth)
{
	if (auth == AUTH_EXPIRED) {
		metrics_rejected(METRICS_REJECT_EXPIRED);
		ws_close(s, WS_CLOSE_AUTH, "token_expired");
	} else {
		metrics_rejected(METRICS_REJECT_UNAUTH);
		ws_close(s, WS_CLOSE_AUTH, "unauthenticated");
	}
}

/* Exact match of scheme, host and port; no Origin (native apps) is fine. */
static int
ws_origin_allowed(struct http_request *req)
{
	const char	*origin;
	size_t		i;

	if (parley_cfg.origins_count == 0 ||
	    !http_request_header(req, "origin", &origin))
		return (1);

	for (i = 0; i < parley_cfg.origins_count; i++) {
		if (!strcmp(origin, parley_cfg.origins[i]))
			return (1);
	}

	return (0);
}

static int
ws_offers_parley(struct http_request *req)
{
	const char	*hdr, *p;
	size_t		n;

	if (!http_request_header(req, "sec-websocket-protocol", &hdr))
		return (0);

	for (p = hdr; *p != '\0'; p += n) {
		while (*p == ' ' || *p == ',')
			p++;
		n = strcspn(p, ", ");
		if (n == 6 && !strncmp(p, "parley", 6))
			return (1);
	}

	return (0);
}

/* Sends, in any form, are what the per-socket rate limit counts. */
static int
ws_is_send(struct session *s, const char *type)
{
	if (s->kind != SESSION_CHAT)
		return (0);

	return (!strcmp(type, "message") || !strcmp(type, "send_message") ||
	    message_is_type(type));
}

/*
 * Token bucket: PARLEY_RATE_MESSAGES per second, bursts of three times
 * that. A refused send is answered with rate_limited; a client that keeps
 * sending through twice a burst of refusals is closed with 4008.
 */
static int
ws_rate_ok(struct session *s, u_int64_t now, yajl_val root)
{
	double		burst;

	burst = parley_cfg.rate_messages * 3;
	s->tokens += (double)(now - s->refilled) * parley_cfg.rate_messages /
	    1000.0;
	if (s->tokens > burst)
		s->tokens = burst;
	s->refilled = now;

	if (s->tokens >= 1.0) {
		s->tokens -= 1.0;
		s->strikes = 0;
		return (1);
	}

	if (++s->strikes >= 2 * burst) {
		ws_close(s, WS_CLOSE_RATE, "rate_limited");
		return (0);
	}

	ws_error(s, "rate_limited", "too many messages; slow down",
	    ws_ref(root));
	return (0);
}

/* The client_id of a refused event, for the error's ref. */
static const char *
ws_ref(yajl_val root)
{
	const char	*path[] = { "client_id", NULL };
	yajl_val	v;

	v = yajl_tree_get(root, path, yajl_t_string);
	return (v != NULL ? v->u.string : NULL);
}

/* Bytes queued on a connection and not yet written to the socket. */
static size_t
ws_pending_bytes(struct connection *c)
{
	struct netbuf	*nb;
	size_t		n;

	n = 0;
	TAILQ_FOREACH(nb, &c->send_queue, list)
		n += nb->b_len - nb->s_off;

	return (n);
}

/*
 * Once a second: protocol pings, idle and expired-token closes, and the
 * typing indicator that the client forgot to turn off.
 */
static void
ws_sweep(void *unused, u_int64_t now)
{
	static const u_int8_t	ping[] = { 0x80 | WEBSOCKET_OP_PING, 0 };
	struct session		*s, *next;
	int64_t			secs;

	/*
	 * A parent killed outright (SIGKILL) leaves workers that would hold
	 * the listening socket forever: drain and go as on SIGTERM.
	 */
	if (getppid() != parley_parent_pid && !ws_is_draining) {
		kore_log(LOG_NOTICE, "parent process gone, shutting down");
		(void)kill(getpid(), SIGTERM);
	}

	secs = util_now();

	for (s = TAILQ_FIRST(&ws_sessions); s != NULL; s = next) {
		next = TAILQ_NEXT(s, all_list);
		if (s->state == SESSION_CLOSED &&
		    util_elapsed(now, s->closed_at) > WS_CLOSE_GRACE_MS) {
			kore_connection_disconnect(s->c);
			continue;
		}
		if (s->state != SESSION_OPEN)
			continue;

		if (!auth_token_valid_at(&s->ident, secs)) {
			ws_close(s, WS_CLOSE_AUTH, "token_expired");
			continue;
		}

		if (util_elapsed(now, s->c->idle_timer.start) >
		    parley_cfg.idle_timeout_ms) {
			ws_close(s, WS_CLOSE_GOING_AWAY, "idle_timeout");
			continue;
		}

		if (s->typing_until != 0 && now >= s->typing_until)
			chat_typing_expired(s);

		if (util_elapsed(now, s->pinged) >=
		    parley_cfg.ping_interval_ms) {
			s->pinged = now;
			ws_send_frame(s, ping, sizeof(ping));
		}
	}
}

/*
 * Kore gives new connections to the worker that holds its accept lock,
 * which keeps it until it is full: left alone, one worker would hold every
 * socket (and make every write) while the others idle. A worker with more
 * sockets than the least loaded one hands the lock over, at each new
 * socket and every WS_BALANCE_MS; one with fewer than the most loaded asks
 * for it (Kore only tries to take the lock when told it is free).
 */
static void
ws_balance(void *unused, u_int64_t now)
{
	int	share;

	share = metrics_socket_share();
	if (share > 0)
		kore_worker_make_busy();
	else if (share < 0 && !worker->has_lock)
		kore_msg_send(worker->id, KORE_MSG_ACCEPT_AVAILABLE, NULL, 0);
}

static void
ws_node_beat(void *unused, u_int64_t now)
{
	const char	*params[1];

	params[0] = ws_node;
	(void)db_query("SELECT parley_node_alive($1)", 1, params, NULL, NULL);
}
