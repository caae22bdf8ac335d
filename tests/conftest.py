"""Fixtures: a throwaway PostgreSQL cluster and the real Parley binary
with two workers on free ports. Nothing is mocked."""


import pytest

from helpers import (Isolated, PgCluster, SECRET, Server, WS, free_port,
                     server_binary)


@pytest.fixture(scope="session")
def binary():
    return server_binary()


@pytest.fixture(scope="session")
def pg():
    cluster = PgCluster()
    yield cluster
    cluster.destroy()


def server_env(pg, **overrides):
    env = {
        "PARLEY_LISTEN": "127.0.0.1:%d" % free_port(),
        "PARLEY_WORKERS": "2",
        "PARLEY_DATABASE_URL": pg.url,
        "PARLEY_JWT_SECRET": SECRET,
    }
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


@pytest.fixture(scope="session")
def server(binary, pg):
    """The shared server: two workers on the shared cluster."""
    srv = Server(binary, server_env(pg)).start()
    yield srv
    srv.stop()
    problems = srv.problems()
    srv.destroy()
    assert not problems, "server reported: %s" % problems


@pytest.fixture
def make_server(binary, pg):
    """Start extra servers with their own settings; stopped afterwards.
    Pass a variable as None to unset it."""
    started = []

    def start(wait="ready", **overrides):
        srv = Server(binary, server_env(pg, **overrides))
        started.append(srv)
        return srv.start(wait=wait)

    yield start
    problems = []
    for srv in started:
        srv.stop()
        problems += srv.problems()
        srv.destroy()
    assert not problems, "server reported: %s" % problems


@pytest.fixture
def conn(pg, server):
    """A direct SQL connection to the database the server migrated."""
    c = pg.connect()
    yield c
    c.close()


@pytest.fixture
def sockets():
    """Open sockets through opener(...); all are closed after the test."""
    opened = []

    def opener(*args, **kw):
        ws = WS(*args, **kw)
        opened.append(ws)
        return ws

    yield opener
    for ws in opened:
        ws.close()


@pytest.fixture
def isolated(binary):
    made = []

    def make(**env):
        iso = Isolated(binary, **env)
        made.append(iso)
        return iso.start()

    yield make
    for iso in made:
        iso.destroy()
