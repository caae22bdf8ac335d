"""The data rules of sql/, exercised through plain SQL.

PROTOCOL.md section 5 promises that another program's INSERT into messages or
notifications has exactly the API's effects, so these tests write rows directly and
call the parley_* functions the server calls, then check the stored state and the
NOTIFY payloads on channel 'parley' (format in docs/DATA.md).

Fixtures from conftest.py: `pg` (session; `pg.url` is a libpq URL of a database the
server has migrated) and `conn` (a psycopg2 autocommit connection to it). Every test
makes its own users and conversations with unique ids, so tests do not interfere
with each other or with a running server.
"""

import json
import select
import threading
import time
import uuid

import psycopg2
import pytest

SENTINEL_CHANNEL = "parley_test_sentinel"


# ---------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------

def new_id(prefix="u"):
    # ':' inside user ids is legal and exercises the length-prefixed uid field
    return f"{prefix}:{uuid.uuid4().hex[:12]}"


def one(conn, sql, *args):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        row = cur.fetchone() if cur.description else None
        return None if row is None else row[0]


def rows(conn, sql, *args):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall()


def call_json(conn, sql, *args):
    return json.loads(one(conn, sql, *args))


def expect_px(conn, status, code, sql, *args):
    """The statement fails with SQLSTATE PX<status> and message <code>."""
    with pytest.raises(psycopg2.Error) as info:
        one(conn, sql, *args)
    assert info.value.pgcode == f"PX{status}", info.value.pgerror
    assert info.value.diag.message_primary == code
    assert info.value.diag.message_detail      # a short human text
    if not conn.autocommit:
        conn.rollback()


SOCKETS = iter(range(1, 10 ** 9))


def online(conn, uid, name):
    """Register a notification socket for uid, as the server does when one
    opens: notifications are pushed only to users with one."""
    one(conn, "select parley_notify_open('sql-rules-node', %s, %s, %s, 1000)",
        next(SOCKETS), uid, name)


def touch(conn, *names):
    """Create users (id -> display name), each with a notification socket
    open, and return their ids."""
    ids = []
    for name in names:
        uid = new_id()
        online(conn, uid, name)
        ids.append(uid)
    return ids


def create(conn, creator, members, title=None, kind=None, ref=None, system=None):
    body = json.dumps([m if isinstance(m, dict) else {"id": m, "role": None}
                       for m in members])
    return call_json(conn, "select parley_create_conversation(%s, %s::jsonb, %s, %s, %s, %s)",
                     creator, body, title, kind, ref, system)


def insert_message(conn, conv, sender, content, type_=None):
    """A plain INSERT, as another program would write it."""
    with conn.cursor() as cur:
        if type_ is None:
            cur.execute("insert into messages (conversation_id, sender_id, content) "
                        "values (%s, %s, %s) returning id", (conv, sender, content))
        else:
            cur.execute("insert into messages (conversation_id, sender_id, type, content) "
                        "values (%s, %s, %s, %s) returning id", (conv, sender, type_, content))
        return cur.fetchone()[0]


def participant(conn, conv, user):
    return rows(conn, "select parley_unread_count(conversation_id, user_id), "
                      "last_read_message_id, muted from participants "
                      "where conversation_id = %s and user_id = %s", conv, user)[0]


def connect(pg, autocommit=False):
    c = psycopg2.connect(pg.url)
    c.autocommit = autocommit
    return c


def parse_payload(payload):
    """<kind>:<seq>:<conv>:<uidlen>:<uid>:<json>; uidlen counts bytes."""
    kind, seq, conv, uidlen, rest = payload.split(":", 4)
    raw = rest.encode()
    n = int(uidlen)
    uid, sep, body = raw[:n].decode(), raw[n:n + 1], raw[n + 1:].decode()
    assert sep == b":", payload
    assert len(kind) == 1
    return kind, int(seq), int(conv), uid, body


class Listener:
    """A LISTEN parley connection. collect() returns the events that arrived up to a
    sentinel NOTIFY sent after everything the test did: notifications are delivered
    in commit order, so nothing the test caused can arrive after it."""

    def __init__(self, pg):
        self.conn = connect(pg, autocommit=True)
        one(self.conn, "listen parley; listen " + SENTINEL_CHANNEL)

    def collect(self, timeout=5.0):
        token = uuid.uuid4().hex
        c = self.conn
        one(c, "select pg_notify(%s, %s)", SENTINEL_CHANNEL, token)
        events = []
        deadline = time.monotonic() + timeout
        while True:
            while c.notifies:
                n = c.notifies.pop(0)
                if n.channel == SENTINEL_CHANNEL and n.payload == token:
                    return events
                if n.channel == "parley":
                    events.append(parse_payload(n.payload))
            left = deadline - time.monotonic()
            assert left > 0, "sentinel notification never arrived"
            select.select([c], [], [], left)
            c.poll()

    def close(self):
        self.conn.close()


@pytest.fixture
def listener(pg):
    lst = Listener(pg)
    yield lst
    lst.close()


def run_in_thread(fn, *args):
    """Start fn(*args) in a thread; the returned box gets 'result' or 'error'."""
    box = {}

    def target():
        try:
            box["result"] = fn(*args)
        except Exception as e:          # handed to the test thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    box["thread"] = t
    return box


def wait_blocked(conn, pid, timeout=5.0):
    """Wait until backend pid waits for a lock (so the race really happens)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if one(conn, "select wait_event_type = 'Lock' from pg_stat_activity where pid = %s",
               pid):
            return
        time.sleep(0.02)
    raise AssertionError("the second session never blocked on a lock")


def finish(box, timeout=10.0):
    box["thread"].join(timeout)
    assert not box["thread"].is_alive(), "concurrent call did not finish"
    if "error" in box:
        raise box["error"]
    return box["result"]


def race(pg, conn, first_call, second_call):
    """first_call(c1) in one open transaction, then second_call(c2) in another
    that must block on the first's locks; the first commits, then the second.
    Returns both results."""
    first, second = connect(pg), connect(pg)
    try:
        r1 = first_call(first)
        box = run_in_thread(second_call, second)
        wait_blocked(conn, second.get_backend_pid())
        first.commit()
        r2 = finish(box)
        second.commit()
    finally:
        first.close()
        second.close()
    return r1, r2


# ---------------------------------------------------------------------------------
# the write path: a plain INSERT into messages
# ---------------------------------------------------------------------------------

def test_plain_insert_updates_last_message_unread_and_collapses(conn):
    a, b, c = touch(conn, "Ana", "Bob", "Cy")
    conv = create(conn, a, [a, b, c])["conversation"]["id"]

    m1 = insert_message(conn, conv, b, "Hello")
    last_id, last_at, msg_at = rows(
        conn, "select c.last_message_id, c.last_message_at, m.created_at "
              "from conversations c join messages m on m.id = c.last_message_id "
              "where c.id = %s", conv)[0]
    assert last_id == m1 and last_at == msg_at

    assert participant(conn, conv, a)[0] == 1
    assert participant(conn, conv, b)[0] == 0          # not the sender
    assert participant(conn, conv, c)[0] == 1

    m2 = insert_message(conn, conv, b, "Second")
    assert m2 > m1
    assert one(conn, "select last_message_id from conversations where id = %s", conv) == m2
    assert participant(conn, conv, a)[0] == 2

    # one collapsed unread new_message per other participant, updated in place
    notes = rows(conn, "select user_id, id, count, payload from notifications "
                       "where conversation_id = %s and type = 'new_message' and read_at is null "
                       "order by user_id", conv)
    assert sorted(n[0] for n in notes) == sorted([a, c])
    for _, _, count, payload in notes:
        assert count == 2
        assert payload["message"] == {"id": m2, "content": "Second"}
        assert payload["from_user"] == {"id": b, "username": "Bob"}
        assert payload["conversation_id"] == conv

    me = call_json(conn, "select parley_me(%s)", a)
    assert me == {"user": {"id": a, "name": "Ana"}, "unread_messages": 2,
                  "unread_notifications": 1}


def test_only_a_senders_rename_moves_the_names_version(conn):
    """Kept latest pages show senders' names, so renaming someone who has
    sent moves parley_names.version (their stamp); renaming someone who has
    not (a first connect replacing a placeholder name, the usual rename)
    does not, or every first connect would queue on that one row."""
    a, b = touch(conn, "Ana", "Bob")
    conv = create(conn, a, [a, b])["conversation"]["id"]
    version = "select version from parley_names"
    before = one(conn, version)
    one(conn, "select parley_touch_user(%s, 'Bob B.')", b)
    assert one(conn, version) == before
    insert_message(conn, conv, b, "hi")
    one(conn, "select parley_touch_user(%s, 'Bob C.')", b)
    assert one(conn, version) == before + 1


def test_system_message_counts_for_everyone(conn):
    a, b = touch(conn, "Ana", "Bob")
    conv = create(conn, None, [a, b], system="Chat is now active")
    assert conv["created"] is True
    last = conv["conversation"]["last_message"]
    assert last["message_type"] == "SYSTEM"
    assert last["sender_id"] is None and last["sender_name"] is None
    assert last["content"] == last["message_text"] == "Chat is now active"
    cid = conv["conversation"]["id"]
    assert participant(conn, cid, a)[0] == 1 and participant(conn, cid, b)[0] == 1
    frames = [json.loads(r[0]) for r in rows(
        conn, "select parley_notification_frame(id) from notifications "
              "where conversation_id = %s order by user_id", cid)]
    assert len(frames) == 2
    assert all(f["from_user"] is None for f in frames)


def test_insert_works_whatever_the_writers_search_path(pg, conn):
    a, b = touch(conn, "Ana", "Bob")
    conv = create(conn, a, [a, b])["conversation"]["id"]
    schema = one(conn, "select current_schema()")
    other = connect(pg, autocommit=True)
    try:
        # another program, another search_path: the triggers still find their tables
        one(other, "set search_path = pg_catalog")
        one(other, 'insert into "%s".messages (conversation_id, sender_id, content) '
                   "values (%%s, %%s, 'hi')" % schema, conv, b)
    finally:
        other.close()
    assert participant(conn, conv, a)[0] == 1
    assert one(conn, "select count(*) from notifications where user_id = %s", a) == 1


def test_reads_see_a_touch_in_the_same_statement(conn):
    uid = new_id()
    me = call_json(conn, "select parley_me(%s) from parley_touch_user(%s, %s)",
                   uid, uid, "Fresh Name")
    assert me["user"] == {"id": uid, "name": "Fresh Name"}
    call_json(conn, "select parley_me(%s) from parley_touch_user(%s, %s)", uid, uid, "New")
    assert one(conn, "select name from users where id = %s", uid) == "New"


def test_insert_rejects_non_participant_and_unknown_conversation(conn):
    a, b, outsider = touch(conn, "Ana", "Bob", "Eve")
    conv = create(conn, a, [a, b])["conversation"]["id"]
    expect_px(conn, 403, "forbidden",
              "insert into messages (conversation_id, sender_id, content) values (%s, %s, 'x')",
              conv, outsider)
    expect_px(conn, 404, "not_found",
              "insert into messages (conversation_id, sender_id, content) values (%s, %s, 'x')",
              -1, a)
    assert one(conn, "select count(*) from messages where conversation_id = %s", conv) == 0


def test_ids_grow_in_commit_order(pg, conn):
    a, b = touch(conn, "Ana", "Bob")
    conv = create(conn, a, [a, b])["conversation"]["id"]
    first = connect(pg)
    second = connect(pg)
    try:
        m1 = insert_message(first, conv, a, "one")
        # the second writer starts now but must wait for the first to commit ...
        box = run_in_thread(insert_message, second, conv, b, "two")
        wait_blocked(conn, second.get_backend_pid())
        # ... so a message the first writes meanwhile still gets a smaller id
        m2 = insert_message(first, conv, a, "three")
        first.commit()
        m3 = finish(box)
        second.commit()
        assert m1 < m2 < m3
    finally:
        first.close()
        second.close()
    ids = [r[0] for r in rows(conn, "select id from messages where conversation_id = %s "
                                    "order by created_at, id", conv)]
    assert ids == sorted(ids) == [m1, m2, m3]


# ---------------------------------------------------------------------------------
# parley_post_message: idempotency
# ---------------------------------------------------------------------------------

POST = "select parley_post_message(%s, %s, %s, %s, %s::jsonb, %s)"


def test_post_message_is_idempotent_and_detects_conflicts(conn, listener):
    a, b = touch(conn, "Ana", "Bob")
    conv = create(conn, a, [a, b])["conversation"]["id"]
    meta = json.dumps({"lat": 1.5, "lng": 2})

    first = call_json(conn, POST, conv, a, "LOCATION", "here", meta, "c-1")
    assert first["status"] == "created"
    msg = first["message"]
    assert set(msg) == {"id", "conversation_id", "sender_id", "sender_name", "message_text",
                        "content", "message_type", "metadata", "client_id", "timestamp",
                        "created_at", "is_read"}
    assert msg["sender_id"] == a and msg["sender_name"] == "Ana"
    assert msg["metadata"] == {"lat": 1.5, "lng": 2}
    assert msg["client_id"] == "c-1" and msg["is_read"] is False
    assert msg["timestamp"] == msg["created_at"]
    assert len(msg["created_at"]) == 24 and msg["created_at"].endswith("Z")

    again = call_json(conn, POST, conv, a, "LOCATION", "here", meta, "c-1")
    assert again == {"status": "duplicate", "message": msg}

    expect_px(conn, 409, "conflict", POST, conv, a, "LOCATION", "elsewhere", meta, "c-1")
    expect_px(conn, 409, "conflict", POST, conv, a, "LOCATION", "here",
              json.dumps({"lat": 0, "lng": 0}), "c-1")
    # the same client_id is another sender's own key
    other = call_json(conn, POST, conv, b, "TEXT", "hi", None, "c-1")
    assert other["status"] == "created"

    assert one(conn, "select count(*) from messages where conversation_id = %s", conv) == 2
    assert participant(conn, conv, b)[0] == 1        # the repeat bumped nothing
    events = [e for e in listener.collect() if e[0] in "mM" and e[2] == conv]
    assert [e[1] for e in events] == [msg["id"], other["message"]["id"]]


def test_post_message_access(conn):
    a, b, outsider = touch(conn, "Ana", "Bob", "Eve")
    conv = create(conn, a, [a, b])["conversation"]["id"]
    expect_px(conn, 404, "not_found", POST, conv, outsider, "TEXT", "x", None, None)
    expect_px(conn, 404, "not_found", POST, -5, a, "TEXT", "x", None, None)
    system = call_json(conn, POST, conv, None, "SYSTEM", "note", None, None)
    assert system["message"]["message_type"] == "SYSTEM"
    assert system["message"]["sender_id"] is None


def test_concurrent_identical_sends_store_one_row(pg, conn):
    a, b = touch(conn, "Ana", "Bob")
    conv = create(conn, a, [a, b])["conversation"]["id"]
    r1, r2 = race(pg, conn,
                  lambda c: json.loads(one(c, POST, conv, a, "TEXT", "same", None, "dup-1")),
                  lambda c: json.loads(one(c, POST, conv, a, "TEXT", "same", None, "dup-1")))
    assert r1["status"] == "created" and r2["status"] == "duplicate"
    assert r1["message"]["id"] == r2["message"]["id"]
    assert one(conn, "select count(*) from messages where conversation_id = %s", conv) == 1
    assert participant(conn, conv, b)[0] == 1


# ---------------------------------------------------------------------------------
# conversations: get-or-create
# ---------------------------------------------------------------------------------

def test_get_or_create_on_member_set_and_context(conn):
    a, b, c = touch(conn, "Ana", "Bob", "Cy")
    first = create(conn, a, [{"id": a, "role": "client"}, {"id": b, "role": "pro"}],
                   title="Job", kind="job", ref="42", system="active")
    assert first["created"] is True
    conv = first["conversation"]
    assert conv["title"] == "Job" and conv["context"] == {"kind": "job", "ref": "42"}
    assert {p["id"]: p["role"] for p in conv["participants"]} == {a: "client", b: "pro"}
    assert set(conv) == {"id", "title", "context", "participants", "last_message",
                         "unread_count", "muted", "updated_at"}

    # other order, other title and roles, same key: the same conversation, no new message
    again = create(conn, b, [b, a], title="Other", kind="job", ref="42", system="active")
    assert again["created"] is False
    assert again["conversation"]["id"] == conv["id"]
    assert again["conversation"]["title"] == "Job"
    assert one(conn, "select count(*) from messages where conversation_id = %s",
               conv["id"]) == 1

    no_context = create(conn, a, [a, b])
    assert no_context["created"] is True and no_context["conversation"]["context"] is None
    assert create(conn, a, [b, a])["conversation"]["id"] == no_context["conversation"]["id"]
    other_ref = create(conn, a, [a, b], kind="job", ref="43")
    assert other_ref["created"] is True
    bigger = create(conn, a, [a, b, c], kind="job", ref="42")
    assert bigger["created"] is True

    # unknown users are fine, and get a default name
    stranger = new_id("new")
    made = create(conn, None, [a, stranger])
    names = {p["id"]: p["name"] for p in made["conversation"]["participants"]}
    assert names[stranger] == f"user {stranger}"

    expect_px(conn, 400, "invalid_payload",
              "select parley_create_conversation(%s, '[]'::jsonb, null, null, null, null)", a)
    expect_px(conn, 400, "invalid_payload",
              "select parley_create_conversation(%s, %s::jsonb, null, null, null, null)",
              a, json.dumps([{"id": "x" * 65}]))


def test_concurrent_creates_make_one_conversation(pg, conn):
    a, b = touch(conn, "Ana", "Bob")
    ref = uuid.uuid4().hex
    r1, r2 = race(pg, conn, lambda c: create(c, a, [a, b], kind="job", ref=ref),
                  lambda c: create(c, b, [b, a], None, "job", ref))
    assert r1["created"] is True and r2["created"] is False
    assert r1["conversation"]["id"] == r2["conversation"]["id"]
    assert one(conn, "select count(*) from conversations where context_ref = %s", ref) == 1


def test_list_conversations_cursor(conn):
    a, *others = touch(conn, "Ana", "B1", "B2", "B3", "B4", "B5")
    convs = [create(conn, a, [a, o])["conversation"]["id"] for o in others]
    insert_message(conn, convs[0], a, "bump")       # most recent activity now
    seen, cursor = [], None
    while True:
        page = call_json(conn, "select parley_list_conversations(%s, %s, %s)", a, 2, cursor)
        seen += [c["id"] for c in page["conversations"]]
        cursor = page["next_before"]
        if cursor is None:
            break
    assert seen[0] == convs[0]
    assert sorted(seen) == sorted(convs) and len(seen) == len(convs)
    expect_px(conn, 400, "invalid_payload",
              "select parley_list_conversations(%s, 20, 'garbage')", a)


# ---------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------

def test_mark_read_never_moves_back(conn, listener):
    a, b = touch(conn, "Ana", "Bob")
    conv = create(conn, a, [a, b])["conversation"]["id"]
    ids = [insert_message(conn, conv, b, f"m{i}") for i in range(3)]
    note = one(conn, "select id from notifications where user_id = %s and conversation_id = %s",
               a, conv)

    r = call_json(conn, "select parley_mark_read(%s, %s, %s)", conv, a, ids[1])
    assert r == {"unread_count": 1, "message_id": ids[1], "moved": True}
    r = call_json(conn, "select parley_mark_read(%s, %s, %s)", conv, a, ids[0])
    assert r == {"unread_count": 1, "message_id": ids[1], "moved": False}
    # beyond the latest is clamped; null means the latest
    r = call_json(conn, "select parley_mark_read(%s, %s, %s)", conv, a, ids[2] + 10**9)
    assert r == {"unread_count": 0, "message_id": ids[2], "moved": True}
    assert participant(conn, conv, a)[:2] == (0, ids[2])
    r = call_json(conn, "select parley_mark_read(%s, %s, null)", conv, a)
    assert r["moved"] is False

    events = [e for e in listener.collect() if (e[0] == "e" and e[2] == conv) or e[3] == a]
    receipts = [json.loads(e[4]) for e in events if e[0] == "e"]
    assert [x["message_id"] for x in receipts] == [ids[1], ids[2]]
    assert receipts[0]["type"] == "read_receipt" and receipts[0]["user_id"] == a
    assert all(e[3] == "" for e in events if e[0] == "e")   # the reader's sockets too
    # the conversation's new_message notification was read on the first move
    reads = [json.loads(e[4]) for e in events if e[0] == "r"]
    assert reads == [{"type": "notifications_read", "ids": [note], "unread_notifications": 0}]
    assert one(conn, "select read_at is not null from notifications where id = %s", note)

    # the message is now read by everyone but its sender
    assert [r[0] for r in rows(conn, "select is_read from parley_history(%s, %s, null, null, 10)",
                               conv, b)] == [True, True, True]
    expect_px(conn, 404, "not_found", "select parley_mark_read(%s, %s, null)",
              conv, new_id("nobody"))


def test_mark_read_racing_a_send_keeps_unread_exact(pg, conn):
    a, b = touch(conn, "Ana", "Bob")
    conv = create(conn, a, [a, b])["conversation"]["id"]
    old = insert_message(conn, conv, b, "old")
    # The send is not committed when the read runs: the read covers what was
    # committed, and waits on the new_message notification the send updated.
    m, r = race(pg, conn, lambda c: insert_message(c, conv, b, "new"),
                lambda c: json.loads(one(c, "select parley_mark_read(%s, %s, null)", conv, a)))
    assert r == {"unread_count": 0, "message_id": old, "moved": True}
    # the racing message stays unread, and so does the notification standing for it
    assert participant(conn, conv, a)[:2] == (1, old)
    assert rows(conn, "select (payload->'message'->>'id')::bigint, read_at is null "
                      "from notifications where user_id = %s and conversation_id = %s",
                a, conv) == [(m, True)]
    # a read after the commit covers it
    r = json.loads(one(conn, "select parley_mark_read(%s, %s, null)", conv, a))
    assert r == {"unread_count": 0, "message_id": m, "moved": True}
    assert participant(conn, conv, a)[:2] == (0, m)


def test_mark_read_racing_own_send_keeps_unread_exact(pg, conn):
    a, b = touch(conn, "Ana", "Bob")
    conv = create(conn, a, [a, b])["conversation"]["id"]
    first = insert_message(conn, conv, b, "hi")
    read = "select parley_mark_read(%s, %s, null)"
    # a's send holds a's participant row (its read count): the read waits for it
    m, r = race(pg, conn, lambda c: insert_message(c, conv, a, "mine"),
                lambda c: json.loads(one(c, read, conv, a)))
    assert r == {"unread_count": 0, "message_id": m, "moved": True}
    # a read holding the row: a's send waits, then adds to what the read wrote
    insert_message(conn, conv, b, "again")
    r, m2 = race(pg, conn, lambda c: json.loads(one(c, read, conv, a)),
                 lambda c: insert_message(c, conv, a, "mine too"))
    assert r["unread_count"] == 0 and r["message_id"] > m
    assert participant(conn, conv, a)[0] == 0
    assert participant(conn, conv, b)[0] == 2 and m2 > first


def hold_fanout(pg, conv):
    """A connection holding conv's drain lock (the server runs its own drains
    on this database: this keeps them off conv until the connection closes;
    drains on this connection still work, the lock being its own)."""
    c = connect(pg, autocommit=True)
    one(c, "select pg_advisory_lock(hashtext('parley-fanout'), parley_conversation_key(%s))", conv)
    return c


def drained(conn, conv, timeout=10):
    """Wait until conv has nothing queued (the server's drain, or ours)."""
    deadline = time.monotonic() + timeout
    while one(conn, "select count(*) from parley_fanout where conversation_id = %s", conv):
        assert time.monotonic() < deadline, "the queue was never drained"
        one(conn, "select parley_fanout_drain()")
        time.sleep(0.05)


def test_big_conversation_queues_its_notifications_for_the_drain(pg, conn, listener):
    members = touch(conn, *["M%d" % i for i in range(40)])
    a, b, c = members[:3]
    conv = create(conn, a, members)["conversation"]["id"]
    assert one(conn, "select parley_fanout_inline_max()") < len(members)
    holder = hold_fanout(pg, conv)
    try:
        m1 = insert_message(conn, conv, a, "one")
        m2 = insert_message(conn, conv, b, "two")
        # stored and delivered, counted unread, but no notification yet:
        # queued, and an 'f' note wakes the servers
        assert participant(conn, conv, c)[0] == 2
        assert one(conn, "select count(*) from notifications where conversation_id = %s",
                   conv) == 0
        assert rows(conn, "select first_id, last_id from parley_fanout "
                          "where conversation_id = %s order by id", conv) == [(m1, m1), (m2, m2)]
        kinds = [e[0] for e in listener.collect()]
        assert "m" in kinds and "f" in kinds
        # c has read everything already: the drain gives c one already read
        one(conn, "select parley_mark_read(%s, %s, null)", conv, c)
        assert one(holder, "select parley_fanout_drain()") is True
    finally:
        holder.close()
    assert one(conn, "select count(*) from parley_fanout where conversation_id = %s",
               conv) == 0
    got = dict((u, (n, p, r)) for u, n, p, r in rows(
        conn, "select user_id, count, (payload->'message'->>'id')::bigint, "
              "read_at is not null from notifications where conversation_id = %s", conv))
    assert got[a] == (1, m2, False) and got[b] == (1, m1, False)
    assert got[members[5]] == (2, m2, False)
    assert got[c] == (2, m2, True) and len(got) == len(members)


def test_fanout_drain_never_holds_up_a_sender(pg, conn):
    members = touch(conn, *["N%d" % i for i in range(40)])
    conv = create(conn, members[0], members)["conversation"]["id"]
    drain = hold_fanout(pg, conv)
    sender = connect(pg, autocommit=True)
    try:
        insert_message(conn, conv, members[0], "queued")
        # a drain in progress holds the queued rows; a send must not wait
        one(drain, "begin")
        assert one(drain, "select parley_fanout_drain()") is True
        one(sender, "set statement_timeout = '5s'")
        late = insert_message(sender, conv, members[1], "while draining")
        assert one(sender, "select parley_fanout_drain()") is False   # busy
        one(drain, "commit")
    finally:
        drain.close()
        sender.close()
    drained(conn, conv)
    assert rows(conn, "select count, (payload->'message'->>'id')::bigint "
                      "from notifications where conversation_id = %s and user_id = %s",
                conv, members[2]) == [(2, late)]


def test_a_read_and_a_drain_at_once_leave_no_read_message_notified(pg, conn):
    """The drain writes a big conversation's notifications from a snapshot:
    a read committed after it was taken, and before the drain's commit,
    found nothing to mark and left the drain's notification unread for a
    message already read. Each now waits for the other."""
    members = touch(conn, *["D%d" % i for i in range(40)])
    a, c = members[:2]
    conv = create(conn, a, members)["conversation"]["id"]
    read = "select parley_mark_read(%s, %s, null)"
    holder = hold_fanout(pg, conv)
    reader = connect(pg)
    try:
        # the drain first: the read waits for its commit, then marks it
        m1 = insert_message(conn, conv, a, "one")
        one(holder, "begin")
        assert one(holder, "select parley_fanout_drain()") is True
        box = run_in_thread(lambda r: call_json(r, read, conv, c), reader)
        wait_blocked(conn, reader.get_backend_pid())
        one(holder, "commit")
        assert finish(box)["message_id"] == m1
        reader.commit()
        # the read first: the drain waits for it, then writes the one it
        # would have notified as read
        m2 = insert_message(conn, conv, a, "two")
        assert call_json(reader, read, conv, c)["message_id"] == m2
        box = run_in_thread(lambda h: one(h, "select parley_fanout_drain()"), holder)
        wait_blocked(conn, holder.get_backend_pid())
        reader.commit()
        assert finish(box) is True
    finally:
        holder.close()
        reader.close()
    assert rows(conn, "select (payload->'message'->>'id')::bigint, read_at is not null "
                      "from notifications where conversation_id = %s and user_id = %s "
                      "order by id", conv, c) == [(m1, True), (m2, True)]
    assert one(conn, "select parley_unread_notifications(%s)", c) == 0


def test_a_batch_one_by_one_takes_a_readers_locks_in_its_order(pg, conn):
    """A batch the single insert refuses goes one send at a time: a send to
    b, then b's own, locked b's notification and then b's participant row;
    a read (parley_mark_read: the row, then the notification) in between
    deadlocked with it. The batch now locks its senders' rows first."""
    a, b = touch(conn, "Ana", "Bob")
    conv, other = [create(conn, a, [a, b], kind="job", ref=str(i))["conversation"]["id"]
                   for i in range(2)]
    insert_message(conn, conv, a, "unread by b")
    items = [{"c": conv, "s": a, "t": "TEXT", "b": "to b"},
             {"c": conv, "s": b, "t": "TEXT", "b": "from b"},
             {"c": other, "s": a, "t": "BOGUS", "b": "goes one by one"}]
    reader, writer = connect(pg), connect(pg)
    try:
        # a read's steps, the row first
        one(reader, "select 1 from participants where conversation_id = %s "
                    "and user_id = %s for update", conv, b)
        box = run_in_thread(lambda w: batch(w, "parley_post_messages", items), writer)
        wait_blocked(conn, writer.get_backend_pid())
        one(reader, "set local lock_timeout = '3s'")
        one(reader, "update notifications set read_at = now() where user_id = %s "
                    "and conversation_id = %s and read_at is null", b, conv)
        reader.commit()
        got = finish(box)
        writer.commit()
    finally:
        reader.close()
        writer.close()
    assert [got[i][0] for i in range(3)] == [200, 200, 400]
    assert rows(conn, "select content from messages where conversation_id = %s "
                      "order by id", conv) == [("unread by b",), ("to b",), ("from b",)]


def history_page(conn, *args):
    """parley_history's page: (ids oldest first, has_more)."""
    got = rows(conn, "select id, extra from parley_history(%s, %s, %s, %s, %s)", *args)
    assert [r[0] for r in got] == sorted(r[0] for r in got)
    return [r[0] for r in got if not r[1]], any(r[1] for r in got)


def test_history_pages_and_sync(conn):
    a, b = touch(conn, "Ana", "Bob")
    conv = create(conn, a, [a, b])["conversation"]["id"]
    ids = [insert_message(conn, conv, a if i % 2 else b, f"m{i}") for i in range(7)]

    assert history_page(conn, conv, a, None, None, 3) == (ids[4:], True)
    assert history_page(conn, conv, a, ids[4], None, 3) == (ids[1:4], True)
    assert history_page(conn, conv, a, ids[1], None, 3) == (ids[:1], False)
    assert history_page(conn, conv, a, None, ids[0], 3) == (ids[1:4], True)
    assert history_page(conn, conv, a, None, ids[3], 3) == (ids[4:], False)
    assert history_page(conn, conv, a, ids[5], ids[0], 10) == (ids[1:5], False)
    assert history_page(conn, conv, None, None, None, 100) == (ids, False)
    expect_px(conn, 404, "not_found", "select * from parley_history(%s, %s, %s, %s, %s)",
              conv, new_id("nobody"), None, None, 3)
    # The reader check runs before the page is read: an empty page is no answer.
    empty = create(conn, a, [a, b], kind="job", ref=new_id())["conversation"]["id"]
    assert history_page(conn, empty, a, None, None, 3) == ([], False)
    assert history_page(conn, empty, None, None, 0, 3) == ([], False)
    for who, where in ((new_id("nobody"), empty), (a, empty + 1000000),
                       (None, empty + 1000000)):
        expect_px(conn, 404, "not_found", "select * from parley_history(%s, %s, %s, %s, %s)",
                  where, who, None, None, 3)

    # A socket's sync is a service-style page after an id.
    assert history_page(conn, conv, None, None, ids[2], 3) == (ids[3:6], True)
    live = json.loads(one(conn, "select parley_message_frame(%s)", ids[3]))
    assert "replay" not in live
    assert live["message"] == one(conn, "select parley_message_json(%s::bigint)", ids[3])


def test_ready_unread_and_mute(conn, listener):
    a, b = touch(conn, "Ana", "Bob")
    conv = create(conn, a, [a, b])["conversation"]["id"]
    assert call_json(conn, "select parley_conversation_ready(%s, %s)", conv, a) == \
        {"last_message_id": None, "unread_count": 0}
    expect_px(conn, 404, "not_found", "select parley_conversation_ready(%s, %s)",
              conv, new_id("nobody"))

    muted = call_json(conn, "select parley_set_muted(%s, %s, true)", conv, a)
    assert muted["muted"] is True
    m = insert_message(conn, conv, b, "psst")
    # muted: counted in the conversation, not in the totals, and no new_message
    assert call_json(conn, "select parley_conversation_ready(%s, %s)", conv, a) == \
        {"last_message_id": m, "unread_count": 1}
    assert call_json(conn, "select parley_unread(%s)", a) == \
        {"total": 0, "conversations": [{"id": conv, "unread_count": 1, "muted": True}]}
    assert one(conn, "select count(*) from notifications where user_id = %s", a) == 0
    assert not [e for e in listener.collect() if e[0] in "nN" and e[3] == a]


# ---------------------------------------------------------------------------------
# notifications
# ---------------------------------------------------------------------------------

def test_notification_type_and_payload_rules(conn):
    u = new_id()
    with pytest.raises(psycopg2.errors.CheckViolation):
        one(conn, "insert into notifications (user_id, type) values (%s, 'Bad-Type')", u)
    with pytest.raises(psycopg2.errors.CheckViolation):
        one(conn, "insert into notifications (user_id, type, payload) "
                  "values (%s, 'ok', '[1]')", u)
    post = "select parley_post_notification(%s, %s, %s::jsonb)"
    for bad_type in ["Friend", "a b", "x" * 65, "", "new\n"]:
        expect_px(conn, 400, "invalid_payload", post, u, bad_type, "{}")
    for bad_payload in ['[]', '"x"', '{"id": 1}', '{"type": "x"}', '{"replay": true}',
                        json.dumps({"blob": "x" * 9000})]:
        expect_px(conn, 400, "invalid_payload", post, u, "ok", bad_payload)
    assert one(conn, "select count(*) from notifications where user_id = %s", u) == 0

    note = call_json(conn, post, u, "friend.accepted_2", '{"from_user": {"id": "7"}}')
    assert note["type"] == "friend.accepted_2" and note["read"] is False
    assert note["from_user"] == {"id": "7"} and isinstance(note["id"], int)


def test_notifications_push_list_and_read(conn, listener):
    u = new_id()
    online(conn, u, "Maria")
    payload = {"from_user": {"id": "7", "username": "maria"}}
    posted = call_json(conn, "select parley_post_notification(%s, 'friend_request', %s::jsonb)",
                       u, json.dumps(payload))
    one(conn, "insert into notifications (user_id, type, payload) "
              "values (%s, 'match', '{\"score\": 3}')", u)       # another program's insert

    events = [e for e in listener.collect() if e[3] == u]
    assert [e[0] for e in events] == ["n", "n"]
    first = json.loads(events[0][4])
    assert events[0][1] == posted["id"] and events[0][2] == 0
    assert first == {k: v for k, v in posted.items() if k != "read"}
    assert json.loads(events[1][4])["score"] == 3

    listed = call_json(conn, "select parley_list_notifications(%s, 1, null, false)", u)
    assert listed["has_more"] is True and listed["notifications"][0]["type"] == "match"
    assert call_json(conn, "select parley_read_notification(%s, %s)", u, posted["id"]) == \
        {"unread_notifications": 1}
    unread = call_json(conn, "select parley_list_notifications(%s, 10, null, true)", u)
    assert [n["type"] for n in unread["notifications"]] == ["match"]
    expect_px(conn, 404, "not_found", "select parley_read_notification(%s, %s)",
              new_id(), posted["id"])
    assert call_json(conn, "select parley_read_all_notifications(%s)", u) == \
        {"unread_notifications": 0}
    reads = [json.loads(e[4]) for e in listener.collect() if e[0] == "r" and e[3] == u]
    assert reads == [
        {"type": "notifications_read", "ids": [posted["id"]], "unread_notifications": 1},
        {"type": "notifications_read", "ids": "all", "unread_notifications": 0}]

    replay = rows(conn, "select id, frame from parley_notification_sync(%s, 0, 10)", u)
    assert [json.loads(f)["replay"] for _, f in replay] == [True, True]
    assert call_json(conn, "select parley_notify_ready(%s)", u) == \
        {"unread_notifications": 0, "unread_messages": 0}


def test_updates_push_only_rows_whose_visible_fields_changed(conn, listener):
    """The UPDATE trigger pushes unread rows whose type, payload, count or
    created_at changed, and nothing else, also right after an empty UPDATE
    (a plan kept from such a call once served every 1,000-row drain)."""
    u = new_id()
    online(conn, u, "Maria")
    ids = [one(conn, "insert into notifications (user_id, type, payload) "
                     "values (%s, 'match', %s::jsonb) returning id", u, json.dumps({"n": i}))
           for i in range(6)]
    listener.collect()

    one(conn, "update notifications set count = count + 1 where false returning 1")
    one(conn, "update notifications set payload = case when id = any (%s) "
              "then payload || '{\"x\": 1}' else payload end, "
              "read_at = case when id = %s then now() end "
              "where user_id = %s returning 1",
        ids[:3], ids[1], u)
    pushed = [e[1] for e in listener.collect() if e[0] == "n" and e[3] == u]
    assert pushed == [ids[0], ids[2]]          # ids[1] was read, 3-5 unchanged


def test_disabled_types_are_stored_not_pushed(conn, listener):
    a, b = touch(conn, "Ana", "Bob")
    conv = create(conn, a, [a, b])["conversation"]["id"]
    prefs = call_json(conn, "select parley_set_preferences(%s, %s::jsonb)",
                      a, '["new_message", "promo", "promo"]')
    assert prefs == {"disabled_types": ["new_message", "promo"]}
    assert call_json(conn, "select parley_get_preferences(%s)", a) == prefs
    expect_px(conn, 400, "invalid_payload", "select parley_set_preferences(%s, %s::jsonb)",
              a, '["Bad"]')

    insert_message(conn, conv, b, "hi")
    assert one(conn, "select count(*) from notifications where user_id = %s "
                     "and type = 'new_message'", a) == 0
    call_json(conn, "select parley_post_notification(%s, 'promo', '{}')", a)
    assert one(conn, "select count(*) from notifications where user_id = %s "
                     "and type = 'promo'", a) == 1
    assert not [e for e in listener.collect() if e[0] in "nN" and e[3] == a]


def test_new_message_frame_and_collapse_events(conn, listener):
    a, b = touch(conn, "Ana", "Bob")
    conv = create(conn, a, [a, b])["conversation"]["id"]
    m1 = insert_message(conn, conv, b, "one")
    m2 = insert_message(conn, conv, b, "two")
    events = listener.collect()

    msgs = [e for e in events if e[0] == "m" and e[2] == conv]
    assert [(e[1], e[3]) for e in msgs] == [(m1, ""), (m2, "")]
    frame = json.loads(msgs[1][4])
    assert frame == json.loads(one(conn, "select parley_message_frame(%s)", m2))
    assert frame["type"] == "message" and frame["message"]["content"] == "two"

    notes = [e for e in events if e[0] == "n" and e[3] == a]
    assert len(notes) == 2 and notes[0][1] == notes[1][1]      # same id, sent again
    assert all(e[2] == 0 for e in notes)
    live = json.loads(notes[1][4])
    assert live["type"] == "new_message" and live["id"] == notes[1][1]
    assert live["conversation_id"] == conv
    assert live["from_user"] == {"id": b, "username": "Bob"}
    assert live["message"] == {"id": m2, "content": "two"}
    assert live["count"] == 2 and live["unread_count"] == 2 and live["total_unread"] == 2
    assert set(live) == {"type", "id", "created_at", "conversation_id", "from_user",
                         "message", "count", "unread_count", "total_unread"}
    assert not [e for e in events if e[0] in "nN" and e[3] == b]   # not to the sender


def test_no_push_without_a_notification_socket(conn, listener):
    a, b = new_id(), new_id()
    one(conn, "select parley_touch_user(%s, 'Offline')", a)
    one(conn, "select parley_touch_user(%s, 'Bob')", b)
    conv = create(conn, b, [a, b])["conversation"]["id"]
    insert_message(conn, conv, b, "while you were away")
    call_json(conn, "select parley_post_notification(%s, 'promo', '{}')", a)
    events = listener.collect()
    assert [e[0] for e in events if e[2] == conv] == ["m"]
    assert not [e for e in events if e[0] in "nN" and e[3] == a]
    # Stored all the same, for the ready totals and sync.
    assert one(conn, "select count(*) from notifications where user_id = %s", a) == 2


def test_large_events_go_by_reference(conn, listener):
    a, b = touch(conn, "Ana", "Bob")
    conv = create(conn, a, [a, b])["conversation"]["id"]
    big = "é" * 4000                                  # 8000 bytes
    m = insert_message(conn, conv, b, big)
    events = listener.collect()
    ref = [e for e in events if e[2] == conv and e[0] in "mM"]
    assert ref == [("M", m, conv, "", "")]
    frame = json.loads(one(conn, "select parley_message_frame(%s)", m))
    assert frame["message"]["content"] == big
    note = [e for e in events if e[3] == a and e[0] in "nN"]
    assert len(note) == 1 and note[0][0] == "N" and note[0][4] == ""
    full = json.loads(one(conn, "select parley_notification_frame(%s)", note[0][1]))
    assert full["message"]["content"] == big


def test_typing_and_presence_events(conn, listener):
    a, b = touch(conn, "Ana", "Bob")
    conv = create(conn, a, [a, b])["conversation"]["id"]
    one(conn, "select parley_emit_typing(%s, %s, true)", conv, a)
    one(conn, "select parley_emit_presence(%s, %s, 'online')", conv, b)
    events = [e for e in listener.collect() if e[0] == "e" and e[2] == conv]
    assert [(e[1], e[3]) for e in events] == [(0, a), (0, b)]       # the actor is excluded
    assert json.loads(events[0][4]) == {"type": "typing", "conversation_id": conv,
                                        "user_id": a, "username": "Ana", "is_typing": True}
    assert json.loads(events[1][4]) == {"type": "presence", "conversation_id": conv,
                                        "user_id": b, "status": "online"}


# ---------------------------------------------------------------------------------
# presence: socket opens and closes racing each other
# ---------------------------------------------------------------------------------

def presence_events(listener, conv):
    return [json.loads(e[4])["status"] for e in listener.collect()
            if e[0] == "e" and e[2] == conv and json.loads(e[4])["type"] == "presence"]


def chat_open(conn, conv, uid, socket_id, node="sql-rules-node"):
    return one(conn, "select parley_chat_open(%s, %s, %s, %s, 'Ana', 1000)",
               node, socket_id, conv, uid)


def test_two_tabs_closing_at_once_make_one_offline(pg, conn, listener):
    a, b = touch(conn, "Ana", "Bob")
    conv = create(conn, a, [a, b])["conversation"]["id"]
    tabs = [next(SOCKETS), next(SOCKETS)]
    for t in tabs:
        chat_open(conn, conv, a, t)
    assert presence_events(listener, conv) == ["online"]
    # the first close is not committed when the second runs: without a
    # per-user lock each saw the other tab still open and nobody went offline
    close = "select parley_sockets_close(%s::jsonb)"
    race(pg, conn, lambda c: one(c, close, json.dumps([{"n": "sql-rules-node", "s": tabs[0]}])),
         lambda c: one(c, close, json.dumps([{"n": "sql-rules-node", "s": tabs[1]}])))
    assert presence_events(listener, conv) == ["offline"]
    assert one(conn, "select parley_user_online(%s, %s)", conv, a) is False


def test_a_close_and_a_stopping_node_do_not_deadlock(pg, conn, listener):
    """A worker that stops forgets its node's sockets (users locked first)
    while its last close may still be in flight: a close that deleted its
    socket and then waited for the user deadlocked with it."""
    a, b = touch(conn, "Ana", "Bob")
    conv = create(conn, a, [a, b])["conversation"]["id"]
    node, tab = "stopping-node", next(SOCKETS)
    chat_open(conn, conv, a, tab, node=node)
    conn.commit()
    forget, closer = connect(pg), connect(pg)
    try:
        one(forget, "set deadlock_timeout = '100ms'")
        one(forget, "select parley_user_lock(%s)", a)     # forget's first step
        one(closer, "set deadlock_timeout = '100ms'")
        box = run_in_thread(lambda c: one(c, "select parley_sockets_close(%s::jsonb)",
                                          json.dumps([{"n": node, "s": tab}])), closer)
        wait_blocked(conn, closer.get_backend_pid())
        one(forget, "set local lock_timeout = '3s'")
        one(forget, "select parley_nodes_forget(array[%s])", node)
        forget.commit()
        finish(box)
        closer.commit()
    finally:
        forget.close()
        closer.close()
    assert one(conn, "select count(*) from parley_sockets where node = %s", node) == 0
    assert presence_events(listener, conv) == ["online", "offline"]


def test_closes_in_one_call_each_send_what_one_would(pg, conn, listener):
    a, b, c = touch(conn, "Ana", "Bob", "Cy")
    conv = create(conn, a, [a, b, c])["conversation"]["id"]
    a_tabs = [next(SOCKETS), next(SOCKETS)]
    b_tab, c_tab = next(SOCKETS), next(SOCKETS)
    for t in a_tabs:
        chat_open(conn, conv, a, t)
    chat_open(conn, conv, b, b_tab)
    chat_open(conn, conv, c, c_tab)
    one(conn, "select parley_emit_typing(%s, %s, true)", conv, b)
    listener.collect()
    # both of a's tabs, b's (typing) and a socket that is not there: one
    # offline each for a and b, b's typing ended, c untouched
    one(conn, "select parley_sockets_close(%s::jsonb)", json.dumps(
        [{"n": "sql-rules-node", "s": t, "t": t == b_tab} for t in a_tabs + [b_tab, 10 ** 15]]))
    events = [json.loads(e[4]) for e in listener.collect() if e[0] == "e" and e[2] == conv]
    assert sorted((e["type"], e["user_id"], e.get("status", e.get("is_typing")))
                  for e in events) == sorted([("presence", a, "offline"),
                                              ("presence", b, "offline"),
                                              ("typing", b, False)])
    assert one(conn, "select parley_user_online(%s, %s)", conv, c) is True
    assert one(conn, "select count(*) from parley_sockets where socket_id = any(%s)",
               a_tabs + [b_tab]) == 0


def test_opens_in_one_call_are_answered_each(conn, listener):
    a, b, c = touch(conn, "Ana", "Bob", "Cy")
    conv = create(conn, a, [a, b])["conversation"]["id"]
    node = "sql-rules-node"
    items = [{"n": node, "s": next(SOCKETS), "c": conv, "u": b, "m": "Bob", "x": 5},
             {"n": node, "s": next(SOCKETS), "c": conv, "u": c, "m": "Cy", "x": 5},
             {"n": node, "s": next(SOCKETS), "u": c, "m": "Cy", "x": 5},
             {"n": node, "s": next(SOCKETS), "c": conv, "u": a, "m": "Ana", "x": 0}]
    got = {i: (st, body, code) for i, st, body, code, _ in rows(
        conn, "select * from parley_sockets_open(%s::jsonb)", json.dumps(items))}
    assert sorted(got) == [0, 1, 2, 3]
    # b's chat socket and c's notification socket open; c is no participant
    # (404) and a is over the cap (429), and neither undoes the others
    assert got[0][0] == 200 and json.loads(got[0][1])["online"] == [b]
    assert got[1][:1] + got[1][2:] == (404, "not_found")
    assert got[2][0] == 200 and json.loads(got[2][1])["type"] == "ready"
    assert got[3][:1] + got[3][2:] == (429, "too_many_connections")
    assert presence_events(listener, conv) == ["online"]
    assert one(conn, "select count(*) from parley_sockets where user_id = any(%s)",
               [a, b, c]) == 2 + 3          # touch() opened a socket for each


def test_two_tabs_opening_at_once_make_one_online(pg, conn, listener):
    a, b = touch(conn, "Ana", "Bob")
    conv = create(conn, a, [a, b])["conversation"]["id"]
    _, ready = race(pg, conn, lambda c: chat_open(c, conv, a, next(SOCKETS)),
                    lambda c: json.loads(chat_open(c, conv, a, next(SOCKETS))))
    assert presence_events(listener, conv) == ["online"]
    assert ready["online"] == [a]


def test_a_dead_node_sends_each_user_offline_once(conn, listener):
    a, b = touch(conn, "Ana", "Bob")
    conv = create(conn, a, [a, b])["conversation"]["id"]
    node = "sql-rules-dead-" + uuid.uuid4().hex[:8]
    for _ in range(3):
        chat_open(conn, conv, a, next(SOCKETS), node)
    chat_open(conn, conv, b, next(SOCKETS), node)
    assert presence_events(listener, conv) == ["online", "online"]
    one(conn, "update parley_nodes set seen_at = now() - interval '1 hour' where node = %s",
        node)
    one(conn, "select parley_node_alive('sql-rules-node')")
    assert sorted(presence_events(listener, conv)) == ["offline", "offline"]
    assert one(conn, "select count(*) from parley_sockets where node = %s", node) == 0
    assert one(conn, "select count(*) from parley_nodes where node = %s", node) == 0


# ---------------------------------------------------------------------------------
# write batches (sql/007_batch.sql) and multi-row inserts: one statement, the
# effects of one insert per message
# ---------------------------------------------------------------------------------

def batch(conn, fn, items):
    """{idx: (status, body or None, code)} of one batch call."""
    got = rows(conn, f"select idx, status, body, code from {fn}(%s::jsonb)",
               json.dumps(items))
    return {i: (s, json.loads(b) if b else None, c) for i, s, b, c in got}


def test_multi_row_insert_has_the_effects_of_one_insert_per_message(conn, listener):
    a, b, c = touch(conn, "Ana", "Bob", "Cy")
    one_conv = create(conn, a, [a, b, c])["conversation"]["id"]
    other = create(conn, a, [a, b])["conversation"]["id"]
    with conn.cursor() as cur:
        cur.execute("insert into messages (conversation_id, sender_id, content) "
                    "values (%s, %s, 'one'), (%s, %s, 'two'), (%s, %s, 'three'), "
                    "(%s, %s, 'four') returning id",
                    (one_conv, b, one_conv, c, other, a, one_conv, b))
        ids = [r[0] for r in cur.fetchall()]
    assert ids == sorted(ids)
    last = {conv: one(conn, "select last_message_id from conversations where id = %s", conv)
            for conv in (one_conv, other)}
    assert last == {one_conv: ids[3], other: ids[2]}
    assert [participant(conn, one_conv, u)[0] for u in (a, b, c)] == [3, 1, 2]
    assert [participant(conn, other, u)[0] for u in (a, b)] == [0, 1]
    notes = {(n[0], n[1]): (n[2], n[3]["message"]["id"]) for n in rows(
        conn, "select user_id, conversation_id, count, payload from notifications "
              "where conversation_id in (%s, %s) and type = 'new_message'", one_conv, other)}
    # per recipient: how many messages from others, and the latest of them
    assert notes == {(a, one_conv): (3, ids[3]), (b, one_conv): (1, ids[1]),
                     (c, one_conv): (2, ids[3]), (b, other): (1, ids[2])}
    events = [e for e in listener.collect() if e[0] == "m" and e[2] in (one_conv, other)]
    assert [e[1] for e in events] == ids
    frames = [json.loads(e[4])["message"] for e in events]
    assert [(f["content"], f["sender_name"], f["is_read"]) for f in frames] == \
        [("one", "Bob", False), ("two", "Cy", False), ("three", "Ana", False),
         ("four", "Bob", False)]


@pytest.mark.parametrize("fn", ["parley_post_messages_together", "parley_post_messages"])
def test_a_batch_answers_each_send(conn, listener, fn):
    a, b, eve = touch(conn, "Ana", "Bob", "Eve")
    convs = [create(conn, a, [a, b], kind="job", ref=str(i))["conversation"]["id"]
             for i in range(5)]
    alone = create(conn, a, [a])["conversation"]["id"]
    earlier = call_json(conn, POST, convs[3], a, "TEXT", "kept", None, "k-1")["message"]
    earlier2 = call_json(conn, POST, convs[4], a, "TEXT", "kept", None, "k-2")["message"]
    items = [{"c": convs[0], "s": b, "t": "TEXT", "b": "plain"},
             {"c": convs[1], "s": a, "t": "LOCATION", "b": "here",
              "m": {"lat": 1}, "k": "new"},
             {"c": convs[2], "s": eve, "t": "TEXT", "b": "intruder"},
             {"c": convs[3], "s": a, "t": "TEXT", "b": "kept", "k": "k-1"},
             {"c": convs[4], "s": a, "t": "TEXT", "b": "changed", "k": "k-2"},
             {"c": alone, "s": a, "t": "TEXT", "b": "to myself"}]
    got = batch(conn, fn, items)

    assert sorted(got) == list(range(6))
    assert [got[i][0] for i in range(6)] == [200, 200, 404, 200, 409, 200]
    assert [got[i][1]["status"] for i in (0, 1, 5)] == ["created"] * 3
    assert [got[i][2] for i in (2, 4)] == ["not_found", "conflict"]
    # an ack: the id and timestamp of the stored message, the repeat's the first one's
    assert got[3][1] == {"status": "duplicate", "message_id": earlier["id"],
                         "timestamp": earlier["timestamp"]}
    created = [got[i][1]["message_id"] for i in (0, 1, 5)]
    events = {e[1]: json.loads(e[4])["message"] for e in listener.collect()
              if e[0] == "m" and e[2] in convs + [alone]}
    # one live frame per stored message: none for the repeat, conflict or refusal
    assert sorted(events) == sorted(created + [earlier["id"], earlier2["id"]])
    frames = [events[m] for m in created]
    assert [f["timestamp"] for f in frames] == [got[i][1]["timestamp"] for i in (0, 1, 5)]
    assert [(f["content"], f["sender_name"], f["message_type"], f["metadata"], f["is_read"])
            for f in frames] == [("plain", "Bob", "TEXT", None, False),
                                 ("here", "Ana", "LOCATION", {"lat": 1}, False),
                                 ("to myself", "Ana", "TEXT", None, True)]  # nobody else
    for f in frames:
        assert one(conn, "select parley_message_json(%s)", f["id"]) == f
    assert [participant(conn, c, a)[0] for c in convs] == [1, 0, 0, 0, 0]
    assert one(conn, "select count(*) from messages where conversation_id = any(%s)",
               convs) == 4


def test_a_batch_the_single_insert_refuses_goes_one_by_one(conn):
    a, b = touch(conn, "Ana", "Bob")
    convs = [create(conn, a, [a, b], kind="job", ref=str(i))["conversation"]["id"]
             for i in range(2)]
    # the insert trigger refuses an unknown type: the whole statement fails
    bad = [{"c": convs[0], "s": a, "t": "TEXT", "b": "fine"},
           {"c": convs[1], "s": a, "t": "BOGUS", "b": "refused"}]
    expect_px(conn, 400, "invalid_payload",
              "select * from parley_post_messages_together(%s::jsonb)", json.dumps(bad))
    got = batch(conn, "parley_post_messages", bad)
    assert got[0][0] == 200 and got[0][1]["status"] == "created"
    assert one(conn, "select content from messages where id = %s",
               got[0][1]["message_id"]) == "fine"
    assert got[1] == (400, None, "invalid_payload")
    # several sends of one conversation: ids in batch order, one update per row
    several = [{"c": convs[1], "s": a, "t": "TEXT", "b": "first"},
               {"c": convs[0], "s": b, "t": "TEXT", "b": "elsewhere"},
               {"c": convs[1], "s": b, "t": "TEXT", "b": "second"},
               {"c": convs[1], "s": a, "t": "TEXT", "b": "third"}]
    got = batch(conn, "parley_post_messages_together", several)
    ids = {i: got[i][1]["message_id"] for i in got}
    contents = {i: one(conn, "select content from messages where id = %s", ids[i])
                for i in ids}
    assert contents == {0: "first", 1: "elsewhere", 2: "second", 3: "third"}
    assert ids[0] < ids[2] < ids[3]
    assert [participant(conn, convs[1], u)[0] for u in (a, b)] == [1, 2]
    assert one(conn, "select last_message_id from conversations where id = %s",
               convs[1]) == ids[3]
