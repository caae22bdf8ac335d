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

/* Operations endpoints: /healthz, /readyz, /metrics (PROTOCOL.md 6). */

#include <sys/types.h>

#include "parley.h"

int	ops_healthz(struct http_request *);
int	ops_readyz(struct http_request *);
int	ops_metrics(struct http_request *);

static const char	ready_sql[] = "SELECT '{\"status\":\"ready\"}'";

/* The process is up and its event loop turns. */
int
ops_healthz(struct http_request *req)
{
	static const char	body[] = "{\"status\":\"ok\"}";

	if (!rest_method(req, HTTP_METHOD_GET | HTTP_METHOD_HEAD))
		return (KORE_RESULT_OK);

	rest_reply(req, HTTP_STATUS_OK, body, sizeof(body) - 1);
	return (KORE_RESULT_OK);
}

/* Ready when a query makes the round trip to the database now. */
int
ops_readyz(struct http_request *req)
{
	if (http_state_exists(req))
		return (rest_resume(req));

	if (!rest_method(req, HTTP_METHOD_GET | HTTP_METHOD_HEAD))
		return (KORE_RESULT_OK);

	return (rest_query(req, HTTP_STATUS_OK, ready_sql, 0, NULL, NULL));
}

int
ops_metrics(struct http_request *req)
{
	struct kore_buf		buf;

	if (!rest_method(req, HTTP_METHOD_GET))
		return (KORE_RESULT_OK);

	kore_buf_init(&buf, 4096);
	metrics_render(&buf);
	http_response_header(req, "content-type",
	    "text/plain; version=0.0.4");
	http_response(req, HTTP_STATUS_OK, buf.data, buf.offset);
	kore_buf_cleanup(&buf);

	return (KORE_RESULT_OK);
}
