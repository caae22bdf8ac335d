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
 * Write batching. PostgreSQL serialises commits that NOTIFY, so one
 * transaction per message caps a server at a few thousand messages a
 * second whatever its C code does. Each worker therefore keeps one write
 * in flight: sends that arrive meanwhile wait here and go together in the
 * next round trip (parley_post_messages, one transaction, one INSERT of
 * all of them). Under light load a batch is one message and costs what a
 * single write costs.
 *
 * A send is acknowledged only after its batch committed. A socket has one
 * send in flight at a time, so its sends keep their order.
 */

#include <sys/types.h>

#include <stdio.h>
#include <string.h>

#include "parley.h"

#define BATCH_MAX		256

struct batch_item {
	TAILQ_ENTRY(batch_item)	list;
	struct session		*session;
	struct kore_buf		json;
};

TAILQ_HEAD(batch_list, batch_item);

struct batch {
	struct batch_item	*items[BATCH_MAX];
	int			count;
};

static void	batch_flush(void);
static void	batch_done(struct db_result *, void *);

static struct batch_list	batch_pending = TAILQ_HEAD_INITIALIZER(batch_pending);
static struct batch		*batch_inflight;

/* Queue a validated send of session s; its answer goes to chat_sent(). */
void
batch_submit(struct session *s, struct message_in *m)
{
	struct batch_item	*item;

	item = kore_calloc(1, sizeof(*item));
	item->session = s;
	s->batch_item = item;

	kore_buf_init(&item->json, 128 + m->content_len);
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

	TAILQ_INSERT_TAIL(&batch_pending, item, list);
	if (batch_inflight == NULL)
		batch_flush();
}

/* The socket is gone: drop its waiting send, or ignore its answer. */
void
batch_forget(struct session *s)
{
	struct batch_item	*item;
	int			i;

	if ((item = s->batch_item) == NULL)
		return;
	s->batch_item = NULL;

	if (batch_inflight != NULL) {
		for (i = 0; i < batch_inflight->count; i++) {
			if (batch_inflight->items[i] == item) {
				item->session = NULL;
				return;
			}
		}
	}

	TAILQ_REMOVE(&batch_pending, item, list);
	kore_buf_cleanup(&item->json);
	kore_free(item);
}

static void
batch_flush(void)
{
	struct batch		*b;
	struct batch_item	*item;
	struct kore_buf		array;
	const char		*params[1];

	if (TAILQ_EMPTY(&batch_pending))
		return;

	b = kore_calloc(1, sizeof(*b));
	kore_buf_init(&array, 4096);
	kore_buf_append(&array, "[", 1);

	while ((item = TAILQ_FIRST(&batch_pending)) != NULL &&
	    b->count < BATCH_MAX) {
		TAILQ_REMOVE(&batch_pending, item, list);
		if (b->count > 0)
			kore_buf_append(&array, ",", 1);
		kore_buf_append(&array, item->json.data, item->json.offset);
		b->items[b->count++] = item;
	}
	kore_buf_append(&array, "]", 1);

	params[0] = kore_buf_stringify(&array, NULL);
	batch_inflight = b;
	(void)db_query("SELECT idx, status, body, code, message "
	    "FROM parley_post_messages($1::jsonb)", 1, params, batch_done, b);
	kore_buf_cleanup(&array);
}

static void
batch_done(struct db_result *r, void *arg)
{
	struct batch		*b = arg;
	struct batch_item	*item;
	struct session		*s;
	int64_t			idx, status;
	int			i, n;

	n = r->ok ? PQntuples(r->res) : 0;
	for (i = 0; i < n; i++) {
		if (!util_parse_int64(PQgetvalue(r->res, i, 0), 0,
		    b->count - 1, &idx) ||
		    !util_parse_int64(PQgetvalue(r->res, i, 1), 100, 599,
		    &status))
			continue;
		item = b->items[idx];
		if ((s = item->session) == NULL)
			continue;
		item->session = NULL;
		s->batch_item = NULL;
		if (status == HTTP_STATUS_OK) {
			chat_sent(s, HTTP_STATUS_OK, PQgetvalue(r->res, i, 2),
			    NULL, NULL);
		} else {
			chat_sent(s, (int)status, NULL,
			    PQgetvalue(r->res, i, 3), PQgetvalue(r->res, i, 4));
		}
	}

	/* Whatever got no row (the whole call failed) gets the error. */
	for (i = 0; i < b->count; i++) {
		item = b->items[i];
		if ((s = item->session) != NULL) {
			s->batch_item = NULL;
			chat_sent(s, r->ok ? HTTP_STATUS_INTERNAL_ERROR :
			    r->status, NULL, "internal", r->ok ?
			    "internal error" : r->message);
		}
		kore_buf_cleanup(&item->json);
		kore_free(item);
	}

	kore_free(b);
	batch_inflight = NULL;
	batch_flush();
}
