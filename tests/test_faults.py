"""Faults: PostgreSQL restarted, backends killed, the database stopped, with
sockets open and sends in flight (PROTOCOL.md section 2 "Delivery
guarantees", section 6; DESIGN.md: the bus catches up after it reconnects).

Each test runs its own throwaway cluster and its own two-worker server on it,
so stopping the database never disturbs the session fixtures. Afterwards the
server log must show no crashed worker (Server.problems()) and the worker
pids must be the ones it started with.
"""

import contextlib
import os
import signal
import threading
import time

import pytest
import requests

from helpers import (api, create_conversation, kill_parley_backends,
                     make_token, message_ids, messages_stored, metrics, new_id,
                     parley_cut_off, sql_one, sql_rows, wait_for)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def send_until_acked(ws, content, client_id, deadline):
    """Send; on `internal` re-send the same client_id until acked.
    Returns (ack, number of internal errors seen)."""
    errors = 0
    while True:
        ws.send({"type": "message", "content": content,
                 "client_id": client_id})
        f = ws.recv_until(lambda f: f["type"] in ("ack", "error") and
                          f.get("client_id", f.get("ref")) == client_id,
                          timeout=max(deadline - time.time(), 1))
        if f["type"] == "ack":
            return f, errors
        assert f["code"] == "internal", f
        errors += 1
        assert time.time() < deadline, "never acked: %r" % f
        time.sleep(0.1)


def exactly_once_in_order(ws, expected, conn, conv, sender, iso=None):
    """The socket had every expected id once, in id order, and nothing
    else: a sentinel written after them is the next message. On a miss
    the server's bus log lines are shown."""
    try:
        got = message_ids(ws, len(expected))
    except TimeoutError:
        got = [f["message"]["id"] for f in ws.frames
               if f["type"] == "message"]
        raise AssertionError("missing %s of %d (got %d)%s" % (
            sorted(set(expected) - set(got)), len(expected), len(got),
            "" if iso is None else "\nserver log (bus lines):\n" +
            "\n".join(l for l in iso.srv.output().splitlines()
                      if "bus:" in l)))
    assert got == sorted(expected), (got, sorted(expected))
    sentinel = sql_one(conn, "INSERT INTO messages (conversation_id, "
                       "sender_id, content) VALUES (%s, %s, 'sentinel') "
                       "RETURNING id", conv, sender)
    got = message_ids(ws, len(expected) + 1)
    assert got == sorted(expected) + [sentinel], got


def seen(ws, pred, timeout=15):
    """The first frame the socket has had, or gets, that matches pred."""
    for f in ws.frames:
        if pred(f):
            return f
    return ws.recv_until(pred, timeout)


def sql_message(conn, conv, sender, content):
    """A message written with SQL, as another program would: its id."""
    return sql_one(conn, "INSERT INTO messages (conversation_id, sender_id, "
                   "content) VALUES (%s, %s, %s) RETURNING id",
                   conv, sender, content)


@contextlib.contextmanager
def pool_stopped(iso, conn):
    """Every worker's pooled connections stop answering (SIGSTOP of their
    backends; with PARLEY_DB_POOL=1 one per worker). The LISTEN
    connections, whose pings name them, go on."""
    pool = [r[0] for r in sql_rows(
        conn, "SELECT pid FROM pg_stat_activity WHERE application_name = "
        "'parley' AND query NOT LIKE '%%LISTEN parley%%'")]
    assert len(pool) == len(iso.pids), pool
    for pid in pool:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pool:
            os.kill(pid, signal.SIGCONT)


def on_every_worker(iso, conn, user, open_socket, conv=None):
    """Sockets of user, opened with open_socket() until every worker holds
    one (Kore hands each new connection to one worker or the other): chat
    sockets of conv, or notification sockets when conv is None."""
    workers = {str(p) for p in iso.pids}
    socks, held = [], set()
    while held != workers and len(socks) < 40:
        socks.append(open_socket())
        time.sleep(0.05)
        held = {r[0] for r in sql_rows(
            conn, "SELECT split_part(node, '-', 1) FROM parley_sockets WHERE "
            "user_id = %s AND conversation_id IS NOT DISTINCT FROM %s",
            user, conv)}
    assert held == workers, held
    return socks


@contextlib.contextmanager
def functions_away(conn, *signatures):
    """The given SQL functions ("name(types)") renamed to name_away until
    the block ends: every call of them fails, as a bug or a timeout would."""
    cur = conn.cursor()
    for sig in signatures:
        cur.execute("ALTER FUNCTION %s RENAME TO %s_away" %
                    (sig, sig.split("(")[0]))
    try:
        yield
    finally:
        for sig in signatures:
            name, args = sig.split("(", 1)
            cur.execute("ALTER FUNCTION %s_away(%s RENAME TO %s" %
                        (name, args, name))


def chat_on_every_worker(iso, conn):
    """A two-person conversation and its first user's chat sockets on every
    worker: (user, other user, conversation, sockets)."""
    a, b = new_id(), new_id()
    conv = create_conversation(conn, [a, b])
    socks = on_every_worker(iso, conn, a, lambda: iso.chat(conv, a, "Ann"),
                            conv)
    return a, b, conv, socks


def listening_backends_killed(conn):
    """Terminate every worker's LISTEN backend (waiting until each is
    gone); the pools go on. How many there were."""
    return sql_one(conn, "SELECT count(*) FROM (SELECT pg_terminate_backend("
                   "pid, 5000) FROM pg_stat_activity WHERE application_name "
                   "= 'parley' AND query LIKE '%%LISTEN parley%%') t")


@contextlib.contextmanager
def listen_cut_off(iso, conn):
    """Every worker's LISTEN connection killed, and none back (the role
    may not log in) until the block ends, its pool connections untouched;
    then every worker listening again."""
    listening = iso.srv.output().count("bus: listening")
    sql_one(conn, "ALTER ROLE CURRENT_USER NOLOGIN")
    try:
        assert listening_backends_killed(conn) == len(iso.pids)
        yield
    finally:
        sql_one(conn, "ALTER ROLE CURRENT_USER LOGIN")
    wait_for(lambda: iso.srv.output().count("bus: listening") >=
             listening + len(iso.pids), 30, 0.1, "every worker listening again")


@contextlib.contextmanager
def sql_function_wrapped(conn, name, params, returns, body, *args):
    """The SQL function name(params) replaced, until the block ends, by a
    PL/pgSQL one: body (its %s filled with args), which may call the
    real one as name_real."""
    types = ", ".join(p.split()[1] for p in params.split(", "))
    cur = conn.cursor()
    cur.execute("ALTER FUNCTION %s(%s) RENAME TO %s_real" % (name, types, name))
    cur.execute("CREATE FUNCTION %s(%s) RETURNS %s LANGUAGE plpgsql AS $$ %s $$"
                % (name, params, returns, body), args)
    try:
        yield
    finally:
        cur.execute("DROP FUNCTION %s(%s)" % (name, types))
        cur.execute("ALTER FUNCTION %s_real(%s) RENAME TO %s" % (name, types, name))


def replays_slowed(conn, conv, seconds):
    """Replays (sync) of conv answered `seconds` after their page was read:
    a socket replaying meanwhile stays behind that long."""
    return sql_function_wrapped(
        conn, "parley_history", "p_conversation bigint, p_viewer text, "
        "p_before bigint, p_after bigint, p_limit integer",
        "TABLE (id bigint, conversation_id bigint, sender_id text, "
        "sender_name text, content text, type text, metadata text, "
        "client_id text, ts text, is_read boolean, extra boolean)", """
        BEGIN
            RETURN QUERY SELECT * FROM parley_history_real(p_conversation,
                p_viewer, p_before, p_after, p_limit);
            IF p_conversation = %s AND p_viewer IS NULL THEN
                PERFORM pg_sleep(%s);
            END IF;
        END""", conv, seconds)


def opens_slowed(conn, user, seconds, before_read=False):
    """A chat socket of user answered `seconds` after its ready frame was
    read; or, before_read, its ready frame read `seconds` late (what is
    stored meanwhile is older than it)."""
    real = ("parley_chat_open_real(p_node, p_socket, p_conv, p_user, "
            "p_name, p_max)")
    pause = "IF p_user = %s THEN PERFORM pg_sleep(%s); END IF;"
    if before_read:
        body = "BEGIN %s RETURN %s; END" % (pause, real)
    else:
        body = "DECLARE v text := %s; BEGIN %s RETURN v; END" % (real, pause)
    return sql_function_wrapped(
        conn, "parley_chat_open", "p_node text, p_socket bigint, "
        "p_conv bigint, p_user text, p_name text, p_max integer", "text",
        body, user, seconds)


def stored(conn, conv):
    return sql_rows(conn, "SELECT client_id, id FROM messages WHERE "
                    "conversation_id = %s ORDER BY id", conv)


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------

def test_postgres_restart_mid_stream(isolated):
    iso = isolated()
    conn = iso.connect()
    a, b = new_id(), new_id()
    conv = create_conversation(conn, [a, b])
    wa = iso.chat(conv, a, "Ann")
    wb = iso.chat(conv, b, "Bob")
    notif = iso.ws("/ws/notifications/", make_token(b, "Bob"))
    assert notif.recv()["type"] == "ready"

    deadline = time.time() + 60
    acked = []
    for i in range(5):
        acked.append(send_until_acked(wa, "before %d" % i, "pre-%d" % i,
                                      deadline)[0]["message_id"])
    assert message_ids(wb, 5) == acked

    conn.close()
    iso.pg.restart()
    conn = iso.connect()

    # written while the workers may not have their LISTEN back yet: the
    # catch-up after the bus reconnects delivers them
    for i in range(3):
        acked.append(sql_message(conn, conv, a, "by sql %d" % i))
    # the sockets stayed open through the restart
    for w in (wa, wb, notif):
        w.send({"type": "ping"})
        w.recv_type("pong")

    iso.wait_ready()
    # sent at once, while a worker's LISTEN may still be down: messages and
    # notifications alike come through its catch-up
    for i in range(5):
        acked.append(send_until_acked(wa, "after %d" % i, "post-%d" % i,
                                      deadline)[0]["message_id"])
    exactly_once_in_order(wb, acked, conn, conv, a, iso)
    # the sender's own socket had them all as well
    got = message_ids(wa, len(acked))
    assert sorted(set(got)) == got and set(acked) <= set(got)

    # notifications keep flowing after the restart
    notif.recv_until(lambda f: f["type"] == "new_message" and
                     f["message"]["content"] == "after 4", timeout=15)

    # a client reconnecting with `after` gets everything, once
    late = iso.chat(conv, b, "Bob", after=0)
    replay = []
    while True:
        f = late.recv()
        if f["type"] == "synced":
            break
        if f["type"] == "message":
            replay.append(f["message"]["id"])
    assert set(acked) <= set(replay) and replay == sorted(set(replay))
    assert [r[0] for r in stored(conn, conv)].count("post-0") == 1
    assert len(stored(conn, conv)) == len(replay)
    iso.assert_workers_alive()


def test_backend_killed_during_send_stream(isolated):
    # rate limits are not the subject here
    iso = isolated(PARLEY_RATE_MESSAGES="100000")
    conn = iso.connect()
    senders = [new_id() for _ in range(3)]
    reader = new_id()
    conv = create_conversation(conn, senders + [reader])
    wr = iso.chat(conv, reader, "Reader")
    per_sender = 150
    acks = {}
    internal = [0]
    failures = []

    def sender(uid):
        try:
            w = iso.chat(conv, uid)
            deadline = time.time() + 90
            for i in range(per_sender):
                cid = "%s-%d" % (uid, i)
                ack, errors = send_until_acked(w, "msg " + cid, cid, deadline)
                acks[cid] = ack["message_id"]
                internal[0] += errors
                w.frames.clear()
        except Exception as e:  # reported below
            failures.append((uid, repr(e)))

    threads = [threading.Thread(target=sender, args=(u,)) for u in senders]
    for t in threads:
        t.start()

    killer_conn = iso.pg.connect()
    kills = 0
    try:
        # kill every parley backend (pool and LISTEN) while sends stream
        while any(t.is_alive() for t in threads) and kills < 8:
            time.sleep(0.2)
            kills += kill_parley_backends(killer_conn) > 0
    finally:
        for t in threads:
            t.join()
        killer_conn.close()
    assert not failures, failures
    assert kills >= 3, "the stream ended before the backends were killed"

    rows = stored(conn, conv)
    total = len(senders) * per_sender
    # nothing stored twice; every ack names the stored row of its client_id
    assert len(rows) == total
    assert dict(rows) == acks
    # the reader got each message once, in order, through bus reconnects
    exactly_once_in_order(wr, list(acks.values()), conn, conv, senders[0],
                          iso)
    iso.assert_workers_alive()
    print("internal errors answered and re-sent: %d; kill rounds: %d" %
          (internal[0], kills))


def test_sql_writes_while_bus_reconnects_are_delivered(isolated):
    """Kill every parley backend (the pool and the LISTEN connection) and
    write a message with SQL right away, twenty times: each is committed while
    the workers' LISTEN is down or coming back, so only the catch-up after
    the bus reconnects can deliver it. Every one must reach the reader,
    once and in order."""
    iso = isolated()
    conn = iso.connect()
    a, b = new_id(), new_id()
    conv = create_conversation(conn, [a, b])
    wb = iso.chat(conv, b, "Bob")
    wa = iso.chat(conv, a, "Ann")
    written = []
    for i in range(20):
        kill_parley_backends(conn)
        written.append(sql_message(conn, conv, a, "round %d" % i))
        # the workers are back before the next round
        iso.wait_ready()
        wait_for(lambda: sql_one(conn, "SELECT count(*) FROM "
                                 "pg_stat_activity WHERE application_name "
                                 "= 'parley' AND query ILIKE '%%LISTEN%%'")
                 >= 2, 15, 0.05, "both workers listening again")
    for w in (wb, wa):
        exactly_once_in_order(w, written, conn, conv, a, iso)
        written.append(max(message_ids(w, len(written) + 1)))
    iso.assert_workers_alive()


def test_notifications_while_bus_reconnects_are_delivered(isolated):
    """Kill every parley backend, then, while the workers' LISTEN is down,
    store a notification, collapse a new_message and read an older
    notification with SQL: every notification socket of the user, on both
    workers, gets all three once the bus is back (its catch-up covers what
    changed since its last ping), and live pushes flow again after it."""
    iso = isolated()
    conn = iso.connect()
    a, b = new_id(), new_id()
    conv = create_conversation(conn, [a, b])
    def notification_socket():
        w = iso.ws("/ws/notifications/", make_token(b, "Bob"))
        assert w.recv()["type"] == "ready"
        return w

    socks = on_every_worker(iso, conn, b, notification_socket)

    post = "SELECT parley_post_notification(%s, %s, '{}')::json->>'id'"
    old = int(sql_one(conn, post, b, "friend_request"))
    sql_message(conn, conv, a, "one")
    for w in socks:
        seen(w, lambda f: f["type"] == "friend_request" and f["id"] == old)
        seen(w, lambda f: f["type"] == "new_message" and f["count"] == 1)

    listening = iso.srv.output().count("bus: listening")
    with parley_cut_off(conn):
        new = int(sql_one(conn, post, b, "match"))
        last = sql_message(conn, conv, a, "two")
        sql_one(conn, "SELECT parley_read_notification(%s, %s)", b, old)
    unread = sql_one(conn, "SELECT count(*) FROM notifications WHERE "
                     "user_id = %s AND read_at IS NULL", b)
    wait_for(lambda: iso.srv.output().count("bus: listening") >=
             listening + len(iso.pids), 30, 0.1, "every worker listening again")

    for w in socks:
        seen(w, lambda f: f["type"] == "match" and f["id"] == new)
        collapsed = seen(w, lambda f: f["type"] == "new_message" and
                         f["count"] == 2)
        assert collapsed["message"]["id"] == last, collapsed
        read = seen(w, lambda f: f["type"] == "notifications_read")
        assert old in read["ids"] and new not in read["ids"], read
        assert read["unread_notifications"] == unread, read

    after = int(sql_one(conn, post, b, "friend_accepted"))
    for w in socks:
        seen(w, lambda f: f["type"] == "friend_accepted" and f["id"] == after)
    iso.assert_workers_alive()


def test_read_receipts_while_bus_reconnects_are_delivered(isolated):
    """A conversation read while the workers' LISTEN is down: the other
    participant's sockets, on both workers, get its read_receipt after the
    messages' catch-up once the bus is back."""
    iso = isolated()
    conn = iso.connect()
    a, b, conv, socks = chat_on_every_worker(iso, conn)
    first = sql_message(conn, conv, a, "one")
    for w in socks:
        assert message_ids(w, 1) == [first]

    listening = iso.srv.output().count("bus: listening")
    with parley_cut_off(conn):
        second = sql_message(conn, conv, a, "two")
        sql_one(conn, "SELECT parley_mark_read(%s, %s, NULL)", conv, b)
    wait_for(lambda: iso.srv.output().count("bus: listening") >=
             listening + len(iso.pids), 30, 0.1, "every worker listening again")

    for w in socks:
        receipt = seen(w, lambda f: f["type"] == "read_receipt")
        assert (receipt["user_id"], receipt["message_id"]) == (b, second)
        got = [f["message"]["id"] for f in w.frames if f["type"] == "message"]
        assert got == [first, second], got
        # the receipt came after the message it refers to
        kinds = [f["type"] for f in w.frames if f["type"] in
                 ("message", "read_receipt")]
        assert kinds == ["message", "message", "read_receipt"], kinds
    iso.assert_workers_alive()


def test_presence_while_bus_reconnects_is_delivered(isolated):
    """A user who goes offline (here: the socket of another instance's node,
    written with SQL) while the workers' LISTEN is down: the other
    participant's sockets, on both workers, get a presence with the status
    now, after the messages' catch-up."""
    iso = isolated()
    conn = iso.connect()
    a, c, conv, socks = chat_on_every_worker(iso, conn)
    sql_one(conn, "SELECT parley_node_alive('elsewhere')")
    sql_one(conn, "SELECT parley_chat_open('elsewhere', 1, %s, %s, 'Cy', 32)",
            conv, c)
    for w in socks:
        seen(w, lambda f: f["type"] == "presence" and f["user_id"] == c and
             f["status"] == "online")

    listening = iso.srv.output().count("bus: listening")
    with parley_cut_off(conn):
        sql_one(conn, "SELECT parley_node_alive('elsewhere')")
        last = sql_message(conn, conv, a, "while c leaves")
        sql_one(conn, """SELECT parley_sockets_close('[{"n":"elsewhere","s":1}]')""")
    wait_for(lambda: iso.srv.output().count("bus: listening") >=
             listening + len(iso.pids), 30, 0.1, "every worker listening again")

    for w in socks:
        gone = seen(w, lambda f: f["type"] == "presence" and
                    f["user_id"] == c and f["status"] == "offline")
        assert gone == {"type": "presence", "conversation_id": conv,
                        "user_id": c, "status": "offline"}, gone
        kinds = [(f["type"], f.get("status")) for f in w.frames
                 if f["type"] in ("message", "presence")]
        # after the message written in the same window
        assert kinds.index(("message", None)) < \
            kinds.index(("presence", "offline")), kinds
        assert [f["message"]["id"] for f in w.frames
                if f["type"] == "message"][-1] == last
    iso.assert_workers_alive()


def test_listen_connection_that_stops_answering_is_replaced(isolated):
    """A LISTEN connection whose backend stops answering (stopped with
    SIGSTOP, as a network that silently drops packets would look) is
    replaced once a ping has gone unanswered for 15 s, and a message written
    meanwhile arrives through the catch-up."""
    iso = isolated()
    conn = iso.connect()
    a, b = new_id(), new_id()
    conv = create_conversation(conn, [a, b])
    wb = iso.chat(conv, b, "Bob")

    def listening():
        pids = [r[0] for r in sql_rows(
            conn, "SELECT pid FROM pg_stat_activity WHERE application_name "
            "= 'parley' AND query LIKE '%%LISTEN parley%%'")]
        return pids if len(pids) == len(iso.pids) else None

    listeners = wait_for(listening, 15, 0.1, "every worker listening")
    for pid in listeners:
        os.kill(pid, signal.SIGSTOP)
    try:
        written = sql_message(conn, conv, a, "while deaf")
        assert message_ids(wb, 1, timeout=40) == [written]
        # the other worker's connection times out on its own clock (the
        # sweep runs every second): it may log a moment later
        wait_for(lambda: iso.srv.output().count(
            "LISTEN connection stopped answering") == len(iso.pids),
            10, 0.1, "every worker's LISTEN connection replaced")
    finally:
        for pid in listeners:
            os.kill(pid, signal.SIGCONT)
    iso.assert_workers_alive()


def test_message_by_reference_is_fetched_again_after_a_failure(isolated):
    """A message too big for NOTIFY goes by reference, and each worker
    fetches it through its pool. When that fetch fails (here the pool's one
    backend stops answering, SIGSTOP, and is replaced after 15 s) it is
    retried, not dropped: the reader gets it, then the message written after
    it, in order."""
    iso = isolated(PARLEY_DB_POOL="1")
    conn = iso.connect()
    a, b = new_id(), new_id()
    conv = create_conversation(conn, [a, b])
    wb = iso.chat(conv, b, "Bob")
    with pool_stopped(iso, conn):
        big = sql_message(conn, conv, a, "\u00e9" * 4000)    # 8,000 bytes
        small = sql_message(conn, conv, a, "after it")
        assert message_ids(wb, 2, timeout=45) == [big, small]
    shown = [f["message"] for f in wb.frames if f["type"] == "message"]
    assert shown[0]["content"] == "\u00e9" * 4000
    iso.assert_workers_alive()


def refused_then_caught_up(iso, refuse, notes_closed):
    """refuse(conn, conv, sender, refused) makes the bus need a query that
    the database refuses every time, calls refused() while it still does,
    and returns the id of the message that only that query could deliver.
    The workers give it up after a few tries rather than hold the bus paused
    for good: the reader's sockets it was for, on every worker, are closed
    with 1013 try_again_later (its notification sockets too when
    notes_closed); coming back with `after` they get what they missed, and
    live events flow again."""
    conn = iso.connect()
    a, b = new_id(), new_id()
    conv = create_conversation(conn, [a, b])
    first = sql_message(conn, conv, a, "before")

    def chat():
        return iso.chat(conv, b, "Bob", after=first)

    def notification_socket():
        w = iso.ws("/ws/notifications/", make_token(b, "Bob"))
        assert w.recv()["type"] == "ready"
        return w

    chats = on_every_worker(iso, conn, b, chat, conv)
    notes = on_every_worker(iso, conn, b, notification_socket)
    time.sleep(2.5)     # a ping answered: a notification catch-up is owed
    gave_up = "refused, closing its sockets"
    expected = len(iso.pids) * (2 if notes_closed else 1)
    missed = refuse(conn, conv, a, lambda: wait_for(
        lambda: iso.srv.output().count(gave_up) >= expected, 30, 0.1,
        "every worker gave up"))
    for w in chats + (notes if notes_closed else []):
        assert w.expect_close(timeout=10) == (1013, "try_again_later")

    chats = on_every_worker(iso, conn, b, chat, conv)
    if notes_closed:
        notes = on_every_worker(iso, conn, b, notification_socket)
    for w in chats:
        assert message_ids(w, 1) == [missed]
    live = sql_message(conn, conv, a, "live")
    for w in chats:
        assert message_ids(w, 2) == [missed, live]
    for w in notes:
        seen(w, lambda f: f["type"] == "new_message" and
             f["message"]["id"] == live)
    iso.assert_workers_alive()


def test_catchup_the_database_refuses_closes_its_sockets(isolated):
    """The catch-up after the bus reconnects (its functions renamed away,
    as a statement timeout would fail them)."""
    def refuse(conn, conv, sender, refused):
        with functions_away(conn, "parley_catchup(bigint, bigint, integer)",
                            "parley_notification_catchup(jsonb, timestamptz)"):
            with parley_cut_off(conn):
                missed = sql_message(conn, conv, sender, "missed")
            refused()
        return missed

    refused_then_caught_up(isolated(), refuse, notes_closed=True)


def test_fetch_the_database_refuses_closes_its_sockets(isolated):
    """A message sent by reference (too big for NOTIFY) whose frame cannot
    be fetched: the conversation's sockets are closed; the notification
    sockets, which wait behind it meanwhile, are not."""
    def refuse(conn, conv, sender, refused):
        with functions_away(conn, "parley_message_frame(bigint)"):
            big = sql_message(conn, conv, sender, "\u00e9" * 4000)
            refused()
        return big

    refused_then_caught_up(isolated(), refuse, notes_closed=False)


def test_bus_queue_past_its_bound_is_caught_up_from_the_database(isolated):
    """While a frame sent by reference is fetched, the bus holds what comes
    after it. Past PARLEY_BUS_QUEUE_MAX notes a worker drops them and makes
    its LISTEN connection again; the catch-up that follows reads what was
    dropped from the database: memory stays bounded, nothing is lost, and
    the order holds."""
    iso = isolated(PARLEY_DB_POOL="1", PARLEY_BUS_QUEUE_MAX="100")
    conn = iso.connect()
    a, b, c = new_id(), new_id(), new_id()
    conv = create_conversation(conn, [a, b, c])
    wb = iso.chat(conv, b, "Bob")
    wn = iso.ws("/ws/notifications/", make_token(c, "Cy"))
    assert wn.recv()["type"] == "ready"
    with pool_stopped(iso, conn):
        # the fetch of `big` waits on the stopped pool; hundreds of notes
        # queue behind it (the messages, the collapsed notifications' updates)
        big = sql_message(conn, conv, a, "\u00e9" * 4000)
        ids = [big] + [sql_message(conn, conv, a, "m%d" % i)
                       for i in range(150)]
        wait_for(lambda: iso.srv.output().count("notes queued, dropping")
                 >= len(iso.pids), 20, 0.1, "every worker's queue dropped")
    assert message_ids(wb, len(ids), timeout=60) == ids
    assert metrics(iso.srv)["parley_bus_overflows_total"] >= len(iso.pids)
    # the notification socket sees the latest state: c's one unread
    # new_message notification standing for all 151 messages
    wn.recv_until(lambda f: f["type"] == "new_message" and
                  f["count"] == len(ids) and f["message"]["id"] == ids[-1],
                  timeout=30)
    iso.assert_workers_alive()


def test_socket_closed_while_cut_off_leaves_the_registry_later(isolated):
    """A socket closed while its worker cannot reach the database: the close
    is written once it can (retried with backoff), so its user does not stay
    online, nor count against the socket cap, for as long as the worker
    lives."""
    iso = isolated()
    conn = iso.connect()
    a, c = new_id(), new_id()
    conv = create_conversation(conn, [a, c])
    iso.chat(conv, a, "Ann")
    wc = iso.chat(conv, c, "Cy")
    registered = ("SELECT count(*) FROM parley_sockets WHERE user_id = %s "
                  "AND conversation_id = %s")
    assert sql_one(conn, registered, c, conv) == 1
    with parley_cut_off(conn):
        wc.close()
        time.sleep(1.5)         # the close is tried, and fails, meanwhile
        assert sql_one(conn, registered, c, conv) == 1
    wait_for(lambda: sql_one(conn, registered, c, conv) == 0, 30, 0.1,
             "the close written once the database is back")
    w = iso.ws("/ws/chat/%d/" % conv, make_token(a, "Ann"))
    ready = w.recv()
    assert ready["type"] == "ready" and ready["online"] == [a], ready
    iso.assert_workers_alive()


def test_open_whose_answer_was_lost_is_taken_out_again(isolated):
    """The connection carrying a socket's registration is lost after the
    database committed it: the socket is refused (try again), so the
    registration is taken out again; its user does not stay online."""
    iso = isolated(proxy=True)
    conn = iso.connect()
    a, c = new_id(), new_id()
    conv = create_conversation(conn, [a, c])
    wa = iso.chat(conv, a, "Ann")
    iso.proxy.lose_answer_to(b'"u":"%s"' % c.encode())
    wc = iso.ws("/ws/chat/%d/" % conv, make_token(c, "Cy"))
    assert wc.expect_close(timeout=20) == (1013, "try_again_later")
    assert iso.proxy.cut.is_set()

    def presence(status):
        return lambda f: (f["type"] == "presence" and f["user_id"] == c
                          and f["status"] == status)
    seen(wa, presence("online"))        # the registration did commit
    seen(wa, presence("offline"))
    wait_for(lambda: sql_one(conn, "SELECT count(*) FROM parley_sockets "
                             "WHERE user_id = %s", c) == 0, 15, 0.1,
             "the lost registration taken out")
    iso.chat(conv, c, "Cy")
    iso.assert_workers_alive()


def test_send_past_the_timeout_is_rolled_back_not_stored_later(isolated):
    """PARLEY_DB_TIMEOUT 3 s: the pool runs with a 2 s statement timeout,
    so a send PostgreSQL takes longer over (a trigger sleeps 4 s) is
    canceled and rolled back there: the socket's sender gets `internal`
    (the socket protocol's code for a database failure), a REST sender 503
    `unavailable`. Nothing commits afterwards behind those answers
    (without the statement timeout, Parley gave up at 3 s and the backend
    committed at 4 s); the same client_id then stores the message once."""
    iso = isolated(PARLEY_DB_TIMEOUT="3")
    conn = iso.connect()
    cur = conn.cursor()
    cur.execute("CREATE FUNCTION slow_insert() RETURNS trigger LANGUAGE "
                "plpgsql AS $$ BEGIN PERFORM pg_sleep(4); RETURN NEW; END $$")
    cur.execute("CREATE TRIGGER slow BEFORE INSERT ON messages FOR EACH ROW "
                "WHEN (NEW.content = 'slow') EXECUTE FUNCTION slow_insert()")
    a, b = new_id(), new_id()
    conv = create_conversation(conn, [a, b])
    wa = iso.chat(conv, a, "Ann")
    wa.send({"type": "message", "content": "slow", "client_id": "k1"})
    f = wa.recv_until(lambda f: f["type"] in ("ack", "error"), timeout=10)
    assert (f["type"], f["code"], f["message"]) == (
        "error", "internal", "the database took too long to answer"), f
    r = api(iso.srv, "POST", "/api/conversations/%d/messages" % conv,
            make_token(b), {"content": "slow"})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "unavailable", r.text
    assert iso.srv.output().count("query canceled") == 2
    time.sleep(3)                       # past the sleeping insert's end
    assert stored(conn, conv) == []

    cur.execute("DROP TRIGGER slow ON messages")
    ack, errors = send_until_acked(wa, "slow", "k1", time.time() + 10)
    assert errors == 0
    assert stored(conn, conv) == [("k1", ack["message_id"])]
    iso.assert_workers_alive()


def test_database_that_drops_packets_does_not_stall_the_workers(isolated):
    """The database becomes unreachable the way a lost route looks: its
    connections are cut and new ones get no answer at all (SYNs dropped).
    Every worker keeps answering its sockets (one used to block inside libpq
    for minutes, writing its startup packet to a TCP connect still under
    way), gives each connect attempt connect_timeout (3 s), and uses the
    database again once it answers."""
    iso = isolated(proxy=True)
    conn = iso.connect()
    a, b, conv, socks = chat_on_every_worker(iso, conn)
    with iso.proxy.unreachable():
        assert kill_parley_backends(conn, 5000) >= 2 * len(iso.pids)
        time.sleep(1)                   # every worker is connecting again
        for w in socks:
            w.send_raw("not json")
            f = w.recv_until(lambda f: f["type"] == "error", timeout=5)
            assert f["code"] == "invalid_json", f
        wait_for(lambda: iso.srv.output().count("connect timed out") >=
                 2 * len(iso.pids), 20, 0.2, "every connect given up")
    iso.wait_ready()
    ack, errors = send_until_acked(socks[0], "back", "k-back",
                                   time.time() + 20)
    assert stored(conn, conv) == [("k-back", ack["message_id"])]
    iso.assert_workers_alive()


def test_catch_up_of_a_socket_still_replaying_starts_at_its_after(isolated):
    """A chat socket opened with `after` whose replay failed (its client is
    to ask again) holds live frames back, but none up to its `after`: not
    the live frames of the 2,100 messages just stored, which may still be
    arriving (which would fill its held frames, 2,048, and close it 4029),
    and not a bus catch-up meanwhile (the LISTEN connection replaced): that
    is for live sockets. Its next sync gets what is new."""
    iso = isolated()
    conn = iso.connect()
    a, b = new_id(), new_id()
    conv = create_conversation(conn, [a, b])
    messages_stored(conn, conv, a, "old ", 2100)
    last = sql_one(conn, "SELECT max(id) FROM messages WHERE "
                   "conversation_id = %s", conv)
    with functions_away(conn, "parley_history(bigint, text, bigint, bigint, "
                        "integer)"):
        wb = iso.chat(conv, b, "Bob", after=last)
        f = wb.recv_until(lambda f: f["type"] == "error")
        assert f["message"] == "the replay failed; try again", f
    with listen_cut_off(iso, conn):
        pass
    new = sql_message(conn, conv, a, "new")
    wb.send({"type": "sync", "after": last})
    synced = wb.recv_type("synced", timeout=15)
    assert (synced["last_message_id"], synced["has_more"]) == (new, False)
    assert message_ids(wb, 1) == [new]
    iso.assert_workers_alive()


@pytest.mark.parametrize("slowed", ["open", "replay"])
def test_socket_answered_after_the_bus_came_back_gets_what_it_missed(
        isolated, slowed):
    """A chat socket's open (its ready frame's last_message_id) or replay
    from `after` (its page) has been read, the LISTEN connections go down,
    a message is stored and read, and they come back before it is
    answered: the bus catch-up is for live sockets, so the socket is caught
    up on its own from the ready frame's or the replay's last id before it
    goes live, and gets the message and the read receipt it would otherwise
    never see."""
    iso = isolated()
    conn = iso.connect()
    a, b = new_id(), new_id()
    conv = create_conversation(conn, [a, b])
    first = sql_message(conn, conv, a, "first")
    if slowed == "open":
        path, answer = "/ws/chat/%d/" % conv, "ready"
        held = opens_slowed(conn, b, 4)
    else:
        path, answer = "/ws/chat/%d/?after=%d" % (conv, first), "synced"
        held = replays_slowed(conn, conv, 5)
    with held:
        wb = iso.ws(path, make_token(b, "Bob"))
        time.sleep(1)                   # its ready frame or page is read
        with listen_cut_off(iso, conn):
            missed = sql_message(conn, conv, a, "while the bus was down")
            sql_one(conn, "SELECT parley_mark_read(%s, %s, NULL)", conv, a)
        got = wb.recv_type(answer, timeout=15)
    assert (got["last_message_id"], got.get("has_more", False)) == \
        (first, False), got
    assert message_ids(wb, 1, timeout=15) == [missed]
    receipt = seen(wb, lambda f: f["type"] == "read_receipt")
    assert (receipt["user_id"], receipt["message_id"]) == (a, missed), receipt
    iso.assert_workers_alive()


def test_socket_replaying_a_long_conversation_survives_the_bus_coming_back(
        isolated):
    """A chat socket replaying 2,100 messages from the start when the
    LISTEN connections come back: the bus catch-up took it for a socket
    with nothing (last id 0) and held the whole conversation for it, past
    the 2,048 frames a socket may hold: closed 4029. The catch-up leaves
    replaying sockets to themselves; it replays everything, the message
    stored while the bus was down included, once each."""
    iso = isolated()
    conn = iso.connect()
    a, b = new_id(), new_id()
    conv = create_conversation(conn, [a, b])
    messages_stored(conn, conv, a, "old ", 2100)
    with replays_slowed(conn, conv, 5):
        wb = iso.chat(conv, b, "Bob", after=0)
        time.sleep(1)
        with listen_cut_off(iso, conn):
            missed = sql_message(conn, conv, a, "while the bus was down")
        synced = wb.recv_type("synced", timeout=15)
    while synced["has_more"]:
        wb.send({"type": "sync", "after": synced["last_message_id"],
                 "limit": 500})
        synced = wb.recv_until(lambda f: f["type"] == "synced" and
                               f["last_message_id"] > synced["last_message_id"])
    stored_ids = [r[0] for r in sql_rows(conn, "SELECT id FROM messages WHERE "
                                         "conversation_id = %s ORDER BY id", conv)]
    assert len(stored_ids) == 2101 and stored_ids[-1] == missed
    assert message_ids(wb, 2101) == stored_ids
    iso.assert_workers_alive()


@pytest.mark.parametrize("after", [None, 0])
def test_socket_opening_while_thousands_of_messages_arrive_sheds_old_frames(
        isolated, after):
    """2,100 messages stored while a chat socket's open waits arrive live
    before its ready frame: more than the 2,048 frames a socket holds back,
    and all older than its ready frame. The oldest are shed instead of the
    socket being closed 4029 (they are in its replay, or before its start):
    with `after` it replays each message once, in order; without, it gets
    none of them and the next message live."""
    iso = isolated()
    conn = iso.connect()
    a, b = new_id(), new_id()
    conv = create_conversation(conn, [a, b])
    path = "/ws/chat/%d/" % conv + ("" if after is None else "?after=0")
    with opens_slowed(conn, b, 2, before_read=True):
        wb = iso.ws(path, make_token(b, "Bob"))
        time.sleep(0.5)                         # its open is waiting
        stored_ids = messages_stored(conn, conv, a, "m ", 2100)
        ready = wb.recv(timeout=15)
    assert ready["type"] == "ready", ready
    assert ready["last_message_id"] == stored_ids[-1]
    if after is None:
        new = sql_message(conn, conv, a, "after the open")
        assert message_ids(wb, 1) == [new]
    else:
        synced = wb.recv_type("synced", timeout=15)
        while synced["has_more"]:
            wb.send({"type": "sync", "after": synced["last_message_id"],
                     "limit": 500})
            synced = wb.recv_type("synced", timeout=15)
        assert len(stored_ids) == 2100
        assert message_ids(wb, 2100) == stored_ids
    iso.assert_workers_alive()


def test_socket_whose_held_frames_overflow_with_newer_messages_is_closed(
        isolated):
    """While a socket's replay waits, 2,100 messages newer than its page
    arrive live: more than the 2,048 frames it holds back, and not in its
    replay, so the ones shed are lost to it. It is closed 4029 when the
    replay ends rather than going live with a gap (its client reconnects
    with `after`)."""
    iso = isolated()
    conn = iso.connect()
    a, b = new_id(), new_id()
    conv = create_conversation(conn, [a, b])
    first = sql_message(conn, conv, a, "first")
    with replays_slowed(conn, conv, 3):
        wb = iso.chat(conv, b, "Bob", after=0)
        time.sleep(0.5)                         # its page is read
        messages_stored(conn, conv, a, "new ", 2100)
        assert wb.expect_close(timeout=15) == (4029, "slow_consumer")
    assert message_ids(wb, 1, timeout=0.1) == [first]
    iso.assert_workers_alive()


def test_socket_live_during_a_catch_up_gets_no_gap(isolated):
    """A bus catch-up pages through what its conversation's live sockets
    missed (500 a page). A socket whose open was answered between two pages
    has every message up to its ready frame's id; a page starting past that
    id would leave a gap: the socket took that page's messages, then skipped
    as old the live frames of the ones in between (here 500 messages lost).
    It takes no such page; they reach it live."""
    iso = isolated()
    conn = iso.connect()
    a, b, conv, socks = chat_on_every_worker(iso, conn)
    # page 1 (from before the outage) read late; page 3 (past the page the
    # new socket's ready frame ends) answered after that socket is live
    catchup_paced = sql_function_wrapped(
        conn, "parley_catchup", "p_conversation bigint, p_after bigint, "
        "p_limit integer", "TABLE (id bigint, frame text)", """
        DECLARE missed bigint := (SELECT max(m.id) FROM messages m
                                   WHERE m.conversation_id = %s
                                     AND m.content LIKE 'missed %%');
        BEGIN
            IF p_after < missed THEN
                PERFORM pg_sleep(3);
            ELSIF p_after > missed THEN
                PERFORM pg_sleep(6);
            END IF;
            RETURN QUERY SELECT * FROM parley_catchup_real(p_conversation,
                p_after, p_limit);
        END""", conv)
    with catchup_paced, opens_slowed(conn, b, 5):
        with listen_cut_off(iso, conn):
            messages_stored(conn, conv, a, "missed ", 500)
        missed_last = sql_one(conn, "SELECT max(id) FROM messages")
        wb = iso.ws("/ws/chat/%d/" % conv, make_token(b, "Bob"))
        time.sleep(0.5)                 # its ready frame is read
        messages_stored(conn, conv, a, "after ", 510)
        ready = wb.recv(timeout=15)
        assert (ready["type"], ready["last_message_id"]) == \
            ("ready", missed_last), ready
        after = [r[0] for r in sql_rows(
            conn, "SELECT id FROM messages WHERE conversation_id = %s "
            "AND id > %s ORDER BY id", conv, missed_last)]
        assert len(after) == 510
        assert message_ids(wb, 510, timeout=20) == after
    missed = [r[0] for r in sql_rows(
        conn, "SELECT id FROM messages WHERE conversation_id = %s ORDER BY id",
        conv)]
    for w in socks:
        assert message_ids(w, len(missed), timeout=20) == missed
    iso.assert_workers_alive()


def test_what_waits_on_the_bus_when_the_listen_is_lost_is_caught_up(isolated):
    """A read receipt queued behind the fetch of a big message when the
    LISTEN connection is lost: delivered after the catch-up of its return,
    it undid the newer receipt the catch-up sent (the reader's position went
    back). What waits is forgotten with the connection, and the catch-up
    reads it from the database."""
    iso = isolated()
    conn = iso.connect()
    a, b = new_id(), new_id()
    conv = create_conversation(conn, [a, b])
    wb = iso.chat(conv, b, "Bob")
    read = "SELECT parley_mark_read(%s, %s, NULL)"
    fetch_slowed = sql_function_wrapped(
        conn, "parley_message_frame", "p_id bigint", "text", """
        BEGIN
            IF length((SELECT m.content FROM messages m WHERE m.id = p_id))
               > 3000 THEN
                PERFORM pg_sleep(3);
            END IF;
            RETURN parley_message_frame_real(p_id);
        END""")
    with fetch_slowed:
        big = sql_message(conn, conv, a, "\u00e9" * 4000)    # by reference
        sql_one(conn, read, conv, a)        # queued behind its fetch
        time.sleep(0.5)
        with listen_cut_off(iso, conn):
            newer = sql_message(conn, conv, a, "while the bus was down")
            sql_one(conn, read, conv, a)
        last = sql_message(conn, conv, a, "live again")
        assert message_ids(wb, 3, timeout=30) == [big, newer, last]
    receipts = [f["message_id"] for f in wb.frames
                if f["type"] == "read_receipt" and f["user_id"] == a]
    assert receipts and receipts[-1] == newer, receipts
    iso.assert_workers_alive()


def test_one_worker_drains_big_conversations(isolated):
    """PARLEY_WORKERS=1: the one worker drains the queued notifications of
    a big conversation (the drain runs on the first worker, which Kore
    numbers 1, not KORE_WORKER_BASE; with one worker nothing drained)."""
    iso = isolated(PARLEY_WORKERS="1")
    conn = iso.connect()
    members = [new_id() for _ in range(40)]
    conv = create_conversation(conn, members)
    sql_message(conn, conv, members[0], "to everyone")
    wait_for(lambda: sql_one(conn, "SELECT count(*) FROM notifications "
                             "WHERE conversation_id = %s", conv) == 39,
             15, 0.1, "every other member's notification written")
    assert sql_one(conn, "SELECT count(*) FROM parley_fanout WHERE "
                   "conversation_id = %s", conv) == 0
    iso.assert_workers_alive()


def test_database_stopped_then_started(isolated):
    iso = isolated()
    conn = iso.connect()
    a, b = new_id(), new_id()
    conv = create_conversation(conn, [a, b])
    wa = iso.chat(conv, a, "Ann")
    wb = iso.chat(conv, b, "Bob")
    first = send_until_acked(wa, "before", "s-0", time.time() + 30)[0]
    assert message_ids(wb, 1) == [first["message_id"]]
    conn.close()

    iso.pg.stop()
    try:
        wait_for(lambda: iso.readyz() == 503, 20, 0.1, "/readyz 503")
        r = requests.get(iso.srv.base + "/healthz", timeout=5)
        assert r.status_code == 200

        # a send gets error internal, with its ref, and no ack
        wa.send({"type": "message", "content": "while down",
                 "client_id": "s-1"})
        err = wa.recv_until(lambda f: f["type"] in ("ack", "error"),
                            timeout=20)
        assert err["type"] == "error", err
        assert (err["code"], err["ref"]) == ("internal", "s-1")
        wa.no_frame(lambda f: f["type"] == "ack", 1.0)
        # the open sockets stay open and answer what needs no database
        for w in (wa, wb):
            w.send({"type": "ping"})
            w.recv_type("pong")
        # a new socket cannot open: 1013 try_again_later (docs/PROTOCOL.md)
        w = iso.ws("/ws/chat/%d/" % conv, make_token(a))
        assert w.expect_close(timeout=20) == (1013, "try_again_later")
    finally:
        iso.pg.start()

    iso.wait_ready()
    conn = iso.connect()
    assert stored(conn, conv) == [("s-0", first["message_id"])]
    # the refused send re-sent with its client_id goes through, once
    ack = send_until_acked(wa, "while down", "s-1", time.time() + 30)[0]
    again = send_until_acked(wa, "while down", "s-1", time.time() + 30)[0]
    assert again == ack
    exactly_once_in_order(wb, [first["message_id"], ack["message_id"]],
                          conn, conv, a, iso)
    # typing, reads and new sockets work again
    wb.send({"type": "typing", "is_typing": True})
    assert wa.recv_type("typing", timeout=15)["user_id"] == b
    iso.chat(conv, b, "Bob")
    iso.assert_workers_alive()


def test_statement_that_failed_to_prepare_is_prepared_again(isolated):
    """A pooled connection prepares each statement the first time it runs
    it (docs/DATA.md). A prepare that failed (here: its function was
    missing) answers that query with internal and leaves the statement
    unprepared, so the next call prepares it again rather than run a name
    the connection does not have."""
    iso = isolated(PARLEY_DB_POOL="1")
    conn = iso.connect()
    token = make_token(new_id(), "Ann")
    with functions_away(conn, "parley_unread(text)"):
        # fresh connections, so both workers' one pooled connection fail it
        for _ in range(8):
            r = api(iso.srv, "GET", "/api/unread", token)
            assert r.status_code == 500, r.text
            assert r.json()["error"]["code"] == "internal", r.text
    for _ in range(8):
        r = api(iso.srv, "GET", "/api/unread", token)
        assert r.status_code == 200, r.text
        assert r.json()["total"] == 0, r.text
    iso.assert_workers_alive()
