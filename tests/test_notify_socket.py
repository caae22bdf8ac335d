"""Notifications, the socket part: /ws/notifications/ (PROTOCOL.md sections 3,
5 and 8).

Every test makes its own users and conversations with new_id(). State is set
up with plain SQL (parley_create_conversation, parley_set_muted,
parley_set_preferences, parley_post_notification, INSERT INTO notifications);
sends go through chat sockets, as a user's would.
"""

import json
import re
import time

import pytest

from helpers import (api, create_conversation, make_token, new_id,
                     service_token, sql_one, sql_rows)

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
NOTIFY = "/ws/notifications/"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def notif_socket(sockets, server, user, name=None):
    ws = sockets(server, NOTIFY, make_token(user, name))
    ready = ws.recv()
    assert ready["type"] == "ready", ready
    ws.ready = ready
    return ws


def chat_socket(sockets, server, conv, user, name=None):
    ws = sockets(server, "/ws/chat/%d/" % conv, make_token(user, name))
    ready = ws.recv()
    assert ready["type"] == "ready", ready
    return ws


def chat_send(ws, content, client_id):
    ws.send({"type": "message", "content": content, "client_id": client_id})
    ack = ws.recv_until(lambda f: f["type"] in ("ack", "error") and
                        f.get("client_id", f.get("ref")) == client_id)
    assert ack["type"] == "ack", ack
    return ack


def post(conn, user, type_, payload=None):
    """Store a notification as the service call does; returns it."""
    out = sql_one(conn, "SELECT parley_post_notification(%s, %s, %s::jsonb)",
                  user, type_,
                  json.dumps(payload) if payload is not None else None)
    return json.loads(out)


def sql_insert_message(conn, conv, sender, content):
    return sql_one(conn, "INSERT INTO messages (conversation_id, sender_id, "
                   "content) VALUES (%s, %s, %s) RETURNING id",
                   conv, sender, content)


def frames_before(ws, pred, timeout=10):
    """The frames a socket gets before the first one matching pred."""
    start = len(ws.frames)
    ws.recv_until(pred, timeout)
    return ws.frames[start:-1]


def sentinel(conn, user, *sockets):
    """Post a notification to `user` and return, per socket, the frames that
    came before it (the bus keeps commit order)."""
    n = post(conn, user, "test.sentinel", {"s": new_id("s")})
    return [frames_before(ws, lambda f: f.get("id") == n["id"] and
                          f["type"] == "test.sentinel") for ws in sockets]


def new_message_rows(conn, user, conv):
    return sql_rows(conn, "SELECT id, count, read_at IS NOT NULL FROM "
                    "notifications WHERE user_id = %s AND conversation_id = %s "
                    "AND type = 'new_message' ORDER BY id", user, conv)


@pytest.fixture
def pair(conn):
    a, b = new_id(), new_id()
    names = ("Ann %s" % a[-4:], "Bob %s" % b[-4:])
    conv = create_conversation(conn, [a, b])
    return conv, (a, b), names


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------

def test_ready_frame_with_unread_totals(server, conn, sockets):
    u, other = new_id(), new_id()
    ws = notif_socket(sockets, server, u, "Una")
    assert ws.ready == {"type": "ready", "user": {"id": u, "name": "Una"},
                        "unread_notifications": 0, "unread_messages": 0}
    ws.close()

    conv = create_conversation(conn, [u, other])
    muted = create_conversation(conn, [u, other], kind="muted", ref=new_id())
    sql_one(conn, "SELECT parley_set_muted(%s, %s, true)", muted, u)
    for i in range(3):
        sql_insert_message(conn, conv, other, "m%d" % i)
    for i in range(2):
        sql_insert_message(conn, muted, other, "muted %d" % i)
    post(conn, u, "friend_request", {"from_user": {"id": other}})
    post(conn, u, "match", {"score": 3})

    ws = notif_socket(sockets, server, u, "Una")
    # 2 posted + 1 collapsed new_message (none in the muted conversation);
    # the muted conversation's unread messages are left out
    assert ws.ready == {"type": "ready", "user": {"id": u, "name": "Una"},
                        "unread_notifications": 3, "unread_messages": 3}


def test_new_message_to_other_participant_not_sender(server, conn, sockets,
                                                      pair):
    conv, (a, b), (na, nb) = pair
    na_ws = notif_socket(sockets, server, a, na)
    nb_ws = notif_socket(sockets, server, b, nb)
    nb2_ws = notif_socket(sockets, server, b, nb)
    ca = chat_socket(sockets, server, conv, a, na)
    ack = chat_send(ca, "  Hello  ", "n-1")

    for ws in (nb_ws, nb2_ws):
        ev = ws.recv_type("new_message")
        assert set(ev) == {"type", "id", "created_at", "conversation_id",
                           "from_user", "message", "count", "unread_count",
                           "total_unread"}
        assert isinstance(ev["id"], int) and TS.match(ev["created_at"])
        assert ev["conversation_id"] == conv
        assert ev["from_user"] == {"id": a, "username": na}
        assert ev["message"] == {"id": ack["message_id"], "content": "Hello"}
        assert (ev["count"], ev["unread_count"], ev["total_unread"]) == \
            (1, 1, 1)
        assert "replay" not in ev
    # the sender's own notification socket gets none
    frames = sentinel(conn, a, na_ws)[0]
    assert not [f for f in frames if f["type"] == "new_message"], frames
    assert new_message_rows(conn, a, conv) == []


def test_collapse_same_id_and_count(server, conn, sockets, pair):
    conv, (a, b), (na, nb) = pair
    nb_ws = notif_socket(sockets, server, b, nb)
    ca = chat_socket(sockets, server, conv, a, na)
    first_ack = chat_send(ca, "first", "c-1")
    first = nb_ws.recv_type("new_message")
    ack = chat_send(ca, "second", "c-2")
    second = nb_ws.recv_type("new_message")
    assert second["id"] == first["id"]
    assert (second["count"], second["unread_count"], second["total_unread"]) \
        == (2, 2, 2)
    assert second["message"] == {"id": ack["message_id"], "content": "second"}
    assert second["created_at"] >= first["created_at"]
    assert first["message"]["id"] == first_ack["message_id"]
    assert new_message_rows(conn, b, conv) == [(first["id"], 2, False)]

    # total_unread counts the other conversations too
    other_conv = create_conversation(conn, [a, b], kind="k", ref=new_id())
    sql_insert_message(conn, other_conv, a, "elsewhere")
    ev = nb_ws.recv_type("new_message")
    assert ev["conversation_id"] == other_conv and ev["id"] != first["id"]
    assert (ev["count"], ev["unread_count"], ev["total_unread"]) == (1, 1, 3)

    # reading the conversation (chat socket) marks its new_message read,
    # answered on the notification socket; the next message makes a new one
    cb = chat_socket(sockets, server, conv, b, nb)
    cb.send({"type": "read"})
    r = nb_ws.recv_type("notifications_read")
    assert r == {"type": "notifications_read", "ids": [first["id"]],
                 "unread_notifications": 1}
    chat_send(ca, "third", "c-3")
    third = nb_ws.recv_type("new_message")
    assert third["id"] != first["id"]
    assert (third["count"], third["unread_count"], third["total_unread"]) \
        == (1, 1, 2)


def test_muted_conversation_creates_none(server, conn, sockets, pair):
    conv, (a, b), (na, nb) = pair
    sql_one(conn, "SELECT parley_set_muted(%s, %s, true)", conv, b)
    nb_ws = notif_socket(sockets, server, b, nb)
    ca = chat_socket(sockets, server, conv, a, na)
    chat_send(ca, "shh", "m-1")
    sql_insert_message(conn, conv, a, "shh by sql")
    frames = sentinel(conn, b, nb_ws)[0]
    assert not [f for f in frames if f["type"] == "new_message"], frames
    assert new_message_rows(conn, b, conv) == []
    # still counted as unread in the conversation, but not in the totals
    assert sql_one(conn, "SELECT parley_unread_count(%s, %s)", conv, b) == 2
    other = create_conversation(conn, [a, b], kind="k", ref=new_id())
    sql_insert_message(conn, other, a, "loud")
    ev = nb_ws.recv_type("new_message")
    assert ev["conversation_id"] == other
    assert (ev["unread_count"], ev["total_unread"]) == (1, 1)

    # unmuted: notified again
    sql_one(conn, "SELECT parley_set_muted(%s, %s, false)", conv, b)
    chat_send(ca, "hello again", "m-2")
    ev = nb_ws.recv_type("new_message")
    assert ev["conversation_id"] == conv and ev["count"] == 1


def test_disabled_type_stored_not_pushed(server, conn, sockets):
    u = new_id()
    sql_one(conn, "SELECT parley_set_preferences(%s, %s::jsonb)", u,
            json.dumps(["friend_request"]))
    ws = notif_socket(sockets, server, u)
    hidden = post(conn, u, "friend_request", {"from_user": {"id": "7"}})
    sql_one(conn, "INSERT INTO notifications (user_id, type, payload) "
            "VALUES (%s, 'friend_request', '{}')", u)
    shown = post(conn, u, "match", {"score": 1})
    ev = ws.recv_until(lambda f: f["type"] not in ("pong",))
    assert ev["type"] == "match" and ev["id"] == shown["id"], ws.frames
    # stored (and counted) all the same
    assert sql_one(conn, "SELECT count(*) FROM notifications WHERE "
                   "user_id = %s AND type = 'friend_request'", u) == 2
    assert hidden["read"] is False
    # a new socket's ready counts them
    assert notif_socket(sockets, server, u).ready[
        "unread_notifications"] == 3


def test_disabled_new_message_creates_none(server, conn, sockets, pair):
    conv, (a, b), (na, nb) = pair
    sql_one(conn, "SELECT parley_set_preferences(%s, %s::jsonb)", b,
            json.dumps(["new_message"]))
    nb_ws = notif_socket(sockets, server, b, nb)
    ca = chat_socket(sockets, server, conv, a, na)
    chat_send(ca, "not notified", "d-1")
    frames = sentinel(conn, b, nb_ws)[0]
    assert not [f for f in frames if f["type"] == "new_message"], frames
    assert new_message_rows(conn, b, conv) == []


def _post_service(server, conn, user, type_, payload):
    """POST /api/notifications with a service token when the endpoint
    exists, else the same through SQL. Returns the stored notification."""
    r = api(server, "POST", "/api/notifications", token=service_token(),
            json_body={"user_id": user, "type": type_, "payload": payload})
    if r.status_code == 404 and r.json().get("error", {}).get(
            "code") == "not_found":
        return post(conn, user, type_, payload)
    assert r.status_code == 201, r.text
    body = r.json()
    return body.get("notification", body)


def test_service_notification_live_to_two_tabs(server, conn, sockets):
    u, other = new_id(), new_id()
    tab1 = notif_socket(sockets, server, u)
    tab2 = notif_socket(sockets, server, u)
    bystander = notif_socket(sockets, server, other)
    payload = {"from_user": {"id": "7", "username": "maria"},
               "note": "caf\u00e9 \U0001F600 'q' \"dq\""}
    stored = _post_service(server, conn, u, "friend_accepted", payload)
    assert stored["type"] == "friend_accepted" and stored["read"] is False
    for ws in (tab1, tab2):
        ev = ws.recv_type("friend_accepted")
        assert ev == {"type": "friend_accepted", "id": stored["id"],
                      "created_at": stored["created_at"], **payload}
        assert list(ev)[:3] == ["type", "id", "created_at"]
    frames = sentinel(conn, other, bystander)[0]
    assert not [f for f in frames if f["type"] == "friend_accepted"], frames


def test_plain_sql_insert_delivered(server, conn, sockets):
    u = new_id()
    ws = notif_socket(sockets, server, u)
    nid = sql_one(conn, "INSERT INTO notifications (user_id, type, payload) "
                  "VALUES (%s, 'session_request', "
                  "'{\"session\": {\"id\": 5}}') RETURNING id", u)
    ev = ws.recv_type("session_request")
    assert ev["id"] == nid and ev["session"] == {"id": 5}
    assert TS.match(ev["created_at"])
    nid = sql_one(conn, "INSERT INTO notifications (user_id, type) VALUES "
                  "(%s, 'app.ping') RETURNING id", u)
    assert ws.recv_type("app.ping") == {
        "type": "app.ping", "id": nid,
        "created_at": ws.frames[-1]["created_at"]}


def test_large_notification_delivered_by_reference(server, conn, sockets):
    """A frame over NOTIFY's size goes by reference and is fetched."""
    u = new_id()
    ws = notif_socket(sockets, server, u)
    payload = {"blob": "x" * 8000}
    n = post(conn, u, "big.one", payload)
    after = post(conn, u, "small.one", {})
    ev = ws.recv_until(lambda f: f["type"] in ("big.one", "small.one"))
    assert ev["type"] == "big.one" and ev["id"] == n["id"]
    assert ev["blob"] == payload["blob"]
    assert ws.recv_type("small.one")["id"] == after["id"]


def test_read_and_read_all_on_every_socket(server, conn, sockets):
    u = new_id()
    tab1 = notif_socket(sockets, server, u)
    tab2 = notif_socket(sockets, server, u)
    ns = [post(conn, u, "t.read", {"i": i}) for i in range(3)]
    for ws in (tab1, tab2):
        for n in ns:
            assert ws.recv_type("t.read")["id"] == n["id"]

    tab1.send({"type": "read", "id": ns[0]["id"]})
    for ws in (tab1, tab2):
        assert ws.recv_type("notifications_read") == {
            "type": "notifications_read", "ids": [ns[0]["id"]],
            "unread_notifications": 2}
    assert sql_one(conn, "SELECT read_at IS NOT NULL FROM notifications "
                   "WHERE id = %s", ns[0]["id"]) is True

    # reading one again is answered again (nothing changes)
    tab2.send({"type": "read", "id": ns[0]["id"]})
    for ws in (tab1, tab2):
        assert ws.recv_type("notifications_read")["unread_notifications"] \
            == 2

    tab2.send({"type": "read_all"})
    for ws in (tab1, tab2):
        assert ws.recv_type("notifications_read") == {
            "type": "notifications_read", "ids": "all",
            "unread_notifications": 0}
    assert sql_one(conn, "SELECT count(*) FROM notifications WHERE "
                   "user_id = %s AND read_at IS NULL", u) == 0
    assert notif_socket(sockets, server, u).ready[
        "unread_notifications"] == 0


def test_read_errors_keep_socket_open(server, conn, sockets):
    u, other = new_id(), new_id()
    ws = notif_socket(sockets, server, u)
    theirs = post(conn, other, "t.x", {})
    # Server's choice (the protocol is silent): a read of an id that is not
    # the user's, or a malformed id, is an invalid_payload error.
    for frame in ({"type": "read", "id": theirs["id"]},
                  {"type": "read", "id": 10 ** 15},
                  {"type": "read"},
                  {"type": "read", "id": "1"},
                  {"type": "read", "id": 0}):
        ws.send(frame)
        err = ws.recv_type("error")
        assert err["code"] == "invalid_payload", (frame, err)
        assert err["ref"] is None
    # the other user's notification stays unread
    assert sql_one(conn, "SELECT read_at FROM notifications WHERE id = %s",
                   theirs["id"]) is None
    for frame in ({"type": "message", "content": "hi"}, {"type": "typing",
                                                         "is_typing": True},
                  {"type": "nope"}):
        ws.send(frame)
        assert ws.recv_type("error")["code"] == "unknown_type", frame
    ws.send("not json")
    assert ws.recv_type("error")["code"] == "invalid_json"
    ws.send([1])
    assert ws.recv_type("error")["code"] == "invalid_payload"
    ws.send({"type": "ping"})
    assert TS.match(ws.recv_type("pong")["ts"])


def test_sync_replay_and_synced(server, conn, sockets):
    u = new_id()
    sql_one(conn, "SELECT parley_set_preferences(%s, %s::jsonb)", u,
            json.dumps(["hidden.type"]))
    ns = [post(conn, u, "t.sync", {"i": i}) for i in range(3)]
    post(conn, u, "hidden.type", {})
    last = post(conn, u, "t.sync", {"i": 3})
    ws = notif_socket(sockets, server, u)

    def collect():
        got = []
        while True:
            f = ws.recv_until(lambda f: f["type"] in ("t.sync", "synced"))
            if f["type"] == "synced":
                return got, f
            got.append(f)

    ws.send({"type": "sync", "after": 0, "limit": 2})
    got, synced = collect()
    assert [f["id"] for f in got] == [ns[0]["id"], ns[1]["id"]]
    assert all(f["replay"] is True for f in got)
    assert got[0] == {"type": "t.sync", "id": ns[0]["id"],
                      "created_at": ns[0]["created_at"], "i": 0,
                      "replay": True}
    assert synced == {"type": "synced", "last_notification_id": ns[1]["id"],
                      "has_more": True}

    ws.send({"type": "sync", "after": ns[1]["id"]})
    got, synced = collect()
    # the disabled type is stored but not replayed (never pushed)
    assert [f["id"] for f in got] == [ns[2]["id"], last["id"]]
    assert synced == {"type": "synced", "last_notification_id": last["id"],
                      "has_more": False}

    ws.send({"type": "sync", "after": last["id"]})
    got, synced = collect()
    assert got == [] and synced == {"type": "synced",
                                    "last_notification_id": last["id"],
                                    "has_more": False}
    # live ones after a sync carry no replay key
    live = post(conn, u, "t.sync", {"i": 4})
    ev = ws.recv_type("t.sync")
    assert ev["id"] == live["id"] and "replay" not in ev


def test_sync_replays_read_ones_too_and_new_message_counts(server, conn,
                                                           sockets, pair):
    conv, (a, b), (na, nb) = pair
    sql_insert_message(conn, conv, a, "one")
    sql_insert_message(conn, conv, a, "two")
    n = post(conn, b, "t.other", {})
    sql_one(conn, "SELECT parley_read_notification(%s, %s)", b, n["id"])
    ws = notif_socket(sockets, server, b, nb)
    ws.send({"type": "sync", "after": 0})
    replays = []
    while True:
        f = ws.recv()
        if f["type"] == "synced":
            break
        # The read above was committed before this socket opened, but its
        # notifications_read event may still be on its way through the bus.
        if f["type"] != "notifications_read":
            replays.append(f)
    types = [f["type"] for f in replays]
    assert types == ["new_message", "t.other"], replays
    nm = replays[0]
    assert nm["replay"] is True and nm["conversation_id"] == conv
    assert (nm["count"], nm["unread_count"], nm["total_unread"]) == (2, 2, 2)
    assert nm["message"]["content"] == "two"


def test_notification_socket_refusals(server, sockets):
    u = new_id()
    ws = sockets(server, NOTIFY, service_token())
    assert ws.expect_close() == (4001, "unauthenticated")
    ws = sockets(server, NOTIFY, make_token(u, exp_in=-60))
    assert ws.expect_close() == (4001, "token_expired")
    ws = sockets(server, NOTIFY)
    assert ws.expect_close() == (4001, "unauthenticated")
    for via in ("header", "query", "cookie", "subprotocol"):
        ws = sockets(server, NOTIFY, make_token(u), via=via)
        assert ws.recv()["type"] == "ready"


def test_auth_on_notification_socket(server, sockets):
    u = new_id()
    ws = sockets(server, NOTIFY, make_token(u, exp_in=-27))
    assert ws.recv()["type"] == "ready"
    ws.send({"type": "auth", "token": make_token(new_id())})
    assert ws.recv_type("error")["code"] == "invalid_token"
    exp = int(time.time()) + 600
    ws.send({"type": "auth", "token": make_token(u, exp_in=600)})
    assert abs(ws.recv_type("auth_ok")["exp"] - exp) <= 2
    ws.no_frame(lambda f: False, 5)     # would raise Closed if expired


def test_big_conversation_notifications_written_after_the_send(server, conn,
                                                               sockets):
    # Over parley_fanout_inline_max() members: the send commits without the
    # notifications, the server's drain writes them right after, live events
    # included, with the same collapse as a small conversation's.
    members = [new_id() for _ in range(40)]
    a, b, c = members[:3]
    conv = create_conversation(conn, members)
    nb = notif_socket(sockets, server, b)
    ca = chat_socket(sockets, server, conv, a)
    first = chat_send(ca, "to everyone", "big-1")
    ev = nb.recv_type("new_message")
    assert ev["conversation_id"] == conv and ev["count"] == 1
    assert ev["message"] == {"id": first["message_id"], "content": "to everyone"}
    assert (ev["unread_count"], ev["total_unread"]) == (1, 1)
    second_id = sql_insert_message(conn, conv, c, "by sql")
    again = nb.recv_type("new_message")
    assert again["id"] == ev["id"] and again["count"] == 2
    assert again["message"]["id"] == second_id
    # every other member has one; the senders' stand for the others' only
    rows = dict(sql_rows(conn, "SELECT user_id, count FROM notifications "
                         "WHERE conversation_id = %s AND read_at IS NULL",
                         conv))
    assert set(rows) == set(members)
    assert rows[a] == 1 and rows[c] == 1 and rows[b] == 2
    assert sql_one(conn, "SELECT count(*) FROM parley_fanout "
                   "WHERE conversation_id = %s", conv) == 0
