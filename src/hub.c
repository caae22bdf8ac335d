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
 * The worker's registry of sockets, by conversation and by user, and the
 * fan-out: an event from the bus is framed once and the same bytes are
 * queued on every socket it is for.
 *
 * Message frames carry their id (seq). A socket that is replaying history
 * (behind) holds them back until the replay ends; every socket skips ids it
 * has already had, so a frame is never delivered twice.
 */

#include <sys/types.h>

#include <string.h>

#include "parley.h"

#define HUB_BUCKETS		4096
#define HUB_HELD_MAX		2048

struct hub_conv {
	int64_t			id;
	TAILQ_HEAD(, session)	sessions;
	LIST_ENTRY(hub_conv)	bucket;
	TAILQ_ENTRY(hub_conv)	list;
};

struct hub_user {
	char			id[PARLEY_USER_ID_MAX + 1];
	TAILQ_HEAD(, session)	sessions;
	LIST_ENTRY(hub_user)	bucket;
};

LIST_HEAD(hub_conv_bucket, hub_conv);
LIST_HEAD(hub_user_bucket, hub_user);

static u_int32_t	hub_hash(const char *, size_t);
static struct hub_conv	*hub_conv_get(int64_t, int);
static struct hub_user	*hub_user_get(const char *, size_t, int);
static void		hub_deliver(struct session *, int64_t,
			    const u_int8_t *, size_t);
static void		hub_hold_shed(struct session *);

static struct hub_conv_bucket	hub_convs[HUB_BUCKETS];
static struct hub_user_bucket	hub_users[HUB_BUCKETS];
static TAILQ_HEAD(, hub_conv)	hub_conv_list;
static struct kore_buf		hub_frame;

void
hub_init(void)
{
	int		i;

	for (i = 0; i < HUB_BUCKETS; i++) {
		LIST_INIT(&hub_convs[i]);
		LIST_INIT(&hub_users[i]);
	}

	TAILQ_INIT(&hub_conv_list);
	kore_buf_init(&hub_frame, 1024);
}

void
hub_add(struct session *s)
{
	s->user = hub_user_get(s->ident.user_id, strlen(s->ident.user_id), 1);
	TAILQ_INSERT_TAIL(&s->user->sessions, s, user_list);

	if (s->kind == SESSION_CHAT) {
		s->conv = hub_conv_get(s->conversation_id, 1);
		TAILQ_INSERT_TAIL(&s->conv->sessions, s, conv_list);
	}
}

void
hub_remove(struct session *s)
{
	if (s->user != NULL) {
		TAILQ_REMOVE(&s->user->sessions, s, user_list);
		if (TAILQ_EMPTY(&s->user->sessions)) {
			LIST_REMOVE(s->user, bucket);
			kore_free(s->user);
		}
		s->user = NULL;
	}

	if (s->conv != NULL) {
		TAILQ_REMOVE(&s->conv->sessions, s, conv_list);
		if (TAILQ_EMPTY(&s->conv->sessions)) {
			LIST_REMOVE(s->conv, bucket);
			TAILQ_REMOVE(&hub_conv_list, s->conv, list);
			kore_free(s->conv);
		}
		s->conv = NULL;
	}

	hub_hold_drop(s);
}

/*
 * An event for a conversation's sockets. seq > 0 marks a message (ordered,
 * deduplicated, held back during replays); exclude names a user whose
 * sockets must not get it (the typist).
 *
 * from >= 0: a message of a bus catch-up's page, which has every message
 * after `from`: only for live sockets that have every one up to it, else
 * it would leave a gap before it. A socket that went live since the page
 * was asked, or is still opening or replaying, has (or will have) every
 * message up to a moment after the LISTEN came back (chat_go_live): the
 * rest reaches it live.
 */
void
hub_conversation(int64_t conv_id, int64_t seq, int64_t from,
    const char *exclude, size_t exclude_len, const char *json, size_t len)
{
	struct hub_conv		*conv;
	struct session		*s, *next;

	if ((conv = hub_conv_get(conv_id, 0)) == NULL)
		return;

	kore_buf_reset(&hub_frame);
	ws_frame_build(&hub_frame, WEBSOCKET_OP_TEXT, json, len);

	for (s = TAILQ_FIRST(&conv->sessions); s != NULL; s = next) {
		/* A slow consumer may be closed, and unlinked, as we go. */
		next = TAILQ_NEXT(s, conv_list);
		if (exclude_len > 0 &&
		    strlen(s->ident.user_id) == exclude_len &&
		    !memcmp(s->ident.user_id, exclude, exclude_len))
			continue;
		if (from >= 0 && (s->state != SESSION_OPEN || s->behind ||
		    s->last_seq < from))
			continue;
		hub_deliver(s, seq, hub_frame.data, hub_frame.offset);
	}
}

/* An event for the notification sockets of one user. */
void
hub_user(const char *uid, size_t uid_len, const char *json, size_t len)
{
	struct hub_user		*user;
	struct session		*s, *next;

	if ((user = hub_user_get(uid, uid_len, 0)) == NULL)
		return;

	kore_buf_reset(&hub_frame);
	ws_frame_build(&hub_frame, WEBSOCKET_OP_TEXT, json, len);

	for (s = TAILQ_FIRST(&user->sessions); s != NULL; s = next) {
		next = TAILQ_NEXT(s, user_list);
		if (s->kind == SESSION_NOTIFY)
			hub_deliver(s, 0, hub_frame.data, hub_frame.offset);
	}
}

/*
 * Close the sockets that missed events the bus could not get for them:
 * their clients come back and catch up themselves (`after`, `ready`).
 */
void
hub_conversation_close(int64_t conv_id)
{
	struct hub_conv		*conv;
	struct session		*s, *next;

	if ((conv = hub_conv_get(conv_id, 0)) == NULL)
		return;

	/* Each close unlinks its socket; the last one frees conv. */
	for (s = TAILQ_FIRST(&conv->sessions); s != NULL; s = next) {
		next = TAILQ_NEXT(s, conv_list);
		ws_close(s, WS_CLOSE_TRY_AGAIN, "try_again_later");
	}
}

void
hub_user_close(const char *uid, size_t uid_len)
{
	struct hub_user		*user;
	struct session		*s, *next;

	if ((user = hub_user_get(uid, uid_len, 0)) == NULL)
		return;

	for (s = TAILQ_FIRST(&user->sessions); s != NULL; s = next) {
		next = TAILQ_NEXT(s, user_list);
		if (s->kind == SESSION_NOTIFY)
			ws_close(s, WS_CLOSE_TRY_AGAIN, "try_again_later");
	}
}

/* Calls cb with the id of each user who has a notification socket here. */
void
hub_notify_users(void (*cb)(const char *, void *), void *arg)
{
	struct hub_user		*user;
	struct session		*s;
	int			i;

	for (i = 0; i < HUB_BUCKETS; i++) {
		LIST_FOREACH(user, &hub_users[i], bucket) {
			TAILQ_FOREACH(s, &user->sessions, user_list) {
				if (s->kind == SESSION_NOTIFY)
					break;
			}
			if (s != NULL)
				cb(user->id, arg);
		}
	}
}

/*
 * The replay is over: send what was held back and is newer than `seq`.
 * A frame shed from the full queue and newer than that is lost: 4029.
 */
void
hub_hold_release(struct session *s, int64_t seq)
{
	struct held_frame	*h;

	if (seq > s->last_seq)
		s->last_seq = seq;
	s->behind = 0;

	if (s->held_lost > s->last_seq) {
		ws_close(s, WS_CLOSE_SLOW, "slow_consumer");
		return;
	}

	while (s->state == SESSION_OPEN && (h = TAILQ_FIRST(&s->held)) != NULL) {
		TAILQ_REMOVE(&s->held, h, list);
		s->nheld--;
		if (h->seq > s->last_seq) {
			s->last_seq = h->seq;
			ws_send_frame(s, h->data, h->len);
		}
		kore_free(h);
	}
}

void
hub_hold_drop(struct session *s)
{
	struct held_frame	*h;

	while ((h = TAILQ_FIRST(&s->held)) != NULL) {
		TAILQ_REMOVE(&s->held, h, list);
		kore_free(h);
	}
	s->nheld = 0;
	s->held_lost = 0;
}

/*
 * The held queue is full: drop its oldest frame and remember its id.
 * Whether it is lost is known only at the release: thousands of messages
 * stored just before a socket opens still arrive live while it opens, and
 * are all older than its ready frame or covered by its replay.
 */
static void
hub_hold_shed(struct session *s)
{
	struct held_frame	*h;

	h = TAILQ_FIRST(&s->held);
	TAILQ_REMOVE(&s->held, h, list);
	s->nheld--;
	if (h->seq > s->held_lost)
		s->held_lost = h->seq;
	kore_free(h);
}

/*
 * Whether a socket of this conversation is open; *low: the oldest message
 * id a live one has had, -1 for none. A socket still replaying is left
 * out: a bus catch-up is not for it (hub_conversation), and counting it
 * could take the catch-up back to the start of the conversation.
 */
int
hub_conv_open(struct hub_conv *conv, int64_t *low)
{
	struct session	*s;
	int		open;

	open = 0;
	*low = -1;
	TAILQ_FOREACH(s, &conv->sessions, conv_list) {
		if (s->state != SESSION_OPEN)
			continue;
		open = 1;
		if (!s->behind && (*low == -1 || s->last_seq < *low))
			*low = s->last_seq;
	}

	return (open);
}

struct hub_conv *
hub_conv_first(void)
{
	return (TAILQ_FIRST(&hub_conv_list));
}

struct hub_conv *
hub_conv_next(struct hub_conv *conv)
{
	return (TAILQ_NEXT(conv, list));
}

int64_t
hub_conv_id(struct hub_conv *conv)
{
	return (conv->id);
}

static void
hub_deliver(struct session *s, int64_t seq, const u_int8_t *frame, size_t len)
{
	struct held_frame	*h;

	if (s->state != SESSION_OPEN && !(seq > 0 && s->behind))
		return;

	if (seq == 0) {
		if (s->state == SESSION_OPEN)
			ws_send_frame(s, frame, len);
		return;
	}

	if (seq <= s->last_seq)
		return;

	if (s->behind) {
		if (s->nheld >= HUB_HELD_MAX)
			hub_hold_shed(s);
		h = kore_malloc(sizeof(*h) + len);
		h->seq = seq;
		h->len = len;
		memcpy(h->data, frame, len);
		TAILQ_INSERT_TAIL(&s->held, h, list);
		s->nheld++;
		return;
	}

	s->last_seq = seq;
	ws_send_frame(s, frame, len);
}

static struct hub_conv *
hub_conv_get(int64_t id, int create)
{
	struct hub_conv_bucket	*b;
	struct hub_conv		*conv;

	b = &hub_convs[(u_int64_t)id % HUB_BUCKETS];
	LIST_FOREACH(conv, b, bucket) {
		if (conv->id == id)
			return (conv);
	}

	if (!create)
		return (NULL);

	conv = kore_calloc(1, sizeof(*conv));
	conv->id = id;
	TAILQ_INIT(&conv->sessions);
	LIST_INSERT_HEAD(b, conv, bucket);
	TAILQ_INSERT_TAIL(&hub_conv_list, conv, list);

	return (conv);
}

static struct hub_user *
hub_user_get(const char *id, size_t len, int create)
{
	struct hub_user_bucket	*b;
	struct hub_user		*user;

	if (len > PARLEY_USER_ID_MAX)
		return (NULL);

	b = &hub_users[hub_hash(id, len) % HUB_BUCKETS];
	LIST_FOREACH(user, b, bucket) {
		if (strlen(user->id) == len && !memcmp(user->id, id, len))
			return (user);
	}

	if (!create)
		return (NULL);

	user = kore_calloc(1, sizeof(*user));
	memcpy(user->id, id, len);
	TAILQ_INIT(&user->sessions);
	LIST_INSERT_HEAD(b, user, bucket);

	return (user);
}

/* FNV-1a: small, fast and good enough for user ids. */
static u_int32_t
hub_hash(const char *s, size_t len)
{
	u_int32_t	h;
	size_t		i;

	h = 2166136261u;
	for (i = 0; i < len; i++) {
		h ^= (u_int8_t)s[i];
		h *= 16777619u;
	}

	return (h);
}
