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
 * Counters for /metrics. The parent maps one shared page before the
 * workers fork; each worker writes only its own slot, so no locks, and
 * whichever worker serves /metrics sums the slots of all of them.
 */

#include <sys/types.h>
#include <sys/mman.h>

#include <stdint.h>
#include <string.h>

#include "parley.h"

static const double latency_bounds[METRICS_LATENCY_BUCKETS] = {
	0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5
};

static const char *reject_reasons[METRICS_REJECT_MAX] = {
	"origin", "unauthenticated", "token_expired", "forbidden",
	"too_many_connections", "bad_request"
};

static const char *socket_kinds[METRICS_SOCKET_KINDS] = {
	"chat", "notifications"
};

struct metrics_slot {
	u_int64_t	sockets_open[METRICS_SOCKET_KINDS];
	u_int64_t	messages_stored;
	u_int64_t	frames_sent;
	u_int64_t	db_errors;
	u_int64_t	bus_overflows;
	u_int64_t	send_batches;
	u_int64_t	send_splits;
	u_int64_t	pages[2];
	u_int64_t	rejected[METRICS_REJECT_MAX];
	u_int64_t	latency[METRICS_LATENCY_BUCKETS];
	u_int64_t	latency_count;
	u_int64_t	latency_sum_us;
};

#define METRICS_SLOTS	(KORE_WORKER_MAX + KORE_WORKER_BASE + 1)

static struct metrics_slot	*metrics_slots;
static struct metrics_slot	metrics_parent;

static struct metrics_slot	*metrics_mine(void);
static void	metrics_counter(struct kore_buf *, const char *, u_int64_t);

/* In the parent, before the workers fork. */
void
metrics_init(void)
{
	metrics_slots = mmap(NULL, METRICS_SLOTS * sizeof(*metrics_slots),
	    PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (metrics_slots == MAP_FAILED)
		fatal("metrics: mmap: %s", errno_s);
}

/* A restarted worker starts with no sockets. */
void
metrics_worker_start(void)
{
	memset(metrics_mine()->sockets_open, 0,
	    sizeof(metrics_mine()->sockets_open));
}

void
metrics_socket_open(int kind, int delta)
{
	metrics_mine()->sockets_open[kind] += delta;
}

/*
 * This worker's share of the sockets: above zero when it holds more than
 * the least loaded worker, below zero when it holds fewer than the most
 * loaded one, zero when they are even.
 */
int
metrics_socket_share(void)
{
	u_int64_t	mine, least, most, n;
	int		id, k, workers;

	if (worker == NULL || metrics_slots == NULL)
		return (0);

	mine = most = 0;
	least = UINT64_MAX;
	workers = worker_count - KORE_WORKER_BASE;
	for (id = 1; id <= workers; id++) {
		n = 0;
		for (k = 0; k < METRICS_SOCKET_KINDS; k++)
			n += metrics_slots[id].sockets_open[k];
		if (id == worker->id)
			mine = n;
		if (n < least)
			least = n;
		if (n > most)
			most = n;
	}

	if (mine > least)
		return (1);
	if (mine < most)
		return (-1);
	return (0);
}

void
metrics_message_stored(void)
{
	metrics_mine()->messages_stored++;
}

void
metrics_frames_sent(u_int64_t n)
{
	metrics_mine()->frames_sent += n;
}

void
metrics_db_error(void)
{
	metrics_mine()->db_errors++;
}

void
metrics_bus_overflow(void)
{
	metrics_mine()->bus_overflows++;
}

/* A batch of sends went to the database; `split`: its worker just split. */
void
metrics_send_batch(int split)
{
	metrics_mine()->send_batches++;
	metrics_mine()->send_splits += split != 0;
}

/* A latest page answered from the worker's copy (kept) or rendered. */
void
metrics_page(int kept)
{
	metrics_mine()->pages[kept != 0]++;
}

void
metrics_rejected(int reason)
{
	metrics_mine()->rejected[reason]++;
}

void
metrics_send_latency(u_int64_t us)
{
	struct metrics_slot	*m;
	int			i;

	m = metrics_mine();
	m->latency_count++;
	m->latency_sum_us += us;
	for (i = 0; i < METRICS_LATENCY_BUCKETS; i++) {
		if ((double)us / 1e6 <= latency_bounds[i]) {
			m->latency[i]++;
			break;
		}
	}
}

void
metrics_render(struct kore_buf *buf)
{
	struct metrics_slot	sum;
	u_int64_t		cumulative;
	size_t			s, i;

	memset(&sum, 0, sizeof(sum));
	for (s = 0; s < METRICS_SLOTS; s++) {
		for (i = 0; i < METRICS_SOCKET_KINDS; i++)
			sum.sockets_open[i] += metrics_slots[s].sockets_open[i];
		for (i = 0; i < METRICS_REJECT_MAX; i++)
			sum.rejected[i] += metrics_slots[s].rejected[i];
		for (i = 0; i < METRICS_LATENCY_BUCKETS; i++)
			sum.latency[i] += metrics_slots[s].latency[i];
		sum.messages_stored += metrics_slots[s].messages_stored;
		sum.frames_sent += metrics_slots[s].frames_sent;
		sum.db_errors += metrics_slots[s].db_errors;
		sum.bus_overflows += metrics_slots[s].bus_overflows;
		sum.send_batches += metrics_slots[s].send_batches;
		sum.send_splits += metrics_slots[s].send_splits;
		sum.pages[0] += metrics_slots[s].pages[0];
		sum.pages[1] += metrics_slots[s].pages[1];
		sum.latency_count += metrics_slots[s].latency_count;
		sum.latency_sum_us += metrics_slots[s].latency_sum_us;
	}

	kore_buf_appendf(buf, "# TYPE parley_sockets_open gauge\n");
	for (i = 0; i < METRICS_SOCKET_KINDS; i++) {
		kore_buf_appendf(buf, "parley_sockets_open{kind=\"%s\"} %llu\n",
		    socket_kinds[i], (unsigned long long)sum.sockets_open[i]);
	}

	metrics_counter(buf, "parley_messages_stored_total",
	    sum.messages_stored);
	metrics_counter(buf, "parley_frames_sent_total", sum.frames_sent);
	metrics_counter(buf, "parley_db_errors_total", sum.db_errors);
	metrics_counter(buf, "parley_bus_overflows_total", sum.bus_overflows);
	metrics_counter(buf, "parley_send_batches_total", sum.send_batches);
	metrics_counter(buf, "parley_send_lane_splits_total", sum.send_splits);
	kore_buf_appendf(buf, "# TYPE parley_latest_pages_total counter\n"
	    "parley_latest_pages_total{source=\"kept\"} %llu\n"
	    "parley_latest_pages_total{source=\"database\"} %llu\n",
	    (unsigned long long)sum.pages[1],
	    (unsigned long long)sum.pages[0]);

	kore_buf_appendf(buf,
	    "# TYPE parley_handshakes_rejected_total counter\n");
	for (i = 0; i < METRICS_REJECT_MAX; i++) {
		kore_buf_appendf(buf,
		    "parley_handshakes_rejected_total{reason=\"%s\"} %llu\n",
		    reject_reasons[i], (unsigned long long)sum.rejected[i]);
	}

	kore_buf_appendf(buf,
	    "# TYPE parley_send_latency_seconds histogram\n");
	cumulative = 0;
	for (i = 0; i < METRICS_LATENCY_BUCKETS; i++) {
		cumulative += sum.latency[i];
		kore_buf_appendf(buf,
		    "parley_send_latency_seconds_bucket{le=\"%g\"} %llu\n",
		    latency_bounds[i], (unsigned long long)cumulative);
	}
	kore_buf_appendf(buf,
	    "parley_send_latency_seconds_bucket{le=\"+Inf\"} %llu\n"
	    "parley_send_latency_seconds_sum %.6f\n"
	    "parley_send_latency_seconds_count %llu\n",
	    (unsigned long long)sum.latency_count,
	    (double)sum.latency_sum_us / 1e6,
	    (unsigned long long)sum.latency_count);
}

static void
metrics_counter(struct kore_buf *buf, const char *name, u_int64_t value)
{
	kore_buf_appendf(buf, "# TYPE %s counter\n%s %llu\n", name, name,
	    (unsigned long long)value);
}

static struct metrics_slot *
metrics_mine(void)
{
	if (worker == NULL || metrics_slots == NULL)
		return (&metrics_parent);

	return (&metrics_slots[worker->id]);
}
