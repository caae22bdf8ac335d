"""The chat page (assets/) and parley.js in headless Chromium against the real server.

Two browsers signed in as two users chat both ways and see typing, read marks and
unread badges change live; a service notification shows as a toast; a server restart
while a user keeps sending loses and duplicates nothing; an expired token ends in a
clear signed-out state instead of a reconnect loop; notifications the server
sends again after its database connection came back are emitted once.

Needs Debian's python3-selenium, chromium and chromium-driver.
"""

import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from helpers import (api, make_token, new_id, parley_cut_off, service_token,
                     sql_one, wait_for)

from selenium import webdriver  # noqa: E402  (scripts/test installs it)
from selenium.common.exceptions import (  # noqa: E402
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# scripts/test installs Debian's chromium and chromium-driver.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

TESTS = Path(__file__).resolve().parent
ARTIFACTS = TESTS / "artifacts"

# Counts the WebSockets a page opens (installed before any page script runs).
COUNT_SOCKETS = """
window.__sockets = 0;
const NativeWebSocket = window.WebSocket;
window.WebSocket = class extends NativeWebSocket {
  constructor(...args) { super(...args); window.__sockets += 1; }
};
"""

# Records every connection-badge state the page shows.
WATCH_BADGE = """
const badge = document.getElementById('connection-badge');
window.__badgeStates = [badge.dataset.state];
new MutationObserver(() => window.__badgeStates.push(badge.dataset.state))
  .observe(badge, {attributes: true, attributeFilter: ['data-state']});
"""


class ChatPage:
    """One browser signed in to the chat page, with waits for what a person sees."""

    def __init__(self, base, user_id, name):
        self.base = base
        self.user_id = user_id
        self.name = name
        self.profile = tempfile.mkdtemp(prefix="parley-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in (
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={self.profile}",
            "--window-size=1280,820",
        ):
            options.add_argument(arg)
        self.driver = webdriver.Chrome(
            service=Service(executable_path=CHROMEDRIVER), options=options
        )
        self.driver.execute_cdp_cmd(
            "Page.addScriptToEvaluateOnNewDocument", {"source": COUNT_SOCKETS}
        )

    def quit(self):
        self.driver.quit()
        shutil.rmtree(self.profile, ignore_errors=True)

    # -- waiting ---------------------------------------------------------------

    def wait(self, condition, timeout=15, message=""):
        """Waits until condition(driver) is truthy (stale elements count as not yet)."""

        def check(driver):
            try:
                return condition(driver)
            except StaleElementReferenceException:
                return False

        return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(check, message)

    def find(self, css):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css):
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def visible(self, css):
        return any(e.is_displayed() for e in self.find_all(css))

    # -- actions ---------------------------------------------------------------

    def sign_in(self, token):
        self.driver.get(self.base + "/")
        self.wait(lambda d: self.visible("#token-input"), message="sign-in form")
        self.find("#token-input").send_keys(token)
        self.find("#sign-in").click()
        self.wait(lambda d: self.visible("#conversation-list"), message="signed in")
        self.wait(lambda d: self.badge() == "connected", message="notifications connected")
        return self

    def open_conversation(self, conversation_id):
        self.wait(
            lambda d: self.find_all(f'[data-conversation-id="{conversation_id}"]'),
            message=f"conversation {conversation_id} listed",
        )
        self.find(f'[data-conversation-id="{conversation_id}"]').click()
        self.wait(lambda d: self.visible("#message-input"), message="conversation open")
        self.wait(lambda d: self.badge() == "connected", message="chat connected")

    def send(self, text):
        box = self.find("#message-input")
        box.send_keys(text)
        self.find("#send").click()

    def badge(self):
        return self.find("#connection-badge").get_attribute("data-state")

    def messages(self):
        """[(text, data-status)] of the messages shown, top to bottom."""
        return self.driver.execute_script(
            """return [...document.querySelectorAll('#messages .message:not(.system)')]
                 .map(m => [m.querySelector('.message-text').textContent,
                            m.dataset.status || null]);"""
        )

    def texts(self):
        return [text for text, _ in self.messages()]

    def status_of(self, text):
        for shown, status in self.messages():
            if shown == text:
                return status
        return None

    def unread_badge(self, conversation_id):
        """The unread count shown on a conversation (0 when the badge is hidden)."""
        badge = self.find(f'[data-conversation-id="{conversation_id}"] .unread-badge')
        return int(badge.get_attribute("data-count")) if badge.is_displayed() else 0

    def screenshot(self, *paths):
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.driver.save_screenshot(str(path))


@pytest.fixture
def browsers(server):
    """Opens ChatPage browsers on demand; quits them all after the test."""
    pages = []

    def open_page(user_id, name):
        page = ChatPage(server.base, user_id, name)
        pages.append(page)
        return page

    yield open_page
    for page in pages:
        page.quit()


@pytest.fixture
def pair(server):
    """Two users who have used Parley, and a conversation between them."""
    ana = (new_id("ana"), "Ana Souza")
    ben = (new_id("ben"), "Ben Okafor")
    tokens = {}
    for user_id, name in (ana, ben):
        tokens[user_id] = make_token(user_id, name=name)
        assert api(server, "GET", "/api/me", tokens[user_id]).status_code == 200
    created = api(
        server,
        "POST",
        "/api/conversations",
        service_token(),
        json_body={
            "participants": [ana[0], ben[0]],
            "context": {"kind": "test", "ref": new_id("c")},
        },
    )
    assert created.status_code == 201, created.text
    return {"ana": ana, "ben": ben, "tokens": tokens, "conversation": created.json()["id"]}


def test_two_users_chat_live(pair, browsers):
    (ana_id, ana_name), (ben_id, ben_name) = pair["ana"], pair["ben"]
    cid = pair["conversation"]
    ana = browsers(ana_id, ana_name).sign_in(pair["tokens"][ana_id])
    ben = browsers(ben_id, ben_name).sign_in(pair["tokens"][ben_id])

    first, second = "Hi Ben, are you free on Monday?", "I can bring the tools."
    reply = "Monday works, see you at 9!"
    toast = '.toast[data-notification-type="new_message"]'

    # Ana writes while Ben is elsewhere: Ben's badge and a toast appear live.
    ana.open_conversation(cid)
    assert ana.find("#conversation-title").text == ben_name
    ana.send(first)
    ana.wait(lambda d: ana.status_of(first) == "sent", message="first message acknowledged")
    ben.wait(lambda d: ben.unread_badge(cid) == 1, message="unread badge 1")
    ben.wait(lambda d: ben.visible(toast), message="new message toast")
    assert "Monday" in ben.find(toast).text
    ana.send(second)
    ben.wait(lambda d: ben.unread_badge(cid) == 2, message="unread badge 2")
    assert ben.find("#total-unread").text == "2"

    # Ben opens it: his badge clears, Ana sees both marked read and Ben online.
    ben.open_conversation(cid)
    ben.wait(lambda d: ben.texts()[-2:] == [first, second], message="history")
    ben.wait(lambda d: ben.unread_badge(cid) == 0, message="badge cleared")
    ana.wait(lambda d: ana.messages() == [[first, "read"], [second, "read"]], message="read")
    presence = f'.presence[data-user-id="{ben_id}"]'
    ana.wait(lambda d: ana.find(presence).get_attribute("data-status") == "online")

    # Ben types: Ana sees it; his message arrives and the indicator goes.
    typing = f"{ben_name} is typing"
    ben.find("#message-input").send_keys("Monday works")
    ana.wait(lambda d: typing in ana.find("#typing-indicator").text, message="typing shown")
    ben.find("#message-input").send_keys(", see you at 9!")
    ben.find("#send").click()
    ana.wait(lambda d: ana.texts()[-1] == reply, message="reply shown")
    ana.wait(lambda d: ana.find("#typing-indicator").text == "", message="typing cleared")
    # Ana has the conversation open: Ben's message is read at once, and no badge.
    ben.wait(lambda d: ben.status_of(reply) == "read", message="reply read")
    assert ana.unread_badge(cid) == 0

    # Both ways: Ben is typing again when the screenshot is taken.
    ben.find("#message-input").send_keys("I will bring coffee")
    ana.wait(lambda d: typing in ana.find("#typing-indicator").text, message="typing again")
    # The artifact of the run; docs/screenshot.png is a committed copy of one.
    ana.screenshot(ARTIFACTS / "chat.png")


def test_service_notification_shows_as_toast(server, pair, browsers):
    ana_id, ana_name = pair["ana"]
    ana = browsers(ana_id, ana_name).sign_in(pair["tokens"][ana_id])
    posted = api(
        server,
        "POST",
        "/api/notifications",
        service_token(),
        json_body={
            "user_id": ana_id,
            "type": "friend_accepted",
            "payload": {"from_user": {"id": "7", "username": "maria"}},
        },
    )
    assert posted.status_code == 201, posted.text
    toast = '.toast[data-notification-type="friend_accepted"]'
    ana.wait(lambda d: ana.visible(toast), message="toast shown")
    text = ana.find(toast).text
    assert "Friend accepted" in text and "maria" in text
    assert ana.find(toast).get_attribute("data-notification-id") == str(posted.json()["id"])


def test_restart_loses_and_duplicates_nothing(server, pair, browsers):
    (ana_id, ana_name), (ben_id, ben_name) = pair["ana"], pair["ben"]
    cid = pair["conversation"]
    ana = browsers(ana_id, ana_name).sign_in(pair["tokens"][ana_id])
    ben = browsers(ben_id, ben_name).sign_in(pair["tokens"][ben_id])
    ana.open_conversation(cid)
    ben.open_conversation(cid)
    ana.driver.execute_script(WATCH_BADGE)

    sent = []

    def say(text):
        ana.find("#message-input").send_keys("typing…")
        ana.find("#message-input").clear()
        ana.send(text)
        sent.append(text)

    for i in range(3):
        say(f"before restart {i}")
    ana.wait(lambda d: ana.texts() == sent and ben.texts() == sent, message="first messages")

    restart = threading.Thread(target=server.restart)
    restart.start()
    deadline = time.monotonic() + 120
    i = 0
    while (restart.is_alive() or i < 5) and time.monotonic() < deadline:
        say(f"during restart {i}")
        i += 1
        time.sleep(0.3)
    restart.join()
    for i in range(3):
        say(f"after restart {i}")

    def settled(page):
        shown = page.messages()
        return [text for text, _ in shown] == sent and all(
            status in (None, "sent", "read") for _, status in shown
        )

    try:
        ana.wait(lambda d: settled(ana) and ben.texts() == sent, timeout=60)
    except TimeoutException:
        pytest.fail(f"sent {sent}\nana shows {ana.messages()}\nben shows {ben.texts()}")

    states = ana.driver.execute_script("return window.__badgeStates")
    assert "reconnecting" in states, states
    assert ana.badge() == ben.badge() == "connected"
    path = f"/api/conversations/{cid}/messages?limit=200"
    stored = api(server, "GET", path, pair["tokens"][ana_id])
    assert [m["content"] for m in stored.json()["messages"]] == sent


def test_expired_token_signs_out_without_reconnect_loop(pair, browsers):
    ana_id, ana_name = pair["ana"]
    ana = browsers(ana_id, ana_name)
    # Past its exp but inside the server's 30 s leeway: valid for a few more seconds,
    # then the server closes the open sockets with 4001 token_expired.
    ana.sign_in(make_token(ana_id, name=ana_name, exp_in=-20))
    ana.wait(lambda d: ana.visible("#signed-out"), timeout=75, message="signed out")
    assert ana.find("#signed-out").get_attribute("data-reason") == "token_expired"
    assert "expired" in ana.find("#signed-out-reason").text
    assert not ana.visible("#workspace")
    assert ana.driver.execute_script("return sessionStorage.getItem('parley.token')") is None

    opened = ana.driver.execute_script("return window.__sockets")
    time.sleep(6)  # several backoff periods
    assert ana.driver.execute_script("return window.__sockets") == opened
    assert ana.visible("#signed-out")


def test_parley_js_rest_helpers(server, pair, browsers):
    ana_id, ana_name = pair["ana"]
    cid = pair["conversation"]
    token = pair["tokens"][ana_id]
    for text in ("one", "two", "three"):
        path = f"/api/conversations/{cid}/messages"
        posted = api(server, "POST", path, token, json_body={"content": text})
        assert posted.status_code == 201, posted.text
    page = browsers(ana_id, ana_name)
    page.driver.get(server.base + "/")
    result = page.driver.execute_async_script(
        """
        const [token, cid, done] = arguments;
        (async () => {
          const { Parley, ParleyError } = await import('/parley.js');
          const parley = new Parley({ token });
          const me = await parley.me();
          const list = await parley.listConversations({ limit: 10 });
          const latest = await parley.history(cid, { limit: 2 });
          const older = await parley.history(cid, { before: latest.messages[0].id });
          const newer = await parley.history(cid, { after: older.messages[0].id, limit: 1 });
          const unread = await parley.unread();
          const notes = await parley.notifications({ limit: 5 });
          const read = await parley.markRead(cid);
          const conversation = await parley.getConversation(cid, { markRead: false });
          let missing = null;
          try { await parley.getConversation(999999999); } catch (e) {
            missing = e instanceof ParleyError ? [e.status, e.code] : String(e);
          }
          parley.close();
          return {
            me: me.user.id,
            listed: list.conversations.some((c) => c.id === cid),
            latest: latest.messages.map((m) => m.content),
            older: older.messages.map((m) => m.content),
            newer: newer.messages.map((m) => m.content),
            unread: typeof unread.total,
            notes: Array.isArray(notes.notifications),
            read: read.unread_count,
            conversation: conversation.id,
            missing,
          };
        })().then(done, (e) => done({ error: String(e) }));
        """,
        token,
        cid,
    )
    assert result == {
        "me": ana_id,
        "listed": True,
        "latest": ["two", "three"],
        "older": ["one"],
        "newer": ["two"],
        "unread": "number",
        "notes": True,
        "read": 0,
        "conversation": cid,
        "missing": [404, "not_found"],
    }


def test_parley_js_emits_each_notification_once_through_a_bus_catch_up(isolated):
    """When a worker's LISTEN connection comes back, its catch-up sends again
    the notifications of the seconds before it was lost (PROTOCOL.md, delivery
    guarantees): a raw socket gets the first one twice, parley.js emits it
    once, and also the one stored while the connection was down."""
    iso = isolated()
    conn = iso.connect()
    user = new_id("ana")
    token = make_token(user, "Ana")
    raw = iso.ws("/ws/notifications/", token)
    assert raw.recv()["type"] == "ready"
    page = ChatPage(iso.srv.base, user, "Ana")
    try:
        page.driver.get(iso.srv.base + "/")
        synced = page.driver.execute_async_script(
            """
            const [token, done] = arguments;
            (async () => {
              const { Parley } = await import('/parley.js');
              window.__notes = [];
              const socket = new Parley({ token }).connectNotifications({ after: 0 });
              socket.subscribe('notification', (f) => window.__notes.push(f.id));
              socket.subscribe('synced', () => done(true));
            })().catch((e) => done(String(e)));
            """,
            token,
        )
        assert synced is True, synced

        def notes():
            return page.driver.execute_script("return window.__notes")

        post = "SELECT parley_post_notification(%s, %s, '{}')::json->>'id'"
        first = int(sql_one(conn, post, user, "friend_request"))
        page.wait(lambda d: notes() == [first], message="the first notification")
        listening = iso.srv.output().count("bus: listening")
        with parley_cut_off(conn):
            second = int(sql_one(conn, post, user, "match"))
        wait_for(lambda: iso.srv.output().count("bus: listening") >=
                 listening + len(iso.pids), 30, 0.1, "every worker listening again")
        third = int(sql_one(conn, post, user, "friend_accepted"))

        raw.recv_until(lambda f: f.get("id") == third, timeout=15)
        assert [f.get("id") for f in raw.frames].count(first) == 2, raw.frames
        page.wait(lambda d: third in notes(), message="the third notification")
        assert notes() == [first, second, third]
    finally:
        page.quit()
