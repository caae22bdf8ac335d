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
 * The latest pages of history this worker served (GET .../messages with
 * no cursor), each kept with the stamp parley_latest_pages() gave it
 * (sql/008_pages.sql, latest.c). Asked again with that stamp, the
 * database checks the reader and recomputes the stamp, but sends no rows
 * when it is the same: the page is answered from here. Nothing needs
 * invalidating, since every use is checked against the database; memory
 * is bounded (PARLEY_PAGE_CACHE_MB per worker, least recently used first
 * out; a page over a 64th of it is not kept, 0 keeps none).
 *
 * A request holds the page it asks about until it is over, answering
 * from it without a copy (copying 17 KB pages twice was a tenth of a
 * worker's CPU); a page replaced or evicted meanwhile is freed when the
 * last request holding it lets go.
 */

#include <sys/types.h>
#include <sys/queue.h>

#include <stddef.h>
#include <string.h>

#include "parley.h"

#define PAGES_BUCKETS		4096

struct page_entry {
	LIST_ENTRY(page_entry)	bucket;
	TAILQ_ENTRY(page_entry)	lru;
	size_t			size;
	int			held;
	int			kept;
	struct page		page;
};

LIST_HEAD(page_bucket, page_entry);
TAILQ_HEAD(page_lru, page_entry);

#define PAGES_ENTRY(p)	((struct page_entry *)((u_int8_t *)(p) -	\
			    offsetof(struct page_entry, page)))

static struct page_entry *pages_find(int64_t, int);
static void		pages_evict(struct page_entry *);

static struct page_bucket		pages_buckets[PAGES_BUCKETS];
static struct page_lru			pages_lru =
				    TAILQ_HEAD_INITIALIZER(pages_lru);
static size_t				pages_bytes;

/* The page kept for (conv, limit), held until pages_release(); or NULL. */
struct page *
pages_get(int64_t conv, int limit)
{
	struct page_entry	*e;

	if ((e = pages_find(conv, limit)) == NULL)
		return (NULL);

	TAILQ_REMOVE(&pages_lru, e, lru);
	TAILQ_INSERT_HEAD(&pages_lru, e, lru);
	e->held++;

	return (&e->page);
}

void
pages_release(struct page *p)
{
	struct page_entry	*e;

	e = PAGES_ENTRY(p);
	if (--e->held == 0 && !e->kept)
		kore_free(e);
}

/* Keep body as the page of (conv, limit) made at `stamp`, in place of any. */
void
pages_put(int64_t conv, int limit, const char *stamp, const void *body,
    size_t len)
{
	struct page_entry	*e, *old;
	struct page		*p;
	size_t			slen, size;

	if ((old = pages_find(conv, limit)) != NULL)
		pages_evict(old);

	if (len >= parley_cfg.page_cache_bytes / 64)
		return;

	/* One block: the entry, then its stamp, then its body. */
	slen = strlen(stamp) + 1;
	size = sizeof(*e) + slen + len;
	e = kore_malloc(size);
	e->size = size;
	e->held = 0;
	e->kept = 1;
	p = &e->page;
	p->conv = conv;
	p->limit = limit;
	p->stamp = (char *)(e + 1);
	memcpy(p->stamp, stamp, slen);
	p->body = (u_int8_t *)p->stamp + slen;
	p->len = len;
	memcpy(p->body, body, len);

	while (pages_bytes + size > parley_cfg.page_cache_bytes &&
	    (old = TAILQ_LAST(&pages_lru, page_lru)) != NULL)
		pages_evict(old);

	LIST_INSERT_HEAD(&pages_buckets[(u_int64_t)conv % PAGES_BUCKETS],
	    e, bucket);
	TAILQ_INSERT_HEAD(&pages_lru, e, lru);
	pages_bytes += size;
}

static struct page_entry *
pages_find(int64_t conv, int limit)
{
	struct page_entry	*e;

	LIST_FOREACH(e, &pages_buckets[(u_int64_t)conv % PAGES_BUCKETS],
	    bucket) {
		if (e->page.conv == conv && e->page.limit == limit)
			return (e);
	}

	return (NULL);
}

static void
pages_evict(struct page_entry *e)
{
	LIST_REMOVE(e, bucket);
	TAILQ_REMOVE(&pages_lru, e, lru);
	pages_bytes -= e->size;
	e->kept = 0;
	if (e->held == 0)
		kore_free(e);
}
