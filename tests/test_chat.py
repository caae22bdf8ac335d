"""Live chat: the chat socket /ws/chat/{id}/ (PROTOCOL.md sections 1, 2, 6, 8).

Every test makes its own users and conversations (new_id()), so tests are
independent of each other and of the order they run in. Conversations are
created with plain SQL (parley_create_conversation). Tests that need other
settings start their own server with make_server.
"""

import json
import re
import signal
import socket
import threading
import time

import pytest
import requests
import websocket

from helpers import (message_ids, messages_stored, WS, Closed,
                     create_conversation, make_token, metrics, new_id,
                     service_token, sql_one, sql_rows, wait_for, SECRET)

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

MESSAGE_KEYS = {"id", "conversation_id", "sender_id", "sender_name",
                "message_text", "content", "message_type", "metadata",
                "client_id", "timestamp", "created_at", "is_read"}


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def chat_path(conv, after=None, slash=True):
    path = "/ws/chat/%s%s" % (conv, "/" if slash else "")
    if after is not None:
        path += "?after=%d" % after
    return path


def users(n=2, names=None):
    ids = [new_id() for _ in range(n)]
    names = names or ["Name %s" % u[-4:] for u in ids]
    return ids, names


def join(sockets, server, conv, user, name=None, after=None, **kw):
    """A chat socket of `user` that got its ready frame."""
    token = kw.pop("token", None) or make_token(user, name)
    ws = sockets(server, chat_path(conv, after), token, **kw)
    ready = ws.recv()
    assert ready["type"] == "ready", ready
    ws.ready = ready
    return ws


def send_ok(ws, content, client_id=None, **extra):
    """Send a canonical message and return its ack."""
    frame = {"type": "message", "content": content}
    if client_id is not None:
        frame["client_id"] = client_id
    frame.update(extra)
    ws.send(frame)
    ack = ws.recv_until(lambda f: f["type"] in ("ack", "error") and
                        f.get("client_id", f.get("ref")) == client_id)
    assert ack["type"] == "ack", ack
    return ack


def expect_error(ws, frame, code, ref=None):
    """Send `frame`; the answer is an error `code` echoing `ref`; the
    socket stays open and usable (a ping is answered)."""
    ws.send(frame)
    err = ws.recv_until(lambda f: f["type"] in ("error", "ack"))
    assert err["type"] == "error", (frame, err)
    assert err["code"] == code, (frame, err)
    assert err["ref"] == ref, (frame, err)
    assert isinstance(err["message"], str) and err["message"]
    ws.send({"type": "ping"})
    ws.recv_type("pong")
    return err


def message_of(ws, pred=lambda m: True, timeout=10):
    """The next `message` event whose message matches pred."""
    return ws.recv_until(lambda f: f["type"] == "message" and
                         pred(f["message"]), timeout)["message"]


def find_message(ws, message_id, timeout=10):
    """The `message` event of `message_id`, whether it already arrived
    (while the socket waited for something else, such as its ack) or
    arrives now. The ack and the broadcast of a send come by different
    paths, so their order on the sending socket is not fixed."""
    for f in ws.frames:
        if f["type"] == "message" and f["message"]["id"] == message_id:
            return f
    return ws.recv_until(lambda f: f["type"] == "message" and
                         f["message"]["id"] == message_id, timeout)


def sql_insert(conn, conv, sender, content, type_=None):
    return sql_one(conn, "INSERT INTO messages (conversation_id, sender_id, "
                   "type, content) VALUES (%s, %s, %s, %s) RETURNING id",
                   conv, sender, type_, content)


def count_messages(conn, conv):
    return sql_one(conn, "SELECT count(*) FROM messages WHERE "
                   "conversation_id = %s", conv)


def frames_before_message(ws, message_id, timeout=10):
    """The frames a socket gets before the message `message_id` (a
    sentinel: the bus keeps commit order, so anything sent before the
    sentinel was written arrives before it)."""
    start = len(ws.frames)
    ws.recv_until(lambda f: f["type"] == "message" and
                  f["message"]["id"] == message_id, timeout)
    return ws.frames[start:-1]


def sentinel(conn, conv, sender, *sockets):
    """Write a message with SQL and return, per socket, the frames that
    arrived before it."""
    mid = sql_insert(conn, conv, sender, "sentinel %s" % new_id("s"))
    return [frames_before_message(ws, mid) for ws in sockets]


def ws_error_status(server, path, **kw):
    """The HTTP status of a handshake the server refuses to upgrade."""
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        WS(server, path, **kw)
    return info.value.status_code


@pytest.fixture
def pair(conn):
    """A conversation of two fresh users: (conv, (a, b), (name_a, name_b))."""
    (a, b), names = users(2, names=None)
    names = ["Ann %s" % a[-4:], "Bob %s" % b[-4:]]
    conv = create_conversation(conn, [a, b], title="pair")
    return conv, (a, b), names


# ---------------------------------------------------------------------------
# handshake: ready frame, token sources, refusals
# ---------------------------------------------------------------------------

def test_ready_frame_fields(server, conn, sockets, pair):
    conv, (a, b), (na, nb) = pair
    ws = join(sockets, server, conv, a, na)
    assert ws.ready == {"type": "ready", "conversation_id": conv,
                        "user": {"id": a, "name": na},
                        "last_message_id": None, "unread_count": 0,
                        "online": [a]}

    m1 = sql_insert(conn, conv, b, "one")
    m2 = sql_insert(conn, conv, b, "two")
    wb = join(sockets, server, conv, b, nb)
    assert wb.ready["last_message_id"] == m2
    assert wb.ready["unread_count"] == 0
    assert sorted(wb.ready["online"]) == sorted([a, b])

    wa2 = join(sockets, server, conv, a, na)
    assert wa2.ready["last_message_id"] == m2
    assert wa2.ready["unread_count"] == 2
    assert sorted(wa2.ready["online"]) == sorted([a, b])
    assert m1 < m2


def test_ready_user_name_fallbacks(server, conn, sockets):
    a, b, c = new_id(), new_id(), new_id()
    conv = create_conversation(conn, [a, b, c])
    ws = join(sockets, server, conv, a, token=make_token(a, username="ann_u"))
    assert ws.ready["user"] == {"id": a, "name": "ann_u"}
    ws = join(sockets, server, conv, b, token=make_token(b))
    assert ws.ready["user"] == {"id": b, "name": "user %s" % b}
    # an integer user id claim 7 is the user "7"; `sub` when no user_id
    token = make_token(None, name="Cee", sub=c)
    ws = join(sockets, server, conv, c, token=token)
    assert ws.ready["user"] == {"id": c, "name": "Cee"}


def test_integer_user_id_claim(server, conn, sockets):
    uid = int(time.time() * 1000) % 10 ** 12 + 10 ** 12
    other = new_id()
    conv = create_conversation(conn, [str(uid), other])
    ws = join(sockets, server, conv, str(uid), token=make_token(uid, "Int"))
    assert ws.ready["user"] == {"id": str(uid), "name": "Int"}


@pytest.mark.parametrize("via", ["subprotocol", "header", "query", "cookie"])
def test_every_token_source(server, sockets, pair, via):
    conv, (a, b), (na, nb) = pair
    ws = join(sockets, server, conv, a, na, via=via)
    assert ws.ready["user"]["id"] == a
    send_ok(ws, "via %s" % via, "c-" + via)


def test_subprotocol_answered_parley_never_the_token(server, sockets, pair):
    conv, (a, b), (na, nb) = pair
    token = make_token(a, na)
    ws = join(sockets, server, conv, a, token=token, via="subprotocol")
    headers = ws.ws.getheaders()
    assert headers.get("sec-websocket-protocol") == "parley"
    assert token not in json.dumps(headers)
    assert ws.subprotocol == "parley"

    # the form written with a space, as browsers send it
    ws = sockets(server, chat_path(conv), header=[
        "Sec-WebSocket-Protocol: parley, bearer." + token])
    assert ws.recv()["type"] == "ready"
    assert ws.ws.getheaders().get("sec-websocket-protocol") == "parley"

    # "parley" offered with the token elsewhere: still answered "parley"
    ws = sockets(server, chat_path(conv), token, via="query",
                 subprotocols=["parley"])
    assert ws.recv()["type"] == "ready"
    assert ws.subprotocol == "parley"


def test_token_never_logged(server, sockets, pair):
    conv, (a, b), (na, nb) = pair
    tokens = {}
    for via in ("subprotocol", "header", "query", "cookie"):
        tokens[via] = make_token(a, na, marker=new_id("m"))
        join(sockets, server, conv, a, token=tokens[via], via=via)
    bad = make_token(a, na, secret="wrong", marker=new_id("m"))
    ws = sockets(server, chat_path(conv), bad, via="query")
    assert ws.expect_close() == (4001, "unauthenticated")
    out = server.output()
    for tok in list(tokens.values()) + [bad]:
        # not the token, nor its signature part
        assert tok not in out
        assert tok.rsplit(".", 1)[1] not in out


def test_first_token_source_decides(server, sockets, pair):
    conv, (a, b), (na, nb) = pair
    good = make_token(a, na)
    bad = make_token(a, na, secret="not-the-secret")
    path = chat_path(conv)

    # header (bad) before subprotocol (good)
    ws = sockets(server, path, good, via="subprotocol",
                 header=["Authorization: Bearer " + bad])
    assert ws.expect_close() == (4001, "unauthenticated")
    # header (good) before subprotocol (bad)
    ws = sockets(server, path, bad, via="subprotocol",
                 header=["Authorization: Bearer " + good])
    assert ws.recv()["type"] == "ready"
    # subprotocol (bad) before query (good)
    ws = sockets(server, path + "?token=" + good, bad, via="subprotocol")
    assert ws.expect_close() == (4001, "unauthenticated")
    # query (bad) before cookie (good)
    ws = sockets(server, path + "?token=" + bad, good, via="cookie")
    assert ws.expect_close() == (4001, "unauthenticated")
    # query (good) before cookie (bad)
    ws = sockets(server, path + "?token=" + good, bad, via="cookie")
    assert ws.recv()["type"] == "ready"
    # an Authorization header with another scheme is ignored
    ws = sockets(server, path, good, via="query",
                 header=["Authorization: Basic dXNlcjpwYXNz"])
    assert ws.recv()["type"] == "ready"
    # an expired token first is token_expired, even with a good one after
    expired = make_token(a, na, exp_in=-120)
    ws = sockets(server, path + "?token=" + good, expired,
                 via="subprotocol")
    assert ws.expect_close() == (4001, "token_expired")


def _alg_none_token(user):
    import base64

    def b64(obj):
        raw = json.dumps(obj).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    now = int(time.time())
    return "%s.%s." % (b64({"alg": "none", "typ": "JWT"}),
                       b64({"user_id": user, "exp": now + 3600,
                            "token_type": "access"}))


def _bad_tokens(user):
    import jwt as pyjwt
    now = int(time.time())
    return {
        "bad signature": make_token(user, secret="wrong-secret"),
        "alg none": _alg_none_token(user),
        "alg none signed": _alg_none_token(user) + "c2ln",
        "HS512 with the same secret": make_token(user, alg="HS512"),
        "refresh token": make_token(user, token_type="refresh"),
        "no exp": pyjwt.encode({"user_id": user, "token_type": "access"},
                               SECRET, algorithm="HS256"),
        "nbf in the future": make_token(user, nbf=now + 600),
        "empty user id": make_token(""),
        "user id over 64 bytes": make_token("u" * 65),
        "user id float": make_token(1.5),
        "user id object": make_token({"id": user}),
        "user id list": make_token([user]),
        "bad user_id does not fall back to sub": make_token("", sub=user),
        "no user id at all": make_token(None),
        "service token": service_token(),
        "service token (array scope)": service_token(scope=["read",
                                                            "service"]),
        "garbage": "not-a-jwt",
        "three garbage parts": "aaa.bbb.ccc",
    }


@pytest.mark.parametrize("kind", ["chat", "notifications"])
def test_unauthenticated_tokens_close_4001(server, conn, sockets, kind):
    user = new_id()
    conv = create_conversation(conn, [user, new_id()])
    path = chat_path(conv) if kind == "chat" else "/ws/notifications/"
    failures = []
    for label, token in _bad_tokens(user).items():
        ws = sockets(server, path, token, via="query")
        got = ws.expect_close()
        if got != (4001, "unauthenticated"):
            failures.append((label, got))
        ws.close()
    # no token at all
    ws = sockets(server, path)
    got = ws.expect_close()
    if got != (4001, "unauthenticated"):
        failures.append(("no token", got))
    assert not failures, failures


@pytest.mark.parametrize("via", ["subprotocol", "header", "query", "cookie"])
def test_expired_token_closes_4001_token_expired(server, sockets, pair, via):
    conv, (a, b), (na, nb) = pair
    ws = sockets(server, chat_path(conv), make_token(a, na, exp_in=-31),
                 via=via)
    assert ws.expect_close() == (4001, "token_expired")


def test_leeway_accepts_recently_expired_and_early_nbf(server, sockets, pair):
    conv, (a, b), (na, nb) = pair
    now = int(time.time())
    ws = join(sockets, server, conv, a, token=make_token(a, na, exp_in=-20))
    assert ws.ready["user"]["id"] == a
    ws = join(sockets, server, conv, a, token=make_token(a, na, nbf=now + 20))
    assert ws.ready["user"]["id"] == a


def test_forbidden_non_participant_and_missing_conversation(server, conn,
                                                            sockets, pair):
    conv, (a, b), (na, nb) = pair
    stranger = new_id()
    ws = sockets(server, chat_path(conv), make_token(stranger))
    assert ws.expect_close() == (4003, "forbidden")
    # a conversation that does not exist is indistinguishable
    missing = sql_one(conn, "SELECT coalesce(max(id), 0) + 1000000 "
                      "FROM conversations")
    ws = sockets(server, chat_path(missing), make_token(a))
    assert ws.expect_close() == (4003, "forbidden")
    ws = sockets(server, chat_path(9223372036854775807), make_token(a))
    assert ws.expect_close() == (4003, "forbidden")
    # Ids no conversation can have (0, beyond 64 bits): the server answers
    # HTTP 404 as for a non-numeric id (its choice; the protocol only says
    # "numeric"); a 4003 would do as well. Never a ready frame.
    for bad in (0, 10 ** 20):
        try:
            ws = sockets(server, chat_path(bad), make_token(a))
        except websocket.WebSocketBadStatusException as e:
            assert e.status_code == 404
        else:
            assert ws.expect_close() == (4003, "forbidden")
    # the stranger's socket did not make anyone see them online
    wa = join(sockets, server, conv, a, na)
    assert wa.ready["online"] == [a]


def test_non_numeric_id_is_http_404(server, pair):
    conv, (a, b), (na, nb) = pair
    token = make_token(a, na)
    for path in ("/ws/chat/abc/", "/ws/chat/12a/", "/ws/chat/-1/",
                 "/ws/chat//", "/ws/chat/"):
        assert ws_error_status(server, path, token=token) == 404, path
    # and a plain GET of it too, with the JSON error object
    r = requests.get(server.base + "/ws/chat/abc/", timeout=10)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


def test_upgrade_kore_would_refuse_gets_the_json_error(server, pair):
    """A WebSocket upgrade without version 13 (or without a key) is refused
    with the JSON error object and the version the server speaks, on a
    connection that stays usable (no session is left behind on it)."""
    conv, (a, b), (na, nb) = pair
    token = make_token(a, na)
    with requests.Session() as http:
        for headers in ({"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                         "Sec-WebSocket-Version": "8"},
                        {"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="},
                        {"Sec-WebSocket-Version": "13"}):
            headers.update({"Upgrade": "websocket", "Connection": "Upgrade",
                            "Authorization": "Bearer " + token})
            r = http.get(server.base + chat_path(conv), headers=headers,
                         timeout=10)
            assert r.status_code == 400, (headers, r.text)
            assert r.json()["error"]["code"] == "invalid_payload", r.text
            assert r.headers["sec-websocket-version"] == "13"


def test_trailing_slash_optional(server, sockets, pair):
    conv, (a, b), (na, nb) = pair
    ws = sockets(server, chat_path(conv, slash=False), make_token(a, na))
    assert ws.recv()["type"] == "ready"
    ws = sockets(server, "/ws/notifications", make_token(a, na))
    assert ws.recv()["type"] == "ready"


def test_origin_allow_list(make_server, conn, sockets):
    srv = make_server(PARLEY_ALLOWED_ORIGINS="https://app.example.com,"
                      "http://localhost:3000")
    a, b = new_id(), new_id()
    conv = create_conversation(conn, [a, b])
    token = make_token(a)
    for origin in ("https://evil.example.com", "http://app.example.com",
                   "https://app.example.com:443", "http://localhost:3001",
                   "https://app.example.com.evil.com", "null"):
        assert ws_error_status(srv, chat_path(conv), token=token,
                               origin=origin) == 403, origin
        assert ws_error_status(srv, "/ws/notifications/", token=token,
                               origin=origin) == 403, origin
    for origin in ("https://app.example.com", "http://localhost:3000"):
        ws = sockets(srv, chat_path(conv), token, origin=origin)
        assert ws.recv()["type"] == "ready"
    # no Origin at all (a native app) is allowed
    ws = sockets(srv, chat_path(conv), token, suppress_origin=True)
    assert ws.recv()["type"] == "ready"
    ws = sockets(srv, "/ws/notifications/", token, suppress_origin=True)
    assert ws.recv()["type"] == "ready"
    # the 403 happens before identity: even with no token
    assert ws_error_status(srv, chat_path(conv),
                           origin="https://evil.example.com") == 403


# ---------------------------------------------------------------------------
# sends
# ---------------------------------------------------------------------------

def test_send_forms(server, conn, sockets, pair):
    conv, (a, b), (na, nb) = pair
    wa = join(sockets, server, conv, a, na)
    wb = join(sockets, server, conv, b, nb)
    forms = [
        ({"type": "message", "content": "canonical", "message_type": "TEXT",
          "client_id": "f-1", "metadata": None}, "canonical", "TEXT", "f-1"),
        ({"type": "send_message", "text": "send form"}, "send form", "TEXT",
         None),
        ({"message": "compat form", "type": "TEXT"}, "compat form", "TEXT",
         None),
        ({"type": "message", "content": "short form"}, "short form", "TEXT",
         None),
        ({"message": "", "type": "LOCATION",
          "metadata": {"lat": 45.5, "lng": -73.6}}, "", "LOCATION", None),
        ({"type": "message", "message_type": "IMAGE", "content": " pic ",
          "metadata": {"url": "https://cdn.example.com/a.png", "name": "a.png",
                       "size": 10, "mime": "image/png"}}, "pic", "IMAGE",
         None),
        ({"type": "send_message", "message_type": "FILE",
          "metadata": {"url": "/files/1"}}, "", "FILE", None),
    ]
    for frame, content, mtype, cid in forms:
        wa.send(frame)
        ack = wa.recv_type("ack")
        assert ack["client_id"] == cid
        got = message_of(wb, lambda m: m["id"] == ack["message_id"])
        assert got["content"] == got["message_text"] == content, frame
        assert got["message_type"] == mtype
        assert got["sender_id"] == a
        assert got["metadata"] == frame.get("metadata"), frame
    assert count_messages(conn, conv) == len(forms)


def test_ack_and_message_fan_out(server, conn, sockets, pair):
    conv, (a, b), (na, nb) = pair
    a1 = join(sockets, server, conv, a, na)
    a2 = join(sockets, server, conv, a, na)
    b1 = join(sockets, server, conv, b, nb)
    b2 = join(sockets, server, conv, b, nb)

    a1.send({"type": "message", "content": "  Hello  ", "client_id": "c-123"})
    ack = a1.recv_type("ack")
    assert set(ack) == {"type", "client_id", "message_id", "timestamp"}
    assert ack["client_id"] == "c-123"
    assert isinstance(ack["message_id"], int)
    assert TS.match(ack["timestamp"])

    for ws in (a1, a2, b1, b2):
        frame = find_message(ws, ack["message_id"])
        assert "replay" not in frame
        msg = frame["message"]
        assert set(msg) == MESSAGE_KEYS
        assert msg == {"id": ack["message_id"], "conversation_id": conv,
                       "sender_id": a, "sender_name": na,
                       "message_text": "Hello", "content": "Hello",
                       "message_type": "TEXT", "metadata": None,
                       "client_id": "c-123", "timestamp": ack["timestamp"],
                       "created_at": ack["timestamp"], "is_read": False}

    # the ack went to the sending socket only
    for frames in sentinel(conn, conv, b, a2, b1, b2):
        assert not [f for f in frames if f["type"] == "ack"], frames
    for ws in (a2, b1, b2):
        ws.no_frame(lambda f: f["type"] == "ack", 0.3)

    # a send without client_id is acked with client_id null
    ack = send_ok(b2, "no id")
    assert ack["client_id"] is None
    msg = message_of(a1, lambda m: m["id"] == ack["message_id"])
    assert msg["client_id"] is None and msg["sender_name"] == nb
    row = sql_rows(conn, "SELECT sender_id, type, content, metadata, "
                   "client_id FROM messages WHERE id = %s", ack["message_id"])
    assert row == [(b, "TEXT", "no id", None, None)]


def test_sender_name_is_latest_display_name(server, conn, sockets, pair):
    conv, (a, b), (na, nb) = pair
    wb = join(sockets, server, conv, b, nb)
    wa = join(sockets, server, conv, a, "First Name")
    ack = send_ok(wa, "one")
    assert message_of(wb, lambda m: m["id"] == ack["message_id"])[
        "sender_name"] == "First Name"
    wa2 = join(sockets, server, conv, a, "Renamed")
    ack = send_ok(wa2, "two")
    assert message_of(wb, lambda m: m["id"] == ack["message_id"])[
        "sender_name"] == "Renamed"


def test_invalid_json(server, conn, sockets, pair):
    conv, (a, b), (na, nb) = pair
    ws = join(sockets, server, conv, a, na)
    for raw in ("not json{", "{\"type\":\"message\",", "", "{'a':1}",
                "\xff\xfe"):
        expect_error(ws, raw, "invalid_json")
    send_ok(ws, "still fine", "ok-1")
    assert count_messages(conn, conv) == 1


def test_invalid_payload(server, conn, sockets, pair):
    conv, (a, b), (na, nb) = pair
    ws = join(sockets, server, conv, a, na)
    cases = [
        # JSON but not an object, or no usable type
        ("[1, 2]", None),
        ("\"message\"", None),
        ("42", None),
        ("null", None),
        ({"content": "no type"}, None),
        ({"type": 5, "content": "x"}, None),
        ({"type": None, "content": "x"}, None),
        # wrong field types
        ({"type": "message", "content": 5, "client_id": "p-1"}, "p-1"),
        ({"type": "message", "content": ["x"], "client_id": "p-2"}, "p-2"),
        ({"type": "send_message", "text": {"a": 1}, "client_id": "p-3"},
         "p-3"),
        ({"type": "message", "content": "x", "message_type": 1,
          "client_id": "p-4"}, "p-4"),
        ({"message": 5, "type": "TEXT", "client_id": "p-5"}, "p-5"),
        # bad metadata
        ({"type": "message", "content": "x", "metadata": [1],
          "client_id": "p-6"}, "p-6"),
        ({"type": "message", "content": "x", "metadata": "str",
          "client_id": "p-7"}, "p-7"),
        ({"type": "message", "content": "x", "metadata": {"k": "v" * 2100},
          "client_id": "p-8"}, "p-8"),
        ({"type": "message", "message_type": "LOCATION", "content": "",
          "client_id": "p-9"}, "p-9"),
        ({"type": "message", "message_type": "LOCATION",
          "metadata": {"lat": 91, "lng": 0}, "client_id": "p-10"}, "p-10"),
        ({"type": "message", "message_type": "LOCATION",
          "metadata": {"lat": 0, "lng": -180.5}, "client_id": "p-11"},
         "p-11"),
        ({"type": "message", "message_type": "LOCATION",
          "metadata": {"lat": "1", "lng": "2"}, "client_id": "p-12"},
         "p-12"),
        ({"type": "message", "message_type": "IMAGE",
          "metadata": {"name": "x.png"}, "client_id": "p-13"}, "p-13"),
        ({"type": "message", "message_type": "IMAGE",
          "metadata": {"url": "http://insecure.example.com/x.png"},
          "client_id": "p-14"}, "p-14"),
        ({"type": "message", "message_type": "FILE",
          "metadata": {"url": "//evil.example.com/x"}, "client_id": "p-15"},
         "p-15"),
        ({"type": "message", "message_type": "FILE",
          "metadata": {"url": "files/x"}, "client_id": "p-16"}, "p-16"),
        ({"type": "message", "message_type": "FILE", "metadata": None,
          "client_id": "p-17"}, "p-17"),
        # numbers no double holds (jsonb could not store 1e2000)
        ('{"type":"message","content":"x","metadata":{"n":1e2000},'
         '"client_id":"p-20"}', "p-20"),
        ('{"type":"message","message_type":"LOCATION","content":"",'
         '"metadata":{"lat":1e-400,"lng":0},"client_id":"p-21"}', "p-21"),
        # unknown message type, in the forms that name one
        ({"type": "message", "content": "x", "message_type": "VIDEO",
          "client_id": "p-18"}, "p-18"),
        ({"type": "send_message", "text": "x", "message_type": "text",
          "client_id": "p-19"}, "p-19"),
        # bad client_id: no ref, since it is not a usable client_id
        ({"type": "message", "content": "x", "client_id": ""}, None),
        ({"type": "message", "content": "x", "client_id": "c" * 65}, None),
        ({"type": "message", "content": "x", "client_id": 12}, None),
        ({"type": "message", "content": "x", "client_id": ["a"]}, None),
        # a read with a bad id, a typing without a boolean
        ({"type": "read", "message_id": "12"}, None),
        ({"type": "read", "message_id": -1}, None),
        ({"type": "typing", "is_typing": "yes"}, None),
        ({"type": "typing"}, None),
        ({"type": "sync", "after": "x"}, None),
        ({"type": "sync", "after": -5}, None),
        ({"type": "sync", "after": 0, "limit": "10"}, None),
    ]
    for frame, ref in cases:
        expect_error(ws, frame, "invalid_payload", ref)
    assert count_messages(conn, conv) == 0
    # a 64-byte client_id is fine
    send_ok(ws, "fine", "c" * 64)
    assert count_messages(conn, conv) == 1


def test_unknown_type(server, conn, sockets, pair):
    conv, (a, b), (na, nb) = pair
    ws = join(sockets, server, conv, a, na)
    for t in ("dance", "MESSAGE", "read_all", "Message", ""):
        expect_error(ws, {"type": t, "content": "x"}, "unknown_type")
    assert count_messages(conn, conv) == 0


def test_empty_message(server, conn, sockets, pair):
    conv, (a, b), (na, nb) = pair
    ws = join(sockets, server, conv, a, na)
    for content, cid in (("", "e-1"), ("   ", "e-2"), ("\n\t \r", "e-3"),
                         ("\u00a0 \u00a0", "e-4"), (None, "e-5")):
        frame = {"type": "message", "client_id": cid}
        if content is not None:
            frame["content"] = content
        expect_error(ws, frame, "empty_message", cid)
    expect_error(ws, {"type": "send_message", "text": "  "}, "empty_message")
    expect_error(ws, {"message": "", "type": "TEXT"}, "empty_message")
    assert count_messages(conn, conv) == 0


def test_message_too_long_counts_code_points_after_trim(server, conn, sockets,
                                                       pair):
    conv, (a, b), (na, nb) = pair
    ws = join(sockets, server, conv, a, na)
    expect_error(ws, {"type": "message", "content": "x" * 4001,
                      "client_id": "l-1"}, "message_too_long", "l-1")
    expect_error(ws, {"type": "message", "content": "\u00e9" * 4001,
                      "client_id": "l-2"}, "message_too_long", "l-2")
    expect_error(ws, {"type": "message", "content": "\U0001F600" * 4001,
                      "client_id": "l-3"}, "message_too_long", "l-3")
    assert count_messages(conn, conv) == 0
    # exactly the limit, in multi-byte characters and with spaces around
    for content, cid in (("x" * 4000, "ok-1"), ("\u00e9" * 4000, "ok-2"),
                         ("\U0001F600" * 4000, "ok-3"),
                         ("  " + "y" * 4000 + "\n", "ok-4")):
        ack = send_ok(ws, content, cid)
        stored = sql_one(conn, "SELECT content FROM messages WHERE id = %s",
                         ack["message_id"])
        assert stored == content.strip()


def test_max_message_chars_setting(make_server, conn, sockets):
    srv = make_server(PARLEY_MAX_MESSAGE_CHARS="10")
    a, b = new_id(), new_id()
    conv = create_conversation(conn, [a, b])
    ws = join(sockets, srv, conv, a)
    send_ok(ws, "\u00e9" * 10, "m-1")
    expect_error(ws, {"type": "message", "content": "\u00e9" * 11,
                      "client_id": "m-2"}, "message_too_long", "m-2")
    send_ok(ws, "  0123456789  ", "m-3")


def test_forbidden_type_system_from_user(server, conn, sockets, pair):
    conv, (a, b), (na, nb) = pair
    ws = join(sockets, server, conv, a, na)
    expect_error(ws, {"type": "message", "content": "I am the system",
                      "message_type": "SYSTEM", "client_id": "s-1"},
                 "forbidden_type", "s-1")
    expect_error(ws, {"message": "I am the system", "type": "SYSTEM"},
                 "forbidden_type")
    assert count_messages(conn, conv) == 0


def test_client_id_idempotent_and_conflict(server, conn, sockets, pair):
    conv, (a, b), (na, nb) = pair
    wa = join(sockets, server, conv, a, na)
    wb = join(sockets, server, conv, b, nb)
    first = send_ok(wa, "Hello", "dup-1", metadata={"k": 1})
    message_of(wb, lambda m: m["id"] == first["message_id"])

    # the same send again (also with other surrounding whitespace), from
    # this socket and from another socket of the same user
    again = send_ok(wa, "  Hello ", "dup-1", metadata={"k": 1})
    assert again == first
    wa2 = join(sockets, server, conv, a, na)
    assert send_ok(wa2, "Hello", "dup-1", metadata={"k": 1}) == first
    assert sql_one(conn, "SELECT count(*) FROM messages WHERE "
                   "conversation_id = %s AND client_id = 'dup-1'", conv) == 1

    # nothing broadcast for the repeats
    frames = sentinel(conn, conv, b, wb)[0]
    assert not [f for f in frames if f["type"] == "message"], frames

    # the same client_id with other content, type or metadata: conflict
    expect_error(wa, {"type": "message", "content": "Other",
                      "client_id": "dup-1", "metadata": {"k": 1}},
                 "conflict", "dup-1")
    expect_error(wa, {"type": "message", "content": "Hello",
                      "client_id": "dup-1", "metadata": {"k": 2}},
                 "conflict", "dup-1")
    expect_error(wa, {"type": "message", "content": "Hello",
                      "client_id": "dup-1"}, "conflict", "dup-1")
    expect_error(wa, {"type": "message", "message_type": "LOCATION",
                      "content": "Hello", "client_id": "dup-1",
                      "metadata": {"lat": 1, "lng": 1}}, "conflict", "dup-1")
    assert count_messages(conn, conv) == 2   # Hello + the sentinel

    # another sender may use the same client_id: it is per sender
    other = send_ok(wb, "Hello", "dup-1", metadata={"k": 1})
    assert other["message_id"] != first["message_id"]
    # and the same sender in another conversation too
    conv2 = create_conversation(conn, [a, b], title="second", kind="t",
                                ref=new_id())
    wa3 = join(sockets, server, conv2, a, na)
    assert send_ok(wa3, "Hello", "dup-1")["message_id"] != first["message_id"]


def test_binary_frame_closes_1003(server, sockets, pair):
    conv, (a, b), (na, nb) = pair
    ws = join(sockets, server, conv, a, na)
    ws.send_raw(b'{"type":"ping"}', websocket.ABNF.OPCODE_BINARY)
    assert ws.expect_close() == (1003, "binary_not_supported")


def test_frame_over_64k_closes_1009(server, conn, sockets, pair):
    conv, (a, b), (na, nb) = pair
    ws = join(sockets, server, conv, a, na)
    # exactly 64 KiB is allowed (and too long a message)
    body = '{"type":"message","client_id":"big","content":"%s"}'
    frame = body % ("x" * (65536 - len(body % "")))
    assert len(frame.encode()) == 65536
    expect_error(ws, frame, "message_too_long", "big")
    frame = body % ("x" * (65537 - len(body % "")))
    ws.send_raw(frame)
    assert ws.expect_close() == (1009, "message_too_big")
    assert count_messages(conn, conv) == 0


def test_sql_metacharacters_stored_verbatim(server, conn, sockets, pair):
    conv, (a, b), (na, nb) = pair
    wa = join(sockets, server, conv, a, na)
    wb = join(sockets, server, conv, b, nb)
    texts = [
        "'; DROP TABLE messages; --",
        "Robert'); DELETE FROM participants WHERE ('1'='1",
        "$1 $2 %s %d %% \\x00 \\' \\\\ E'\\n'",
        "\"quoted\" `back` $$dollar$$ $tag$ body $tag$",
        "<script>alert('x')</script> & &amp;",
        "emoji \U0001F600 \u00e9\u4e2d\u6587 \u202e rtl",
        "line1\nline2\ttab",
    ]
    for i, text in enumerate(texts):
        cid = "sq-%d-'\";--" % i
        ack = send_ok(wa, text, cid, metadata={"q": text, "k'\"": [text]})
        msg = message_of(wb, lambda m: m["id"] == ack["message_id"])
        assert msg["content"] == text
        assert msg["client_id"] == cid
        assert msg["metadata"] == {"q": text, "k'\"": [text]}
        row = sql_rows(conn, "SELECT content, client_id, metadata FROM "
                       "messages WHERE id = %s", ack["message_id"])
        assert row == [(text, cid, {"q": text, "k'\"": [text]})]
    assert sql_one(conn, "SELECT count(*) FROM participants WHERE "
                   "conversation_id = %s", conv) == 2


def test_nul_character_is_not_silently_truncated(server, conn, sockets, pair):
    """A JSON \\u0000 cannot be stored in a PostgreSQL text: the send must
    be refused as invalid_payload (or stored whole), never cut at the NUL
    nor answered with internal."""
    conv, (a, b), (na, nb) = pair
    ws = join(sockets, server, conv, a, na)
    ws.send({"type": "message", "content": "before\u0000after",
             "client_id": "nul-1"})
    got = ws.recv_until(lambda f: f["type"] in ("ack", "error"))
    if got["type"] == "ack":
        stored = sql_one(conn, "SELECT content FROM messages WHERE id = %s",
                         got["message_id"])
        assert stored == "before\u0000after", "stored %r" % stored
    else:
        assert got["code"] == "invalid_payload", got
        assert got["ref"] == "nul-1"
    ws.send({"type": "ping"})
    ws.recv_type("pong")
    # the same in metadata (jsonb cannot hold it either)
    ws.send({"type": "message", "content": "meta", "client_id": "nul-2",
             "metadata": {"k": "a\u0000b"}})
    got = ws.recv_until(lambda f: f["type"] in ("ack", "error"))
    if got["type"] == "ack":
        stored = sql_one(conn, "SELECT metadata FROM messages WHERE id = %s",
                         got["message_id"])
        assert stored == {"k": "a\u0000b"}, "stored %r" % stored
    else:
        assert (got["code"], got["ref"]) == ("invalid_payload", "nul-2"), got


def test_lone_surrogate_escape_is_refused_not_internal(server, conn, sockets,
                                                     pair):
    """"\\udc00" (a lone low surrogate) is no Unicode character: the send
    is refused as invalid (the JSON is valid, the text is not), never
    answered with internal, and the socket stays usable."""
    conv, (a, b), (na, nb) = pair
    ws = join(sockets, server, conv, a, na)
    for raw, cid in (('{"type":"message","content":"x\\udc00","client_id":'
                      '"sg-1"}', "sg-1"),
                     ('{"type":"message","content":"x","metadata":{"k":'
                      '"\\udfff"},"client_id":"sg-2"}', "sg-2")):
        ws.send(raw)
        got = ws.recv_until(lambda f: f["type"] in ("ack", "error"))
        assert got["type"] == "error", (raw, got)
        assert got["code"] in ("invalid_payload", "invalid_json"), (raw, got)
        assert got["ref"] in (cid, None)
    send_ok(ws, "fine", "sg-3")
    assert count_messages(conn, conv) == 1


@pytest.fixture
def conversation_lock(pg):
    """lock(conv): hold the conversation row (FOR UPDATE) in an open
    transaction, so a write to it waits; release() commits."""
    c = pg.connect()
    c.autocommit = False

    class Lock:
        def lock(self, conv):
            with c.cursor() as cur:
                cur.execute("SELECT 1 FROM conversations WHERE id = %s "
                            "FOR UPDATE", (conv,))

        def release(self):
            c.commit()

    yield Lock()
    c.rollback()
    c.close()


def _write_blocked(conn):
    return sql_one(conn, "SELECT count(*) FROM pg_stat_activity WHERE "
                   "application_name = 'parley' AND wait_event_type = "
                   "'Lock'") > 0


def test_sends_sharing_a_write_batch_are_answered_each(server, conn, sockets,
                                                       conversation_lock):
    """The server writes the sends that arrive while a write is in flight
    in the next round trip (sql/007_batch.sql, one INSERT for the batch).
    Each keeps its own outcome: a refused or malformed send must
    not fail the others, and two sockets of one user sending the same
    client_id get one message and the same ack, whichever worker and batch
    they went through."""
    a, b, c = new_id(), new_id(), new_id()
    blocked = create_conversation(conn, [a, b])
    conv = create_conversation(conn, [a, b, c])
    wa_blocked = join(sockets, server, blocked, a)
    b1 = join(sockets, server, conv, b)
    b2 = join(sockets, server, conv, b)
    wc = join(sockets, server, conv, c)
    wc2 = join(sockets, server, conv, c)
    wa = join(sockets, server, conv, a)

    conversation_lock.lock(blocked)
    wa_blocked.send({"type": "message", "content": "waits", "client_id": "w"})
    wait_for(lambda: _write_blocked(conn), 10, what="the first write waits")
    # these arrive while that write is in flight: they share the next one
    b1.send({"type": "message", "content": "same", "client_id": "twice"})
    b2.send({"type": "message", "content": "same", "client_id": "twice"})
    wc.send({"type": "message", "content": "good one", "client_id": "good"})
    wc2.send({"type": "message", "content": "same", "client_id": "twice"})
    wa.send('{"type":"message","content":"bad \\udc00","client_id":"bad"}')
    time.sleep(0.5)      # nothing to wait for: let the server read them
    conversation_lock.release()

    assert wa_blocked.recv_type("ack")["client_id"] == "w"
    ack1 = b1.recv_until(lambda f: f["type"] in ("ack", "error"))
    ack2 = b2.recv_until(lambda f: f["type"] in ("ack", "error"))
    good = wc.recv_until(lambda f: f["type"] in ("ack", "error"))
    other = wc2.recv_until(lambda f: f["type"] in ("ack", "error"))
    bad = wa.recv_until(lambda f: f["type"] in ("ack", "error"))
    assert good["type"] == "ack", good
    assert ack1["type"] == "ack" and ack2 == ack1, (ack1, ack2)
    # the same client_id from another sender is its own message
    assert other["type"] == "ack" and other["message_id"] not in (
        ack1["message_id"], good["message_id"]), other
    assert bad["type"] == "error" and bad["code"] != "internal", bad
    rows = sql_rows(conn, "SELECT sender_id, client_id, id FROM messages "
                    "WHERE conversation_id = %s", conv)
    assert sorted(rows) == sorted([(b, "twice", ack1["message_id"]),
                                   (c, "good", good["message_id"]),
                                   (c, "twice", other["message_id"])])


# ---------------------------------------------------------------------------
# typing, read, sync, presence, ping, auth
# ---------------------------------------------------------------------------

def test_typing_relayed_to_others_not_typist(server, conn, sockets, pair):
    conv, (a, b), (na, nb) = pair
    a1 = join(sockets, server, conv, a, na)
    a2 = join(sockets, server, conv, a, na)
    b1 = join(sockets, server, conv, b, nb)
    b2 = join(sockets, server, conv, b, nb)

    a1.send({"type": "typing", "is_typing": True})
    for ws in (b1, b2):
        t = ws.recv_type("typing")
        assert t == {"type": "typing", "conversation_id": conv,
                     "user_id": a, "username": na, "is_typing": True}
    a1.send({"type": "typing", "is_typing": False})
    for ws in (b1, b2):
        t = ws.recv_type("typing")
        assert t["is_typing"] is False and t["user_id"] == a

    for frames in sentinel(conn, conv, b, a1, a2):
        assert not [f for f in frames if f["type"] == "typing"], frames
    # nothing stored
    assert count_messages(conn, conv) == 1


def test_typing_stops_by_itself_after_6_seconds(server, sockets, pair):
    conv, (a, b), (na, nb) = pair
    wa = join(sockets, server, conv, a, na)
    wb = join(sockets, server, conv, b, nb)
    wa.send({"type": "typing", "is_typing": True})
    start = time.time()
    assert wb.recv_type("typing")["is_typing"] is True
    stop = wb.recv_type("typing", timeout=12)
    elapsed = time.time() - start
    assert stop == {"type": "typing", "conversation_id": conv, "user_id": a,
                    "username": na, "is_typing": False}
    assert 5.0 <= elapsed <= 9.0, elapsed


def test_typing_renewed_keeps_going(server, sockets, pair):
    conv, (a, b), (na, nb) = pair
    wa = join(sockets, server, conv, a, na)
    wb = join(sockets, server, conv, b, nb)
    wa.send({"type": "typing", "is_typing": True})
    assert wb.recv_type("typing")["is_typing"] is True
    for _ in range(4):            # keeps typing for 8 s
        time.sleep(2)
        wa.send({"type": "typing", "is_typing": True})
    # no is_typing:false while the renewals came in (nor 2 s after)
    wb.no_frame(lambda f: f["type"] == "typing" and not f["is_typing"], 2)
    start = time.time()
    wb.recv_until(lambda f: f["type"] == "typing" and not f["is_typing"],
                  timeout=10)
    assert time.time() - start <= 6


def test_typing_false_when_socket_closes(server, sockets, pair):
    conv, (a, b), (na, nb) = pair
    wa = join(sockets, server, conv, a, na)
    wb = join(sockets, server, conv, b, nb)
    wa.send({"type": "typing", "is_typing": True})
    assert wb.recv_type("typing")["is_typing"] is True
    start = time.time()
    wa.close()
    t = wb.recv_type("typing")
    assert t["is_typing"] is False and t["user_id"] == a
    assert time.time() - start < 4.5    # not the 6 s expiry


def test_read_receipts(server, conn, sockets, pair):
    conv, (a, b), (na, nb) = pair
    ids = [sql_insert(conn, conv, a, "m%d" % i) for i in range(3)]
    wa = join(sockets, server, conv, a, na)
    b1 = join(sockets, server, conv, b, nb)
    b2 = join(sockets, server, conv, b, nb)
    assert b1.ready["unread_count"] == 3

    b1.send({"type": "read", "message_id": ids[1]})
    for ws in (wa, b1, b2):
        rr = ws.recv_type("read_receipt")
        assert set(rr) == {"type", "conversation_id", "user_id",
                           "message_id", "read_at"}
        assert rr["conversation_id"] == conv and rr["user_id"] == b
        assert rr["message_id"] == ids[1]
        assert TS.match(rr["read_at"])
    assert sql_one(conn, "SELECT parley_unread_count(%s, %s)", conv, b) == 1

    # a read that does not move the position sends nothing
    b1.send({"type": "read", "message_id": ids[0]})
    b1.send({"type": "read", "message_id": ids[1]})
    b1.send({"type": "ping"})
    b1.recv_type("pong")
    for frames in sentinel(conn, conv, a, wa, b1, b2):
        assert not [f for f in frames if f["type"] == "read_receipt"], frames
    sentinel_id = wa.frames[-1]["message"]["id"]
    assert sql_one(conn, "SELECT last_read_message_id FROM participants "
                   "WHERE conversation_id = %s AND user_id = %s",
                   conv, b) == ids[1]

    # above the latest: clamped to the latest
    b2.send({"type": "read", "message_id": sentinel_id + 10 ** 9})
    for ws in (wa, b1, b2):
        rr = ws.recv_type("read_receipt")
        assert rr["message_id"] == sentinel_id
    assert sql_rows(conn, "SELECT last_read_message_id, "
                    "parley_unread_count(conversation_id, user_id) FROM "
                    "participants WHERE conversation_id = %s AND "
                    "user_id = %s", conv, b) == [(sentinel_id, 0)]

    # no message_id: up to the latest
    last = sql_insert(conn, conv, a, "more")
    b1.send({"type": "read"})
    for ws in (wa, b1, b2):
        assert ws.recv_type("read_receipt")["message_id"] == last
    # is_read shows in a replay once every other participant read it
    wa.send({"type": "sync", "after": ids[2] - 1})
    replayed = wa.recv_until(lambda f: f["type"] == "message" and
                             f["message"]["id"] == ids[2])
    assert replayed["message"]["is_read"] is True
    wa.recv_type("synced")
    wb3 = join(sockets, server, conv, b, nb)
    assert wb3.ready["unread_count"] == 0


def test_read_in_empty_conversation_sends_nothing(server, conn, sockets,
                                                  pair):
    conv, (a, b), (na, nb) = pair
    wa = join(sockets, server, conv, a, na)
    wa.send({"type": "read"})
    wa.send({"type": "read", "message_id": 99})
    wa.send({"type": "ping"})
    wa.recv_type("pong")
    for frames in sentinel(conn, conv, b, wa):
        assert not [f for f in frames if f["type"] in
                    ("read_receipt", "error")], frames


def _collect_sync(ws):
    """Messages replayed up to the next synced, and the synced frame."""
    msgs = []
    while True:
        f = ws.recv_until(lambda f: f["type"] in ("message", "synced"))
        if f["type"] == "synced":
            return msgs, f
        msgs.append(f)


def test_sync_replay_and_paging(server, conn, sockets, pair):
    conv, (a, b), (na, nb) = pair
    ids = [sql_insert(conn, conv, a, "m%d" % i) for i in range(5)]
    wb = join(sockets, server, conv, b, nb)

    wb.send({"type": "sync", "after": ids[0], "limit": 2})
    msgs, synced = _collect_sync(wb)
    assert [m["message"]["id"] for m in msgs] == ids[1:3]
    assert all(m["replay"] is True for m in msgs)
    assert set(msgs[0]["message"]) == MESSAGE_KEYS
    assert msgs[0]["message"]["content"] == "m1"
    assert synced == {"type": "synced", "last_message_id": ids[2],
                      "has_more": True}

    wb.send({"type": "sync", "after": ids[2], "limit": 2})
    msgs, synced = _collect_sync(wb)
    assert [m["message"]["id"] for m in msgs] == ids[3:5]
    assert synced == {"type": "synced", "last_message_id": ids[4],
                      "has_more": False}

    # nothing after the latest: last_message_id is `after`
    wb.send({"type": "sync", "after": ids[4]})
    msgs, synced = _collect_sync(wb)
    assert msgs == [] and synced == {"type": "synced",
                                     "last_message_id": ids[4],
                                     "has_more": False}
    # after 0, default limit: everything
    wb.send({"type": "sync", "after": 0})
    msgs, synced = _collect_sync(wb)
    assert [m["message"]["id"] for m in msgs] == ids
    assert synced["has_more"] is False
    # a later live message carries no replay key
    live = sql_insert(conn, conv, a, "live")
    frame = wb.recv_until(lambda f: f["type"] == "message")
    assert frame["message"]["id"] == live and "replay" not in frame


def test_sync_limit_default_200_max_500(server, conn, sockets, pair):
    conv, (a, b), (na, nb) = pair
    ids = messages_stored(conn, conv, a, "bulk ", 520)
    wb = join(sockets, server, conv, b, nb)
    wb.send({"type": "sync", "after": 0})
    msgs, synced = _collect_sync(wb)
    assert len(msgs) == 200 and synced["has_more"] is True
    assert synced["last_message_id"] == ids[199]
    wb.send({"type": "sync", "after": 0, "limit": 10000})
    msgs, synced = _collect_sync(wb)
    assert len(msgs) == 500 and synced["has_more"] is True
    assert synced["last_message_id"] == ids[499]
    wb.send({"type": "sync", "after": ids[499], "limit": 500})
    msgs, synced = _collect_sync(wb)
    assert [m["message"]["id"] for m in msgs] == ids[500:]
    assert synced["has_more"] is False


def test_connect_with_after_replays_then_synced(server, conn, sockets, pair):
    conv, (a, b), (na, nb) = pair
    ids = [sql_insert(conn, conv, a, "m%d" % i) for i in range(4)]
    wb = join(sockets, server, conv, b, nb, after=ids[1])
    msgs, synced = _collect_sync(wb)
    assert [m["message"]["id"] for m in msgs] == ids[2:]
    assert all(m["replay"] is True for m in msgs)
    assert synced == {"type": "synced", "last_message_id": ids[3],
                      "has_more": False}

    wb2 = join(sockets, server, conv, b, nb, after=0)
    msgs, synced = _collect_sync(wb2)
    assert [m["message"]["id"] for m in msgs] == ids

    wb3 = join(sockets, server, conv, b, nb, after=ids[3])
    msgs, synced = _collect_sync(wb3)
    assert msgs == [] and synced["last_message_id"] == ids[3]

    # live after the replay, once each
    new = sql_insert(conn, conv, a, "after")
    for ws in (wb, wb2, wb3):
        f = ws.recv_until(lambda f: f["type"] == "message")
        assert f["message"]["id"] == new and "replay" not in f
    for frames in sentinel(conn, conv, a, wb, wb2, wb3):
        assert not [f for f in frames if f["type"] == "message"]


def test_connect_with_bad_after_is_refused(server, pair):
    conv, (a, b), (na, nb) = pair
    status = ws_error_status(server, chat_path(conv) + "?after=abc",
                             token=make_token(a))
    assert status == 400


def test_presence_online_offline(server, sockets, pair):
    conv, (a, b), (na, nb) = pair
    wa = join(sockets, server, conv, a, na)
    assert wa.ready["online"] == [a]
    b1 = join(sockets, server, conv, b, nb)
    assert sorted(b1.ready["online"]) == sorted([a, b])
    p = wa.recv_type("presence")
    assert p == {"type": "presence", "conversation_id": conv, "user_id": b,
                 "status": "online"}

    # a second socket of b: no event; b never hears about itself
    b2 = join(sockets, server, conv, b, nb)
    b2.send({"type": "ping"})
    b2.recv_type("pong")
    b2.close()
    b1.send({"type": "ping"})
    b1.recv_type("pong")
    wa.no_frame(lambda f: f["type"] == "presence", 1.0)
    assert not [f for f in b1.frames if f["type"] == "presence"]

    b1.close()
    p = wa.recv_type("presence")
    assert p == {"type": "presence", "conversation_id": conv, "user_id": b,
                 "status": "offline"}
    wb = join(sockets, server, conv, b, nb)
    assert wa.recv_type("presence")["status"] == "online"
    wa.close()
    assert wb.recv_type("presence") == {"type": "presence",
                                        "conversation_id": conv,
                                        "user_id": a, "status": "offline"}


def test_ping_pong(server, sockets, pair):
    conv, (a, b), (na, nb) = pair
    ws = join(sockets, server, conv, a, na)
    ws.send({"type": "ping"})
    pong = ws.recv_type("pong")
    assert set(pong) == {"type", "ts"} and TS.match(pong["ts"])
    ws.send({"type": "ping", "extra": [1, 2]})
    assert ws.recv_type("pong")["type"] == "pong"


def test_auth_swaps_token(server, sockets, pair):
    conv, (a, b), (na, nb) = pair
    ws = join(sockets, server, conv, a, token=make_token(a, na, exp_in=60))
    fresh = make_token(a, na, exp_in=7200)
    exp = int(time.time()) + 7200
    ws.send({"type": "auth", "token": fresh})
    ok = ws.recv_type("auth_ok")
    assert set(ok) == {"type", "exp"} and abs(ok["exp"] - exp) <= 2
    # an integer claim for the same user works too
    for bad in (make_token(b, nb), make_token(a, na, exp_in=-60),
                "garbage", make_token(a, secret="other"),
                make_token(a, token_type="refresh"), service_token(),
                None, 12):
        frame = {"type": "auth"}
        if bad is not None:
            frame["token"] = bad
        expect_error(ws, frame, "invalid_token")
    send_ok(ws, "still me", "au-1")


def test_token_expiry_closes_open_socket(server, sockets, pair):
    conv, (a, b), (na, nb) = pair
    ws = join(sockets, server, conv, a, token=make_token(a, na, exp_in=-25))
    start = time.time()
    assert ws.expect_close(timeout=15) == (4001, "token_expired")
    assert time.time() - start <= 10


def test_auth_keeps_socket_past_old_expiry(server, sockets, pair):
    conv, (a, b), (na, nb) = pair
    ws = join(sockets, server, conv, a, token=make_token(a, na, exp_in=-27))
    ws.send({"type": "auth", "token": make_token(a, na, exp_in=600)})
    ws.recv_type("auth_ok")
    ws.no_frame(lambda f: False, 5)   # a close would raise here
    send_ok(ws, "alive", "au-2")


def test_rejected_auth_keeps_old_expiry(server, sockets, pair):
    conv, (a, b), (na, nb) = pair
    ws = join(sockets, server, conv, a, token=make_token(a, na, exp_in=-27))
    expect_error(ws, {"type": "auth", "token": make_token(b, exp_in=600)},
                 "invalid_token")
    assert ws.expect_close(timeout=15) == (4001, "token_expired")


def test_server_pings_and_idle_timeout(make_server, conn, sockets):
    """The server pings every PARLEY_PING_INTERVAL; a client that answers
    (websocket-client pongs whenever it reads) stays; one that says nothing
    for PARLEY_IDLE_TIMEOUT is closed with 1001 idle_timeout (the server's
    choice, docs/PROTOCOL.md)."""
    srv = make_server(PARLEY_IDLE_TIMEOUT="5", PARLEY_PING_INTERVAL="1")
    a, b = new_id(), new_id()
    conv = create_conversation(conn, [a, b])
    reader = join(sockets, srv, conv, a)
    silent = join(sockets, srv, conv, b)
    reader.ws.settimeout(5)
    deadline = time.time() + 5
    while True:                       # text frames (presence) may come first
        op, _ = reader.ws.recv_data(control_frame=True)
        if op == websocket.ABNF.OPCODE_PING:
            break
        assert time.time() < deadline, "no ping in 5 s"
    # for 8 s the reader reads (and so pongs) while silent does nothing
    reader.no_frame(lambda f: f["type"] != "presence", 8)
    assert silent.expect_close() == (1001, "idle_timeout")
    reader.send({"type": "ping"})
    assert reader.recv_type("pong")["type"] == "pong"


def test_large_message_delivered_whole(server, conn, sockets, pair):
    """A frame over NOTIFY's 8,000 bytes travels by reference (DATA.md)."""
    conv, (a, b), (na, nb) = pair
    wa = join(sockets, server, conv, a, na)
    wb = join(sockets, server, conv, b, nb)
    big = "\U0001F600" * 3000 + " end"
    ack = send_ok(wa, big, "big-1", metadata={"pad": "p" * 1900})
    small = send_ok(wa, "small after", "big-2")
    msg = message_of(wb)
    assert msg["id"] == ack["message_id"] and msg["content"] == big
    assert msg["metadata"] == {"pad": "p" * 1900}
    assert message_of(wb)["id"] == small["message_id"]
    wb.send({"type": "sync", "after": ack["message_id"] - 1, "limit": 1})
    replay = wb.recv_type("message")
    assert replay["replay"] is True and replay["message"]["content"] == big


# ---------------------------------------------------------------------------
# limits
# ---------------------------------------------------------------------------

def test_rate_limit_then_4008(make_server, conn, sockets):
    srv = make_server(PARLEY_RATE_MESSAGES="2")
    a, b = new_id(), new_id()
    conv = create_conversation(conn, [a, b])
    ws = join(sockets, srv, conv, a)
    for i in range(7):
        ws.send({"type": "message", "content": "burst %d" % i,
                 "client_id": "r-%d" % i})
    answers = {}
    while len(answers) < 7:
        f = ws.recv_until(lambda f: f["type"] in ("ack", "error"))
        key = f.get("client_id") if f["type"] == "ack" else f["ref"]
        answers[key] = f
    refused = [k for k, f in answers.items() if f["type"] == "error"]
    assert all(answers["r-%d" % i]["type"] == "ack" for i in range(6))
    assert refused == ["r-6"], answers
    assert answers["r-6"]["code"] == "rate_limited"
    # other events are not counted
    ws.send({"type": "ping"})
    ws.recv_type("pong")

    # keep flooding: closed with 4008
    try:
        for i in range(40):
            ws.send({"type": "message", "content": "flood %d" % i,
                     "client_id": "f-%d" % i})
    except (OSError, websocket.WebSocketException):
        pass                          # the server closed meanwhile
    assert ws.expect_close() == (4008, "rate_limited")
    acks = [f for f in ws.frames if f["type"] == "ack"]
    errors = [f for f in ws.frames if f["type"] == "error"]
    assert all(e["code"] == "rate_limited" for e in errors)
    # refused sends stored nothing
    assert count_messages(conn, conv) == len(acks)


def test_rate_limit_without_client_id_ref_null(make_server, conn, sockets):
    srv = make_server(PARLEY_RATE_MESSAGES="1")
    a, b = new_id(), new_id()
    conv = create_conversation(conn, [a, b])
    ws = join(sockets, srv, conv, a)
    for i in range(4):
        ws.send({"type": "send_message", "text": "x%d" % i})
    err = ws.recv_type("error")
    assert err["code"] == "rate_limited" and err["ref"] is None
    assert len([f for f in ws.frames if f["type"] == "ack"]) <= 3


def test_too_many_sockets_4009(make_server, conn, sockets):
    srv = make_server(PARLEY_MAX_SOCKETS_PER_USER="2")
    a, b = new_id(), new_id()
    conv = create_conversation(conn, [a, b])
    c1 = join(sockets, srv, conv, a)
    n1 = sockets(srv, "/ws/notifications/", make_token(a))
    assert n1.recv()["type"] == "ready"
    ws = sockets(srv, chat_path(conv), make_token(a))
    assert ws.expect_close() == (4009, "too_many_connections")
    ws = sockets(srv, "/ws/notifications/", make_token(a))
    assert ws.expect_close() == (4009, "too_many_connections")
    # another user is not affected
    join(sockets, srv, conv, b)
    join(sockets, srv, conv, b)
    # the refused sockets did not count; a closed one frees its place
    n1.close()

    def reopen():
        w = WS(srv, chat_path(conv), make_token(a))
        try:
            f = w.recv()
            if f["type"] == "ready":
                return w
        except Closed:
            pass
        w.close()
        return None
    w = wait_for(reopen, timeout=10, what="a freed place")
    w.close()
    c1.close()


# ---------------------------------------------------------------------------
# delivery across workers, instances and writers
# ---------------------------------------------------------------------------

def _socket_nodes(conn, *user_ids):
    """The worker pids (as strings) holding these users' sockets."""
    return {r[0].split("-")[0] for r in sql_rows(
        conn, "SELECT node FROM parley_sockets WHERE user_id = ANY(%s)",
        list(user_ids))}


def _exchange_everything(conn, socks, conv):
    """Every user sends from two sockets (and SQL writes one): every socket
    gets every message once, in id order; typing and read receipts reach
    every other socket."""
    users_ = list(socks)
    everyone = [w for ws in socks.values() for w in ws]
    sent = []
    for u in users_:
        for i, w in enumerate(socks[u][:2]):
            sent.append(send_ok(w, "from %s %d" % (u, i),
                                "%s-%d" % (u, i))["message_id"])
    sent.append(sql_insert(conn, conv, users_[0], "by sql"))
    for w in everyone:
        assert message_ids(w, len(sent)) == sorted(sent)

    typist, reader = users_[0], users_[-1]
    socks[typist][0].send({"type": "typing", "is_typing": True})
    for u in users_[1:]:
        for w in socks[u]:
            assert w.recv_type("typing")["user_id"] == typist
    socks[reader][0].send({"type": "read"})
    for w in everyone:
        assert w.recv_type("read_receipt")["message_id"] == max(sent)


def test_several_sockets_everything_arrives(server, conn, sockets):
    """Several sockets of three users on the shared two-worker server:
    wherever Kore put them, everything arrives everywhere."""
    a, b, c = new_id(), new_id(), new_id()
    conv = create_conversation(conn, [a, b, c])
    socks = {u: [join(sockets, server, conv, u) for _ in range(4)]
             for u in (a, b, c)}
    _exchange_everything(conn, socks, conv)


def _latest_node(conn, user):
    """The worker pid (as a string) of the user's newest socket."""
    return sql_one(conn, "SELECT split_part(node, '-', 1) FROM parley_sockets "
                   "WHERE user_id = %s ORDER BY opened_at DESC LIMIT 1", user)


def _open_elsewhere(conn, open_socket, user, avoid, filler):
    """Open sockets of `user` until one lands on a worker not in `avoid`.
    Parley gives new sockets to the less loaded worker, so one that lands
    in `avoid` is closed again, and filler() opens a socket of someone else
    (kept open) to even the load out first."""
    def count():
        return sql_one(conn, "SELECT count(*) FROM parley_sockets "
                       "WHERE user_id = %s", user)
    before = count()
    for _ in range(60):
        ws = open_socket()
        if _latest_node(conn, user) not in avoid:
            return ws
        ws.close()
        wait_for(lambda: count() == before, 10, what="the closed socket forgotten")
        filler()
    raise AssertionError("every socket of %s landed on %s" % (user, avoid))


def test_sockets_spread_over_the_workers(make_server, conn, sockets):
    """Kore gives a new connection to the worker holding its accept lock,
    and a worker keeps the lock until it is full; Parley's workers hand it
    over (ws_balance), so on a fresh, idle server sockets still spread: both
    workers hold at least 4 of the first sockets (up to 40, 50 ms apart, as
    sockets arrive; a worker still starting cannot take the lock yet)."""
    srv = make_server()
    u = new_id()
    conv = create_conversation(conn, [u, new_id()])
    workers = {str(p) for p in srv.worker_pids()}
    per_worker = {}
    for _ in range(40):
        join(sockets, srv, conv, u)
        time.sleep(0.05)
        per_worker = dict(sql_rows(conn, "SELECT split_part(node, '-', 1), count(*) "
                                   "FROM parley_sockets WHERE user_id = %s GROUP BY 1", u))
        if set(per_worker) == workers and min(per_worker.values()) >= 4:
            break
    assert set(per_worker) == workers, per_worker
    assert min(per_worker.values()) >= 4, per_worker


def test_sockets_are_served_as_soon_as_the_server_is_ready(make_server, conn,
                                                          sockets):
    """/readyz is answered by one worker; the other may still be connecting
    its database pool then. A socket reaching it waits for the connection
    instead of being refused with 1013 try_again_later (three fresh
    servers, twelve sockets each, opened at once the moment /readyz says
    ready)."""
    for _ in range(3):
        u = new_id()
        conv = create_conversation(conn, [u, new_id()])
        srv = make_server()
        frames = []

        def opener():
            try:
                frames.append(join(sockets, srv, conv, u).ready["type"])
            except Closed as c:
                frames.append((c.code, c.reason))

        threads = [threading.Thread(target=opener) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert frames == ["ready"] * 12


def test_users_on_two_different_workers(server, conn, sockets):
    """a and b on different workers see each other's messages, typing,
    reads and presence; a's two notification tabs on different workers
    both get a notification."""
    a, b = new_id(), new_id()
    conv = create_conversation(conn, [a, b])
    wa = join(sockets, server, conv, a, "Ann")
    node_a = _latest_node(conn, a)
    def filler():
        ws = sockets(server, "/ws/notifications/", make_token(new_id()))
        assert ws.recv()["type"] == "ready"

    wb = _open_elsewhere(conn, lambda: join(sockets, server, conv, b, "Bob"),
                         b, {node_a}, filler)
    assert _socket_nodes(conn, a) != _socket_nodes(conn, b)
    # b's arrival was announced to a across workers
    p = wa.recv_until(lambda f: f["type"] == "presence" and f["status"] == "online")
    assert p["user_id"] == b

    tab1 = sockets(server, "/ws/notifications/", make_token(a, "Ann"))
    assert tab1.recv()["type"] == "ready"
    first_tab = _latest_node(conn, a)

    def second_tab():
        tab = sockets(server, "/ws/notifications/", make_token(a, "Ann"))
        assert tab.recv()["type"] == "ready"
        return tab
    tab2 = _open_elsewhere(conn, second_tab, a, {first_tab}, filler)
    note = sql_one(conn, "SELECT parley_post_notification(%s, "
                   "'friend_request', '{\"from_user\": {\"id\": \"7\"}}')", a)
    note_id = json.loads(note)["id"]
    for tab in (tab1, tab2):
        got = tab.recv_type("friend_request")
        assert got["id"] == note_id and got["from_user"] == {"id": "7"}

    socks = {a: [wa, join(sockets, server, conv, a, "Ann")],
             b: [wb, join(sockets, server, conv, b, "Bob")]}
    _exchange_everything(conn, socks, conv)
    for w in socks[b]:
        w.close()
    p = wa.recv_until(lambda f: f["type"] == "presence" and f["status"] == "offline")
    assert p["user_id"] == b


def test_second_instance_shares_the_database(server, make_server, conn,
                                             sockets):
    other = make_server()
    a, b = new_id(), new_id()
    conv = create_conversation(conn, [a, b])
    wa = join(sockets, server, conv, a, "Ann")
    wb = join(sockets, other, conv, b, "Bob")
    assert sorted(wb.ready["online"]) == sorted([a, b])
    assert wa.recv_type("presence")["user_id"] == b

    ack = send_ok(wa, "to the other instance", "x-1")
    msg = message_of(wb)
    assert msg["id"] == ack["message_id"] and msg["sender_name"] == "Ann"
    ack = send_ok(wb, "and back", "x-2")
    assert message_of(wa, lambda m: m["id"] == ack["message_id"])[
        "content"] == "and back"
    wb.send({"type": "typing", "is_typing": True})
    assert wa.recv_type("typing")["user_id"] == b
    wb.close()
    assert wa.recv_type("presence")["status"] == "offline"


def test_plain_sql_insert_arrives_live(server, conn, sockets, pair):
    conv, (a, b), (na, nb) = pair
    wa = join(sockets, server, conv, a, na)
    wb = join(sockets, server, conv, b, nb)
    mid = sql_insert(conn, conv, a, "written by another program")
    for ws in (wa, wb):
        msg = message_of(ws)
        assert msg["id"] == mid and msg["sender_id"] == a
        assert msg["content"] == "written by another program"
    # a SYSTEM message (no sender)
    sid = sql_insert(conn, conv, None, "system says")
    msg = message_of(wb)
    assert msg["id"] == sid and msg["message_type"] == "SYSTEM"
    assert msg["sender_id"] is None and msg["sender_name"] is None
    # unread counts moved: b has both, a has the SYSTEM one
    assert join(sockets, server, conv, b, nb).ready["unread_count"] == 2
    assert join(sockets, server, conv, a, na).ready["unread_count"] == 1
    assert sql_rows(conn, "SELECT user_id, parley_unread_count(conversation_id, user_id) "
                    "FROM participants "
                    "WHERE conversation_id = %s ORDER BY user_id = %s",
                    conv, b) == [(a, 1), (b, 2)]


def test_concurrent_senders_and_reconnecting_reader(make_server, conn):
    srv = make_server(PARLEY_RATE_MESSAGES="100000")
    senders = [new_id() for _ in range(20)]
    reader = new_id()
    conv = create_conversation(conn, senders + [reader])
    per_sender = 100
    acked = []
    failures = []
    lock = threading.Lock()

    def sender(uid):
        ws = None
        try:
            ws = WS(srv, chat_path(conv), make_token(uid), timeout=30)
            assert ws.recv()["type"] == "ready"
            for i in range(per_sender):
                cid = "%s-%d" % (uid, i)
                ws.send({"type": "message", "content": cid,
                         "client_id": cid})
                f = ws.recv_until(lambda f: f["type"] in ("ack", "error") and
                                  f.get("client_id", f.get("ref")) == cid,
                                  timeout=30)
                assert f["type"] == "ack", f
                with lock:
                    acked.append(f["message_id"])
                ws.frames.clear()
        except Exception as e:  # reported below
            failures.append((uid, repr(e)))
        finally:
            if ws is not None:
                ws.close()

    seen = []

    def connect(after):
        ws = WS(srv, chat_path(conv, after=after), make_token(reader),
                timeout=30)
        assert ws.recv()["type"] == "ready"
        return ws

    threads = [threading.Thread(target=sender, args=(u,)) for u in senders]
    for t in threads:
        t.start()
    ws = connect(0)
    reconnect_at = [150, 500, 900, 1300, 1700]
    total = len(senders) * per_sender
    deadline = time.time() + 120
    try:
        while len(seen) < total:
            assert time.time() < deadline, "reader got %d of %d" % (
                len(seen), total)
            f = ws.recv(timeout=30)
            if f["type"] == "message":
                mid = f["message"]["id"]
                assert not seen or mid > seen[-1], (mid, seen[-3:])
                seen.append(mid)
                if reconnect_at and len(seen) >= reconnect_at[0]:
                    reconnect_at.pop(0)
                    ws.close()
                    ws = connect(seen[-1])
            elif f["type"] == "synced" and f["has_more"]:
                ws.send({"type": "sync", "after": f["last_message_id"],
                         "limit": 500})
    finally:
        ws.close()
        for t in threads:
            t.join()
    assert not failures, failures[:3]
    assert not reconnect_at
    assert len(acked) == total
    assert seen == sorted(acked)
    assert count_messages(conn, conv) == total


def test_sends_split_into_lanes_keep_every_order(make_server, conn, sockets):
    """A busy worker writes its sends in lanes by conversation, one batch
    in flight per lane (src/batch.c); PARLEY_SEND_SPLIT_MS=0 splits at
    once. Each socket's sends are still acked in order, every conversation
    delivers its messages once each in id order, and each is stored once."""
    srv = make_server(PARLEY_RATE_MESSAGES="100000", PARLEY_SEND_LANES="3",
                      PARLEY_SEND_SPLIT_MS="0")
    per_socket = 40
    before = metrics(srv)
    convs = []
    for _ in range(6):          # consecutive ids: every lane gets some
        a, b = new_id(), new_id()
        conv = create_conversation(conn, [a, b])
        convs.append((conv, [join(sockets, srv, conv, u) for u in (a, b)]))

    for conv, pair in convs:    # all at once, none waits for its acks
        for n, ws in enumerate(pair):
            for i in range(per_socket):
                ws.send({"type": "message", "content": "m%d" % i,
                         "client_id": "%d-%d-%d" % (conv, n, i)})

    for conv, pair in convs:
        for n, ws in enumerate(pair):
            acks, live = [], []
            while len(acks) < per_socket or len(live) < 2 * per_socket:
                f = ws.recv(timeout=30)
                if f["type"] == "ack":
                    acks.append(f)
                elif f["type"] == "message":
                    live.append(f["message"]["id"])
                else:
                    assert f["type"] in ("presence", "read"), f
            assert [f["client_id"] for f in acks] == [
                "%d-%d-%d" % (conv, n, i) for i in range(per_socket)]
            ids = [f["message_id"] for f in acks]
            assert ids == sorted(ids) and len(set(ids)) == per_socket
            assert live == sorted(live) and len(set(live)) == len(live)
            assert set(ids) <= set(live)
        stored = sql_rows(conn, "SELECT id FROM messages WHERE "
                          "conversation_id = %s ORDER BY id", conv)
        assert [r[0] for r in stored] == live

    after = metrics(srv)
    assert after["parley_send_lane_splits_total"] - before[
        "parley_send_lane_splits_total"] >= 1
    batches = after["parley_send_batches_total"] - before[
        "parley_send_batches_total"]
    assert 1 <= batches <= 12 * per_socket, batches


def test_lanes_split_when_sends_wait_and_join_when_calm(make_server, conn,
                                                       sockets,
                                                       conversation_lock):
    """A worker splits its sends into lanes once one goes to the database
    PARLEY_SEND_SPLIT_MS after it arrived (here: it waited in its socket's
    queue behind a send held by a lock), and goes back to one lane after
    2 s of prompt answers, so the next wait splits again."""
    srv = make_server(PARLEY_RATE_MESSAGES="1000", PARLEY_SEND_SPLIT_MS="300")
    a, b = new_id(), new_id()
    conv = create_conversation(conn, [a, b])
    wa = join(sockets, srv, conv, a)
    splits = metrics(srv)["parley_send_lane_splits_total"]
    n = [0]

    def send(wait):
        n[0] += 1
        wa.send({"type": "message", "content": "x", "client_id": str(n[0])})
        if wait:
            wa.recv_until(lambda f: f["type"] == "ack" and
                          f["client_id"] == str(n[0]))

    def held_send():
        conversation_lock.lock(conv)
        send(False)             # in flight, waits for the lock
        wait_for(lambda: _write_blocked(conn), 10, what="the write waits")
        send(False)             # waits in the socket's queue behind it
        time.sleep(0.6)
        conversation_lock.release()
        send(True)

    held_send()
    assert metrics(srv)["parley_send_lane_splits_total"] == splits + 1
    deadline = time.time() + 3
    while time.time() < deadline:
        send(True)
        time.sleep(0.05)
    assert metrics(srv)["parley_send_lane_splits_total"] == splits + 1
    held_send()
    assert metrics(srv)["parley_send_lane_splits_total"] == splits + 2
    assert count_messages(conn, conv) == n[0]


def test_metrics(make_server, conn, sockets):
    srv = make_server()
    r = requests.get(srv.base + "/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    for name in ("parley_sockets_open", "parley_messages_stored_total",
                 "parley_frames_sent_total", "parley_send_latency_seconds",
                 "parley_db_errors_total", "parley_bus_overflows_total",
                 "parley_send_batches_total", "parley_send_lane_splits_total",
                 "parley_handshakes_rejected_total"):
        assert "# TYPE %s " % name in r.text, name
    before = metrics(srv)
    assert 'parley_sockets_open{kind="chat"}' in before
    assert "parley_send_latency_seconds_count" in before
    assert before["parley_bus_overflows_total"] == 0
    assert 'parley_send_latency_seconds_bucket{le="+Inf"}' in before

    a, b = new_id(), new_id()
    conv = create_conversation(conn, [a, b])
    wa = join(sockets, srv, conv, a)
    wb = join(sockets, srv, conv, b)
    wn = sockets(srv, "/ws/notifications/", make_token(a))
    wn.recv()
    for i in range(3):
        ack = send_ok(wa, "metric %d" % i, "mt-%d" % i)
        message_of(wb, lambda m: m["id"] == ack["message_id"])
    send_ok(wa, "metric 0", "mt-0")      # a repeat stores nothing
    ws = sockets(srv, chat_path(conv))
    assert ws.expect_close()[0] == 4001
    ws = sockets(srv, chat_path(conv), make_token(new_id()))
    assert ws.expect_close()[0] == 4003

    after = metrics(srv)

    def delta(key):
        return after.get(key, 0) - before.get(key, 0)

    # the refused sockets may still be going away: wait for the gauge
    wait_for(lambda: metrics(srv)['parley_sockets_open{kind="chat"}'] ==
             before['parley_sockets_open{kind="chat"}'] + 2, 10,
             what="chat sockets gauge +2")
    assert delta('parley_sockets_open{kind="notifications"}') == 1
    assert delta("parley_messages_stored_total") == 3
    assert delta("parley_send_latency_seconds_count") == 4
    assert 1 <= delta("parley_send_batches_total") <= 4
    assert delta('parley_send_latency_seconds_bucket{le="+Inf"}') == 4
    assert delta("parley_frames_sent_total") >= 3 * 2 + 4 + 3
    assert delta('parley_handshakes_rejected_total{reason="unauthenticated"}'
                 ) == 1
    assert delta('parley_handshakes_rejected_total{reason="forbidden"}') == 1
    wa.close()
    wb.close()
    wait_for(lambda: metrics(srv)['parley_sockets_open{kind="chat"}'] ==
             before['parley_sockets_open{kind="chat"}'], 10,
             what="chat sockets gauge back down")


def test_sigterm_drains_with_going_away(make_server, conn):
    srv = make_server()
    a, b = new_id(), new_id()
    conv = create_conversation(conn, [a, b])
    wa = WS(srv, chat_path(conv), make_token(a))
    wb = WS(srv, chat_path(conv), make_token(b))
    wn = WS(srv, "/ws/notifications/", make_token(b))
    for ws in (wa, wb, wn):
        assert ws.recv()["type"] == "ready"
    try:
        for i in range(5):
            wa.send({"type": "message", "content": "in flight %d" % i,
                     "client_id": "d-%d" % i})
        srv.proc.send_signal(signal.SIGTERM)
        code = {}
        for name, ws in (("a", wa), ("b", wb), ("n", wn)):
            code[name] = ws.expect_close(timeout=20)
        assert code == {k: (1001, "going_away") for k in code}, code
        assert srv.proc.wait(timeout=20) == 0
    finally:
        for ws in (wa, wb, wn):
            ws.close()
    acked = {f["client_id"]: f["message_id"] for f in wa.frames
             if f["type"] == "ack"}
    errors = [f for f in wa.frames if f["type"] == "error"]
    stored = dict(sql_rows(conn, "SELECT client_id, id FROM messages WHERE "
                           "conversation_id = %s", conv))
    # every acked send is stored, every stored send was acked
    assert acked == stored, (acked, stored, errors)
    # what was refused was refused as internal (shutting down)
    assert all(e["code"] == "internal" and e["ref"] not in stored
               for e in errors)
    # A send still unread when the drain began gets no answer (the close
    # says going_away) and was not stored (above): the client sends it again.
    assert len(acked) + len(errors) <= 5, (acked, errors)
    # a new socket is refused now (the process is gone)
    with pytest.raises(Exception):
        WS(srv, chat_path(conv), make_token(a), timeout=3)


def test_slow_consumer_closed_with_4029(make_server, conn):
    """A socket that stops reading while its conversation is busy: once
    the unsent output passes PARLEY_MAX_OUTPUT_BYTES the server adds
    nothing more and closes it with 4029 slow_consumer, after what was
    already queued; the other sockets are unaffected."""
    import socket as pysocket
    srv = make_server(PARLEY_MAX_OUTPUT_BYTES="262144")
    a, b = new_id(), new_id()
    conv = create_conversation(conn, [a, b])
    # The reader: a tiny receive buffer and no reads until the flood is over.
    slow = websocket.WebSocket(
        sockopt=((pysocket.SOL_SOCKET, pysocket.SO_RCVBUF, 4096),))
    slow.connect(srv.ws_base + chat_path(conv),
                 subprotocols=["parley", "bearer." + make_token(b)],
                 suppress_origin=True)
    healthy = WS(srv, chat_path(conv), make_token(a))
    got = {"messages": 0}
    stop = threading.Event()

    def drain():
        # The healthy socket keeps reading all along.
        while not stop.is_set():
            try:
                if healthy.recv(1)["type"] == "message":
                    got["messages"] += 1
            except TimeoutError:
                continue
            except Closed as c:
                got["closed"] = (c.code, c.reason)
                return

    reader = threading.Thread(target=drain)
    try:
        assert healthy.recv()["type"] == "ready"
        reader.start()
        body = "x" * 3000
        for _ in range(60):
            sql_one(conn, "WITH w AS (INSERT INTO messages (conversation_id, "
                    "sender_id, content) SELECT %s, %s, %s FROM "
                    "generate_series(1, 50) RETURNING id) SELECT count(*) "
                    "FROM w", conv, a, body)
            if sql_one(conn, "SELECT count(*) FROM parley_sockets WHERE "
                       "user_id = %s", b) == 0:
                break
            time.sleep(0.3)     # a pace the healthy reader keeps up with
        # The slow socket left the registry (closed) while a stays.
        wait_for(lambda: sql_one(conn, "SELECT count(*) FROM parley_sockets "
                                 "WHERE user_id = %s", b) == 0, 30,
                 what="the slow socket is closed")
        assert sql_one(conn, "SELECT count(*) FROM parley_sockets WHERE "
                       "user_id = %s", a) == 1, (got, srv.output()[-2000:])
        # Reading now: what was queued, then the close code.
        slow.settimeout(10)
        code = None
        while True:
            op, data = slow.recv_data(control_frame=True)
            if op == websocket.ABNF.OPCODE_CLOSE:
                code = (int.from_bytes(data[:2], "big"),
                        data[2:].decode())
                break
        assert code == (4029, "slow_consumer")
        # The healthy socket had every message and is still open.
        inserted = sql_one(conn, "SELECT count(*) FROM messages WHERE "
                           "conversation_id = %s", conv)
        wait_for(lambda: got["messages"] == inserted, 30,
                 what="every message on the healthy socket")
    finally:
        stop.set()
        if reader.is_alive():
            reader.join()
        slow.close()
        healthy.close()


def test_sockets_closed_while_opening_leave_nobody_online(server, conn):
    # Closed right after the upgrade, most of these sockets go away while
    # their registration is in flight: each is taken out again, so the user
    # ends with no socket in the registry and offline.
    a, b = new_id(), new_id()
    conv = create_conversation(conn, [a, b])
    for _ in range(30):
        ws = WS(server, "/ws/chat/%d/" % conv, make_token(a))
        ws.ws.sock.close()          # no close frame: the TCP connection just ends
    def gone():
        return sql_one(conn, "SELECT count(*) = 0 AND NOT parley_user_online(%s, %s) "
                       "FROM parley_sockets WHERE user_id = %s", conv, a, a)

    # The registry can be empty for a moment while later opens are still in
    # flight: the state must hold once they have landed too.
    wait_for(gone, 10)
    time.sleep(1)
    assert gone()


def test_sync_of_long_messages_reaches_a_slow_reader(make_server, conn, sockets, pair):
    """A replay whose frames wait unsent past half the output bound stops
    there with has_more, and the client asks again: a client that reads,
    through a small receive window, gets 500 messages of 4,000 characters
    (2 MB, thirty times the bound here) in several pages, and is never
    closed as a slow consumer (4029 is for a client that stopped reading)."""
    conv, (a, b), (na, nb) = pair
    ids = messages_stored(conn, conv, a, "x" * 3990, 500)
    server = make_server(PARLEY_MAX_OUTPUT_BYTES="65536")
    small = ((socket.SOL_SOCKET, socket.SO_RCVBUF, 16384),)
    for after in (None, 0):         # asked with sync, or at connect
        wb = join(sockets, server, conv, b, nb, after=after, sockopt=small)
        if after is None:
            wb.send({"type": "sync", "after": 0, "limit": 500})
        got, pages = [], []
        while True:
            msgs, synced = _collect_sync(wb)
            got += [m["message"]["id"] for m in msgs]
            pages.append(len(msgs))
            assert msgs and synced["last_message_id"] == got[-1]
            if not synced["has_more"]:
                break
            wb.send({"type": "sync", "after": synced["last_message_id"],
                     "limit": 500})
        assert got == ids
        if after is None:
            assert pages[0] < 500, pages            # cut short, not 4029
        wb.close()
