"""Client-side helpers for Parley's tests: tokens, REST calls, sockets,
and the PostgreSQL cluster and server processes the fixtures manage."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid

import jwt
import requests
import websocket

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PG_BIN = "/usr/lib/postgresql/15/bin"
SECRET = "test-secret-for-parley"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_id(prefix="u"):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:12])


def make_token(user_id, name=None, exp_in=3600, secret=SECRET,
               alg="HS256", **claims):
    """A user access token like simplejwt would issue."""
    now = int(time.time())
    payload = {"exp": now + exp_in, "iat": now, "token_type": "access"}
    if user_id is not None:
        payload["user_id"] = user_id
    if name is not None:
        payload["name"] = name
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm=alg)


def service_token(exp_in=3600, scope="service", **claims):
    return make_token(None, exp_in=exp_in, scope=scope, **claims)


def as_root():
    return os.geteuid() == 0


def run_as_pg(args, **kw):
    """PostgreSQL refuses to run as root: run its tools as postgres."""
    if as_root():
        args = ["runuser", "-u", "postgres", "--"] + args
    return subprocess.run(args, check=True, capture_output=True, **kw)


class PgCluster:
    """A throwaway PostgreSQL cluster on a free port."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="parley-pg-")
        if as_root():
            shutil.chown(self.dir, "postgres", "postgres")
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        run_as_pg([PG_BIN + "/initdb", "-D", self.data, "-A", "trust",
                   "-U", "postgres", "-E", "UTF8", "--locale=C.UTF-8"])
        self.start()
        run_as_pg([PG_BIN + "/createdb", "-h", "127.0.0.1", "-p",
                   str(self.port), "-U", "postgres", "parley"])

    @property
    def url(self):
        return "postgresql://postgres@127.0.0.1:%d/parley" % self.port

    def start(self):
        opts = ("-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off "
                "-c max_connections=300" % (self.port, self.dir))
        run_as_pg([PG_BIN + "/pg_ctl", "-D", self.data, "-l",
                   os.path.join(self.dir, "log"), "-w", "-o", opts, "start"])

    def stop(self):
        run_as_pg([PG_BIN + "/pg_ctl", "-D", self.data, "-m", "fast", "-w",
                   "stop"])

    def restart(self):
        self.stop()
        self.start()

    def connect(self, dbname="parley"):
        import psycopg2
        conn = psycopg2.connect(host="127.0.0.1", port=self.port,
                                user="postgres", dbname=dbname)
        conn.autocommit = True
        return conn

    def destroy(self):
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def server_binary():
    path = os.environ.get("PARLEY_BIN")
    if path:
        return path
    out = subprocess.run(["bash", "-c", "source scripts/lib.sh && build dev"],
                         cwd=ROOT, check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


class Server:
    """The real Parley binary, started with -f -n -r in its own directory
    (Kore writes kore.pid into the working directory)."""

    def __init__(self, binary, env):
        self.binary = binary
        self.env = dict(env)
        self.dir = tempfile.mkdtemp(prefix="parley-srv-")
        self.log_path = os.path.join(self.dir, "server.log")
        self.proc = None
        self.port = int(self.env["PARLEY_LISTEN"].rsplit(":", 1)[1])

    @property
    def base(self):
        return "http://127.0.0.1:%d" % self.port

    @property
    def ws_base(self):
        return "ws://127.0.0.1:%d" % self.port

    def start(self, wait="ready", timeout=30):
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "HOME": self.dir}
        # Sanitizer settings from scripts/test --asan reach the server.
        for name in ("ASAN_OPTIONS", "UBSAN_OPTIONS"):
            if name in os.environ:
                env[name] = os.environ[name]
        env.update(self.env)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([self.binary, "-f", "-n", "-r"],
                                     cwd=self.dir, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        if wait:
            self.wait(wait, timeout)
        return self

    def wait(self, what="ready", timeout=30):
        path = "/readyz" if what == "ready" else "/healthz"
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited with %s:\n%s" %
                                   (self.proc.returncode, self.output()))
            try:
                if requests.get(self.base + path, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise RuntimeError("server not %s in %ss:\n%s" %
                           (what, timeout, self.output()))

    def output(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    # Lines that mean a bug whatever the test was about: sanitizer reports,
    # seccomp kills, crashed workers.
    PROBLEMS = ("ERROR: AddressSanitizer", "runtime error:",
                "sandbox violation", ") gone")

    def problems(self):
        return [l for l in self.output().splitlines()
                if any(p in l for p in self.PROBLEMS)]

    def stop(self, sig=signal.SIGTERM, timeout=20):
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def restart(self, wait="ready"):
        self.stop()
        return self.start(wait=wait)

    def worker_pids(self):
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)],
                             capture_output=True, text=True)
        return sorted(int(p) for p in out.stdout.split())

    def destroy(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def api(server, method, path, token=None, json_body=None, headers=None,
        data=None, **kw):
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = "Bearer " + token
    return requests.request(method, server.base + path, json=json_body,
                            data=data, headers=h, timeout=10, **kw)


# websocket-client 1.2 refuses close codes it does not list, among them the
# IANA-registered 1012 (service restart) and 1013 (try again later) that
# browsers accept; accept them too, so tests can see them.
import websocket._abnf as _ws_abnf  # noqa: E402
_ws_abnf.VALID_CLOSE_STATUS = tuple(_ws_abnf.VALID_CLOSE_STATUS) + (1012, 1013)


class Closed(Exception):
    def __init__(self, code, reason):
        super().__init__("closed %s %s" % (code, reason))
        self.code = code
        self.reason = reason


class WS:
    """A synchronous WebSocket client that understands Parley frames."""

    def __init__(self, server, path, token=None, via="subprotocol",
                 origin=None, timeout=10, subprotocols=None, header=None,
                 suppress_origin=False, sockopt=()):
        self.ws = websocket.WebSocket(sockopt=sockopt)
        kw = {"timeout": timeout, "header": list(header or []),
              "suppress_origin": suppress_origin}
        url = server.ws_base + path
        if token is not None:
            if via == "subprotocol":
                kw["subprotocols"] = ["parley", "bearer." + token]
            elif via == "query":
                url += ("&" if "?" in url else "?") + "token=" + token
            elif via == "header":
                kw["header"].append("Authorization: Bearer " + token)
            elif via == "cookie":
                kw["cookie"] = "access_token=" + token
        if subprotocols is not None:
            kw["subprotocols"] = subprotocols
        if origin is not None:
            kw["origin"] = origin
        self.ws.connect(url, **kw)
        self.frames = []
        # websocket-client answers a close frame with its own close before
        # it returns the frame; when the server has already hung up that
        # reply fails (broken pipe) and the close code would be lost.
        # The same for the pong it sends when it reads a ping that the
        # server sent before closing: the close frame behind it still counts.
        for name in ("send_close", "pong"):
            setattr(self.ws, name, self._quietly(getattr(self.ws, name)))

    @staticmethod
    def _quietly(reply):
        def call(*args, **kwargs):
            try:
                return reply(*args, **kwargs)
            except (OSError, websocket.WebSocketException):
                return None
        return call

    @property
    def subprotocol(self):
        return self.ws.getsubprotocol()

    def send(self, obj):
        self.ws.send(json.dumps(obj) if not isinstance(obj, str) else obj)

    def send_raw(self, data, opcode=websocket.ABNF.OPCODE_TEXT):
        self.ws.send(data, opcode)

    def recv(self, timeout=10):
        """The next JSON frame; Closed when the server closes. The timeout
        bounds the whole wait, server pings included."""
        deadline = time.time() + timeout
        while True:
            self.ws.settimeout(max(deadline - time.time(), 0.001))
            try:
                op, data = self.ws.recv_data(control_frame=True)
            except (websocket.WebSocketTimeoutException, socket.timeout):
                raise TimeoutError("no frame in %.1fs" % timeout)
            except websocket.WebSocketConnectionClosedException:
                raise Closed(None, "connection dropped")
            except OSError as e:          # reset by the server
                raise Closed(None, "connection dropped: %s" % e)
            if op == websocket.ABNF.OPCODE_CLOSE:
                code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
                raise Closed(code, data[2:].decode("utf-8", "replace"))
            if op == websocket.ABNF.OPCODE_TEXT:
                return json.loads(data)

    def recv_until(self, pred, timeout=10):
        """The first frame matching pred; frames before it are kept."""
        deadline = time.time() + timeout
        while True:
            left = deadline - time.time()
            if left <= 0:
                raise TimeoutError("no matching frame; got %r" % self.frames[-5:])
            frame = self.recv(left)
            self.frames.append(frame)
            if pred(frame):
                return frame

    def recv_type(self, typ, timeout=10):
        return self.recv_until(lambda f: f.get("type") == typ, timeout)

    def expect_close(self, timeout=10):
        """Read until the server's close frame; returns (code, reason)."""
        try:
            self.recv_until(lambda f: False, timeout)
        except Closed as c:
            return c.code, c.reason
        raise AssertionError("socket not closed")

    def no_frame(self, pred=lambda f: True, wait=1.0):
        """Assert no matching frame arrives within `wait` seconds."""
        try:
            frame = self.recv_until(pred, wait)
        except TimeoutError:
            return
        raise AssertionError("unexpected frame %r" % frame)

    def close(self):
        try:
            self.ws.close()
        except Exception:
            pass


# ---------------------------------------------------------------------------
# Small generic helpers shared by the socket test files.
# ---------------------------------------------------------------------------

def sql_one(conn, sql, *args):
    """The first column of the first row (None when there is no row)."""
    with conn.cursor() as cur:
        cur.execute(sql, args)
        row = cur.fetchone() if cur.description else None
        return None if row is None else row[0]


def sql_rows(conn, sql, *args):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall()


def messages_stored(conn, conv, sender, prefix, n):
    """n messages of sender's in one INSERT, prefix and a number each; the
    ids of the conversation's messages, oldest first."""
    conn.cursor().execute(
        "INSERT INTO messages (conversation_id, sender_id, content) "
        "SELECT %s, %s, %s || g FROM generate_series(1, %s) g",
        (conv, sender, prefix, n))
    return [r[0] for r in sql_rows(conn, "SELECT id FROM messages WHERE "
                                   "conversation_id = %s ORDER BY id", conv)]


def create_conversation(conn, members, title=None, kind=None, ref=None,
                        system_message=None, creator=None):
    """Create (or get) a conversation with plain SQL; returns its id."""
    body = json.dumps(list(members))
    out = sql_one(conn, "SELECT parley_create_conversation(%s, %s::jsonb, "
                  "%s, %s, %s, %s)", creator, body, title, kind, ref,
                  system_message)
    return json.loads(out)["conversation"]["id"]


def metrics(server):
    """/metrics as {'name{labels}': value}."""
    out = {}
    r = requests.get(server.base + "/metrics", timeout=10)
    r.raise_for_status()
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def wait_for(pred, timeout=10, interval=0.05, what="condition"):
    """Poll pred() until it returns a true value; returns that value."""
    deadline = time.time() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.time() >= deadline:
            raise TimeoutError("%s not met in %ss" % (what, timeout))
        time.sleep(interval)


def message_ids(ws, n, timeout=20):
    """The ids of the `message` events a socket has had so far (all frames
    read through recv_until are kept), once there are at least n."""
    def ids():
        return [f["message"]["id"] for f in ws.frames
                if f["type"] == "message"]
    deadline = time.time() + timeout
    while len(ids()) < n:
        ws.recv_until(lambda f: f["type"] == "message",
                      max(deadline - time.time(), 0.01))
    return ids()


class PgProxy:
    """A TCP relay between the server and its cluster, which can lose an
    answer the way a broken network does: the database has done the work,
    the server never hears of it."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.trigger = None
        self.cut = threading.Event()
        self.socks = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, pg):
        return pg.url.replace(":%d/" % pg.port, ":%d/" % self.port)

    def lose_answer_to(self, needle):
        """The connection that next sends bytes containing needle is closed
        as soon as the database answers them, and the answer dropped."""
        with self.lock:
            self.trigger = needle
            self.cut.clear()

    @contextlib.contextmanager
    def unreachable(self):
        """New connections get no answer at all, as when packets to the
        database are dropped: the listening socket's queue is full, so the
        kernel drops their SYNs. Connections already made go on."""
        self.listener.shutdown(socket.SHUT_RDWR)     # ends the accept()
        self.listener.close()
        hole = socket.socket()
        hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hole.bind(("127.0.0.1", self.port))
        hole.listen(0)
        filler = socket.create_connection(("127.0.0.1", self.port))
        try:
            yield
        finally:
            filler.close()
            hole.close()
            self.listener = socket.create_server(("127.0.0.1", self.port))
            threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(("127.0.0.1",
                                                   self.target_port))
            except OSError:
                return
            doomed = threading.Event()
            with self.lock:
                self.socks += [client, server]
            threading.Thread(target=self._pump, daemon=True,
                             args=(client, server, doomed, True)).start()
            threading.Thread(target=self._pump, daemon=True,
                             args=(server, client, doomed, False)).start()

    def _pump(self, src, dst, doomed, upstream):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if upstream:
                    with self.lock:
                        if self.trigger is not None and self.trigger in data:
                            self.trigger = None
                            doomed.set()
                elif doomed.is_set():
                    self.cut.set()
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.listener.close()
        with self.lock:
            for sock in self.socks:
                sock.close()


class Isolated:
    """A cluster of its own and a two-worker server on it, for tests that
    stop the database or kill its backends (the `isolated` fixture). With
    proxy=True the server reaches the cluster through a PgProxy."""

    def __init__(self, binary, proxy=False, **env):
        self.pg = PgCluster()
        self.proxy = PgProxy(self.pg.port) if proxy else None
        base = {"PARLEY_LISTEN": "127.0.0.1:%d" % free_port(),
                "PARLEY_WORKERS": "2",
                "PARLEY_DATABASE_URL":
                    self.proxy.url(self.pg) if proxy else self.pg.url,
                "PARLEY_JWT_SECRET": SECRET}
        base.update(env)
        self.srv = Server(binary, base)
        self.sockets = []
        self.conns = []

    def start(self):
        self.srv.start()
        self.pids = self.srv.worker_pids()
        assert len(self.pids) == int(self.srv.env.get("PARLEY_WORKERS")), \
            self.pids
        return self

    def connect(self):
        c = self.pg.connect()
        self.conns.append(c)
        return c

    def ws(self, path, token, **kw):
        w = WS(self.srv, path, token, **kw)
        self.sockets.append(w)
        return w

    def chat(self, conv, user, name=None, after=None):
        path = "/ws/chat/%d/" % conv
        if after is not None:
            path += "?after=%d" % after
        w = self.ws(path, make_token(user, name))
        ready = w.recv()
        assert ready["type"] == "ready", ready
        return w

    def readyz(self):
        try:
            return requests.get(self.srv.base + "/readyz",
                                timeout=5).status_code
        except requests.RequestException:
            return None

    def wait_ready(self, timeout=30):
        wait_for(lambda: self.readyz() == 200, timeout, 0.1,
                 "/readyz 200")

    def assert_workers_alive(self):
        assert self.srv.proc.poll() is None, self.srv.output()[-3000:]
        assert self.srv.worker_pids() == self.pids, \
            "a worker was replaced:\n" + self.srv.output()[-3000:]
        assert not self.srv.problems(), self.srv.problems()

    def destroy(self):
        for w in self.sockets:
            w.close()
        for c in self.conns:
            try:
                c.close()
            except Exception:
                pass
        self.srv.destroy()
        if self.proxy is not None:
            self.proxy.close()
        self.pg.destroy()


def kill_parley_backends(conn, wait_ms=0):
    """Terminate every parley backend; with wait_ms, wait until each is gone
    (so that what the caller writes next finds them down)."""
    return sql_one(conn, "SELECT count(*) FROM (SELECT "
                   "pg_terminate_backend(pid, %s) FROM pg_stat_activity "
                   "WHERE application_name = 'parley') t", wait_ms)


@contextlib.contextmanager
def parley_cut_off(conn):
    """Every parley backend killed, and the role closed to new logins until
    the block ends: what the block writes on conn (already connected) is
    committed while every worker's LISTEN and pool are down, however fast
    they try to come back. (The workers connect as the same role.)"""
    sql_one(conn, "ALTER ROLE CURRENT_USER NOLOGIN")
    try:
        assert kill_parley_backends(conn, 5000) >= 1
        yield
    finally:
        sql_one(conn, "ALTER ROLE CURRENT_USER LOGIN")
