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
 * Deferred notifications: a big conversation's new_message notifications
 * (a row per recipient) are queued by the message trigger instead of being
 * written in the sending transaction (sql/002_messages.sql, parley_fanout).
 * Each worker drains the queue when an 'f' note says it has work, and every
 * FANOUT_SWEEP_MS in case a note was missed (LISTEN down, a drain that
 * failed). The first worker of each instance drains (PostgreSQL's SKIP
 * LOCKED shares the work between instances), one drain in flight at a
 * time, starting at most every FANOUT_PACE_MS: a drain writes a row per
 * recipient however many messages it covers, so in a busy big
 * conversation draining less often (and from one worker, not each) leaves
 * the CPU to the sends, for notifications a little later.
 */

#include <sys/types.h>

#include "parley.h"

#define FANOUT_SWEEP_MS		1000
#define FANOUT_PACE_MS		100
#define FANOUT_WORKER_ID	1	/* Kore numbers its workers from 1 */

static void	fanout_sweep(void *, u_int64_t);
static void	fanout_paced(void *, u_int64_t);
static void	fanout_run(void);
static void	fanout_done(struct db_result *, void *);

static int		fanout_enabled;
static int		fanout_inflight;
static int		fanout_again;
static int		fanout_scheduled;
static u_int64_t	fanout_started;

void
fanout_init(void)
{
	if (worker->id != FANOUT_WORKER_ID)
		return;
	fanout_enabled = 1;
	(void)kore_timer_add(fanout_sweep, FANOUT_SWEEP_MS, NULL, 0);
}

void
fanout_wake(void)
{
	u_int64_t	now, since;

	if (!fanout_enabled)
		return;
	if (fanout_inflight) {
		fanout_again = 1;
		return;
	}
	if (fanout_scheduled)
		return;

	now = kore_time_ms();
	since = now - fanout_started;
	if (since < FANOUT_PACE_MS) {
		fanout_scheduled = 1;
		(void)kore_timer_add(fanout_paced, FANOUT_PACE_MS - since, NULL,
		    KORE_TIMER_ONESHOT);
		return;
	}
	fanout_run();
}

static void
fanout_sweep(void *unused, u_int64_t now)
{
	fanout_wake();
}

static void
fanout_paced(void *unused, u_int64_t now)
{
	fanout_scheduled = 0;
	fanout_wake();
}

static void
fanout_run(void)
{
	fanout_inflight = 1;
	fanout_again = 0;
	fanout_started = kore_time_ms();
	(void)db_query("SELECT parley_fanout_drain()", 0, NULL, fanout_done,
	    NULL);
}

/* Work done means there may be more: go on until a drain finds none. */
static void
fanout_done(struct db_result *r, void *unused)
{
	int	more;

	fanout_inflight = 0;
	more = r->ok && PQntuples(r->res) == 1 &&
	    PQgetvalue(r->res, 0, 0)[0] == 't';
	if (!r->ok && r->res != NULL)
		kore_log(LOG_NOTICE, "fanout: drain failed: %s", r->message);

	if (more || fanout_again)
		fanout_wake();
}
