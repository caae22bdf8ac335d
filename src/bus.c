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
 * The bus: what PostgreSQL NOTIFYs on channel parley, routed to the hub.
 * Payloads are <kind>:<seq>:<conv>:<uidlen>:<uid>:<json> (docs/DATA.md);
 * the json is the finished frame, written to sockets as it came.
 *
 * Notes are handled strictly in order. Two things pause the bus, queueing
 * what arrives meanwhile: a frame sent by reference (too big for NOTIFY)
 * being fetched, and the catch-up after the LISTEN connection came back,
 * which replays to each conversation what its sockets missed while it was
 * down (messages, then read receipts and presence), and to each user
 * with notification sockets the notifications stored, collapsed or read
 * since the connection was last known alive, so a database restart loses
 * nothing.
 *
 * The queue is bounded (PARLEY_BUS_QUEUE_MAX notes): past that, what it
 * holds is dropped and the LISTEN connection made again, and the catch-up
 * that follows fetches from the database what was dropped, from when the
 * queue was last empty.
 *
 * A fetch or catch-up the database keeps refusing is given up rather than
 * hold the bus paused for good: the sockets it was for are closed (1013),
 * and their clients catch up themselves when they reconnect.
 */

#include <sys/types.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "parley.h"

#define BUS_CATCHUP_LIMIT	500
#define BUS_CATCHUP_USERS	500
#define BUS_TIME_MAX		64

/* LISTEN returns whose `since` a socket's own catch-up may ask for. */
#define BUS_UPS_KEPT		8

/* Answers with an error (not a lost connection) before a query is given up. */
#define BUS_REFUSALS_MAX	5

#define BUS_CATCHUP_MESSAGES		1
#define BUS_CATCHUP_STATE		2
#define BUS_CATCHUP_NOTIFICATIONS	3

struct bus_note {
	TAILQ_ENTRY(bus_note)	list;
	size_t			len;
	char			data[];
};

/*
 * What sockets may have missed while LISTEN was down: a conversation's
 * messages after `after`, then its read receipts since `since`; or the
 * notifications of `users` (a JSON array) since `since`.
 */
struct bus_catchup {
	int			kind;
	int64_t			conversation_id;
	int64_t			after;
	char			*users;
	char			since[BUS_TIME_MAX];
	u_int64_t		backoff;
	int			refusals;
};

struct bus_users {
	struct kore_buf		json;
	int			count;
};

struct bus_parsed {
	char			kind;
	int64_t			seq;
	int64_t			conv;
	const char		*uid;
	size_t			uid_len;
	const char		*json;
	size_t			json_len;
};

static int	bus_parse(const char *, size_t, struct bus_parsed *);
static int	bus_parse_int(const char **, const char *, int64_t *);
static void	bus_route(struct bus_parsed *);
static void	bus_drain(void);
static void	bus_overflow(void);
static void	bus_forget_queued(void);
static void	bus_fetch(struct bus_parsed *);
static void	bus_fetch_query(void *, u_int64_t);
static void	bus_fetched(struct db_result *, void *);
static int	bus_try_again(struct db_result *, int *);
static void	bus_catchup_start(int, int64_t, int64_t, const char *);
static void	bus_catchup_user(const char *, void *);
static void	bus_catchup_users(struct bus_users *);
static void	bus_catchup_query(struct bus_catchup *);
static void	bus_catchup_retry(void *, u_int64_t);
static void	bus_catchup_done(struct db_result *, void *);
static void	bus_catchup_abandon(struct bus_catchup *);
static void	bus_users_close(const char *);
static void	bus_catchup_messages(struct bus_catchup *, PGresult *);
static void	bus_catchup_state(struct bus_catchup *, PGresult *);
static void	bus_catchup_notifications(PGresult *);

static TAILQ_HEAD(, bus_note)	bus_queue = TAILQ_HEAD_INITIALIZER(bus_queue);
static int			bus_queued;
static char			bus_queued_since[BUS_TIME_MAX];
static int			bus_paused;
static int			bus_catchups;
static struct bus_parsed	bus_fetching;
static char			bus_fetching_uid[PARLEY_USER_ID_MAX + 1];
static u_int64_t		bus_fetch_backoff;
static int			bus_fetch_refusals;
static char			bus_alive_at[BUS_TIME_MAX];
static u_int64_t		bus_up_count;
static char			bus_up_since[BUS_UPS_KEPT][BUS_TIME_MAX];

/* The LISTEN is in place: catch every socket up, then go live. */
void
bus_up(void)
{
	struct hub_conv		*conv;
	struct bus_users	users;
	int64_t			low;

	kore_log(LOG_NOTICE, "bus: listening");

	bus_up_count++;
	(void)kore_strlcpy(bus_up_since[bus_up_count % BUS_UPS_KEPT],
	    bus_alive_at, sizeof(bus_up_since[0]));
	bus_paused++;
	for (conv = hub_conv_first(); conv != NULL;
	    conv = hub_conv_next(conv)) {
		if (!hub_conv_open(conv, &low))
			continue;
		if (low >= 0) {
			bus_catchup_start(BUS_CATCHUP_MESSAGES,
			    hub_conv_id(conv), low, bus_alive_at);
		} else if (bus_alive_at[0] != '\0') {
			bus_catchup_start(BUS_CATCHUP_STATE,
			    hub_conv_id(conv), 0, bus_alive_at);
		}
	}

	/* Before the first ping of the worker's first LISTEN nothing is owed. */
	if (bus_alive_at[0] != '\0') {
		kore_buf_init(&users.json, 1024);
		users.count = 0;
		hub_notify_users(bus_catchup_user, &users);
		bus_catchup_users(&users);
		kore_buf_cleanup(&users.json);
	}
	bus_paused--;

	bus_drain();
}

/* How many times the LISTEN came back: a socket opening across one. */
u_int64_t
bus_ups(void)
{
	return (bus_up_count);
}

/*
 * Since when a socket up to date at `ups` (bus_ups() then, before the
 * latest return) may have missed read receipts and presence: the last ping
 * before the first loss of the LISTEN after it (or the oldest kept). ""
 * for the worker's first LISTEN: nothing is owed before it.
 */
const char *
bus_since(u_int64_t ups)
{
	if (bus_up_count - ups > BUS_UPS_KEPT)
		ups = bus_up_count - BUS_UPS_KEPT;

	return (bus_up_since[(ups + 1) % BUS_UPS_KEPT]);
}

/* The LISTEN connection answered a ping: `at` is the server's clock. */
void
bus_alive(const char *at)
{
	(void)kore_strlcpy(bus_alive_at, at, sizeof(bus_alive_at));
}

/*
 * What waits (behind a fetch or a catch-up) is forgotten too: delivered
 * after the catch-up of the LISTEN's return, an old read receipt would
 * undo a newer one. The catch-up gets it all from the database.
 */
void
bus_down(void)
{
	kore_log(LOG_NOTICE, "bus: LISTEN connection lost, reconnecting");

	if (bus_queued > 0)
		bus_forget_queued();
}

void
bus_notify(const char *payload, size_t len)
{
	struct bus_note		*note;

	if (bus_queued == parley_cfg.bus_queue_max) {
		bus_overflow();
		return;
	}

	/* Empty: whatever came before the last ping has been handled. */
	if (bus_queued == 0) {
		(void)kore_strlcpy(bus_queued_since, bus_alive_at,
		    sizeof(bus_queued_since));
	}

	note = kore_malloc(sizeof(*note) + len);
	note->len = len;
	memcpy(note->data, payload, len);
	TAILQ_INSERT_TAIL(&bus_queue, note, list);
	bus_queued++;

	bus_drain();
}

/*
 * Too much waits behind a fetch or a catch-up: drop it (and the note that
 * did not fit) and catch up as after a lost LISTEN, from when the queue
 * was last empty.
 */
static void
bus_overflow(void)
{
	kore_log(LOG_NOTICE, "bus: %d notes queued, dropping them to catch "
	    "up from the database", bus_queued);
	metrics_bus_overflow();

	bus_forget_queued();
	db_listen_reset("bus queue full");
}

/* The next catch-up starts from when the queue was last empty. */
static void
bus_forget_queued(void)
{
	struct bus_note		*note;

	while ((note = TAILQ_FIRST(&bus_queue)) != NULL) {
		TAILQ_REMOVE(&bus_queue, note, list);
		kore_free(note);
	}
	bus_queued = 0;

	(void)kore_strlcpy(bus_alive_at, bus_queued_since,
	    sizeof(bus_alive_at));
}

static void
bus_drain(void)
{
	struct bus_note		*note;
	struct bus_parsed	p;

	while (!bus_paused && bus_catchups == 0 &&
	    (note = TAILQ_FIRST(&bus_queue)) != NULL) {
		TAILQ_REMOVE(&bus_queue, note, list);
		bus_queued--;
		if (bus_parse(note->data, note->len, &p))
			bus_route(&p);
		else
			kore_log(LOG_NOTICE, "bus: malformed note ignored");
		kore_free(note);
	}
}

static void
bus_route(struct bus_parsed *p)
{
	switch (p->kind) {
	case 'm':
		hub_conversation(p->conv, p->seq, -1, NULL, 0, p->json,
		    p->json_len);
		break;
	case 'e':
		hub_conversation(p->conv, 0, -1, p->uid, p->uid_len, p->json,
		    p->json_len);
		break;
	case 'n':
	case 'r':
		hub_user(p->uid, p->uid_len, p->json, p->json_len);
		break;
	case 'M':
	case 'N':
		bus_fetch(p);
		break;
	case 'f':
		fanout_wake();
		break;
	default:
		kore_log(LOG_NOTICE, "bus: unknown kind '%c'", p->kind);
		break;
	}
}

/* A frame too big for NOTIFY: fetch it, holding everything behind it. */
static void
bus_fetch(struct bus_parsed *p)
{
	/* The note that p points into is freed when we return. */
	bus_fetching = *p;
	memcpy(bus_fetching_uid, p->uid, p->uid_len);
	bus_fetching.uid = bus_fetching_uid;
	bus_fetch_backoff = 0;
	bus_fetch_refusals = 0;

	bus_paused++;
	bus_fetch_query(NULL, 0);
}

static void
bus_fetch_query(void *unused, u_int64_t now)
{
	const char	*params[1];
	char		seq[24];

	(void)snprintf(seq, sizeof(seq), "%lld", (long long)bus_fetching.seq);
	params[0] = seq;

	(void)db_query(bus_fetching.kind == 'M' ?
	    "SELECT parley_message_frame($1)" :
	    "SELECT parley_notification_frame($1)", 1, params,
	    bus_fetched, NULL);
}

/*
 * A failed fetch is retried like a catch-up: not lost, not overtaken. One
 * the database keeps refusing closes the sockets the frame was for.
 */
static void
bus_fetched(struct db_result *r, void *unused)
{
	struct bus_parsed	*p = &bus_fetching;

	if (!r->ok && bus_try_again(r, &bus_fetch_refusals)) {
		util_backoff(&bus_fetch_backoff);
		(void)kore_timer_add(bus_fetch_query, bus_fetch_backoff, NULL,
		    KORE_TIMER_ONESHOT);
		return;
	}

	if (!r->ok) {
		kore_log(LOG_NOTICE, "bus: %c %lld refused, closing its "
		    "sockets", p->kind, (long long)p->seq);
		if (p->kind == 'M')
			hub_conversation_close(p->conv);
		else
			hub_user_close(p->uid, p->uid_len);
	} else if (PQntuples(r->res) == 1 && !PQgetisnull(r->res, 0, 0)) {
		p->kind = p->kind == 'M' ? 'm' : 'n';
		p->json = PQgetvalue(r->res, 0, 0);
		p->json_len = PQgetlength(r->res, 0, 0);
		bus_route(p);
	} else {
		/* Deleted since: nothing left to deliver. */
		kore_log(LOG_NOTICE, "bus: %c %lld is gone",
		    p->kind, (long long)p->seq);
	}

	bus_paused--;
	bus_drain();
}

/*
 * Whether a failed query is tried again: always while the database cannot
 * be reached (it is coming back), BUS_REFUSALS_MAX times in all when it
 * answers with an error (a statement timeout, a bug): the bus must not stay
 * paused for good behind one query.
 */
static int
bus_try_again(struct db_result *r, int *refusals)
{
	return (r->res == NULL || ++*refusals < BUS_REFUSALS_MAX);
}

static void
bus_catchup_start(int kind, int64_t conversation_id, int64_t after,
    const char *since)
{
	struct bus_catchup	*cu;

	cu = kore_calloc(1, sizeof(*cu));
	cu->kind = kind;
	cu->conversation_id = conversation_id;
	cu->after = after;
	(void)kore_strlcpy(cu->since, since, sizeof(cu->since));

	bus_catchups++;
	bus_catchup_query(cu);
}

/* Users go to the database BUS_CATCHUP_USERS at a time. */
static void
bus_catchup_user(const char *id, void *arg)
{
	struct bus_users	*users = arg;

	kore_buf_append(&users->json, users->count ? "," : "[", 1);
	json_append_string(&users->json, id, strlen(id));
	if (++users->count == BUS_CATCHUP_USERS)
		bus_catchup_users(users);
}

static void
bus_catchup_users(struct bus_users *users)
{
	struct bus_catchup	*cu;

	if (users->count == 0)
		return;

	kore_buf_append(&users->json, "]", 1);
	cu = kore_calloc(1, sizeof(*cu));
	cu->kind = BUS_CATCHUP_NOTIFICATIONS;
	cu->users = kore_strdup(kore_buf_stringify(&users->json, NULL));
	(void)kore_strlcpy(cu->since, bus_alive_at, sizeof(cu->since));
	kore_buf_reset(&users->json);
	users->count = 0;

	bus_catchups++;
	bus_catchup_query(cu);
}

static void
bus_catchup_query(struct bus_catchup *cu)
{
	const char		*params[3];
	char			conv[24], a[24], limit[16];

	(void)snprintf(conv, sizeof(conv), "%lld",
	    (long long)cu->conversation_id);

	switch (cu->kind) {
	case BUS_CATCHUP_NOTIFICATIONS:
		params[0] = cu->users;
		params[1] = cu->since;
		(void)db_query("SELECT user_id, frame FROM "
		    "parley_notification_catchup($1, $2)", 2, params,
		    bus_catchup_done, cu);
		return;
	case BUS_CATCHUP_STATE:
		params[0] = conv;
		params[1] = cu->since;
		(void)db_query("SELECT skip_user, frame FROM "
		    "parley_conversation_catchup($1, $2)", 2, params,
		    bus_catchup_done, cu);
		return;
	}

	(void)snprintf(a, sizeof(a), "%lld", (long long)cu->after);
	(void)snprintf(limit, sizeof(limit), "%d", BUS_CATCHUP_LIMIT);
	params[0] = conv;
	params[1] = a;
	params[2] = limit;

	(void)db_query("SELECT id, frame FROM parley_catchup($1, $2, $3)",
	    3, params, bus_catchup_done, cu);
}

static void
bus_catchup_retry(void *arg, u_int64_t now)
{
	bus_catchup_query(arg);
}

/*
 * A failed catch-up (the pool is often still reconnecting when LISTEN is
 * back) is retried with backoff, and the bus stays paused until it
 * succeeds, live frames must not overtake what the sockets missed, or is
 * given up (bus_try_again).
 */
static void
bus_catchup_done(struct db_result *r, void *arg)
{
	struct bus_catchup	*cu = arg;

	if (!r->ok && bus_try_again(r, &cu->refusals)) {
		util_backoff(&cu->backoff);
		(void)kore_timer_add(bus_catchup_retry, cu->backoff, cu,
		    KORE_TIMER_ONESHOT);
		return;
	}

	bus_catchups--;

	if (!r->ok) {
		bus_catchup_abandon(cu);
	} else {
		switch (cu->kind) {
		case BUS_CATCHUP_MESSAGES:
			bus_catchup_messages(cu, r->res);
			break;
		case BUS_CATCHUP_STATE:
			bus_catchup_state(cu, r->res);
			break;
		case BUS_CATCHUP_NOTIFICATIONS:
			bus_catchup_notifications(r->res);
			break;
		}
	}

	kore_free(cu->users);
	kore_free(cu);
	bus_drain();
}

/* What the catch-up was for cannot be had: its sockets are closed. */
static void
bus_catchup_abandon(struct bus_catchup *cu)
{
	kore_log(LOG_NOTICE, "bus: catch-up refused, closing its sockets");

	if (cu->kind == BUS_CATCHUP_NOTIFICATIONS)
		bus_users_close(cu->users);
	else
		hub_conversation_close(cu->conversation_id);
}

/* users: the JSON array of ids the catch-up was for. */
static void
bus_users_close(const char *users)
{
	yajl_val	root, v;
	size_t		i;

	if ((root = json_parse(users, strlen(users))) == NULL)
		return;

	for (i = 0; YAJL_IS_ARRAY(root) && i < YAJL_GET_ARRAY(root)->len;
	    i++) {
		v = YAJL_GET_ARRAY(root)->values[i];
		if (YAJL_IS_STRING(v))
			hub_user_close(v->u.string, strlen(v->u.string));
	}

	yajl_tree_free(root);
}

/*
 * Deliver what was missed; a full page means there may be more, and after
 * the last page come the read receipts, which refer to those messages.
 */
static void
bus_catchup_messages(struct bus_catchup *cu, PGresult *res)
{
	int64_t			id;
	int			i, n;

	n = PQntuples(res);
	id = cu->after;
	for (i = 0; i < n; i++) {
		if (!util_parse_int64(PQgetvalue(res, i, 0), 1, INT64_MAX,
		    &id))
			continue;
		hub_conversation(cu->conversation_id, id, cu->after, NULL, 0,
		    PQgetvalue(res, i, 1), PQgetlength(res, i, 1));
	}

	if (n == BUS_CATCHUP_LIMIT) {
		bus_catchup_start(BUS_CATCHUP_MESSAGES, cu->conversation_id, id,
		    cu->since);
	} else if (cu->since[0] != '\0') {
		bus_catchup_start(BUS_CATCHUP_STATE, cu->conversation_id, 0,
		    cu->since);
	}
}

/* Read receipts to every socket; presence to all but the user's own. */
static void
bus_catchup_state(struct bus_catchup *cu, PGresult *res)
{
	int		i;

	for (i = 0; i < PQntuples(res); i++) {
		hub_conversation(cu->conversation_id, 0, -1, PQgetvalue(res, i, 0),
		    PQgetlength(res, i, 0), PQgetvalue(res, i, 1),
		    PQgetlength(res, i, 1));
	}
}

static void
bus_catchup_notifications(PGresult *res)
{
	int		i;

	for (i = 0; i < PQntuples(res); i++) {
		hub_user(PQgetvalue(res, i, 0), PQgetlength(res, i, 0),
		    PQgetvalue(res, i, 1), PQgetlength(res, i, 1));
	}
}

static int
bus_parse_int(const char **p, const char *end, int64_t *out)
{
	int64_t		v;

	v = 0;
	if (*p >= end || **p < '0' || **p > '9')
		return (0);

	while (*p < end && **p >= '0' && **p <= '9') {
		if (v > (INT64_MAX - 9) / 10)
			return (0);
		v = v * 10 + (**p - '0');
		(*p)++;
	}

	if (*p >= end || **p != ':')
		return (0);
	(*p)++;

	*out = v;
	return (1);
}

static int
bus_parse(const char *data, size_t len, struct bus_parsed *p)
{
	const char	*cur, *end;
	int64_t		uid_len;

	end = data + len;
	if (len < 2 || data[1] != ':')
		return (0);

	p->kind = data[0];
	cur = data + 2;
	if (!bus_parse_int(&cur, end, &p->seq) ||
	    !bus_parse_int(&cur, end, &p->conv) ||
	    !bus_parse_int(&cur, end, &uid_len))
		return (0);

	if (uid_len > PARLEY_USER_ID_MAX || end - cur < uid_len + 1 ||
	    cur[uid_len] != ':')
		return (0);

	p->uid = cur;
	p->uid_len = (size_t)uid_len;
	p->json = cur + uid_len + 1;
	p->json_len = (size_t)(end - p->json);

	return (1);
}
