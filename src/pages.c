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
	struct page		page;
};

LIST_HEAD(page_bucket, page_entry);
TAILQ_HEAD(page_lru, page_entry);

#define PAGES_ENTRY(p)	((struct page_entry *)((u_int8_t *)(p) -	\
			    offsetof(struct page_entry, page)))

static struct page	*pages_alloc(size_t, int64_t, int, const char *,
			    const void *, size_t, size_t *);
static struct page_entry *pages_find(int64_t, int);
static void		pages_evict(struct page_entry *);

static struct page_bucket		pages_buckets[PAGES_BUCKETS];
static struct page_lru			pages_lru =
				    TAILQ_HEAD_INITIALIZER(pages_lru);
static size_t				pages_bytes;

/*
 * A copy of the cached page for (conv, limit), or an empty one (stamp
 * NULL) that pages_put() can fill; the caller frees it with kore_free().
 */
struct page *
pages_get(int64_t conv, int limit)
{
	struct page_entry	*e;

	if ((e = pages_find(conv, limit)) == NULL)
		return (pages_alloc(0, conv, limit, NULL, NULL, 0, NULL));

	TAILQ_REMOVE(&pages_lru, e, lru);
	TAILQ_INSERT_HEAD(&pages_lru, e, lru);

	return (pages_alloc(0, conv, limit, e->page.stamp, e->page.body,
	    e->page.len, NULL));
}

/* Keep body as p's page, made at `stamp`, in place of what was kept. */
void
pages_put(const struct page *p, const char *stamp, const void *body,
    size_t len)
{
	struct page_entry	*e, *old;
	size_t			size;

	if ((old = pages_find(p->conv, p->limit)) != NULL)
		pages_evict(old);

	if (len >= parley_cfg.page_cache_bytes / 64)
		return;

	e = PAGES_ENTRY(pages_alloc(offsetof(struct page_entry, page),
	    p->conv, p->limit, stamp, body, len, &size));
	e->size = size;

	while (pages_bytes + size > parley_cfg.page_cache_bytes &&
	    (old = TAILQ_LAST(&pages_lru, page_lru)) != NULL)
		pages_evict(old);

	LIST_INSERT_HEAD(&pages_buckets[(u_int64_t)p->conv % PAGES_BUCKETS],
	    e, bucket);
	TAILQ_INSERT_HEAD(&pages_lru, e, lru);
	pages_bytes += size;
}

/*
 * One allocation for a page, its stamp and body, `head` bytes after the
 * start of the block (room for a page_entry's links).
 */
static struct page *
pages_alloc(size_t head, int64_t conv, int limit, const char *stamp,
    const void *body, size_t len, size_t *total)
{
	struct page	*p;
	u_int8_t	*block;
	size_t		slen, size;

	slen = stamp != NULL ? strlen(stamp) + 1 : 0;
	size = head + sizeof(*p) + slen + len;
	block = kore_malloc(size);

	p = (struct page *)(block + head);
	p->conv = conv;
	p->limit = limit;
	p->stamp = NULL;
	p->body = (u_int8_t *)(p + 1) + slen;
	p->len = len;
	if (stamp != NULL) {
		p->stamp = (char *)(p + 1);
		memcpy(p->stamp, stamp, slen);
	}
	if (len > 0)
		memcpy(p->body, body, len);
	if (total != NULL)
		*total = size;

	return (p);
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
	kore_free(e);
}
