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
 * The worker's database pool: a few nonblocking libpq connections driven
 * by Kore's event loop. Kore's own pgsql pool keeps dead connections,
 * drops callbacks on hangup and can take the worker down when a backend is
 * killed (KORE-NOTES section 0, items 6-9); this pool owns its sockets, so
 * a dead connection fails its one query, reconnects with backoff and never
 * touches the others.
 *
 * Every query gets exactly one callback (unless cancelled by its owner),
 * with the first result of the statement or an error.
 *
 * Statements run by name: a connection prepares each the first time it
 * runs it (one more round trip, once), so PostgreSQL parses and plans
 * the call once per connection instead of at every query (a history page
 * costs the database a fifth less).
 *
 * One more connection of the same kind holds LISTEN parley for the bus:
 * its notifications go to bus_notify(), its ups and downs to bus_up() and
 * bus_down(). It is pinged every DB_LISTEN_PING ms: a connection that no
 * longer answers is replaced (a silently lost network would leave the bus
 * deaf), and the server's clock in each answer tells bus_alive() until
 * when nothing can have been missed.
 */

#include <sys/types.h>

#include <poll.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "parley.h"

#define DB_CONN_DOWN		0
#define DB_CONN_CONNECTING	1
#define DB_CONN_IDLE		2
#define DB_CONN_BUSY		3

#define DB_BACKOFF_MIN		100
#define DB_BACKOFF_MAX		5000
#define DB_CONNECT_POLL		5
#define DB_QUEUE_LIMIT		20000
#define DB_MIGRATE_RETRY_MAX	5000
#define DB_LISTEN_PING		2000
#define DB_CANCELED		"57014"	/* query_canceled */
#define DB_STATEMENTS_MAX	64
#define DB_LISTEN_PING_SQL	\
	"SELECT clock_timestamp() /* LISTEN parley alive */"

struct db_query {
	TAILQ_ENTRY(db_query)	list;
	const char		*sql;
	int			nparams;
	char			*params[DB_PARAMS_MAX];
	int			statement;
	db_cb			cb;
	void			*arg;
	u_int64_t		started;
	int			sent;
	int			answered;
};

struct db_conn {
	struct kore_event	evt;
	PGconn			*pg;
	int			fd;
	int			state;
	u_int64_t		backoff;
	struct kore_timer	*timer;
	struct db_query		*query;
	PGresult		*result;
	u_int64_t		prepared;
	int			preparing;
	int			listen;
	int			listening;
	u_int64_t		sent;
	u_int64_t		connect_started;
	short			connect_wait;	/* POLLIN or POLLOUT */
};

TAILQ_HEAD(db_query_list, db_query);

static void	db_migrate(void *, u_int64_t);
static PGconn	*db_connect_blocking(void);
static void	db_conn_start(struct db_conn *);
static void	db_conn_poll(void *, u_int64_t);
static void	db_conn_retry(void *, u_int64_t);
static void	db_conn_event(void *, int);
static void	db_conn_fail(struct db_conn *, const char *);
static void	db_conn_dispatch(struct db_conn *);
static void	db_conn_send(struct db_conn *);
static int	db_statement(const char *);
static void	db_conn_flush(void *, u_int64_t);
static void	db_conn_complete(struct db_conn *);
static void	db_conn_notifies(struct db_conn *);
static void	db_listen_send(struct db_conn *, const char *);
static void	db_listen_result(struct db_conn *, PGresult *);
static void	db_sweep(void *, u_int64_t);
static void	db_query_finish(struct db_query *, PGresult *, const char *);
static void	db_query_free(struct db_query *);
static void	db_notice(void *, const char *);
static int	db_pool_alive(void);

static struct db_conn		*db_conns;
static struct db_query_list	db_queue;
static size_t			db_queue_len;
static int			db_migrated;
static int			db_stopping;
static u_int64_t		db_migrate_backoff;
static char			*db_statements[DB_STATEMENTS_MAX];
static int			db_nstatements;
static struct db_query		*db_placing;	/* in db_query() */

void
db_init(void)
{
	TAILQ_INIT(&db_queue);
	db_queue_len = 0;
	db_migrated = 0;
	db_migrate_backoff = DB_BACKOFF_MIN;

	/* The pool, then the bus's LISTEN connection. */
	db_conns = kore_calloc(parley_cfg.db_pool_size + 1, sizeof(*db_conns));
	db_conns[parley_cfg.db_pool_size].listen = 1;

	(void)kore_timer_add(db_sweep, 1000, NULL, 0);
	db_migrate(NULL, 0);
}

/*
 * Bring the schema up to date before the pool opens. This one connect is
 * blocking (bounded by connect_timeout) but happens only until it
 * succeeds once per worker; meanwhile queries fail fast as unavailable and
 * /readyz answers 503.
 */
static void
db_migrate(void *unused, u_int64_t now)
{
	PGconn		*pg;
	int		i;

	if ((pg = db_connect_blocking()) != NULL && migrate_run(pg)) {
		PQfinish(pg);
		db_migrated = 1;
		kore_log(LOG_NOTICE, "database ready, schema up to date");
		for (i = 0; i <= parley_cfg.db_pool_size; i++)
			db_conn_start(&db_conns[i]);
		return;
	}

	if (pg != NULL)
		PQfinish(pg);

	kore_log(LOG_NOTICE, "database unavailable, retrying in %llu ms",
	    (unsigned long long)db_migrate_backoff);
	(void)kore_timer_add(db_migrate, db_migrate_backoff, NULL,
	    KORE_TIMER_ONESHOT);

	db_migrate_backoff *= 2;
	if (db_migrate_backoff > DB_MIGRATE_RETRY_MAX)
		db_migrate_backoff = DB_MIGRATE_RETRY_MAX;
}

static PGconn *
db_connect_blocking(void)
{
	PGconn		*pg;

	pg = PQconnectdbParams(parley_cfg.db_keywords,
	    parley_cfg.db_values, 0);
	if (pg == NULL)
		return (NULL);

	PQsetNoticeProcessor(pg, db_notice, NULL);
	if (PQstatus(pg) != CONNECTION_OK) {
		kore_log(LOG_NOTICE, "database: %s",
		    PQerrorMessage(pg));
		PQfinish(pg);
		return (NULL);
	}

	return (pg);
}

/*
 * Ready means migrated and a pooled connection is up or connecting: a
 * query queued meanwhile runs once it is up (a worker's pool is still
 * connecting when the first sockets reach it), and fails when the
 * connect does (bounded by connect_timeout).
 */
int
db_ready(void)
{
	return (db_migrated && db_pool_alive());
}

static int
db_pool_alive(void)
{
	int		i;

	for (i = 0; i < parley_cfg.db_pool_size; i++) {
		if (db_conns[i].state != DB_CONN_DOWN)
			return (1);
	}

	return (0);
}

/* Drop the LISTEN connection; it comes back, and bus_up() catches up. */
void
db_listen_reset(const char *why)
{
	struct db_conn		*conn = &db_conns[parley_cfg.db_pool_size];

	if (conn->pg != NULL)
		db_conn_fail(conn, why);
}

/* Queries accepted and not yet answered: what a drain waits for. */
size_t
db_inflight(void)
{
	size_t		n;
	int		i;

	n = db_queue_len;
	for (i = 0; i < parley_cfg.db_pool_size; i++) {
		if (db_conns[i].query != NULL)
			n++;
	}

	return (n);
}

/*
 * Queue `sql` with up to DB_PARAMS_MAX text parameters (NULL is SQL NULL).
 * Parameters are copied. When no connection can take it soon (not
 * migrated, every connection down, queue full) the callback runs at once
 * with an error, so callers never wait on a dead database.
 */
struct db_query *
db_query(const char *sql, int nparams, const char *const *params, db_cb cb,
    void *arg)
{
	struct db_query		*q, *outer;
	int			i;

	if (nparams > DB_PARAMS_MAX)
		fatal("db_query: too many parameters (%d)", nparams);

	q = kore_calloc(1, sizeof(*q));
	q->sql = sql;
	q->statement = db_statement(sql);
	q->cb = cb;
	q->arg = arg;
	q->nparams = nparams;
	for (i = 0; i < nparams; i++) {
		if (params[i] != NULL)
			q->params[i] = kore_strdup(params[i]);
	}

	if (!db_ready() || db_queue_len >= DB_QUEUE_LIMIT) {
		db_query_finish(q, NULL, "database unavailable");
		return (NULL);
	}

	TAILQ_INSERT_TAIL(&db_queue, q, list);
	db_queue_len++;

	/*
	 * A send that fails at once answers the query before we return (the
	 * failure may take the pool's last connection, and the queue, with
	 * it): then it is freed here and the caller gets NULL, as for
	 * "unavailable" above. A callback may call us again: hence outer.
	 */
	outer = db_placing;
	db_placing = q;
	for (i = 0; i < parley_cfg.db_pool_size; i++) {
		if (db_conns[i].state == DB_CONN_IDLE) {
			db_conn_dispatch(&db_conns[i]);
			break;
		}
	}
	db_placing = outer;

	if (q->answered) {
		db_query_free(q);
		return (NULL);
	}

	return (q);
}

/* The owner is going away: its callback must never run. */
void
db_cancel(struct db_query *q)
{
	int		i;

	if (q == NULL)
		return;

	for (i = 0; i < parley_cfg.db_pool_size; i++) {
		if (db_conns[i].query == q) {
			q->cb = NULL;
			return;
		}
	}

	TAILQ_REMOVE(&db_queue, q, list);
	db_queue_len--;
	db_query_free(q);
}

void
db_shutdown(void)
{
	struct db_query		*q;
	int			i;

	db_stopping = 1;
	while ((q = TAILQ_FIRST(&db_queue)) != NULL) {
		TAILQ_REMOVE(&db_queue, q, list);
		db_queue_len--;
		db_query_finish(q, NULL, "shutting down");
	}

	for (i = 0; i <= parley_cfg.db_pool_size; i++) {
		if (db_conns[i].pg != NULL)
			db_conn_fail(&db_conns[i], "shutting down");
	}
}

static void
db_conn_start(struct db_conn *conn)
{
	conn->evt.type = KORE_TYPE_PGSQL_CONN;
	conn->evt.flags = 0;
	conn->evt.handle = db_conn_event;
	conn->fd = -1;
	conn->state = DB_CONN_CONNECTING;
	conn->prepared = 0;
	conn->preparing = 0;

	conn->pg = PQconnectStartParams(parley_cfg.db_keywords,
	    parley_cfg.db_pool_values, 0);
	if (conn->pg == NULL || PQstatus(conn->pg) == CONNECTION_BAD) {
		db_conn_fail(conn, "connect failed");
		return;
	}

	PQsetNoticeProcessor(conn->pg, db_notice, NULL);

	/* libpq may swap sockets while connecting: poll until it is done. */
	conn->connect_started = kore_time_ms();
	conn->connect_wait = POLLOUT;
	conn->timer = kore_timer_add(db_conn_poll, DB_CONNECT_POLL, conn, 0);
}

/*
 * PQconnectPoll is called only once its socket is ready for what it last
 * asked: called early, libpq takes a TCP connect still under way for done
 * and then blocks the worker writing to it (for minutes, when packets to
 * the database are dropped). libpq's connect_timeout does not apply here:
 * parley_cfg.db_connect_timeout_ms does.
 */
static void
db_conn_poll(void *arg, u_int64_t now)
{
	struct db_conn		*conn = arg;
	struct pollfd		pfd;
	const char		*why;

	pfd.fd = PQsocket(conn->pg);
	pfd.events = conn->connect_wait;
	pfd.revents = 0;
	if (pfd.fd != -1 && poll(&pfd, 1, 0) != 1) {
		if (util_elapsed(now, conn->connect_started) <
		    parley_cfg.db_connect_timeout_ms)
			return;
		why = "connect timed out";
	} else {
		switch (PQconnectPoll(conn->pg)) {
		case PGRES_POLLING_OK:
			why = NULL;
			break;
		case PGRES_POLLING_READING:
			conn->connect_wait = POLLIN;
			return;
		case PGRES_POLLING_WRITING:
			conn->connect_wait = POLLOUT;
			return;
		case PGRES_POLLING_FAILED:
			why = PQerrorMessage(conn->pg);
			break;
		default:
			return;
		}
	}

	if (why != NULL) {
		conn->timer->flags |= KORE_TIMER_ONESHOT;
		conn->timer = NULL;
		db_conn_fail(conn, why);
		return;
	}

	/* A timer cannot remove itself in Kore 4.1: let it expire. */
	conn->timer->flags |= KORE_TIMER_ONESHOT;
	conn->timer = NULL;

	if (PQsetnonblocking(conn->pg, 1) == -1) {
		db_conn_fail(conn, "cannot set nonblocking");
		return;
	}

	conn->fd = PQsocket(conn->pg);
	conn->state = DB_CONN_IDLE;
	conn->backoff = DB_BACKOFF_MIN;
	kore_platform_event_level_read(conn->fd, conn);

	if (!conn->listen) {
		db_conn_dispatch(conn);
		return;
	}

	/* bus_up() once the server confirms the LISTEN. */
	db_listen_send(conn, "LISTEN parley");
}

static void
db_conn_retry(void *arg, u_int64_t now)
{
	struct db_conn		*conn = arg;

	conn->timer = NULL;
	db_conn_start(conn);
}

static void
db_conn_event(void *arg, int error)
{
	struct db_conn		*conn = arg;
	PGresult		*res;

	conn->evt.flags &= ~(KORE_EVENT_READ | KORE_EVENT_WRITE);

	if (conn->pg == NULL || conn->state < DB_CONN_IDLE)
		return;

	if (error) {
		db_conn_fail(conn, "socket error or hangup");
		return;
	}

	if (!PQconsumeInput(conn->pg)) {
		db_conn_fail(conn, PQerrorMessage(conn->pg));
		return;
	}

	while (conn->state == DB_CONN_BUSY && !PQisBusy(conn->pg)) {
		if ((res = PQgetResult(conn->pg)) == NULL) {
			db_conn_complete(conn);
			break;
		}
		/* Keep the first result; a statement has one. */
		if (conn->result == NULL)
			conn->result = res;
		else
			PQclear(res);
	}

	if (conn->listen)
		db_conn_notifies(conn);

	if (conn->pg != NULL && PQstatus(conn->pg) == CONNECTION_BAD)
		db_conn_fail(conn, PQerrorMessage(conn->pg));
}

static void
db_conn_notifies(struct db_conn *conn)
{
	PGnotify	*n;

	while (conn->pg != NULL && (n = PQnotifies(conn->pg)) != NULL) {
		bus_notify(n->extra, strlen(n->extra));
		PQfreemem(n);
	}
}

static void
db_listen_send(struct db_conn *conn, const char *sql)
{
	conn->state = DB_CONN_BUSY;
	conn->sent = kore_time_ms();
	if (!PQsendQuery(conn->pg, sql)) {
		db_conn_fail(conn, PQerrorMessage(conn->pg));
		return;
	}
	db_conn_flush(conn, 0);
}

/* The LISTEN is confirmed, or a ping came back with the server's clock. */
static void
db_listen_result(struct db_conn *conn, PGresult *res)
{
	if (!conn->listening) {
		if (PQresultStatus(res) != PGRES_COMMAND_OK) {
			db_conn_fail(conn, "LISTEN failed");
			return;
		}
		conn->listening = 1;
		bus_up();
		/* The first ping at once: its clock is the window's start. */
		db_listen_send(conn, DB_LISTEN_PING_SQL);
		return;
	}

	if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
		db_conn_fail(conn, "LISTEN ping failed");
		return;
	}
	bus_alive(PQgetvalue(res, 0, 0));
}

static void
db_conn_dispatch(struct db_conn *conn)
{
	struct db_query		*q;

	if (conn->listen || conn->state != DB_CONN_IDLE ||
	    (q = TAILQ_FIRST(&db_queue)) == NULL)
		return;

	TAILQ_REMOVE(&db_queue, q, list);
	db_queue_len--;

	conn->query = q;
	conn->state = DB_CONN_BUSY;
	q->started = kore_time_ms();

	db_conn_send(conn);
}

/* Run the query by name, preparing it first on this connection. */
static void
db_conn_send(struct db_conn *conn)
{
	struct db_query		*q = conn->query;
	const char *const	*params = (const char *const *)q->params;
	char			name[16];
	int			sent;

	(void)snprintf(name, sizeof(name), "parley_%d", q->statement);

	if (q->statement == -1) {
		sent = PQsendQueryParams(conn->pg, q->sql, q->nparams, NULL,
		    params, NULL, NULL, 0);
	} else if (conn->prepared & (1ULL << q->statement)) {
		sent = PQsendQueryPrepared(conn->pg, name, q->nparams,
		    params, NULL, NULL, 0);
	} else {
		conn->preparing = 1;
		sent = PQsendPrepare(conn->pg, name, q->sql, q->nparams, NULL);
	}

	if (!sent) {
		db_conn_fail(conn, PQerrorMessage(conn->pg));
		return;
	}

	q->sent = !conn->preparing;
	db_conn_flush(conn, 0);
}

/*
 * The statement's number, the same on every connection of the worker;
 * -1 (run unnamed) once DB_STATEMENTS_MAX distinct statements are known.
 */
static int
db_statement(const char *sql)
{
	int		i;

	for (i = 0; i < db_nstatements; i++) {
		if (!strcmp(db_statements[i], sql))
			return (i);
	}

	if (db_nstatements == DB_STATEMENTS_MAX)
		return (-1);

	db_statements[db_nstatements] = kore_strdup(sql);
	return (db_nstatements++);
}

/* Send what libpq still buffers; a full socket is retried shortly. */
static void
db_conn_flush(void *arg, u_int64_t now)
{
	struct db_conn		*conn = arg;

	if (conn->state != DB_CONN_BUSY)
		return;

	switch (PQflush(conn->pg)) {
	case 0:
		break;
	case 1:
		(void)kore_timer_add(db_conn_flush, 1, conn,
		    KORE_TIMER_ONESHOT);
		break;
	default:
		db_conn_fail(conn, PQerrorMessage(conn->pg));
		break;
	}
}

static void
db_conn_complete(struct db_conn *conn)
{
	struct db_query		*q;
	PGresult		*res;

	q = conn->query;
	res = conn->result;
	conn->result = NULL;

	/* Prepared: now run it. A failed prepare is the query's answer. */
	if (conn->preparing) {
		conn->preparing = 0;
		if (res != NULL && PQresultStatus(res) == PGRES_COMMAND_OK) {
			PQclear(res);
			conn->prepared |= 1ULL << q->statement;
			db_conn_send(conn);
			return;
		}
	}

	conn->query = NULL;
	conn->state = DB_CONN_IDLE;

	if (conn->listen) {
		db_listen_result(conn, res);
		PQclear(res);
		return;
	}

	db_query_finish(q, res, NULL);
	PQclear(res);

	db_conn_dispatch(conn);
}

/*
 * The connection is gone: answer its query with an error, close it and
 * come back later. When no connection is left, queued queries fail now
 * rather than wait for a database that may be down for minutes.
 */
static void
db_conn_fail(struct db_conn *conn, const char *why)
{
	struct db_query		*q;

	if (conn->pg != NULL) {
		if (!db_stopping) {
			kore_log(LOG_NOTICE, "database connection lost: %.*s",
			    (int)strcspn(why, "\n"), why);
		}
		/* libpq may have closed the socket itself already. */
		if (conn->fd != -1 && PQsocket(conn->pg) == conn->fd)
			kore_platform_disable_read(conn->fd);
		PQfinish(conn->pg);
		conn->pg = NULL;
	}

	if (conn->listening) {
		conn->listening = 0;
		bus_down();
	}

	conn->fd = -1;
	conn->state = DB_CONN_DOWN;

	if (conn->result != NULL) {
		PQclear(conn->result);
		conn->result = NULL;
	}

	if ((q = conn->query) != NULL) {
		conn->query = NULL;
		db_query_finish(q, NULL, "database connection lost");
	}

	if (conn->timer == NULL && !db_stopping) {
		conn->timer = kore_timer_add(db_conn_retry, conn->backoff,
		    conn, KORE_TIMER_ONESHOT);
	}
	conn->backoff = conn->backoff ? conn->backoff * 2 : DB_BACKOFF_MIN;
	if (conn->backoff > DB_BACKOFF_MAX)
		conn->backoff = DB_BACKOFF_MAX;

	if (db_pool_alive())
		return;

	while ((q = TAILQ_FIRST(&db_queue)) != NULL) {
		TAILQ_REMOVE(&db_queue, q, list);
		db_queue_len--;
		db_query_finish(q, NULL, "database unavailable");
	}
}

/* A query that hangs (a stalled server, a lost network) ends the conn. */
static void
db_sweep(void *unused, u_int64_t now)
{
	struct db_conn		*conn;
	int			i;

	for (i = 0; i < parley_cfg.db_pool_size; i++) {
		if (db_conns[i].state == DB_CONN_BUSY &&
		    util_elapsed(now, db_conns[i].query->started) >
		    parley_cfg.db_timeout_ms)
			db_conn_fail(&db_conns[i], "query timed out");
	}

	conn = &db_conns[parley_cfg.db_pool_size];
	if (conn->state == DB_CONN_BUSY &&
	    util_elapsed(now, conn->sent) > parley_cfg.db_timeout_ms)
		db_conn_fail(conn, "LISTEN connection stopped answering");
	else if (conn->state == DB_CONN_IDLE &&
	    util_elapsed(now, conn->sent) >= DB_LISTEN_PING)
		db_listen_send(conn, DB_LISTEN_PING_SQL);
}

/*
 * Turn a result into what callers need: ok, or an HTTP-like status with a
 * protocol error code. Functions in sql/ raise SQLSTATE PXnnn with the
 * protocol code as message (docs/DATA.md); a canceled statement is
 * unavailable; anything else is internal.
 */
static void
db_query_finish(struct db_query *q, PGresult *res, const char *why)
{
	struct db_result	r;
	ExecStatusType		st;
	const char		*state;

	memset(&r, 0, sizeof(r));
	r.res = res;

	if (res == NULL) {
		r.unknown = q->sent;
		r.status = HTTP_STATUS_SERVICE_UNAVAILABLE;
		r.code = "unavailable";
		r.message = why;
		metrics_db_error();
	} else if ((st = PQresultStatus(res)) == PGRES_TUPLES_OK ||
	    st == PGRES_COMMAND_OK) {
		r.ok = 1;
		r.status = HTTP_STATUS_OK;
	} else {
		state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
		if (state != NULL && state[0] == 'P' && state[1] == 'X') {
			r.status = atoi(state + 2);
			r.code = PQresultErrorField(res,
			    PG_DIAG_MESSAGE_PRIMARY);
			r.message = PQresultErrorField(res,
			    PG_DIAG_MESSAGE_DETAIL);
		} else if (state != NULL && !strcmp(state, DB_CANCELED)) {
			/* The statement timeout: rolled back, worth a retry. */
			r.status = HTTP_STATUS_SERVICE_UNAVAILABLE;
			r.code = "unavailable";
			r.message = "the database took too long to answer";
			kore_log(LOG_NOTICE, "query canceled: %.*s",
			    (int)strcspn(PQresultErrorMessage(res), "\n"),
			    PQresultErrorMessage(res));
			metrics_db_error();
		} else {
			r.status = HTTP_STATUS_INTERNAL_ERROR;
			r.code = "internal";
			r.message = "internal error";
			kore_log(LOG_NOTICE, "query failed: %s: %.*s",
			    state ? state : "?",
			    (int)strcspn(PQresultErrorMessage(res), "\n"),
			    PQresultErrorMessage(res));
			metrics_db_error();
		}
		if (r.code == NULL)
			r.code = "internal";
		if (r.message == NULL)
			r.message = r.code;
	}

	if (q->cb != NULL)
		q->cb(&r, q->arg);

	if (q == db_placing)
		q->answered = 1;
	else
		db_query_free(q);
}

static void
db_query_free(struct db_query *q)
{
	int		i;

	for (i = 0; i < q->nparams; i++)
		kore_free(q->params[i]);
	kore_free(q);
}

/* Server notices (e.g. on termination) go to our log, one line each. */
static void
db_notice(void *arg, const char *msg)
{
	kore_log(LOG_NOTICE, "database: %.*s", (int)strcspn(msg, "\n"), msg);
}
