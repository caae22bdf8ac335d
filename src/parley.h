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

#ifndef __H_PARLEY_H
#define __H_PARLEY_H

#include <sys/types.h>
#include <sys/queue.h>

#include <libpq-fe.h>
#include <yajl/yajl_tree.h>

#include <kore/kore.h>
#include <kore/http.h>

#define PARLEY_USER_ID_MAX	64
#define PARLEY_NAME_MAX		128
#define PARLEY_CLIENT_ID_MAX	64
#define PARLEY_SEND_LANES_MAX	16

/* Settings, read once from the environment by the parent (config.c). */
struct parley_config {
	char		*listen_host;
	char		*listen_port;
	int		workers;

	const char	**db_keywords;
	const char	**db_values;
	/* The same, with the statement timeout for the pool's connections. */
	const char	**db_pool_values;
	int		db_pool_size;
	u_int64_t	db_timeout_ms;
	u_int64_t	db_connect_timeout_ms;

	int		jwt_alg;
	unsigned char	*jwt_key;
	size_t		jwt_key_len;
	char		*jwt_issuer;
	char		*jwt_audience;

	char		**origins;
	size_t		origins_count;

	int		max_message_chars;
	int		max_sockets_per_user;
	int		rate_messages;
	size_t		max_frame_bytes;
	size_t		max_output_bytes;
	u_int64_t	idle_timeout_ms;
	u_int64_t	ping_interval_ms;
	u_int64_t	drain_timeout_ms;
	int		bus_queue_max;
	size_t		page_cache_bytes;
	int		send_lanes;
	u_int64_t	send_split_ms;
};

extern struct parley_config	parley_cfg;
extern pid_t			parley_parent_pid;

void	config_load(void);

/* An authenticated caller (auth.c). */
#define AUTH_OK			0
#define AUTH_MISSING		1
#define AUTH_INVALID		2
#define AUTH_EXPIRED		3

struct identity {
	int		service;
	char		user_id[PARLEY_USER_ID_MAX + 1];
	char		name[PARLEY_NAME_MAX + 1];
	int64_t		exp;
};

#define TOKEN_SOURCE_SOCKET	0x01

int	auth_verify(const char *, struct identity *);
int	auth_request(struct http_request *, int, struct identity *);
int	auth_token_valid_at(const struct identity *, int64_t);

/* The database pool (db.c): every query of the worker goes through it. */
struct db_query;
struct db_result {
	PGresult	*res;
	int		ok;
	/* The connection was lost after the query went: it may have run. */
	int		unknown;
	int		status;
	const char	*code;
	const char	*message;
};

typedef void	(*db_cb)(struct db_result *, void *);

#define DB_PARAMS_MAX	8

struct db_query	*db_query(const char *, int, const char *const *,
		    db_cb, void *);
void		db_cancel(struct db_query *);
void		db_init(void);
void		db_shutdown(void);
int		db_ready(void);
void		db_listen_reset(const char *);
size_t		db_inflight(void);

/* A validated send, from any of the accepted forms (message.c). */
struct message_in {
	char		type[16];
	char		*content;
	size_t		content_len;
	char		*metadata;
	char		client_id[PARLEY_CLIENT_ID_MAX + 1];
	int		has_client_id;
	const char	*error;
	const char	*detail;
};

int	message_is_type(const char *);
int	message_parse(yajl_val, int, struct message_in *);
void	message_cleanup(struct message_in *);

/* The columns message_render() reads: those of parley_history(). */
#define MESSAGE_COLUMNS		10

void	message_render(struct kore_buf *, PGresult *, int);
void	message_page(struct kore_buf *, PGresult *, int, int);

/* Sockets: what chat and notification sockets share (ws.c). */
#define SESSION_CHAT		0
#define SESSION_NOTIFY		1

#define SESSION_OPENING		0	/* handshake done, open query pending */
#define SESSION_OPEN		1
#define SESSION_CLOSED		2

/* A message frame held back while its socket replays history. */
struct held_frame {
	TAILQ_ENTRY(held_frame)	list;
	int64_t			seq;
	size_t			len;
	u_int8_t		data[];
};

/* A client event waiting for the socket's previous one to finish. */
struct ws_event {
	TAILQ_ENTRY(ws_event)	list;
	yajl_val		root;
	u_int64_t		received;
};

struct hub_conv;
struct hub_user;
struct batch_item;

struct session {
	struct connection	*c;
	int			kind;
	int			state;
	int			auth;
	int			registered;
	u_int64_t		id;
	struct identity		ident;
	int64_t			conversation_id;
	int64_t			after;

	struct hub_conv		*conv;
	struct hub_user		*user;
	TAILQ_ENTRY(session)	conv_list;
	TAILQ_ENTRY(session)	user_list;
	TAILQ_ENTRY(session)	all_list;

	struct db_query		*query;
	TAILQ_HEAD(, ws_event)	events;
	u_int32_t		nevents;

	int			behind;
	int64_t			last_seq;
	u_int64_t		bus_ups;	/* bus_ups() when open or replay asked */
	u_int64_t		state_ups;	/* receipts, presence: up to date at */
	int64_t			sync_after;
	int64_t			sync_limit;
	TAILQ_HEAD(, held_frame) held;
	u_int32_t		nheld;
	int64_t			held_lost;	/* highest id shed when full */

	double			tokens;
	u_int64_t		refilled;
	u_int32_t		strikes;
	u_int64_t		typing_relayed;
	u_int64_t		typing_until;
	u_int64_t		pinged;
	u_int64_t		closed_at;

	/* The send in flight: its batch entry, what its ack or error needs. */
	struct batch_item	*batch_item;
	char			send_ref[PARLEY_CLIENT_ID_MAX + 1];
	u_int64_t		send_received;
};

#define WS_EVENT_DONE		0	/* handled, take the next event */
#define WS_EVENT_WAIT		1	/* a query runs; ws_event_done() follows */

#define WS_CLOSE_NORMAL		1000
#define WS_CLOSE_GOING_AWAY	1001
#define WS_CLOSE_UNSUPPORTED	1003
#define WS_CLOSE_TOO_BIG	1009
#define WS_CLOSE_TRY_AGAIN	1013
#define WS_CLOSE_AUTH		4001
#define WS_CLOSE_FORBIDDEN	4003
#define WS_CLOSE_RATE		4008
#define WS_CLOSE_TOO_MANY	4009
#define WS_CLOSE_SLOW		4029

extern char	ws_node[];

void	ws_init(void);
void	ws_drain(void);
int	ws_handshake(struct http_request *, int, int64_t);
void	ws_send(struct session *, const void *, size_t);
void	ws_send_frame(struct session *, const u_int8_t *, size_t);
void	ws_frame_build(struct kore_buf *, u_int8_t, const void *, size_t);
void	ws_close(struct session *, int, const char *);
void	ws_error(struct session *, const char *, const char *, const char *);
void	ws_event_done(struct session *);
void	ws_opened(struct session *, int, const char *, const char *,
	    const char *);
void	ws_sync(struct session *, int64_t, int64_t);
void	ws_query(struct session *, const char *, int, const char *const *,
	    db_cb);
int	ws_int_field(yajl_val, const char *, int64_t, int64_t, int64_t *);

/* The chat socket's events (chat.c) and the notification socket's (notify.c). */
void	chat_opened(struct session *, const char *);
void	chat_go_live(struct session *, int64_t);
void	chat_typing_expired(struct session *);
void	chat_sent(struct session *, int, const char *, const char *,
	    const char *);

/* Batching of socket sends, opens and closes (batch.c). */
void	batch_init(void);
void	batch_send(struct session *, struct message_in *);
void	batch_open(struct session *);
void	batch_close(u_int64_t, int);
void	batch_forget(struct session *);
int	chat_event(struct session *, const char *, yajl_val, u_int64_t);
void	notify_opened(struct session *);
int	notify_event(struct session *, const char *, yajl_val, u_int64_t);

/* Who is connected to this worker, and fan-out to them (hub.c). */
void	hub_init(void);
void	hub_add(struct session *);
void	hub_remove(struct session *);
void	hub_conversation(int64_t, int64_t, int64_t, const char *, size_t,
	    const char *, size_t);
void	hub_user(const char *, size_t, const char *, size_t);
void	hub_conversation_close(int64_t);
void	hub_user_close(const char *, size_t);
void	hub_notify_users(void (*)(const char *, void *), void *);
void	hub_hold_release(struct session *, int64_t);
void	hub_hold_drop(struct session *);
int	hub_conv_open(struct hub_conv *, int64_t *);
struct hub_conv	*hub_conv_first(void);
struct hub_conv	*hub_conv_next(struct hub_conv *);
int64_t	hub_conv_id(struct hub_conv *);

/* Latest pages of history, checked by stamp (pages.c). */
struct page {
	int64_t		conv;
	int		limit;
	char		*stamp;
	u_int8_t	*body;
	size_t		len;
};

struct page	*pages_get(int64_t, int);
void		pages_release(struct page *);
void		pages_put(int64_t, int, const char *, const void *, size_t);

/* Latest pages asked in batches (latest.c). */
int		latest_page(struct http_request *, int64_t, const char *, int);

/* Deferred notifications of big conversations (fanout.c). */
void	fanout_init(void);
void	fanout_wake(void);

/* The per-worker LISTEN connection and what it routes (bus.c). */
void		bus_up(void);
void		bus_down(void);
void		bus_alive(const char *);
void		bus_notify(const char *, size_t);
u_int64_t	bus_ups(void);
const char	*bus_since(u_int64_t);

/* Schema migrations (migrate.c). */
int	migrate_run(PGconn *);

/* JSON helpers (json.c). */
void	json_append_string(struct kore_buf *, const char *, size_t);
int	json_serialize(struct kore_buf *, yajl_val);
yajl_val	json_parse(const void *, size_t);
int	json_has_nul(const void *, size_t);
int	json_utf8_valid(const u_int8_t *, size_t);
size_t	json_utf8_length(const u_int8_t *, size_t);

/* What every REST endpoint shares (rest.c). */
#define REST_ANY		0
#define REST_USER		1
#define REST_SERVICE		2

#define REST_BODY_MAX		(64 * 1024)

typedef int	(*rest_finish_fn)(struct db_result *, int, struct kore_buf *);

void	rest_reply(struct http_request *, int, const void *, size_t);
void	rest_error(struct http_request *, int, const char *, const char *);
int	rest_method(struct http_request *, int);
int	rest_identity(struct http_request *, int, struct identity *);
int	rest_body(struct http_request *, yajl_val *);
void	rest_error_body(struct kore_buf *, const char *, const char *);
int	rest_query(struct http_request *, int, const char *, int,
	    const char *const *, rest_finish_fn);
int	rest_wait(struct http_request *, void *, void (*)(void *));
struct kore_buf	*rest_answer_body(struct http_request *);
void	rest_answer(struct http_request *, int);
void	rest_answer_kept(struct http_request *, int, const void *, size_t);
int	rest_resume(struct http_request *);
int	rest_not_found(struct http_request *);

/* Validating REST input (rest.c). */
#define REST_PAGE_AFTER		0x01	/* `after` is read (0 allowed) */
#define REST_PAGE_CURSOR	0x02	/* `before` is an opaque cursor */

struct rest_page {
	const char	*before;	/* NULL when absent */
	const char	*after;		/* NULL when absent */
	char		limit[24];
	char		before_buf[64];
	char		after_buf[24];
};

int	rest_invalid(struct http_request *, const char *);
int	rest_page(struct http_request *, int64_t, int64_t, int,
	    struct rest_page *);
int	rest_param_bool(struct http_request *, const char *, int *);
int	rest_path_id(struct http_request *, char *, size_t);
yajl_val	rest_member(yajl_val, const char *);
int	rest_user_id(yajl_val, char *, size_t);
void	rest_message_error(struct http_request *, const struct message_in *);
int	rest_finish_created(struct db_result *, int, struct kore_buf *);

/* Counters for /metrics (metrics.c). */
#define METRICS_SOCKET_CHAT		0
#define METRICS_SOCKET_NOTIFY		1
#define METRICS_SOCKET_KINDS		2

#define METRICS_REJECT_ORIGIN		0
#define METRICS_REJECT_UNAUTH		1
#define METRICS_REJECT_EXPIRED		2
#define METRICS_REJECT_FORBIDDEN	3
#define METRICS_REJECT_TOO_MANY		4
#define METRICS_REJECT_BAD_REQUEST	5
#define METRICS_REJECT_MAX		6

#define METRICS_LATENCY_BUCKETS		11

void	metrics_init(void);
void	metrics_worker_start(void);
void	metrics_socket_open(int, int);
int	metrics_socket_share(void);
void	metrics_message_stored(void);
void	metrics_frames_sent(u_int64_t);
void	metrics_db_error(void);
void	metrics_bus_overflow(void);
void	metrics_page(int);
void	metrics_rejected(int);
void	metrics_send_latency(u_int64_t);
void	metrics_send_batch(int);
void	metrics_render(struct kore_buf *);

/* Small utilities (util.c). */
#define UTIL_BACKOFF_MIN	100
#define UTIL_BACKOFF_MAX	5000

int	util_parse_int64(const char *, int64_t, int64_t, int64_t *);
int	util_query_get(struct http_request *, const char *, char *, size_t);
int64_t	util_now(void);
void	util_backoff(u_int64_t *);
u_int64_t	util_elapsed(u_int64_t, u_int64_t);
int	util_path_id(struct http_request *, int64_t *);
void	util_buf_reserve(struct kore_buf *, size_t);

/* Append a string literal to a kore_buf. */
#define UTIL_BUF_LITERAL(b, s)	kore_buf_append((b), (s), sizeof(s) - 1)

#endif
