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

#include <sys/types.h>

#include <ctype.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "parley.h"

static int	util_hexval(int);

/* A whole decimal integer within [min, max], nothing before or after it. */
int
util_parse_int64(const char *s, int64_t min, int64_t max, int64_t *out)
{
	long long	v;
	char		*end;

	if (s == NULL || *s == '\0' || isspace((unsigned char)*s))
		return (KORE_RESULT_ERROR);

	errno = 0;
	v = strtoll(s, &end, 10);
	if (errno != 0 || *end != '\0' || v < min || v > max)
		return (KORE_RESULT_ERROR);

	*out = v;
	return (KORE_RESULT_OK);
}

/*
 * Copy the URL-decoded value of query parameter `name` into out.
 * Kore's own argument parsing only keeps parameters listed in a params
 * block, and we need the raw string for tokens, so we read it ourselves.
 */
int
util_query_get(struct http_request *req, const char *name, char *out,
    size_t outlen)
{
	const char	*p, *end, *amp;
	size_t		nlen, i;
	int		hi, lo;

	if (req->query_string == NULL)
		return (KORE_RESULT_ERROR);

	nlen = strlen(name);
	for (p = req->query_string; *p != '\0'; p = amp + 1) {
		if ((amp = strchr(p, '&')) == NULL)
			amp = p + strlen(p);

		if ((size_t)(amp - p) > nlen && p[nlen] == '=' &&
		    !strncmp(p, name, nlen)) {
			i = 0;
			for (p += nlen + 1, end = amp; p < end; p++) {
				if (i + 1 >= outlen)
					return (KORE_RESULT_ERROR);
				if (*p == '%' && end - p >= 3 &&
				    (hi = util_hexval(p[1])) != -1 &&
				    (lo = util_hexval(p[2])) != -1) {
					out[i++] = (char)(hi << 4 | lo);
					p += 2;
				} else if (*p == '+') {
					out[i++] = ' ';
				} else {
					out[i++] = *p;
				}
			}
			out[i] = '\0';
			return (KORE_RESULT_OK);
		}

		if (*amp == '\0')
			break;
	}

	return (KORE_RESULT_ERROR);
}

int64_t
util_now(void)
{
	return ((int64_t)time(NULL));
}

/* The next wait before trying again: 0.1 s, doubling up to 5 s. */
/*
 * Milliseconds from since to now, 0 when since is later: a timer gets the
 * time its run started, and an earlier timer of the same run may already
 * have stamped something with a later kore_time_ms() (the unsigned
 * difference then read as years, and a query sent a moment ago "timed
 * out").
 */
u_int64_t
util_elapsed(u_int64_t now, u_int64_t since)
{
	return (now > since ? now - since : 0);
}

void
util_backoff(u_int64_t *ms)
{
	*ms = *ms ? *ms * 2 : UTIL_BACKOFF_MIN;
	if (*ms > UTIL_BACKOFF_MAX)
		*ms = UTIL_BACKOFF_MAX;
}

static int
util_hexval(int c)
{
	if (c >= '0' && c <= '9')
		return (c - '0');
	if (c >= 'a' && c <= 'f')
		return (c - 'a' + 10);
	if (c >= 'A' && c <= 'F')
		return (c - 'A' + 10);
	return (-1);
}

/*
 * The first path segment made only of digits, e.g. 45 in
 * /api/conversations/45/messages. Kore 4.1 compiles routes with REG_NOSUB,
 * so there are no capture groups: the route's regex has checked the
 * shape, this reads the digits and refuses ids beyond int64.
 */
int
util_path_id(struct http_request *req, int64_t *out)
{
	const char	*p;
	char		buf[24];
	size_t		len;

	for (p = req->path; (p = strchr(p, '/')) != NULL; p++) {
		len = strspn(p + 1, "0123456789");
		if (len == 0 || (p[len + 1] != '/' && p[len + 1] != '\0'))
			continue;
		if (len >= sizeof(buf))
			return (KORE_RESULT_ERROR);
		memcpy(buf, p + 1, len);
		buf[len] = '\0';
		return (util_parse_int64(buf, 1, INT64_MAX, out));
	}

	return (KORE_RESULT_ERROR);
}

/*
 * Room for `more` bytes past buf's offset, at least doubling it. Kore's
 * kore_buf_append grows a buffer by exactly what it appends and its
 * kore_realloc always copies, so a body built from n pieces was copied n
 * times (a 50-message history page: most of the server's time per request).
 */
void
util_buf_reserve(struct kore_buf *buf, size_t more)
{
	size_t		need;

	if ((need = buf->offset + more) < more)
		fatal("util_buf_reserve: overflow");
	if (need <= buf->length)
		return;

	if (need < buf->length * 2)
		need = buf->length * 2;
	buf->data = kore_realloc(buf->data, need);
	buf->length = need;
}
