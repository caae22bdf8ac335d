"""Foundation: configuration, migrations, JWT verification, health checks.
Every test talks to the real binary over HTTP; the database is real."""

import os
import subprocess
import tempfile
import threading
import time

import jwt
import pytest
import requests

from helpers import (PgCluster, SECRET, Server, api, free_port, make_token,
                     new_id, run_as_pg, PG_BIN, service_token)


def run_binary(binary, env, timeout=15):
    """Run the binary to completion (for start-up errors)."""
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/tmp"}
    full.update(env)
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([binary, "-f", "-n", "-r"], env=full, cwd=cwd,
                              capture_output=True, text=True, timeout=timeout)


def base_env(pg):
    return {
        "PARLEY_LISTEN": "127.0.0.1:%d" % free_port(),
        "PARLEY_WORKERS": "2",
        "PARLEY_DATABASE_URL": pg.url,
        "PARLEY_JWT_SECRET": SECRET,
    }


# --- configuration -------------------------------------------------------

@pytest.mark.parametrize("change, needle", [
    ({"PARLEY_DATABASE_URL": None}, "PARLEY_DATABASE_URL is not set"),
    ({"PARLEY_DATABASE_URL": "host=127.0.0.1 nonsense=1"}, "PARLEY_DATABASE_URL is not a valid"),
    ({"PARLEY_JWT_SECRET": None}, "PARLEY_JWT_SECRET is not set"),
    ({"PARLEY_JWT_SECRET": ""}, "PARLEY_JWT_SECRET is not set"),
    ({"PARLEY_JWT_ALG": "HS512"}, "PARLEY_JWT_ALG must be HS256, RS256 or ES256"),
    ({"PARLEY_JWT_ALG": "RS256"}, "PARLEY_JWT_PUBLIC_KEY is not set"),
    ({"PARLEY_JWT_ALG": "ES256", "PARLEY_JWT_PUBLIC_KEY": "/nonexistent/key.pem"},
     "PARLEY_JWT_PUBLIC_KEY: cannot read /nonexistent/key.pem"),
    ({"PARLEY_LISTEN": "nonsense"}, "PARLEY_LISTEN must be host:port"),
    ({"PARLEY_LISTEN": "127.0.0.1:99999"}, "PARLEY_LISTEN has a bad port"),
    ({"PARLEY_WORKERS": "two"}, "PARLEY_WORKERS must be an integer"),
    ({"PARLEY_WORKERS": "0"}, "PARLEY_WORKERS must be an integer"),
    ({"PARLEY_MAX_MESSAGE_CHARS": "-5"}, "PARLEY_MAX_MESSAGE_CHARS must be an integer"),
    ({"PARLEY_RATE_MESSAGES": "10x"}, "PARLEY_RATE_MESSAGES must be an integer"),
    ({"PARLEY_ALLOWED_ORIGINS": "app.example.com"}, "PARLEY_ALLOWED_ORIGINS"),
    ({"PARLEY_PING_INTERVAL": "80"}, "PARLEY_PING_INTERVAL must be below"),
    ({"PARLEY_BUS_QUEUE_MAX": "99"}, "PARLEY_BUS_QUEUE_MAX must be an integer"),
    ({"PARLEY_DB_TIMEOUT": "2"}, "PARLEY_DB_TIMEOUT must be an integer from 3"),
    ({"PARLEY_PAGE_CACHE_MB": "-1"}, "PARLEY_PAGE_CACHE_MB must be an integer from 0"),
    ({"PARLEY_SEND_LANES": "17"}, "PARLEY_SEND_LANES must be an integer from 1 to 16"),
    ({"PARLEY_SEND_LANES": "0"}, "PARLEY_SEND_LANES must be an integer from 1"),
    ({"PARLEY_SEND_SPLIT_MS": "-1"}, "PARLEY_SEND_SPLIT_MS must be an integer from 0"),
])
def test_bad_configuration_stops_with_one_clear_line(binary, pg, change, needle):
    env = base_env(pg)
    for k, v in change.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    out = run_binary(binary, env)
    assert out.returncode == 1
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, out.stderr
    assert needle in lines[0]
    assert lines[0].startswith("parley: configuration error: ")
    # Secrets never appear in the message.
    assert SECRET not in out.stderr + out.stdout


def test_unreadable_key_file_names_the_setting(binary, pg, tmp_path):
    key = tmp_path / "not-a-key.pem"
    key.write_text("just text\n")
    env = base_env(pg)
    env.update(PARLEY_JWT_ALG="RS256", PARLEY_JWT_PUBLIC_KEY=str(key))
    out = run_binary(binary, env)
    assert out.returncode == 1
    assert "PARLEY_JWT_PUBLIC_KEY" in out.stderr and "no PEM key" in out.stderr


def test_listen_address_in_use_is_reported(binary, pg, server):
    env = base_env(pg)
    env["PARLEY_LISTEN"] = "127.0.0.1:%d" % server.port
    out = run_binary(binary, env)
    assert out.returncode != 0


# --- health --------------------------------------------------------------

def test_healthz_and_readyz(server):
    r = api(server, "GET", "/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = api(server, "GET", "/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready"}
    assert r.headers["content-type"] == "application/json"


def test_unknown_route_and_wrong_method_are_json(server):
    r = api(server, "GET", "/no/such/thing", token=make_token(new_id()))
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    r = api(server, "POST", "/healthz")
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "method_not_allowed"


def wait_status(srv, path, status, timeout=20):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = api(srv, "GET", path).status_code
        except Exception as e:  # connection refused while restarting
            last = repr(e)
        if last == status:
            return
        time.sleep(0.1)
    raise AssertionError("%s stayed %r, wanted %s" % (path, last, status))


def test_readyz_follows_the_database(binary):
    cluster = PgCluster()
    srv = Server(binary, base_env(cluster))
    try:
        srv.start()
        pids = srv.worker_pids()
        cluster.stop()
        # Every worker must notice: ask more times than there are workers.
        wait_status(srv, "/readyz", 503)
        for _ in range(6):
            r = api(srv, "GET", "/readyz")
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "unavailable"
        assert api(srv, "GET", "/healthz").status_code == 200
        cluster.start()
        wait_status(srv, "/readyz", 200)
        for _ in range(6):
            assert api(srv, "GET", "/readyz").status_code == 200
        token = make_token(new_id(), "Back")
        assert api(srv, "GET", "/api/me", token).status_code == 200
        assert srv.worker_pids() == pids, "a worker died"
    finally:
        srv.destroy()
        cluster.destroy()


def test_database_down_at_startup_is_retried(binary):
    cluster = PgCluster()
    cluster.stop()
    srv = Server(binary, base_env(cluster))
    try:
        srv.start(wait="health")
        assert api(srv, "GET", "/readyz").status_code == 503
        time.sleep(1)
        assert "database unavailable, retrying" in srv.output()
        cluster.start()
        wait_status(srv, "/readyz", 200, timeout=30)
        r = api(srv, "GET", "/api/me", make_token(new_id(), "Late"))
        assert r.status_code == 200
    finally:
        srv.destroy()
        cluster.destroy()


# --- migrations ----------------------------------------------------------

def migrations(conn):
    with conn.cursor() as cur:
        cur.execute("SELECT version, name, applied_at FROM parley_migrations "
                    "ORDER BY version")
        return cur.fetchall()


def sql_files():
    root = os.path.join(os.path.dirname(__file__), "..", "sql")
    return sorted(f[:-4] for f in os.listdir(root) if f.endswith(".sql"))


def test_every_migration_applied_once(server, conn):
    rows = migrations(conn)
    assert [r[1] for r in rows] == sql_files()
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1))


def test_migrations_are_idempotent_across_restarts(make_server, conn):
    before = migrations(conn)
    srv = make_server()
    srv.restart()
    assert migrations(conn) == before


def test_two_instances_migrate_a_fresh_database_concurrently(binary, pg):
    db = "race_" + new_id("d").replace("-", "_")
    run_as_pg([PG_BIN + "/createdb", "-h", "127.0.0.1", "-p", str(pg.port),
               "-U", "postgres", db])
    url = "postgresql://postgres@127.0.0.1:%d/%s" % (pg.port, db)
    servers = []
    for _ in range(2):
        env = base_env(pg)
        env["PARLEY_DATABASE_URL"] = url
        servers.append(Server(binary, env))
    try:
        threads = [threading.Thread(target=s.start) for s in servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for s in servers:
            assert api(s, "GET", "/readyz").status_code == 200
        c = pg.connect(db)
        rows = migrations(c)
        c.close()
        assert [r[1] for r in rows] == sql_files()
        logs = servers[0].output() + servers[1].output()
        for name in sql_files():
            assert logs.count("migration %s applied" % name) == 1, name
    finally:
        for s in servers:
            s.destroy()


# --- JWT -----------------------------------------------------------------

def me(server, token):
    return api(server, "GET", "/api/me", token)


def test_token_accepted_with_user_id_and_name(server):
    uid = new_id()
    r = me(server, make_token(uid, "Maria"))
    assert r.status_code == 200
    assert r.json()["user"] == {"id": uid, "name": "Maria"}


def test_integer_user_id_and_sub_and_username(server):
    r = me(server, make_token(7000 + int(time.time()) % 1000))
    assert r.status_code == 200 and r.json()["user"]["id"].isdigit()
    uid = new_id()
    token = jwt.encode({"sub": uid, "username": "ana", "exp": int(time.time()) + 60},
                       SECRET, algorithm="HS256")
    r = me(server, token)
    assert r.json()["user"] == {"id": uid, "name": "ana"}
    uid = new_id()
    r = me(server, make_token(uid))
    assert r.json()["user"]["name"] == "user " + uid


def test_display_name_is_refreshed_from_claims(server):
    uid = new_id()
    me(server, make_token(uid, "Old Name"))
    r = me(server, make_token(uid, "New Name"))
    assert r.json()["user"]["name"] == "New Name"


def test_leeway_of_30_seconds(server):
    assert me(server, make_token(new_id(), exp_in=-10)).status_code == 200
    assert me(server, make_token(new_id(), exp_in=-45)).status_code == 401
    assert me(server, make_token(new_id(), nbf=int(time.time()) + 10)).status_code == 200
    assert me(server, make_token(new_id(), nbf=int(time.time()) + 90)).status_code == 401


# Each worker keeps the tokens it accepted (auth.c). One keep-alive
# connection stays on one worker, so these ask the same cache again.

def test_kept_token_still_expires(server):
    with requests.Session() as s:
        t = make_token(new_id(), exp_in=-27)
        h = {"Authorization": "Bearer " + t}
        assert s.get(server.base + "/api/me", headers=h, timeout=10).status_code == 200
        time.sleep(4.5)
        r = s.get(server.base + "/api/me", headers=h, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"


def test_kept_token_matches_only_itself(server):
    uid = new_id()
    t = make_token(uid)
    head, sig = t.rsplit(".", 1)
    # A middle character of the signature: all six of its bits count.
    c = sig[20]
    forged = head + "." + sig[:20] + ("A" if c != "A" else "B") + sig[21:]
    with requests.Session() as s:
        def me_on(token):
            return s.get(server.base + "/api/me", timeout=10,
                         headers={"Authorization": "Bearer " + token})
        assert me_on(t).json()["user"]["id"] == uid
        assert me_on(forged).status_code == 401
        assert me_on(t).json()["user"]["id"] == uid


def test_kept_tokens_keep_their_own_identity(server):
    # More tokens than a worker keeps: slots are shared and replaced.
    users = [new_id() for _ in range(1500)]
    tokens = [make_token(u, "n" + u) for u in users]
    with requests.Session() as s:
        for _ in range(2):
            for u, t in zip(users, tokens):
                r = s.get(server.base + "/api/me", timeout=10,
                          headers={"Authorization": "Bearer " + t})
                assert r.json()["user"] == {"id": u, "name": "n" + u}


def alg_none_token(uid):
    import base64
    import json

    def b64(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return b64({"alg": "none", "typ": "JWT"}) + "." + b64(
        {"user_id": uid, "exp": int(time.time()) + 60}) + "."


@pytest.mark.parametrize("token", [
    lambda: make_token(new_id(), secret="another-key"),
    lambda: alg_none_token(new_id()),
    lambda: make_token(new_id(), alg="HS512"),
    lambda: make_token(new_id(), alg="HS384"),
    lambda: make_token(new_id(), token_type="refresh"),
    lambda: jwt.encode({"user_id": new_id()}, SECRET, algorithm="HS256"),
    lambda: jwt.encode({"user_id": new_id(), "exp": "tomorrow"}, SECRET, algorithm="HS256"),
    lambda: make_token(""),
    lambda: make_token("x" * 65),
    lambda: make_token(1.5),
    lambda: make_token({"id": 1}),
    lambda: make_token("", sub="fallback-must-not-be-used"),
    lambda: make_token(None),
    lambda: "not.a.token",
    lambda: "garbage",
    lambda: make_token(new_id()) + "x",
    lambda: "a" * 9000,
], ids=["wrong-key", "alg-none", "hs512", "hs384", "refresh", "no-exp",
        "exp-string", "empty-id", "long-id", "float-id", "object-id",
        "no-sub-fallback", "no-id", "three-parts", "garbage", "bad-sig",
        "oversized"])
def test_token_rejections(server, token):
    r = me(server, token())
    assert r.status_code == 401
    assert r.json() == {"error": {"code": "unauthenticated",
                                  "message": "a valid access token is required"}}


def test_token_sources_for_rest(server):
    uid = new_id()
    t = make_token(uid)
    assert api(server, "GET", "/api/me?token=" + t).json()["user"]["id"] == uid
    r = api(server, "GET", "/api/me", cookies={"access_token": t})
    assert r.json()["user"]["id"] == uid
    # Another scheme is ignored: the query token decides.
    r = api(server, "GET", "/api/me?token=" + t,
            headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert r.status_code == 200
    # The first source present decides: a bad header does not fall through.
    r = api(server, "GET", "/api/me?token=" + t,
            headers={"Authorization": "Bearer bad.token.here"})
    assert r.status_code == 401
    assert api(server, "GET", "/api/me").status_code == 401


def test_service_token_is_forbidden_on_user_endpoints(server):
    r = me(server, service_token())
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = me(server, service_token(scope=["read", "service"]))
    assert r.status_code == 403
    # "services" is not the word "service".
    r = me(server, make_token(None, scope="services"))
    assert r.status_code == 401


def test_issuer_and_audience_when_configured(make_server):
    srv = make_server(PARLEY_JWT_ISSUER="https://app.example",
                      PARLEY_JWT_AUDIENCE="parley")
    uid = new_id()
    good = make_token(uid, iss="https://app.example", aud="parley")
    assert me(srv, good).status_code == 200
    assert me(srv, make_token(uid, iss="https://app.example",
                              aud=["x", "parley"])).status_code == 200
    assert me(srv, make_token(uid, iss="https://evil", aud="parley")).status_code == 401
    assert me(srv, make_token(uid, iss="https://app.example", aud="other")).status_code == 401
    assert me(srv, make_token(uid)).status_code == 401


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_public_key_algorithms(make_server, tmp_path, alg):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    if alg == "RS256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM,
        serialization.PublicFormat.SubjectPublicKeyInfo)
    path = tmp_path / "pub.pem"
    path.write_bytes(pem)
    os.chmod(tmp_path, 0o755)
    srv = make_server(PARLEY_JWT_ALG=alg, PARLEY_JWT_PUBLIC_KEY=str(path),
                      PARLEY_JWT_SECRET=None)
    uid = new_id()
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    token = jwt.encode({"user_id": uid, "exp": int(time.time()) + 60},
                       private, algorithm=alg)
    assert me(srv, token).json()["user"]["id"] == uid
    # An HMAC token signed with the public key text must not pass.
    forged = jwt.encode({"user_id": uid, "exp": int(time.time()) + 60},
                        SECRET, algorithm="HS256")
    assert me(srv, forged).status_code == 401


def test_tokens_never_logged(server):
    t = make_token(new_id())
    api(server, "GET", "/api/me?token=" + t)
    api(server, "GET", "/api/me", t)
    out = server.output()
    assert t not in out
    assert t.split(".")[2] not in out


def test_workers_exit_when_the_parent_is_killed(binary, pg):
    import signal
    srv = Server(binary, base_env(pg))
    try:
        srv.start()
        workers = srv.worker_pids()
        assert len(workers) == 2
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait()
        deadline = time.time() + 15
        alive = workers
        while alive and time.time() < deadline:
            alive = [p for p in workers if os.path.exists("/proc/%d" % p)
                     and "zombie" not in open("/proc/%d/status" % p).read()]
            time.sleep(0.2)
        assert not alive, "orphaned workers %s still hold the port" % alive
        assert "parent process gone" in srv.output()
    finally:
        srv.destroy()
