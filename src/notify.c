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
 * The notification socket, /ws/notifications/ (PROTOCOL.md section 3):
 * one per tab of a user, whatever conversation it shows. Notifications
 * arrive through the bus; reads are answered on every socket of the user
 * (the notifications_read event comes through the bus too).
 */

#include <sys/types.h>

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "parley.h"

int	ws_notifications(struct http_request *);

static int	notify_read(struct session *, yajl_val, int);
static void	notify_read_done(struct db_result *, void *);

int
ws_notifications(struct http_request *req)
{
	return (ws_handshake(req, SESSION_NOTIFY, 0));
}

void
notify_opened(struct session *s)
{
	hub_hold_release(s, 0);
	ws_event_done(s);
}

int
notify_event(struct session *s, const char *type, yajl_val root,
    u_int64_t recv)
{
	if (!strcmp(type, "read"))
		return (notify_read(s, root, 0));
	if (!strcmp(type, "read_all"))
		return (notify_read(s, root, 1));

	ws_error(s, "unknown_type", "unknown event type", NULL);
	return (WS_EVENT_DONE);
}

static int
notify_read(struct session *s, yajl_val root, int all)
{
	const char	*params[2];
	char		id[24];
	int64_t		nid;

	params[0] = s->ident.user_id;

	if (all) {
		ws_query(s, "SELECT parley_read_all_notifications($1)", 1,
		    params, notify_read_done);
		return (WS_EVENT_WAIT);
	}

	if (!ws_int_field(root, "id", 1, INT64_MAX, &nid) || nid == -1) {
		ws_error(s, "invalid_payload", "id is a notification id", NULL);
		return (WS_EVENT_DONE);
	}

	(void)snprintf(id, sizeof(id), "%lld", (long long)nid);
	params[1] = id;
	ws_query(s, "SELECT parley_read_notification($1, $2)", 2, params,
	    notify_read_done);

	return (WS_EVENT_WAIT);
}

static void
notify_read_done(struct db_result *r, void *arg)
{
	struct session	*s = arg;

	s->query = NULL;
	if (!r->ok) {
		ws_error(s, r->status == HTTP_STATUS_NOT_FOUND ?
		    "invalid_payload" : "internal", r->message, NULL);
	}

	ws_event_done(s);
}
