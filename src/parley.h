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

/* Settings, read once from the environment by the parent (config.c). */
struct parley_config {
	char		*listen_host;
	char		*listen_port;
	int		workers;

	const char	**db_keywords;
	const char	**db_values;
	int		db_pool_size;

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
};

extern struct parley_config	parley_cfg;

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
int	auth_request(struct http_request *, int, struct identity *, int *);
int	auth_token_valid_at(const struct identity *, int64_t);

/* The database pool (db.c): every query of the worker goes through it. */
struct db_query;
struct db_result {
	PGresult	*res;
	int		ok;
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
size_t		db_inflight(void);
PGconn		*db_connect_blocking(void);

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

/* Schema migrations (migrate.c). */
int	migrate_run(PGconn *);

/* JSON helpers (json.c). */
void	json_append_string(struct kore_buf *, const char *, size_t);
void	json_serialize(struct kore_buf *, yajl_val);
yajl_val	json_parse(const void *, size_t);
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
int	rest_query(struct http_request *, int, const char *, int,
	    const char *const *, rest_finish_fn);
int	rest_resume(struct http_request *);
int	rest_not_found(struct http_request *);

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
void	metrics_message_stored(void);
void	metrics_frames_sent(u_int64_t);
void	metrics_db_error(void);
void	metrics_rejected(int);
void	metrics_send_latency(u_int64_t);
void	metrics_render(struct kore_buf *);

/* Small utilities (util.c). */
int	util_parse_int64(const char *, int64_t, int64_t, int64_t *);
int	util_query_get(struct http_request *, const char *, char *, size_t);
int64_t	util_now(void);
int	util_path_id(struct http_request *, int, int64_t *);

#endif
