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

/* The caller's own resources: /api/me, /api/unread (PROTOCOL.md 4). */

#include <sys/types.h>

#include "parley.h"

int	api_me(struct http_request *);
int	api_unread(struct http_request *);

static int	api_user_get(struct http_request *, const char *, int);

/* $1 is the user, $2 (when taken) the token's display name. */
static const char	me_sql[] =
    "SELECT parley_me($1) FROM parley_touch_user($1, $2)";
static const char	unread_sql[] = "SELECT parley_unread($1)";

/* Refresh the display name from the token, then read the totals. */
int
api_me(struct http_request *req)
{
	return (api_user_get(req, me_sql, 2));
}

/* The conversations with unread messages; the total leaves muted ones out. */
int
api_unread(struct http_request *req)
{
	return (api_user_get(req, unread_sql, 1));
}

/* A GET for the caller's own user: one query on (user id, name). */
static int
api_user_get(struct http_request *req, const char *sql, int nparams)
{
	struct identity		id;
	const char		*params[2];

	if (http_state_exists(req))
		return (rest_resume(req));

	if (!rest_method(req, HTTP_METHOD_GET) ||
	    !rest_identity(req, REST_USER, &id))
		return (KORE_RESULT_OK);

	params[0] = id.user_id;
	params[1] = id.name;

	return (rest_query(req, HTTP_STATUS_OK, sql, nparams, params, NULL));
}
