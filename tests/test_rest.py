"""The REST API (PROTOCOL.md sections 4, 5 and 8) against the real binary
(two workers) and a real PostgreSQL.

Every test makes its own users (unique ids) so tests do not interfere with
each other or with what the shared server has already seen. Refused requests
are checked to have written nothing, by counting rows with plain SQL through
the `conn` fixture.
"""

import concurrent.futures
import json
import re
import socket
import threading

import pytest
import requests

from helpers import WS, api, make_token, metrics, new_id, service_token


# ---------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------

class User:
    """A user id, display name and access token."""

    def __init__(self, name=None):
        self.id = new_id()
        self.name = name or "Name " + self.id
        self.token = make_token(self.id, name=self.name)


SERVICE = service_token()


def users(n):
    return [User() for _ in range(n)]


def error(r, status, code):
    """r is the JSON error object of the contract with that status and code."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body


def ok(r, status=200):
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    return r.json()


def one(conn, sql, *args):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        row = cur.fetchone()
        return None if row is None else row[0]


def counts(conn):
    """Rows of every table a request could write."""
    return tuple(one(conn, "select count(*) from " + t) for t in
                 ("users", "conversations", "participants", "messages",
                  "notifications", "notification_preferences"))


def create(server, token, participants, status=None, **body):
    body["participants"] = participants
    r = api(server, "POST", "/api/conversations", token, body)
    if status is not None:
        assert r.status_code == status, r.text
    return r


def conversation(server, token, participants, **body):
    """A conversation the caller is in (created or found)."""
    r = create(server, token, participants, **body)
    assert r.status_code in (200, 201), r.text
    return r.json()


def send(server, token, conv, body, status=201):
    r = api(server, "POST", "/api/conversations/%d/messages" % conv, token, body)
    assert r.status_code == status, r.text
    return r.json()


def insert_messages(conn, conv, sender, n):
    """n messages with plain SQL (the triggers number them); their ids.
    Batches of 100, each its own transaction: the triggers update the same
    conversation and participant rows for every message, and within one
    transaction each update walks all earlier versions of those rows."""
    ids = []
    with conn.cursor() as cur:
        for start in range(0, n, 100):
            cur.execute("insert into messages (conversation_id, sender_id, content) "
                        "select %s, %s, 'm' || g from generate_series(%s, %s) g "
                        "returning id", (conv, sender, start + 1, min(start + 100, n)))
            ids += [r[0] for r in cur.fetchall()]
    return sorted(ids)


def unread(server, user):
    return ok(api(server, "GET", "/api/unread", user.token))


def raw(server, method, path, token, data, ctype="application/json"):
    headers = {"Authorization": "Bearer " + token}
    if ctype is not None:
        headers["Content-Type"] = ctype
    return requests.request(method, server.base + path, data=data,
                            headers=headers, timeout=10)


# ---------------------------------------------------------------------------------
# routes, methods, tokens
# ---------------------------------------------------------------------------------

ROUTES = [
    ("GET", "/api/unread"),
    ("GET", "/api/conversations"),
    ("POST", "/api/conversations"),
    ("GET", "/api/conversations/1"),
    ("PATCH", "/api/conversations/1"),
    ("GET", "/api/conversations/1/messages"),
    ("POST", "/api/conversations/1/messages"),
    ("POST", "/api/conversations/1/read"),
    ("GET", "/api/notifications"),
    ("POST", "/api/notifications"),
    ("POST", "/api/notifications/1/read"),
    ("POST", "/api/notifications/read_all"),
    ("GET", "/api/notification-preferences"),
    ("PUT", "/api/notification-preferences"),
]

USER_ONLY = [
    ("GET", "/api/unread"),
    ("GET", "/api/conversations"),
    ("PATCH", "/api/conversations/1"),
    ("POST", "/api/conversations/1/read"),
    ("GET", "/api/notifications"),
    ("POST", "/api/notifications/1/read"),
    ("POST", "/api/notifications/read_all"),
    ("GET", "/api/notification-preferences"),
    ("PUT", "/api/notification-preferences"),
]

WRONG_METHODS = [
    ("POST", "/api/unread"),
    ("DELETE", "/api/conversations"),
    ("PUT", "/api/conversations/1"),
    ("POST", "/api/conversations/1"),
    ("DELETE", "/api/conversations/1/messages"),
    ("GET", "/api/conversations/1/read"),
    ("PUT", "/api/notifications"),
    ("GET", "/api/notifications/1/read"),
    ("GET", "/api/notifications/read_all"),
    ("POST", "/api/notification-preferences"),
    ("DELETE", "/api/notification-preferences"),
]


@pytest.mark.parametrize("method,path", ROUTES)
def test_no_token_is_401(server, method, path):
    error(api(server, method, path, json_body={}), 401, "unauthenticated")


@pytest.mark.parametrize("method,path", ROUTES)
def test_bad_token_is_401(server, method, path):
    bad = make_token("u1", secret="another-secret")
    error(api(server, method, path, bad, {}), 401, "unauthenticated")
    expired = make_token("u1", exp_in=-3600)
    error(api(server, method, path, expired, {}), 401, "unauthenticated")


@pytest.mark.parametrize("method,path", USER_ONLY)
def test_service_token_on_user_endpoint_is_403(server, conn, method, path):
    before = counts(conn)
    error(api(server, method, path, SERVICE, {"muted": True, "disabled_types": []}),
          403, "forbidden")
    assert counts(conn) == before


def test_user_token_on_service_endpoint_is_403(server, conn):
    u = User()
    before = counts(conn)
    body = {"user_id": u.id, "type": "friend_accepted", "payload": {}}
    error(api(server, "POST", "/api/notifications", u.token, body), 403, "forbidden")
    assert counts(conn) == before


@pytest.mark.parametrize("method,path", WRONG_METHODS)
def test_wrong_method_is_405(server, method, path):
    error(api(server, method, path, User().token), 405, "method_not_allowed")


@pytest.mark.parametrize("method,path", [
    ("GET", "/api/conversations/abc"),
    ("GET", "/api/conversations/abc/messages"),
    ("POST", "/api/conversations/-1/read"),
    ("GET", "/api/conversations/1.5"),
    ("GET", "/api/conversations/0"),
    ("PATCH", "/api/conversations/0"),
    ("POST", "/api/conversations/0/messages"),
    ("POST", "/api/conversations/0/read"),
    ("GET", "/api/conversations/99999999999999999999"),
    ("GET", "/api/conversations/99999999999999999999/messages"),
    ("POST", "/api/notifications/x/read"),
    ("POST", "/api/notifications/0/read"),
    ("POST", "/api/notifications/99999999999999999999/read"),
    ("GET", "/api/conversations/1/nope"),
    ("GET", "/api/nope"),
    ("POST", "/api/nope"),
])
def test_bad_ids_and_unknown_routes_are_404(server, method, path):
    """Not an id (0, past 64 bits, not digits) or no such route: 404
    whatever the token, before the token is even looked at."""
    for token in (User().token, SERVICE, None):
        error(api(server, method, path, token, {}), 404, "not_found")


def test_trailing_slash_is_optional(server):
    u = User()
    ok(api(server, "GET", "/api/unread/", u.token))
    ok(api(server, "GET", "/api/conversations/", u.token))
    conv = conversation(server, u.token, [new_id()])["id"]
    ok(api(server, "GET", "/api/conversations/%d/" % conv, u.token))
    ok(api(server, "GET", "/api/conversations/%d/messages/" % conv, u.token))


# ---------------------------------------------------------------------------------
# request bodies
# ---------------------------------------------------------------------------------

def test_bodies_need_json_content_type(server, conn):
    u = User()
    body = json.dumps({"participants": [new_id()]})
    before = counts(conn)
    for ctype in ("text/plain", "application/x-www-form-urlencoded",
                  "application/jsonx", None):
        error(raw(server, "POST", "/api/conversations", u.token, body, ctype),
              415, "unsupported_media_type")
    assert counts(conn) == before
    r = raw(server, "POST", "/api/conversations", u.token, body,
            "application/json; charset=utf-8")
    assert r.status_code == 201, r.text


def test_malformed_json_is_400_invalid_json(server, conn):
    u = User()
    conv = conversation(server, u.token, [new_id()])["id"]
    before = counts(conn)
    for data in (b"{", b"{'content': 'x'}", b"nope", b'{"content":"x"} trailing',
                 b'{"content":"\xff\xfe"}'):
        error(raw(server, "POST", "/api/conversations/%d/messages" % conv, u.token,
                  data), 400, "invalid_json")
        error(raw(server, "POST", "/api/conversations", u.token, data),
              400, "invalid_json")
    assert counts(conn) == before


def test_body_that_is_not_an_object_is_400_invalid_payload(server, conn):
    u = User()
    conv = conversation(server, u.token, [new_id()])["id"]
    before = counts(conn)
    for data in (b"[]", b'"text"', b"42", b"null", b"true"):
        error(raw(server, "POST", "/api/conversations/%d/messages" % conv, u.token,
                  data), 400, "invalid_payload")
        error(raw(server, "PUT", "/api/notification-preferences", u.token, data),
              400, "invalid_payload")
    assert counts(conn) == before


def test_nul_in_any_string_is_refused_not_truncated(server, conn):
    """PostgreSQL cannot store U+0000 and yajl would cut the string there."""
    a, b = users(2)
    conv = conversation(server, a.token, [b.id])["id"]
    before = counts(conn)
    for method, path, token, body in (
            ("POST", "/api/conversations/%d/messages" % conv, a.token,
             {"content": "before\u0000after"}),
            ("POST", "/api/conversations/%d/messages" % conv, a.token,
             {"content": "meta", "metadata": {"k": "a\u0000b"}}),
            ("POST", "/api/conversations", a.token,
             {"participants": [b.id + "\u0000x"]}),
            ("POST", "/api/conversations", a.token,
             {"participants": [b.id], "title": "t\u0000"}),
            ("POST", "/api/notifications", SERVICE,
             {"user_id": b.id, "type": "x", "payload": {"k\u0000": 1}}),
            ("PUT", "/api/notification-preferences", a.token,
             {"disabled_types": ["x\u0000"]})):
        data = json.dumps(body)
        assert "\\u0000" in data
        error(raw(server, method, path, token, data), 400, "invalid_payload")
    assert counts(conn) == before
    # An escaped backslash before "u0000" is just text.
    m = send(server, a.token, conv, {"content": "a\\u0000b"})
    assert m["content"] == "a\\u0000b"


def test_deeply_nested_body_is_400(server, conn):
    a = User()
    conv = conversation(server, a.token, [new_id()])["id"]
    before = counts(conn)
    deep = '{"content":"x","metadata":' + '{"k":' * 100 + "1" + "}" * 101
    error(raw(server, "POST", "/api/conversations/%d/messages" % conv, a.token, deep),
          400, "invalid_json")
    assert counts(conn) == before


def test_oversized_body_is_413(server, conn):
    u = User()
    conv = conversation(server, u.token, [new_id()])["id"]
    big = json.dumps({"content": "x" * (64 * 1024 + 1)})
    before = counts(conn)
    error(raw(server, "POST", "/api/conversations/%d/messages" % conv, u.token, big),
          413, "payload_too_large")
    error(raw(server, "POST", "/api/notifications", SERVICE,
              json.dumps({"user_id": u.id, "type": "x", "payload": {"a": "x" * 70000}})),
          413, "payload_too_large")
    assert counts(conn) == before


def test_post_without_body_needs_no_content_type(server):
    a, b = users(2)
    conv = conversation(server, a.token, [b.id])["id"]
    send(server, b.token, conv, {"content": "hi"})
    r = raw(server, "POST", "/api/conversations/%d/read" % conv, a.token, b"", None)
    assert ok(r) == {"unread_count": 0}
    r = raw(server, "POST", "/api/notifications/read_all", a.token, b"", None)
    assert ok(r) == {"unread_notifications": 0}


# ---------------------------------------------------------------------------------
# POST /api/conversations (user tokens)
# ---------------------------------------------------------------------------------

def test_create_then_get_existing(server, conn):
    a, b = users(2)
    r = create(server, a.token, [b.id], title="Job 42",
               context={"kind": "job", "ref": "42"})
    assert r.status_code == 201, r.text
    c = r.json()
    assert set(c) == {"id", "title", "context", "participants", "last_message",
                      "unread_count", "muted", "updated_at"}
    assert isinstance(c["id"], int)
    assert c["title"] == "Job 42"
    assert c["context"] == {"kind": "job", "ref": "42"}
    assert c["last_message"] is None
    assert c["unread_count"] == 0 and c["muted"] is False
    assert c["updated_at"].endswith("Z") and len(c["updated_at"]) == 24
    members = {p["id"]: p for p in c["participants"]}
    assert set(members) == {a.id, b.id}          # the caller is added
    assert members[a.id]["name"] == a.name        # the token's display name
    assert members[b.id]["name"] == "user " + b.id  # not seen yet: fine

    # The same member set and context, from either side, in any order, with
    # duplicates and another title: the same conversation, 200.
    for token, plist, title in ((a.token, [b.id], "Other"),
                                (a.token, [b.id, a.id, b.id], None),
                                (b.token, [a.id], "x")):
        r = create(server, token, plist, title=title,
                   context={"kind": "job", "ref": "42"})
        assert r.status_code == 200, r.text
        assert r.json()["id"] == c["id"]
        assert r.json()["title"] == "Job 42"     # not part of the key
    assert one(conn, "select count(*) from participants where conversation_id = %s",
               c["id"]) == 2


def test_context_is_part_of_the_key(server):
    a, b = users(2)
    plain = create(server, a.token, [b.id], status=201).json()["id"]
    assert create(server, a.token, [b.id], status=200).json()["id"] == plain
    job1 = create(server, a.token, [b.id], status=201,
                  context={"kind": "job", "ref": "1"}).json()["id"]
    job2 = create(server, a.token, [b.id], status=201,
                  context={"kind": "job", "ref": 2}).json()
    assert job2["context"] == {"kind": "job", "ref": "2"}   # an integer ref
    kind_only = create(server, a.token, [b.id], status=201,
                       context={"kind": "support"}).json()
    assert kind_only["context"] == {"kind": "support", "ref": None}
    assert len({plain, job1, job2["id"], kind_only["id"]}) == 4
    # A null context is no context.
    assert create(server, a.token, [b.id], status=200,
                  context=None).json()["id"] == plain


def test_create_alone_and_integer_ids(server):
    a = User()
    alone = create(server, a.token, [a.id], status=201).json()
    assert [p["id"] for p in alone["participants"]] == [a.id]
    r = create(server, a.token, [7, "7"], status=None)
    assert r.status_code in (200, 201)           # the user "7" may exist already
    assert {p["id"] for p in r.json()["participants"]} == {a.id, "7"}


def test_participant_objects_and_roles(server):
    a, b, c = users(3)
    conv = create(server, a.token, [{"id": b.id, "role": "client"}, c.id,
                                    {"id": b.id, "role": "ignored"}], status=201).json()
    roles = {p["id"]: p["role"] for p in conv["participants"]}
    assert roles == {a.id: None, b.id: "client", c.id: None}


def test_member_limit(server, conn):
    a = User()
    others = [new_id() for _ in range(256)]
    before = counts(conn)
    # 256 others and the caller: 257 members.
    error(create(server, a.token, others), 400, "invalid_payload")
    assert counts(conn) == before
    # 255 others, duplicates and the caller listed: 256 members.
    listed = others[:255] + others[:100] + [a.id]
    conv = create(server, a.token, listed, status=201).json()
    assert len(conv["participants"]) == 256


@pytest.mark.parametrize("body", [
    {},
    {"participants": []},
    {"participants": None},
    {"participants": "u1"},
    {"participants": {"id": "u1"}},
    {"participants": [""]},
    {"participants": ["x" * 65]},
    {"participants": [1.5]},
    {"participants": [True]},
    {"participants": [None]},
    {"participants": [["u1"]]},
    {"participants": [{"role": "client"}]},
    {"participants": [{"id": ""}]},
    {"participants": [{"id": "u1", "role": 5}]},
    {"participants": [{"id": "u1", "role": ""}]},
    {"participants": [{"id": "u1", "role": "r" * 65}]},
    {"participants": ["ok", "x" * 65]},
    {"participants": ["u1"], "title": 5},
    {"participants": ["u1"], "title": "t" * 257},
    {"participants": ["u1"], "context": "job"},
    {"participants": ["u1"], "context": {"ref": "1"}},
    {"participants": ["u1"], "context": {"kind": ""}},
    {"participants": ["u1"], "context": {"kind": "k" * 65}},
    {"participants": ["u1"], "context": {"kind": "job", "ref": ""}},
    {"participants": ["u1"], "context": {"kind": "job", "ref": 1.5}},
    {"participants": ["u1"], "context": {"kind": "job", "ref": ["1"]}},
])
def test_create_bad_input_is_400(server, conn, body):
    a = User()
    body = json.loads(json.dumps(body).replace('"u1"', json.dumps(new_id())))
    before = counts(conn)
    error(api(server, "POST", "/api/conversations", a.token, body),
          400, "invalid_payload")
    assert counts(conn) == before


def test_create_title_length_counts_code_points(server):
    a = User()
    conv = create(server, a.token, [new_id()], status=201, title="é" * 256).json()
    assert conv["title"] == "é" * 256


def test_user_cannot_post_a_system_message(server, conn):
    a = User()
    before = counts(conn)
    error(create(server, a.token, [new_id()], system_message="hello"),
          403, "forbidden_type")
    assert counts(conn) == before


def test_concurrent_get_or_create_makes_one(server, conn):
    a = User()
    others = [new_id() for _ in range(3)]

    def go(_):
        return create(server, a.token, others, context={"kind": "job", "ref": "c"})

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(go, range(20)))
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200] * 19 + [201], [r.text for r in results]
    assert len({r.json()["id"] for r in results}) == 1
    assert one(conn, "select count(*) from conversations where context_ref = 'c' "
               "and id = %s", results[0].json()["id"]) == 1


def test_concurrent_creates_from_both_sides(server, conn):
    """Two users never seen before create their conversation at the same time
    from both sides: one conversation, no deadlock, no error."""
    for _ in range(5):
        a, b = users(2)
        barrier = threading.Barrier(20)

        def go(i):
            me, other = (a, b) if i % 2 else (b, a)
            barrier.wait()
            return create(server, me.token, [other.id])

        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            results = list(pool.map(go, range(20)))
        statuses = sorted(r.status_code for r in results)
        assert statuses == [200] * 19 + [201], [r.text for r in results]
        assert len({r.json()["id"] for r in results}) == 1
        # Both display names were remembered.
        names = dict((p["id"], p["name"]) for p in
                     ok(api(server, "GET", "/api/conversations/%d?mark_read=false" %
                            results[0].json()["id"], a.token))["participants"])
        assert names == {a.id: a.name, b.id: b.name}


def test_display_name_follows_the_token(server):
    a, b = users(2)
    conv = conversation(server, a.token, [b.id])["id"]
    renamed = make_token(a.id, name="Ana Renamed")
    c = create(server, renamed, [b.id], status=200).json()
    assert {p["id"]: p["name"] for p in c["participants"]}[a.id] == "Ana Renamed"
    m = send(server, make_token(a.id, name="Ana Again"), conv, {"content": "x"})
    assert m["sender_name"] == "Ana Again"


# ---------------------------------------------------------------------------------
# POST /api/conversations (service tokens)
# ---------------------------------------------------------------------------------

def test_service_create_with_roles_and_system_message(server, conn):
    client, pro = new_id(), new_id()
    body = {"participants": [{"id": client, "role": "client"},
                             {"id": pro, "role": "professional"}],
            "context": {"kind": "job", "ref": new_id("job")},
            "title": "Plumbing",
            "system_message": "  Job accepted, chat is now active  "}
    r = api(server, "POST", "/api/conversations", SERVICE, body)
    c = ok(r, 201)
    assert {(p["id"], p["role"]) for p in c["participants"]} == \
        {(client, "client"), (pro, "professional")}   # no service member
    last = c["last_message"]
    assert last["message_type"] == "SYSTEM"
    assert last["sender_id"] is None and last["sender_name"] is None
    assert last["content"] == "Job accepted, chat is now active"   # trimmed
    assert c["unread_count"] == 0 and c["muted"] is False

    # Again: the existing one, and no second system message.
    again = ok(api(server, "POST", "/api/conversations", SERVICE, body), 200)
    assert again["id"] == c["id"]
    assert one(conn, "select count(*) from messages where conversation_id = %s",
               c["id"]) == 1
    # Both members have it unread.
    for uid in (client, pro):
        assert unread(server, type("U", (), {"token": make_token(uid)})) == \
            {"total": 1, "conversations": [{"id": c["id"], "unread_count": 1,
                                            "muted": False}]}


def test_service_create_without_system_message(server, conn):
    ids = [new_id(), new_id()]
    c = ok(api(server, "POST", "/api/conversations", SERVICE,
               {"participants": ids}), 201)
    assert c["last_message"] is None
    assert sorted(p["id"] for p in c["participants"]) == sorted(ids)
    # A single member is a conversation too.
    solo = ok(api(server, "POST", "/api/conversations", SERVICE,
                  {"participants": [new_id()]}), 201)
    assert len(solo["participants"]) == 1


@pytest.mark.parametrize("system,code", [
    ("   ", "empty_message"),
    ("", "empty_message"),
    ("x" * 4001, "message_too_long"),
    (5, "invalid_payload"),
    (["x"], "invalid_payload"),
])
def test_service_bad_system_message_is_400(server, conn, system, code):
    before = counts(conn)
    error(api(server, "POST", "/api/conversations", SERVICE,
              {"participants": [new_id()], "system_message": system}), 400, code)
    assert counts(conn) == before


def test_service_member_limit(server, conn):
    before = counts(conn)
    error(api(server, "POST", "/api/conversations", SERVICE,
              {"participants": [new_id() for _ in range(257)]}), 400, "invalid_payload")
    assert counts(conn) == before
    c = ok(api(server, "POST", "/api/conversations", SERVICE,
               {"participants": [new_id() for _ in range(256)]}), 201)
    assert len(c["participants"]) == 256


# ---------------------------------------------------------------------------------
# GET /api/conversations
# ---------------------------------------------------------------------------------

def test_list_walks_every_conversation_once_in_activity_order(server, conn):
    a = User()
    made = [conversation(server, a.token, [new_id()])["id"] for _ in range(23)]
    # Activity moves a conversation to the top.
    send(server, a.token, made[3], {"content": "bump"})

    seen, pages, cursor = [], 0, None
    while True:
        path = "/api/conversations?limit=5" + ("&before=" + cursor if cursor else "")
        page = ok(api(server, "GET", path, a.token))
        assert set(page) == {"conversations", "next_before"}
        assert len(page["conversations"]) <= 5
        seen += page["conversations"]
        pages += 1
        cursor = page["next_before"]
        if cursor is None:
            break
        assert isinstance(cursor, str)
    assert pages == 5
    ids = [c["id"] for c in seen]
    assert sorted(ids) == sorted(made) and len(set(ids)) == len(ids)
    assert ids[0] == made[3]
    stamps = [c["updated_at"] for c in seen]
    assert stamps == sorted(stamps, reverse=True)
    assert seen[0]["last_message"]["content"] == "bump"


def test_list_default_and_max_limit(server, conn):
    a = User()
    # 105 conversations fast, through the same SQL the server calls.
    for _ in range(105):
        one(conn, "select parley_create_conversation(%s, %s::jsonb, null, null, null, null)",
            a.id, json.dumps([new_id()]))
    page = ok(api(server, "GET", "/api/conversations", a.token))
    assert len(page["conversations"]) == 20 and page["next_before"]
    for limit in ("100", "101", "1000", "99999999999999999999999999"):
        page = ok(api(server, "GET", "/api/conversations?limit=" + limit, a.token))
        assert len(page["conversations"]) == 100 and page["next_before"]
    rest = ok(api(server, "GET", "/api/conversations?limit=100&before=" +
                  page["next_before"], a.token))
    assert len(rest["conversations"]) == 5 and rest["next_before"] is None


def test_list_is_only_mine(server):
    a, b, c = users(3)
    mine = conversation(server, a.token, [b.id])["id"]
    conversation(server, c.token, [b.id])
    page = ok(api(server, "GET", "/api/conversations", a.token))
    assert [x["id"] for x in page["conversations"]] == [mine]
    assert ok(api(server, "GET", "/api/conversations", User().token)) == \
        {"conversations": [], "next_before": None}


@pytest.mark.parametrize("query", [
    "limit=0", "limit=-1", "limit=abc", "limit=1.5", "limit=", "limit=+5",
    "limit=1e3", "limit=%205", "before=", "before=abc", "before=1_2_3",
    "before=12", "before=" + "9" * 70, "before=1_99999999999999999999",
])
def test_list_bad_params_are_400(server, query):
    error(api(server, "GET", "/api/conversations?" + query, User().token),
          400, "invalid_payload")


# ---------------------------------------------------------------------------------
# GET / PATCH /api/conversations/{id}
# ---------------------------------------------------------------------------------

def test_get_marks_read_unless_asked_not_to(server, conn):
    a, b = users(2)
    conv = conversation(server, a.token, [b.id])["id"]
    for i in range(3):
        send(server, a.token, conv, {"content": "m%d" % i})

    c = ok(api(server, "GET", "/api/conversations/%d?mark_read=false" % conv, b.token))
    assert c["unread_count"] == 3
    assert c["last_message"]["content"] == "m2"
    assert unread(server, b)["total"] == 3

    c = ok(api(server, "GET", "/api/conversations/%d" % conv, b.token))
    assert c["unread_count"] == 0
    assert unread(server, b) == {"total": 0, "conversations": []}
    assert one(conn, "select last_read_message_id from participants where "
               "conversation_id = %s and user_id = %s", conv, b.id) == \
        c["last_message"]["id"]
    # A's messages now read by everyone else.
    last = ok(api(server, "GET", "/api/conversations/%d/messages" % conv,
                  a.token))["messages"][-1]
    assert last["is_read"] is True


def test_get_bad_mark_read_is_400(server):
    a = User()
    conv = conversation(server, a.token, [new_id()])["id"]
    for v in ("maybe", "", "yes", "TRUE"):
        error(api(server, "GET", "/api/conversations/%d?mark_read=%s" % (conv, v),
                  a.token), 400, "invalid_payload")
    ok(api(server, "GET", "/api/conversations/%d?mark_read=0" % conv, a.token))
    ok(api(server, "GET", "/api/conversations/%d?mark_read=true" % conv, a.token))


def test_get_not_mine_or_unknown_is_404(server, conn):
    a, b, c = users(3)
    conv = conversation(server, a.token, [b.id])["id"]
    error(api(server, "GET", "/api/conversations/%d" % conv, c.token), 404, "not_found")
    missing = one(conn, "select coalesce(max(id), 0) + 1000 from conversations")
    error(api(server, "GET", "/api/conversations/%d" % missing, a.token),
          404, "not_found")
    error(api(server, "GET", "/api/conversations/%d" % missing, SERVICE),
          404, "not_found")


def test_service_reads_any_conversation_without_marking_read(server, conn):
    a, b = users(2)
    conv = conversation(server, a.token, [b.id])["id"]
    send(server, a.token, conv, {"content": "hello"})
    for path in ("/api/conversations/%d", "/api/conversations/%d?mark_read=true"):
        c = ok(api(server, "GET", path % conv, SERVICE))
        assert c["id"] == conv and c["unread_count"] == 0 and c["muted"] is False
        assert c["last_message"]["content"] == "hello"
    assert unread(server, b)["total"] == 1
    assert one(conn, "select sum(last_read_message_id) from participants where "
               "conversation_id = %s and user_id = %s", conv, b.id) == 0


def test_patch_mute(server, conn):
    a, b = users(2)
    conv = conversation(server, a.token, [b.id])["id"]
    send(server, a.token, conv, {"content": "x"})

    c = ok(api(server, "PATCH", "/api/conversations/%d" % conv, b.token,
               {"muted": True}))
    assert c["muted"] is True and c["id"] == conv and c["unread_count"] == 1
    assert unread(server, b) == {"total": 0, "conversations": [
        {"id": conv, "unread_count": 1, "muted": True}]}
    # Idempotent.
    assert ok(api(server, "PATCH", "/api/conversations/%d" % conv, b.token,
                  {"muted": True}))["muted"] is True
    # A muted conversation gets no new_message notification.
    before = one(conn, "select count(*) from notifications where user_id = %s", b.id)
    send(server, a.token, conv, {"content": "y"})
    assert one(conn, "select count(*) from notifications where user_id = %s "
               "and read_at is null", b.id) == before
    c = ok(api(server, "PATCH", "/api/conversations/%d" % conv, b.token,
               {"muted": False}))
    assert c["muted"] is False
    assert unread(server, b)["total"] == 2


@pytest.mark.parametrize("body", [{}, {"muted": None}, {"muted": "true"},
                                  {"muted": 1}, {"mute": True}])
def test_patch_bad_body_is_400(server, conn, body):
    a = User()
    conv = conversation(server, a.token, [new_id()])["id"]
    before = counts(conn)
    error(api(server, "PATCH", "/api/conversations/%d" % conv, a.token, body),
          400, "invalid_payload")
    assert counts(conn) == before


def test_patch_not_mine_is_404(server, conn):
    a, b, c = users(3)
    conv = conversation(server, a.token, [b.id])["id"]
    error(api(server, "PATCH", "/api/conversations/%d" % conv, c.token,
              {"muted": True}), 404, "not_found")
    assert one(conn, "select bool_or(muted) from participants where "
               "conversation_id = %s", conv) is False


# ---------------------------------------------------------------------------------
# POST /api/conversations/{id}/messages
# ---------------------------------------------------------------------------------

def test_send_in_every_form(server, conn):
    a, b = users(2)
    conv = conversation(server, a.token, [b.id])["id"]
    forms = [
        ({"content": "Hi"}, "TEXT", "Hi"),
        ({"type": "message", "content": "  padded \n"}, "TEXT", "padded"),
        ({"type": "send_message", "text": "Hello"}, "TEXT", "Hello"),
        ({"message": "compat", "type": "TEXT"}, "TEXT", "compat"),
        ({"type": "message", "content": "c", "message_type": "TEXT",
          "client_id": None, "metadata": None}, "TEXT", "c"),
        ({"message_type": "LOCATION", "metadata": {"lat": 1.5, "lng": -2}},
         "LOCATION", ""),
        ({"message_type": "IMAGE", "content": "pic",
          "metadata": {"url": "https://x.test/a.png", "name": "a.png", "size": 3,
                       "mime": "image/png"}}, "IMAGE", "pic"),
        ({"message": "", "type": "FILE", "metadata": {"url": "/files/1"}}, "FILE", ""),
    ]
    ids = []
    for body, mtype, content in forms:
        m = send(server, a.token, conv, body)
        assert set(m) == {"id", "conversation_id", "sender_id", "sender_name",
                          "message_text", "content", "message_type", "metadata",
                          "client_id", "timestamp", "created_at", "is_read"}
        assert m["conversation_id"] == conv
        assert m["sender_id"] == a.id and m["sender_name"] == a.name
        assert m["message_type"] == mtype
        assert m["content"] == m["message_text"] == content
        assert m["timestamp"] == m["created_at"]
        assert m["is_read"] is False
        assert m["metadata"] == body.get("metadata")
        ids.append(m["id"])
    assert ids == sorted(ids)
    assert unread(server, b)["total"] == len(forms)
    assert unread(server, a)["total"] == 0


def test_send_is_idempotent_with_client_id(server, conn):
    a, b = users(2)
    conv = conversation(server, a.token, [b.id])["id"]
    first = send(server, a.token, conv, {"content": "once", "client_id": "c-1"})
    assert first["client_id"] == "c-1"
    again = send(server, a.token, conv, {"content": " once ", "client_id": "c-1"},
                 status=200)
    assert again == first
    # Another sender may use the same client_id.
    other = send(server, b.token, conv, {"content": "once", "client_id": "c-1"})
    assert other["id"] != first["id"]
    before = counts(conn)
    error(api(server, "POST", "/api/conversations/%d/messages" % conv, a.token,
              {"content": "different", "client_id": "c-1"}), 409, "conflict")
    error(api(server, "POST", "/api/conversations/%d/messages" % conv, a.token,
              {"content": "once", "client_id": "c-1", "metadata": {"k": 1}}),
          409, "conflict")
    assert counts(conn) == before
    assert unread(server, b)["total"] == 1


def test_concurrent_repeats_store_one(server, conn):
    a, b = users(2)
    conv = conversation(server, a.token, [b.id])["id"]

    def go(_):
        return api(server, "POST", "/api/conversations/%d/messages" % conv, a.token,
                   {"content": "same", "client_id": "race"})

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(go, range(10)))
    assert sorted(r.status_code for r in results) == [200] * 9 + [201]
    assert len({r.json()["id"] for r in results}) == 1
    assert one(conn, "select count(*) from messages where conversation_id = %s",
               conv) == 1


def test_length_limit_counts_code_points(server):
    a = User()
    conv = conversation(server, a.token, [new_id()])["id"]
    send(server, a.token, conv, {"content": "x" * 4000})
    m = send(server, a.token, conv, {"content": "\U0001F600" * 4000})
    assert len(m["content"]) == 4000
    error(api(server, "POST", "/api/conversations/%d/messages" % conv, a.token,
              {"content": "é" * 4001}), 400, "message_too_long")


@pytest.mark.parametrize("body,status,code", [
    ({}, 400, "empty_message"),
    ({"content": "   "}, 400, "empty_message"),
    ({"content": "\u00a0 \t"}, 400, "empty_message"),
    ({"content": "x" * 4001}, 400, "message_too_long"),
    ({"content": 5}, 400, "invalid_payload"),
    ({"content": "x", "message_type": "VIDEO"}, 400, "invalid_payload"),
    ({"content": "x", "message_type": 1}, 400, "invalid_payload"),
    ({"message": "x", "type": "STICKER"}, 400, "invalid_payload"),
    ({"type": "typing", "is_typing": True}, 400, "invalid_payload"),
    ({"type": 5, "content": "x"}, 400, "invalid_payload"),
    ({"content": "x", "client_id": ""}, 400, "invalid_payload"),
    ({"content": "x", "client_id": "c" * 65}, 400, "invalid_payload"),
    ({"content": "x", "client_id": 5}, 400, "invalid_payload"),
    ({"content": "x", "metadata": [1]}, 400, "invalid_payload"),
    ({"content": "x", "metadata": {"k": "v" * 2100}}, 400, "invalid_payload"),
    ({"message_type": "LOCATION"}, 400, "invalid_payload"),
    ({"message_type": "LOCATION", "metadata": {"lat": 91, "lng": 0}},
     400, "invalid_payload"),
    ({"message_type": "IMAGE", "metadata": {"url": "http://x.test/a"}},
     400, "invalid_payload"),
    ({"message_type": "FILE", "metadata": {"url": "//x.test/a"}},
     400, "invalid_payload"),
    ({"content": "x", "message_type": "SYSTEM"}, 403, "forbidden_type"),
    ({"message": "x", "type": "SYSTEM"}, 403, "forbidden_type"),
])
def test_send_bad_input(server, conn, body, status, code):
    a = User()
    conv = conversation(server, a.token, [new_id()])["id"]
    before = counts(conn)
    error(api(server, "POST", "/api/conversations/%d/messages" % conv, a.token, body),
          status, code)
    assert counts(conn) == before


def test_send_not_mine_or_unknown_is_404(server, conn):
    a, b, c = users(3)
    conv = conversation(server, a.token, [b.id])["id"]
    missing = one(conn, "select coalesce(max(id), 0) + 1000 from conversations")
    before = counts(conn)
    error(api(server, "POST", "/api/conversations/%d/messages" % conv, c.token,
              {"content": "x"}), 404, "not_found")
    error(api(server, "POST", "/api/conversations/%d/messages" % missing, a.token,
              {"content": "x"}), 404, "not_found")
    assert counts(conn)[1:] == before[1:]


def test_service_sends(server, conn):
    a, b = users(2)
    conv = conversation(server, a.token, [b.id])["id"]
    path = "/api/conversations/%d/messages" % conv

    m = send(server, SERVICE, conv, {"message_type": "SYSTEM", "content": "Paid"})
    assert m["message_type"] == "SYSTEM"
    assert m["sender_id"] is None and m["sender_name"] is None
    # SYSTEM via the compatibility form, idempotent with a client_id.
    s1 = send(server, SERVICE, conv, {"message": "done", "type": "SYSTEM",
                                      "client_id": "sys-1"})
    assert send(server, SERVICE, conv, {"message": "done", "type": "SYSTEM",
                                        "client_id": "sys-1"}, status=200) == s1

    # On a participant's behalf.
    m = send(server, SERVICE, conv, {"content": "for b", "sender_id": b.id})
    assert m["sender_id"] == b.id and m["message_type"] == "TEXT"
    assert unread(server, a)["total"] == 3
    assert unread(server, b)["total"] == 2

    before = counts(conn)
    error(api(server, "POST", path, SERVICE, {"content": "x"}), 400, "invalid_payload")
    error(api(server, "POST", path, SERVICE, {"content": "x", "sender_id": ""}),
          400, "invalid_payload")
    error(api(server, "POST", path, SERVICE, {"content": "x", "sender_id": [b.id]}),
          400, "invalid_payload")
    error(api(server, "POST", path, SERVICE, {"content": "x", "message_type": "SYSTEM",
                                              "sender_id": b.id}),
          400, "invalid_payload")
    error(api(server, "POST", path, SERVICE, {"content": "x", "sender_id": new_id()}),
          403, "forbidden")
    missing = one(conn, "select coalesce(max(id), 0) + 1000 from conversations")
    for body in ({"content": "x", "sender_id": b.id},
                 {"content": "x", "message_type": "SYSTEM"}):
        error(api(server, "POST", "/api/conversations/%d/messages" % missing,
                  SERVICE, body), 404, "not_found")
    assert counts(conn) == before


# ---------------------------------------------------------------------------------
# GET /api/conversations/{id}/messages
# ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_conversation(server, pg):
    """A conversation of 3,000 messages from two senders, written with plain
    SQL; the tests only read it."""
    a, b = users(2)
    conv = conversation(server, a.token, [b.id])["id"]
    conn = pg.connect()
    ids = []
    for i in range(6):
        ids += insert_messages(conn, conv, (a, b)[i % 2].id, 500)
    conn.close()
    assert ids == sorted(ids) and len(ids) == 3000
    return a, b, conv, ids


def history(server, token, conv, query=""):
    page = ok(api(server, "GET", "/api/conversations/%d/messages%s" % (conv, query),
                  token))
    assert set(page) == {"messages", "has_more"}
    got = [m["id"] for m in page["messages"]]
    assert got == sorted(got)                       # oldest first
    assert all(m["conversation_id"] == conv for m in page["messages"])
    return page


def test_history_walks_backwards_without_gaps(server, long_conversation):
    a, b, conv, ids = long_conversation
    seen, query = [], "?limit=200"
    while True:
        page = history(server, b.token, conv, query)
        seen = [m["id"] for m in page["messages"]] + seen
        if not page["has_more"]:
            break
        assert len(page["messages"]) == 200
        query = "?limit=200&before=%d" % page["messages"][0]["id"]
    assert seen == ids


def test_history_walks_forwards_without_gaps(server, long_conversation):
    a, b, conv, ids = long_conversation
    seen, after = [], 0
    while True:
        page = history(server, a.token, conv, "?limit=173&after=%d" % after)
        seen += [m["id"] for m in page["messages"]]
        if not page["has_more"]:
            break
        assert len(page["messages"]) == 173
        after = page["messages"][-1]["id"]
    assert seen == ids
    # Past the end.
    assert history(server, a.token, conv, "?after=%d" % ids[-1]) == \
        {"messages": [], "has_more": False}


def test_history_windows_and_limits(server, long_conversation):
    a, b, conv, ids = long_conversation
    # Neither: the latest page, default 50.
    page = history(server, a.token, conv)
    assert [m["id"] for m in page["messages"]] == ids[-50:] and page["has_more"]
    # Clamped to 200.
    for limit in ("200", "201", "5000", "99999999999999999999999"):
        page = history(server, a.token, conv, "?limit=" + limit)
        assert [m["id"] for m in page["messages"]] == ids[-200:]
    # before: the latest page before it.
    page = history(server, a.token, conv, "?limit=10&before=%d" % ids[100])
    assert [m["id"] for m in page["messages"]] == ids[90:100] and page["has_more"]
    page = history(server, a.token, conv, "?limit=10&before=%d" % ids[5])
    assert [m["id"] for m in page["messages"]] == ids[:5]
    assert page["has_more"] is False
    # after and before: the first page after, below before.
    page = history(server, a.token, conv,
                   "?limit=10&after=%d&before=%d" % (ids[100], ids[105]))
    assert [m["id"] for m in page["messages"]] == ids[101:105]
    assert page["has_more"] is False
    page = history(server, a.token, conv,
                   "?limit=3&after=%d&before=%d" % (ids[100], ids[105]))
    assert [m["id"] for m in page["messages"]] == ids[101:104] and page["has_more"]
    # after=0 is from the start.
    page = history(server, a.token, conv, "?limit=7&after=0")
    assert [m["id"] for m in page["messages"]] == ids[:7] and page["has_more"]
    # Message objects are complete.
    m = history(server, a.token, conv, "?limit=1")["messages"][0]
    assert m["sender_id"] == b.id and m["sender_name"] == "user " + b.id
    assert m["content"] == m["message_text"] == "m500"
    assert m["is_read"] is False
    # b was only named by a so far; once seen, history shows b's name.
    ok(api(server, "GET", "/api/me", b.token))
    m = history(server, a.token, conv, "?limit=1")["messages"][0]
    assert m["sender_name"] == b.name


def test_history_of_an_empty_conversation(server):
    a = User()
    conv = conversation(server, a.token, [new_id()])["id"]
    assert history(server, a.token, conv) == {"messages": [], "has_more": False}


def test_history_access(server, conn):
    a, b, c = users(3)
    conv = conversation(server, a.token, [b.id])["id"]
    send(server, a.token, conv, {"content": "hi"})
    error(api(server, "GET", "/api/conversations/%d/messages" % conv, c.token),
          404, "not_found")
    page = history(server, SERVICE, conv)               # a service reads any
    assert [m["content"] for m in page["messages"]] == ["hi"]
    missing = one(conn, "select coalesce(max(id), 0) + 1000 from conversations")
    error(api(server, "GET", "/api/conversations/%d/messages" % missing, SERVICE),
          404, "not_found")


def test_history_objects_are_those_of_the_live_frames(server, conn):
    """History pages and socket replays are rendered by the server from
    rows, live frames by PostgreSQL: the same message object either way, for every kind of
    field (escapes, non-ASCII, metadata, client ids, a SYSTEM message, a
    sender not seen yet, is_read before and after a read)."""
    a, b = users(2)
    stranger = new_id()
    conv = conversation(server, a.token, [b.id, stranger])["id"]
    ws = WS(server, "/ws/chat/%d/" % conv, b.token)
    try:
        assert ws.recv()["type"] == "ready"
        sent = [
            send(server, a.token, conv, {
                "content": 'quote " backslash \\ slash / tab \t nl \n cr \r '
                           'ctl \x01 \x1f del \x7f', "client_id": "c-1"}),
            send(server, a.token, conv, {
                "content": "h\u00e9llo \u2603 \U0001F600 \u2028 end",
                "message_type": "LOCATION",
                "metadata": {"lat": 1.5, "lng": -2, "label": 'Caf\u00e9 "x"',
                             "nested": {"a": [1, None, True, 1e-7]}}}),
            send(server, b.token, conv, {"content": "reply", "client_id": "c-2"}),
            send(server, SERVICE, conv, {"message_type": "SYSTEM", "content": "Paid"}),
            send(server, SERVICE, conv, {"content": "on behalf", "sender_id": stranger}),
        ]
        live = []
        while len(live) < len(sent):
            frame = ws.recv()
            if frame["type"] == "message":
                live.append(frame["message"])
    finally:
        ws.close()
    assert [m["id"] for m in live] == [m["id"] for m in sent]
    assert history(server, a.token, conv)["messages"] == live
    # A socket's replay is rendered by the server too.
    ws = WS(server, "/ws/chat/%d/?after=0" % conv, a.token)
    try:
        assert ws.recv()["type"] == "ready"
        replayed = []
        while True:
            frame = ws.recv()
            if frame["type"] == "synced":
                break
            replayed.append(frame)
    finally:
        ws.close()
    assert all(set(f) == {"type", "message", "replay"} and f["type"] == "message"
               and f["replay"] is True for f in replayed), replayed
    assert [f["message"] for f in replayed] == live
    # Once everyone has read, is_read turns true in both renderings.
    for who in (a, b):
        ok(api(server, "POST", "/api/conversations/%d/read" % conv, who.token, {}))
    conn.cursor().execute("select parley_mark_read(%s, %s, null)", (conv, stranger))
    page = history(server, b.token, conv)["messages"]
    assert [m["is_read"] for m in page] == [True] * len(sent)
    assert page == [one(conn, "select parley_message_json(%s::bigint)", m["id"])
                    for m in page]


def kept_pages(server):
    return metrics(server)['parley_latest_pages_total{source="kept"}']


def test_latest_page_is_answered_from_memory_while_nothing_changed(server):
    """Each worker keeps the latest page it rendered (src/pages.c) and
    answers the next request for it from memory when the database says
    nothing it was made from changed: the same bytes, checked every time."""
    a, b = users(2)
    conv = conversation(server, a.token, [b.id])["id"]
    for i in range(3):
        send(server, a.token, conv, {"content": "m%d" % i})
    first = history(server, b.token, conv)
    kept = kept_pages(server)
    for _ in range(8):
        assert history(server, b.token, conv) == first
    # at most one render per worker (two workers): the rest came from memory
    assert kept_pages(server) >= kept + 6
    short = history(server, b.token, conv, "?limit=2")
    assert short["messages"] == first["messages"][1:] and short["has_more"]


def test_page_cache_of_zero_keeps_no_page(isolated):
    """PARLEY_PAGE_CACHE_MB=0: every latest page comes from the database,
    the same as when pages are kept."""
    iso = isolated(PARLEY_PAGE_CACHE_MB="0")
    a, b = users(2)
    conv = conversation(iso.srv, a.token, [b.id])["id"]
    send(iso.srv, a.token, conv, {"content": "hello"})
    first = history(iso.srv, b.token, conv)
    assert [m["content"] for m in first["messages"]] == ["hello"]
    for _ in range(6):
        assert history(iso.srv, b.token, conv) == first
    counts = metrics(iso.srv)
    assert counts['parley_latest_pages_total{source="kept"}'] == 0
    assert counts['parley_latest_pages_total{source="database"}'] >= 7


def test_latest_pages_replaced_and_evicted_while_asked(isolated):
    """A request answered from a kept page holds it (no copy): pages
    replaced by newer ones and evicted by others while requests for them
    wait must still answer whole and current. A 1 MiB cache keeps pages
    up to 16 KiB and about 140 of these 7 KiB ones: readers on keep-alive
    connections ask mostly for ten pages that a writer keeps changing, and
    now and then for one of 150 others that push pages out."""
    iso = isolated(PARLEY_PAGE_CACHE_MB="1")
    a, b = users(2)
    convs = [conversation(iso.srv, a.token, [b.id, c.id])["id"]
             for c in users(160)]
    for conv in convs:
        for _ in range(2):
            send(iso.srv, a.token, conv, {"content": "x" * 3500})
    hot = convs[:10]
    stop = threading.Event()
    last = {conv: 0 for conv in convs}
    problems = []

    def write():
        i = 0
        while not stop.is_set():
            conv = hot[i % len(hot)]
            last[conv] = send(iso.srv, a.token, conv, {"content": "y"})["id"]
            i += 1

    def read(k):
        with requests.Session() as s:
            for i in range(300):
                conv = convs[(k * 31 + i * 7) % len(convs)] if i % 3 == 0 else \
                    hot[(k + i) % len(hot)]
                floor = last[conv]
                r = s.get(iso.srv.base + "/api/conversations/%d/messages" % conv,
                          headers={"Authorization": "Bearer " + b.token}, timeout=10)
                page = r.json()["messages"]
                if (r.status_code != 200 or page[-1]["id"] < floor or
                        any(m["conversation_id"] != conv for m in page) or
                        page[0]["content"] != "x" * 3500):
                    problems.append((conv, floor, r.status_code, r.text[:200]))

    writer = threading.Thread(target=write)
    writer.start()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(read, range(8)))
    stop.set()
    writer.join()
    assert problems == []
    counts = metrics(iso.srv)
    assert counts['parley_latest_pages_total{source="kept"}'] > 0
    assert counts['parley_latest_pages_total{source="database"}'] > len(convs)


def test_history_plans_read_by_key(isolated):
    """parley_history runs one generic plan, in which the page's size is a
    parameter guessed at a tenth of the conversation: with a site's
    numbers of users and messages, a join to users read that whole table
    into a hash at every page (100 ms with 200,000 users). Each sender's
    name is looked up by key, whatever the statistics say, and once per
    sender of the page (two here), not once per row. Likewise the reader
    check of a latest page probes one participant key, where an EXISTS was
    planned as a hash of every conversation of the reader."""
    iso = isolated()
    a, b = users(2)
    conv = conversation(iso.srv, a.token, [b.id])["id"]
    ok(api(iso.srv, "GET", "/api/me", b.token))     # b's own name, not a placeholder
    db = iso.connect()
    cur = db.cursor()
    cur.execute("insert into users (id, name) select 'many' || i, 'Many ' || i "
                "from generate_series(1, 50000) i")
    # Bulk history without the triggers, as bench/run.sh makes its own.
    cur.execute("set session_replication_role = replica")
    cur.execute("insert into messages (id, conversation_id, sender_id, content) "
                "select nextval('messages_id_seq'), %s, "
                "case when g %% 2 = 0 then %s else %s end, 'm' || g "
                "from generate_series(1, 50000) g order by g", (conv, a.id, b.id))
    # A site's participants: most users in a conversation or two, and a
    # reader in thousands.
    cur.execute("insert into conversations (title, member_hash) "
                "select 'bulk ' || i, 'bulk' || i from generate_series(1, 50000) i")
    cur.execute("insert into participants (conversation_id, user_id) "
                "select c.id, 'many' || substr(c.member_hash, 5) from conversations c "
                "where c.member_hash like 'bulk%%'")
    cur.execute("insert into participants (conversation_id, user_id) "
                "select c.id, %s from conversations c "
                "where c.member_hash like 'bulk%%' and c.id %% 10 = 0", (b.id,))
    cur.execute("reset session_replication_role")
    for table in ("users", "messages", "conversations", "participants"):
        cur.execute("analyze " + table)
    for setting in ("auto_explain.log_min_duration = 0",
                    "auto_explain.log_nested_statements = on",
                    "auto_explain.log_analyze = on",
                    "client_min_messages = log"):
        cur.execute("load 'auto_explain'")
        cur.execute("set " + setting)
    cur.execute("select sender_name from parley_history(%s, %s, null, null, 50)",
                (conv, b.id))
    assert {r[0] for r in cur.fetchall()} == {a.name, b.name}
    plans = "".join(db.notices)
    assert "on messages b" in plans                  # the page's plan was logged
    assert "Seq Scan on users" not in plans
    lookups = re.findall(r"Index Scan using users_pkey on users u .*loops=(\d+)\)",
                         plans)
    assert lookups == ["2"], lookups                # a's name and b's
    del db.notices[:]
    cur.execute("select count(*) from parley_latest_pages(%s::jsonb)",
                (json.dumps([{"c": conv, "v": b.id, "l": 50}]),))
    assert cur.fetchone()[0] == 1 + 51              # its header, the page, one more
    plans = "".join(db.notices)
    assert "jsonb_array_elements" in plans           # the headers' plan was logged
    assert "hashed SubPlan" not in plans
    assert "Seq Scan on participants" not in plans
    page = history(iso.srv, b.token, conv)["messages"]
    assert [m["content"] for m in page] == ["m%d" % g for g in range(49951, 50001)]
    assert {m["sender_name"] for m in page} == {a.name, b.name}


def test_latest_page_kept_is_never_stale(server, conn):
    """Whatever a page was made from changes, the next request shows it
    (read-your-writes on every worker): a message stored by SQL, a read
    that turns is_read, a sender renamed, a message edited or deleted by
    another program, a reader who left or a stranger (404 though the page
    is kept and its stamp has not moved)."""
    a, b, c, stranger = users(4)
    conv = conversation(server, a.token, [b.id, c.id])["id"]
    cur = conn.cursor()

    def page(token=b.token):
        for _ in range(4):              # warm, then kept, on both workers
            got = history(server, token, conv)
        return got["messages"]

    for i in range(6):
        cur.execute("insert into messages (conversation_id, sender_id, content) "
                    "values (%s, %s, %s) returning id", (conv, a.id, "sql %d" % i))
        stored = cur.fetchone()[0]
        assert page()[-1]["id"] == stored

    assert not any(m["is_read"] for m in page())
    for reader in (b, c):
        ok(api(server, "POST", "/api/conversations/%d/read" % conv,
               reader.token, {}))
    assert all(m["is_read"] for m in page())

    cur.execute("select parley_touch_user(%s, %s)", (a.id, "Renamed"))
    assert {m["sender_name"] for m in page()} == {"Renamed"}

    last = page()[-1]["id"]
    cur.execute("update messages set content = 'edited' where id = %s", (last,))
    assert page()[-1]["content"] == "edited"
    cur.execute("delete from messages where id = %s", (last,))
    assert last not in [m["id"] for m in page()]

    assert page(a.token)[-1]["content"] == "sql 4"

    # b, who has read everything, leaves a conversation where c has read
    # nothing: the read floor, and so the stamp, stays as it was.
    conv = conversation(server, a.token, [b.id, c.id],
                        context={"kind": "job", "ref": new_id()})["id"]
    send(server, a.token, conv, {"content": "bye"})
    ok(api(server, "POST", "/api/conversations/%d/read" % conv, b.token, {}))
    floor = "select parley_read_floor(%s)::text" % conv
    before = one(conn, floor)
    page()
    cur.execute("delete from participants where conversation_id = %s "
                "and user_id = %s", (conv, b.id))
    assert one(conn, floor) == before
    for who in (b, stranger, b, stranger):
        error(api(server, "GET", "/api/conversations/%d/messages" % conv,
                  who.token), 404, "not_found")


def test_latest_pages_asked_together_get_each_their_own_answer(server):
    """Latest-page requests that arrive together share one database call
    (src/latest.c): each still gets its own page, or its own 404, whatever
    else is in the call; clients that hang up while theirs is in flight
    harm nobody else."""
    a, b, stranger = users(3)
    convs = []
    for i in range(4):
        conv = conversation(server, a.token, [b.id],
                            context={"kind": "job", "ref": new_id()})["id"]
        for j in range(i + 1):
            send(server, a.token, conv, {"content": "c%d m%d" % (i, j)})
        convs.append(conv)
    expected = {c: history(server, b.token, c) for c in convs}
    asks = [(c, who) for c in convs for who in (a, b, stranger)] * 6

    def ask(job):
        conv, who = job
        return api(server, "GET", "/api/conversations/%d/messages" % conv,
                   who.token)

    def hang_up(conv):
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(("GET /api/conversations/%d/messages HTTP/1.1\r\n"
                       "Host: x\r\nAuthorization: Bearer %s\r\n\r\n" %
                       (conv, b.token)).encode())

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        hung = [pool.submit(hang_up, c) for c in convs * 5]
        answers = list(pool.map(ask, asks))
        for h in hung:
            h.result()
    for (conv, who), r in zip(asks, answers):
        if who is stranger:
            error(r, 404, "not_found")
        else:
            assert r.status_code == 200 and r.json() == expected[conv], r.text
    assert history(server, a.token, convs[0]) == expected[convs[0]]


@pytest.mark.parametrize("query", [
    "limit=0", "limit=-5", "limit=abc", "limit=2.5", "limit=", "limit=0000",
    "before=0", "before=-1", "before=x", "before=", "before=1.0",
    "before=99999999999999999999", "after=-1", "after=x", "after=",
    "after=99999999999999999999",
])
def test_history_bad_params_are_400(server, query):
    a = User()
    conv = conversation(server, a.token, [new_id()])["id"]
    error(api(server, "GET", "/api/conversations/%d/messages?%s" % (conv, query),
              a.token), 400, "invalid_payload")


# ---------------------------------------------------------------------------------
# POST /api/conversations/{id}/read, GET /api/unread, GET /api/me
# ---------------------------------------------------------------------------------

def test_unread_counts_across_rest_actions(server, conn):
    a, b = users(2)
    conv = conversation(server, a.token, [b.id])["id"]
    other = conversation(server, a.token, [b.id], context={"kind": "k"})["id"]
    sent = [send(server, a.token, conv, {"content": "m%d" % i})["id"]
            for i in range(5)]
    send(server, a.token, other, {"content": "o"})
    assert unread(server, b) == {"total": 6, "conversations": [
        {"id": conv, "unread_count": 5, "muted": False},
        {"id": other, "unread_count": 1, "muted": False}]}
    assert ok(api(server, "GET", "/api/me", b.token))["unread_messages"] == 6
    assert unread(server, a) == {"total": 0, "conversations": []}

    path = "/api/conversations/%d/read" % conv
    assert ok(api(server, "POST", path, b.token, {"message_id": sent[1]})) == \
        {"unread_count": 3}
    # A position never moves back.
    assert ok(api(server, "POST", path, b.token, {"message_id": sent[0]})) == \
        {"unread_count": 3}
    # Ids above the latest are clamped.
    assert ok(api(server, "POST", path, b.token, {"message_id": 2 ** 62})) == \
        {"unread_count": 0}
    assert one(conn, "select last_read_message_id from participants where "
               "conversation_id = %s and user_id = %s", conv, b.id) == sent[-1]

    # B answers: A has one unread, B none in conv.
    send(server, b.token, conv, {"content": "reply"})
    assert unread(server, a)["total"] == 1
    assert unread(server, b)["total"] == 1               # only `other`
    # Read without a message_id: up to the latest.
    assert ok(api(server, "POST", "/api/conversations/%d/read" % other, b.token)) == \
        {"unread_count": 0}
    assert unread(server, b) == {"total": 0, "conversations": []}
    # A SYSTEM message is unread for everyone.
    send(server, SERVICE, conv, {"message_type": "SYSTEM", "content": "s"})
    assert unread(server, a)["total"] == 2
    assert unread(server, b)["total"] == 1
    # Reading by GET.
    ok(api(server, "GET", "/api/conversations/%d" % conv, a.token))
    assert unread(server, a) == {"total": 0, "conversations": []}
    me = ok(api(server, "GET", "/api/me", a.token))
    assert me["unread_messages"] == 0


def test_reading_marks_the_new_message_notification_read(server, conn):
    a, b = users(2)
    conv = conversation(server, a.token, [b.id])["id"]
    send(server, a.token, conv, {"content": "1"})
    send(server, a.token, conv, {"content": "2"})
    page = ok(api(server, "GET", "/api/notifications?unread=true", b.token))
    [n] = page["notifications"]
    assert n["type"] == "new_message" and n["count"] == 2 and n["read"] is False
    assert n["conversation_id"] == conv and n["unread_count"] == 2
    ok(api(server, "POST", "/api/conversations/%d/read" % conv, b.token))
    assert ok(api(server, "GET", "/api/notifications?unread=true", b.token)) == \
        {"notifications": [], "has_more": False}
    assert ok(api(server, "GET", "/api/me", b.token))["unread_notifications"] == 0


@pytest.mark.parametrize("body", [{"message_id": 0}, {"message_id": -3},
                                  {"message_id": "5"}, {"message_id": 1.5},
                                  {"message_id": True}])
def test_read_bad_body_is_400(server, conn, body):
    a, b = users(2)
    conv = conversation(server, a.token, [b.id])["id"]
    send(server, a.token, conv, {"content": "x"})
    error(api(server, "POST", "/api/conversations/%d/read" % conv, b.token, body),
          400, "invalid_payload")
    assert unread(server, b)["total"] == 1


def test_read_not_mine_is_404(server, conn):
    a, b, c = users(3)
    conv = conversation(server, a.token, [b.id])["id"]
    error(api(server, "POST", "/api/conversations/%d/read" % conv, c.token),
          404, "not_found")


def test_unread_of_a_new_user(server):
    assert unread(server, User()) == {"total": 0, "conversations": []}


# ---------------------------------------------------------------------------------
# notifications
# ---------------------------------------------------------------------------------

def notify(server, user_id, type_, payload=None, status=201, **extra):
    body = dict(extra, user_id=user_id, type=type_)
    if payload is not None:
        body["payload"] = payload
    r = api(server, "POST", "/api/notifications", SERVICE, body)
    assert r.status_code == status, r.text
    return r.json()


def test_post_notification(server, conn):
    u = User()
    payload = {"from_user": {"id": "7", "username": "maria"}, "n": [1, 2.5, None]}
    n = notify(server, u.id, "friend_accepted", payload)
    assert list(n)[:3] == ["type", "id", "created_at"]
    assert n == dict(payload, type="friend_accepted", id=n["id"],
                     created_at=n["created_at"], read=False)
    assert n["created_at"].endswith("Z")
    # Without a payload; to an integer user id; to a user never seen.
    bare = notify(server, u.id, "ping.v2")
    assert bare == {"type": "ping.v2", "id": bare["id"],
                    "created_at": bare["created_at"], "read": False}
    assert notify(server, 12345, "x")["type"] == "x"
    assert one(conn, "select count(*) from notifications where user_id = '12345' "
               "and type = 'x'") >= 1
    listed = ok(api(server, "GET", "/api/notifications", u.token))
    assert listed == {"notifications": [bare, n], "has_more": False}


@pytest.mark.parametrize("body,status,code", [
    ({"type": "x"}, 400, "invalid_payload"),
    ({"user_id": "", "type": "x"}, 400, "invalid_payload"),
    ({"user_id": "u" * 65, "type": "x"}, 400, "invalid_payload"),
    ({"user_id": 1.5, "type": "x"}, 400, "invalid_payload"),
    ({"user_id": "U"}, 400, "invalid_payload"),
    ({"user_id": "U", "type": ""}, 400, "invalid_payload"),
    ({"user_id": "U", "type": "Friend"}, 400, "invalid_payload"),
    ({"user_id": "U", "type": "friend-request"}, 400, "invalid_payload"),
    ({"user_id": "U", "type": "a" * 65}, 400, "invalid_payload"),
    ({"user_id": "U", "type": 5}, 400, "invalid_payload"),
    ({"user_id": "U", "type": "x", "payload": [1]}, 400, "invalid_payload"),
    ({"user_id": "U", "type": "x", "payload": "text"}, 400, "invalid_payload"),
    ({"user_id": "U", "type": "x", "payload": {"type": "y"}}, 400, "invalid_payload"),
    ({"user_id": "U", "type": "x", "payload": {"id": 1}}, 400, "invalid_payload"),
    ({"user_id": "U", "type": "x", "payload": {"created_at": 1}},
     400, "invalid_payload"),
    ({"user_id": "U", "type": "x", "payload": {"read": 1}}, 400, "invalid_payload"),
    ({"user_id": "U", "type": "x", "payload": {"replay": 1}}, 400, "invalid_payload"),
    ({"user_id": "U", "type": "x", "payload": {"k": "v" * 8200}},
     400, "invalid_payload"),
    ({"user_id": "U", "type": "new_message"}, 403, "forbidden_type"),
])
def test_post_notification_bad_input(server, conn, body, status, code):
    uid = new_id()
    body = json.loads(json.dumps(body).replace('"U"', json.dumps(uid)))
    before = counts(conn)
    error(api(server, "POST", "/api/notifications", SERVICE, body), status, code)
    assert counts(conn) == before


def test_payload_limit(server):
    u = User()
    n = notify(server, u.id, "big", {"k": "v" * 7000})
    assert len(n["k"]) == 7000
    # 8 KiB of compact JSON, however many members: PostgreSQL's jsonb text
    # (a space after each ':' and ',') is 400 bytes longer here
    payload = {"k%03d" % i: "x" * 30 for i in range(200)}
    compact = len(json.dumps(payload, separators=(",", ":")))
    payload["k199"] += "x" * (8192 - compact)
    assert len(json.dumps(payload, separators=(",", ":"))) == 8192
    assert notify(server, u.id, "many", payload)["k199"] == payload["k199"]
    payload["k199"] += "x"
    error(api(server, "POST", "/api/notifications", SERVICE,
              {"user_id": u.id, "type": "many", "payload": payload}),
          400, "invalid_payload")
    # a number no double holds: jsonb could not store 1e2000
    for number in ("1e400", "1e2000", "1e-400"):
        body = '{"user_id":%s,"type":"n","payload":{"x":%s}}' % (
            json.dumps(u.id), number)
        error(api(server, "POST", "/api/notifications", SERVICE, data=body,
                  headers={"Content-Type": "application/json"}),
              400, "invalid_payload")


def test_notification_list_pages_and_filters(server):
    u = User()
    made = [notify(server, u.id, "t%d" % i, {"i": i})["id"] for i in range(7)]
    seen, query = [], "?limit=3"
    while True:
        page = ok(api(server, "GET", "/api/notifications" + query, u.token))
        got = [n["id"] for n in page["notifications"]]
        assert got == sorted(got, reverse=True)          # newest first
        seen += got
        if not page["has_more"]:
            break
        query = "?limit=3&before=%d" % got[-1]
    assert seen == made[::-1]

    path = "/api/notifications/%d/read"
    assert ok(api(server, "POST", path % made[2], u.token)) == \
        {"unread_notifications": 6}
    assert ok(api(server, "POST", path % made[2], u.token)) == \
        {"unread_notifications": 6}                      # already read: fine
    page = ok(api(server, "GET", "/api/notifications?unread=true", u.token))
    assert [n["id"] for n in page["notifications"]] == \
        [i for i in made[::-1] if i != made[2]]
    page = ok(api(server, "GET", "/api/notifications?unread=false&limit=100", u.token))
    assert {n["id"]: n["read"] for n in page["notifications"]}[made[2]] is True
    assert ok(api(server, "GET", "/api/me", u.token))["unread_notifications"] == 6

    assert ok(api(server, "POST", "/api/notifications/read_all", u.token)) == \
        {"unread_notifications": 0}
    assert ok(api(server, "GET", "/api/notifications?unread=true", u.token)) == \
        {"notifications": [], "has_more": False}
    page = ok(api(server, "GET", "/api/notifications?limit=1000", u.token))
    assert len(page["notifications"]) == 7
    assert all(n["read"] for n in page["notifications"])


def test_notification_list_clamps_limit(server, conn):
    u = User()
    with conn.cursor() as cur:
        cur.execute("insert into notifications (user_id, type) "
                    "select %s, 'bulk' from generate_series(1, 105)", (u.id,))
    page = ok(api(server, "GET", "/api/notifications", u.token))
    assert len(page["notifications"]) == 50 and page["has_more"]
    page = ok(api(server, "GET", "/api/notifications?limit=100000", u.token))
    assert len(page["notifications"]) == 100 and page["has_more"]


@pytest.mark.parametrize("query", ["limit=0", "limit=-1", "limit=x", "before=0",
                                   "before=-1", "before=y", "unread=yes", "unread="])
def test_notification_list_bad_params_are_400(server, query):
    error(api(server, "GET", "/api/notifications?" + query, User().token),
          400, "invalid_payload")


def test_read_notification_of_someone_else_is_404(server, conn):
    u, v = users(2)
    n = notify(server, u.id, "x")
    error(api(server, "POST", "/api/notifications/%d/read" % n["id"], v.token),
          404, "not_found")
    assert one(conn, "select read_at from notifications where id = %s", n["id"]) is None
    missing = one(conn, "select coalesce(max(id), 0) + 1000 from notifications")
    error(api(server, "POST", "/api/notifications/%d/read" % missing, u.token),
          404, "not_found")


def test_preferences(server, conn):
    u = User()
    path = "/api/notification-preferences"
    assert ok(api(server, "GET", path, u.token)) == {"disabled_types": []}
    got = ok(api(server, "PUT", path, u.token,
                 {"disabled_types": ["friend_request", "a.b", "friend_request"]}))
    assert got == {"disabled_types": ["friend_request", "a.b"]}
    assert ok(api(server, "GET", path, u.token)) == got
    # A disabled type is still stored and listed.
    n = notify(server, u.id, "friend_request", {"x": 1})
    assert ok(api(server, "GET", "/api/notifications", u.token))["notifications"][0] \
        == n
    assert ok(api(server, "PUT", path, u.token, {"disabled_types": []})) == \
        {"disabled_types": []}

    before = counts(conn)
    for body in ({}, {"disabled_types": None}, {"disabled_types": "x"},
                 {"disabled_types": [5]}, {"disabled_types": ["Bad"]},
                 {"disabled_types": [""]}, {"disabled_types": ["a" * 65]},
                 {"disabled_types": ["t%d" % i for i in range(257)]}):
        error(api(server, "PUT", path, u.token, body), 400, "invalid_payload")
    assert counts(conn) == before
    ok(api(server, "PUT", path, u.token,
           {"disabled_types": ["t%d" % i for i in range(256)]}))
