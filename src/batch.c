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
 * Batching. PostgreSQL serialises commits that NOTIFY, so one
 * transaction per message caps a server at a few thousand messages a
 * second whatever its C code does, and one per socket opened or closed
 * made a reconnect storm queue thousands of commits. Each worker therefore
 * keeps one call in flight per kind: the sends (opens, closes) that arrive
 * meanwhile wait here and go together in the next round trip
 * (parley_post_messages, parley_sockets_open, parley_sockets_close: one
 * transaction for all of them). Under light load a batch is one item and
 * costs what a single call costs.
 *
 * A send is acknowledged only after its batch committed. A socket has one
 * send in flight at a time, so its sends keep their order.
 *
 * The two users of a conversation usually sit on different workers, so the
 * workers' send batches lock the same conversations and run one after the
 * other: together they are one pipeline, and past what it writes the sends
 * queue until a socket's queue is full, with CPU to spare (bench/README.md,
 * fifteenth round). A worker whose sends go to the database
 * PARLEY_SEND_SPLIT_MS after they arrived therefore splits them into
 * PARLEY_SEND_LANES lanes by conversation id, one call in flight per lane:
 * every worker splits the same way, so batches of different lanes share
 * no conversation and run side by side. Lanes make smaller batches, each
 * with the call's fixed cost, so a worker goes back to one lane once its
 * sends are answered promptly again. Lanes never break an order: a
 * socket's sends stay in order (one in flight), and a conversation's ids
 * are drawn under its lock whichever batch holds it.
 *
 * Closes have nobody to answer, and one that never reached the registry
 * would leave its user online (and counted against the socket cap) for as
 * long as the worker lives: a failed close batch waits and goes again,
 * backing off, until the database takes it (closing twice is harmless).
 */

#include <sys/types.h>

#include <stdio.h>
#include <string.h>

#include "parley.h"

#define BATCH_MAX		256

/* One lane again once sends waited under half the split wait this long. */
#define BATCH_JOIN_AFTER_MS	2000

struct batch_item {
	TAILQ_ENTRY(batch_item)	list;
	struct batcher		*owner;
	struct session		*session;
	u_int64_t		socket_id;
	u_int64_t		received;	/* a send's frame arrived */
	struct kore_buf		json;
};

TAILQ_HEAD(batch_list, batch_item);

struct batch {
	struct batcher		*owner;
	struct batch_item	*items[BATCH_MAX];
	int			count;
};

/*
 * One kind of batched call: its SQL ($1 the JSON array) and where its
 * answers go (none for closes: nobody waits for them).
 */
struct batcher {
	const char		*sql;
	int			max;
	void			(*answer)(struct session *, int, const char *,
				    const char *, const char *);
	/* Registers sockets: one registered for nothing is closed again. */
	int			close_orphans;
	/* A lane of sends: splits and joins the lanes (batch_lanes_adapt). */
	int			send_lane;
	struct batch_list	pending;
	struct batch		*inflight;
	int			waiting;
	u_int64_t		backoff;
};

static struct batch_item	*batch_item_new(struct batcher *,
				    struct session *, u_int64_t, size_t);
static void	batch_queue(struct batch_item *);
static void	batch_flush(struct batcher *);
static void	batch_done(struct db_result *, void *);
static void	batch_again(struct batch *);
static void	batch_again_flush(void *, u_int64_t);

static int	batch_lanes_adapt(struct batcher *);

static struct batcher	batch_sends[PARLEY_SEND_LANES_MAX];
static int		batch_lanes_used = 1;
static u_int64_t	batch_calm_since;

/*
 * Opens run in a subtransaction each: PostgreSQL caches 64 per backend. A
 * socket that closed while its open was in flight is registered all the
 * same: it is taken out again, as is one whose open was lost with its
 * connection after it reached the database.
 */
static struct batcher	batch_opens = {
	"SELECT idx, status, body, code, message "
	"FROM parley_sockets_open($1::jsonb)",
	64, ws_opened, 1, 0, TAILQ_HEAD_INITIALIZER(batch_opens.pending),
	NULL, 0, 0
};

static struct batcher	batch_closes = {
	"SELECT parley_sockets_close($1::jsonb)",
	BATCH_MAX, NULL, 0, 0, TAILQ_HEAD_INITIALIZER(batch_closes.pending),
	NULL, 0, 0
};

void
batch_init(void)
{
	int		i;

	for (i = 0; i < parley_cfg.send_lanes; i++) {
		batch_sends[i].sql = "SELECT idx, status, body, code, message "
		    "FROM parley_post_messages($1::jsonb)";
		batch_sends[i].max = BATCH_MAX;
		batch_sends[i].answer = chat_sent;
		batch_sends[i].send_lane = 1;
		TAILQ_INIT(&batch_sends[i].pending);
	}
}

/* Queue a validated send of session s; its answer goes to chat_sent(). */
void
batch_send(struct session *s, struct message_in *m)
{
	struct batch_item	*item;
	struct batcher		*lane;

	lane = &batch_sends[s->conversation_id % batch_lanes_used];
	item = batch_item_new(lane, s, s->id, 128 + m->content_len);
	item->received = s->send_received;
	kore_buf_appendf(&item->json, "{\"c\":%lld,\"s\":",
	    (long long)s->conversation_id);
	json_append_string(&item->json, s->ident.user_id,
	    strlen(s->ident.user_id));
	kore_buf_appendf(&item->json, ",\"t\":\"%s\",\"b\":", m->type);
	json_append_string(&item->json, m->content, m->content_len);
	if (m->metadata != NULL)
		kore_buf_appendf(&item->json, ",\"m\":%s", m->metadata);
	if (m->has_client_id) {
		kore_buf_appendf(&item->json, ",\"k\":");
		json_append_string(&item->json, m->client_id,
		    strlen(m->client_id));
	}
	kore_buf_appendf(&item->json, "}");
	batch_queue(item);
}

/* Register the authenticated socket s; its answer goes to ws_opened(). */
void
batch_open(struct session *s)
{
	struct batch_item	*item;

	item = batch_item_new(&batch_opens, s, s->id, 256);
	kore_buf_appendf(&item->json, "{\"n\":\"%s\",\"s\":%llu,", ws_node,
	    (unsigned long long)s->id);
	if (s->kind == SESSION_CHAT) {
		kore_buf_appendf(&item->json, "\"c\":%lld,",
		    (long long)s->conversation_id);
	}
	kore_buf_appendf(&item->json, "\"u\":");
	json_append_string(&item->json, s->ident.user_id,
	    strlen(s->ident.user_id));
	kore_buf_appendf(&item->json, ",\"m\":");
	json_append_string(&item->json, s->ident.name, strlen(s->ident.name));
	kore_buf_appendf(&item->json, ",\"x\":%d}",
	    parley_cfg.max_sockets_per_user);
	batch_queue(item);
}

/* Take socket `id` out of the registry; `typing` ends its typing too. */
void
batch_close(u_int64_t id, int typing)
{
	struct batch_item	*item;

	item = batch_item_new(&batch_closes, NULL, id, 96);
	kore_buf_appendf(&item->json, "{\"n\":\"%s\",\"s\":%llu,\"t\":%s}",
	    ws_node, (unsigned long long)id, typing ? "true" : "false");
	batch_queue(item);
}

/* The socket is gone: drop its waiting item, or ignore its answer. */
void
batch_forget(struct session *s)
{
	struct batch_item	*item;
	struct batch		*b;
	int			i;

	if ((item = s->batch_item) == NULL)
		return;
	s->batch_item = NULL;

	if ((b = item->owner->inflight) != NULL) {
		for (i = 0; i < b->count; i++) {
			if (b->items[i] == item) {
				item->session = NULL;
				return;
			}
		}
	}

	TAILQ_REMOVE(&item->owner->pending, item, list);
	kore_buf_cleanup(&item->json);
	kore_free(item);
}

static struct batch_item *
batch_item_new(struct batcher *owner, struct session *s, u_int64_t socket_id,
    size_t len)
{
	struct batch_item	*item;

	item = kore_calloc(1, sizeof(*item));
	item->owner = owner;
	item->session = s;
	item->socket_id = socket_id;
	if (s != NULL)
		s->batch_item = item;
	kore_buf_init(&item->json, len);

	return (item);
}

static void
batch_queue(struct batch_item *item)
{
	TAILQ_INSERT_TAIL(&item->owner->pending, item, list);
	if (item->owner->inflight == NULL && !item->owner->waiting)
		batch_flush(item->owner);
}

static void
batch_flush(struct batcher *owner)
{
	struct batch		*b;
	struct batch_item	*item;
	struct kore_buf		array;
	const char		*params[1];

	if (TAILQ_EMPTY(&owner->pending))
		return;
	if (owner->send_lane)
		metrics_send_batch(batch_lanes_adapt(owner));

	b = kore_calloc(1, sizeof(*b));
	b->owner = owner;
	kore_buf_init(&array, 4096);
	kore_buf_append(&array, "[", 1);

	while ((item = TAILQ_FIRST(&owner->pending)) != NULL &&
	    b->count < owner->max) {
		TAILQ_REMOVE(&owner->pending, item, list);
		util_buf_reserve(&array, item->json.offset + 2);
		if (b->count > 0)
			kore_buf_append(&array, ",", 1);
		kore_buf_append(&array, item->json.data, item->json.offset);
		b->items[b->count++] = item;
	}
	kore_buf_append(&array, "]", 1);

	params[0] = kore_buf_stringify(&array, NULL);
	owner->inflight = b;
	(void)db_query(owner->sql, 1, params, batch_done, b);
	kore_buf_cleanup(&array);
}

static void
batch_done(struct db_result *r, void *arg)
{
	struct batch		*b = arg;
	struct batcher		*owner = b->owner;
	struct batch_item	*item;
	struct session		*s;
	int64_t			idx, status;
	int			i, n;

	if (owner->answer == NULL) {
		if (!r->ok) {
			batch_again(b);
			return;
		}
		owner->backoff = 0;
	}

	n = r->ok && owner->answer != NULL ? PQntuples(r->res) : 0;
	for (i = 0; i < n; i++) {
		if (!util_parse_int64(PQgetvalue(r->res, i, 0), 0,
		    b->count - 1, &idx) ||
		    !util_parse_int64(PQgetvalue(r->res, i, 1), 100, 599,
		    &status))
			continue;
		item = b->items[idx];
		if ((s = item->session) == NULL) {
			if (status == HTTP_STATUS_OK && owner->close_orphans)
				batch_close(item->socket_id, 0);
			continue;
		}
		item->session = NULL;
		s->batch_item = NULL;
		if (status == HTTP_STATUS_OK) {
			owner->answer(s, HTTP_STATUS_OK,
			    PQgetvalue(r->res, i, 2), NULL, NULL);
		} else {
			owner->answer(s, (int)status, NULL,
			    PQgetvalue(r->res, i, 3), PQgetvalue(r->res, i, 4));
		}
	}

	/*
	 * Whatever got no row (the whole call failed) gets the error. An open
	 * whose answer was lost with the connection may have committed: it is
	 * taken out again, since its socket is refused.
	 */
	for (i = 0; i < b->count; i++) {
		item = b->items[i];
		if (r->unknown && owner->close_orphans)
			batch_close(item->socket_id, 0);
		if ((s = item->session) != NULL) {
			s->batch_item = NULL;
			owner->answer(s, r->ok ? HTTP_STATUS_INTERNAL_ERROR :
			    r->status, NULL, "internal", r->ok ?
			    "internal error" : r->message);
		}
		kore_buf_cleanup(&item->json);
		kore_free(item);
	}

	kore_free(b);
	owner->inflight = NULL;
	batch_flush(owner);
}

/*
 * Split when the oldest send of a batch about to go arrived the split wait
 * ago (it may have waited in its socket's queue behind the socket's
 * previous send); join when every batch's oldest waited under half of it
 * for a while. True when this call split.
 */
static int
batch_lanes_adapt(struct batcher *lane)
{
	u_int64_t	now, waited;

	now = kore_time_ms();
	waited = util_elapsed(now, TAILQ_FIRST(&lane->pending)->received);

	if (waited >= parley_cfg.send_split_ms) {
		batch_calm_since = 0;
		if (batch_lanes_used > 1 || parley_cfg.send_lanes == 1)
			return (0);
		batch_lanes_used = parley_cfg.send_lanes;
		return (1);
	}
	if (batch_lanes_used == 1 || waited >= parley_cfg.send_split_ms / 2) {
		batch_calm_since = 0;
		return (0);
	}
	if (batch_calm_since == 0)
		batch_calm_since = now;
	else if (util_elapsed(now, batch_calm_since) >= BATCH_JOIN_AFTER_MS)
		batch_lanes_used = 1;
	return (0);
}

/* A batch nobody waits for failed: back to the front of the line, later. */
static void
batch_again(struct batch *b)
{
	struct batcher		*owner = b->owner;
	int			i;

	for (i = b->count - 1; i >= 0; i--)
		TAILQ_INSERT_HEAD(&owner->pending, b->items[i], list);
	kore_free(b);

	owner->inflight = NULL;
	owner->waiting = 1;
	util_backoff(&owner->backoff);
	(void)kore_timer_add(batch_again_flush, owner->backoff, owner,
	    KORE_TIMER_ONESHOT);
}

static void
batch_again_flush(void *arg, u_int64_t now)
{
	struct batcher		*owner = arg;

	owner->waiting = 0;
	batch_flush(owner);
}
