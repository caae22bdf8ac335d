/**
 * parley.js: the browser client for the Parley chat server.
 *
 * A dependency-free ES module. One {@link Parley} instance holds the access token
 * (refreshing it before it expires when the app supplies `getToken`), offers the
 * REST helpers, and opens sockets:
 *
 * - {@link ChatSocket} for one conversation: live messages, acknowledged and
 *   idempotent sends that survive reconnects, typing, read receipts, presence.
 * - {@link NotificationSocket} for the user's notifications.
 *
 * Both sockets reconnect with exponential backoff and jitter, resume where they
 * left off so that nothing is lost or delivered twice, send heartbeats, and stop
 * (instead of looping) when the server refuses the token or the access.
 *
 * @module parley
 */

const BACKOFF_MIN_MS = 1_000;
const BACKOFF_MAX_MS = 30_000;
const HEARTBEAT_INTERVAL_MS = 30_000;
const PONG_TIMEOUT_MS = 10_000;
const READY_TIMEOUT_MS = 10_000;
const TYPING_INTERVAL_MS = 2_000;
const RATE_LIMIT_RETRY_MS = 1_000;
const TOKEN_REFRESH_MARGIN_MS = 60_000;
const TOKEN_REFRESH_MIN_DELAY_MS = 5_000;
const TOKEN_REFRESH_RETRY_MS = 10_000;
/** Sends allowed in flight (unacknowledged) at once, well under the server's burst. */
const SEND_WINDOW = 8;
/** Close codes after which reconnecting cannot help: bad token, no access. */
const FATAL_CLOSE_CODES = new Set([4001, 4003]);

/**
 * Connection states of a socket.
 * - `connecting`: the first connection is being opened.
 * - `open`: the server sent `ready`; the socket is usable.
 * - `reconnecting`: the connection was lost; waiting for or making the next attempt.
 * - `closed`: closed by the app, or refused by the server (see `closeError`).
 * @readonly
 * @enum {string}
 */
export const State = Object.freeze({
  CONNECTING: 'connecting',
  OPEN: 'open',
  RECONNECTING: 'reconnecting',
  CLOSED: 'closed',
});

/** A failed REST call: the HTTP status and Parley's error code and message. */
export class ParleyError extends Error {
  /**
   * @param {number} status HTTP status.
   * @param {string} code Parley error code, e.g. `not_found`.
   * @param {string} message Human-readable text.
   */
  constructor(status, code, message) {
    super(message);
    this.name = 'ParleyError';
    this.status = status;
    this.code = code;
  }
}

/**
 * A minimal typed event emitter. A callback that throws is reported and does not
 * stop the others (or the socket that emitted the event).
 */
class Emitter {
  /** @type {Map<string, Set<Function>>} */
  #handlers = new Map();

  /**
   * Calls `callback(event)` for every event of `type`.
   * @param {string} type Event type, e.g. `message`, `state`.
   * @param {(event: object) => void} callback
   * @returns {() => void} A function that removes the subscription.
   */
  subscribe(type, callback) {
    let set = this.#handlers.get(type);
    if (!set) {
      set = new Set();
      this.#handlers.set(type, set);
    }
    set.add(callback);
    return () => set.delete(callback);
  }

  /**
   * @param {string} type
   * @param {object} event
   * @protected
   */
  emit(type, event) {
    for (const callback of [...(this.#handlers.get(type) ?? [])]) {
      try {
        callback(event);
      } catch (err) {
        (globalThis.reportError ?? console.error)(err);
      }
    }
  }
}

/**
 * Reads the `exp` claim of a JWT without verifying it.
 * @param {string} token
 * @returns {number|null} Expiry in milliseconds since the epoch, or null.
 */
function tokenExpiry(token) {
  const payload = token.split('.')[1];
  if (!payload) return null;
  try {
    const claims = JSON.parse(atob(payload.replace(/-/g, '+').replace(/_/g, '/')));
    return typeof claims.exp === 'number' ? claims.exp * 1000 : null;
  } catch {
    return null;
  }
}

/**
 * Delay before reconnect attempt number `attempt` (0-based): 1 s doubling up to 30 s,
 * with "equal jitter" (a random point in the upper half) so clients spread out.
 * @param {number} attempt
 * @returns {number} Milliseconds.
 */
function backoffDelay(attempt) {
  const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** attempt);
  return ceiling / 2 + (Math.random() * ceiling) / 2;
}

/**
 * A random client id for idempotent sends (works outside secure contexts too).
 * @returns {string}
 */
function newClientId() {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return `c-${Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('')}`;
}

/**
 * The client: token holder, REST helpers, socket factory.
 *
 * Events (via `subscribe`):
 * - `token` `{type, token, expiresAt}`: the token changed (refreshed or set).
 * - `token_error` `{type, error}`: `getToken()` failed; it is retried while the
 *   current token is still valid.
 */
export class Parley extends Emitter {
  /** @type {string} */
  #token;
  /** @type {number|null} */
  #expiresAt = null;
  /** @type {(() => Promise<string>)|undefined} */
  #getToken;
  /** @type {Promise<string>|null} */
  #refreshing = null;
  #refreshTimer = 0;
  /** When the token is due for a refresh (ms since the epoch). */
  #refreshAt = Infinity;
  /** @type {Set<ParleySocket>} */
  #sockets = new Set();

  /**
   * @param {object} options
   * @param {string} options.token The current access token (a JWT).
   * @param {() => Promise<string>} [options.getToken] Returns a fresh token; called
   *   shortly before the current one expires, and when the server answers 401.
   * @param {string} [options.baseUrl] Origin of the Parley server, e.g.
   *   `https://chat.example.com`; defaults to the page's origin.
   */
  constructor({ token, getToken, baseUrl = globalThis.location?.origin }) {
    super();
    if (!baseUrl) throw new TypeError('Parley: baseUrl is required outside a page');
    /** Origin of the server; REST and socket paths are resolved against it. @type {string} */
    this.baseUrl = baseUrl;
    this.#getToken = getToken;
    this.setToken(token);
  }

  /** The current access token. @type {string} */
  get token() {
    return this.#token;
  }

  /** Expiry of the current token in ms since the epoch (null if unknown). @type {number|null} */
  get tokenExpiresAt() {
    return this.#expiresAt;
  }

  /**
   * Replaces the token: open sockets re-authenticate with it (`auth`), the next
   * connections and requests use it, and the next refresh is scheduled from its `exp`.
   * @param {string} token
   */
  setToken(token) {
    if (typeof token !== 'string' || !token) throw new TypeError('Parley: token must be a non-empty string');
    this.#token = token;
    this.#expiresAt = tokenExpiry(token);
    this.#scheduleRefresh();
    this.emit('token', { type: 'token', token, expiresAt: this.#expiresAt });
  }

  /**
   * Fetches a new token through `getToken()` now (concurrent calls share one request).
   * @returns {Promise<string>} The new token.
   */
  refreshToken() {
    if (!this.#getToken) return Promise.reject(new Error('Parley: no getToken callback'));
    this.#refreshing ??= Promise.resolve()
      .then(() => this.#getToken())
      .then((token) => {
        this.setToken(token);
        return token;
      })
      .finally(() => {
        this.#refreshing = null;
      });
    return this.#refreshing;
  }

  /**
   * The token to use right now: refreshed first if it is due (the timer may not have
   * run, e.g. in a sleeping tab) and `getToken` was given. A failed refresh yields the
   * current token.
   * @returns {Promise<string>}
   */
  async getFreshToken() {
    if (this.#getToken && Date.now() >= this.#refreshAt) {
      try {
        return await this.refreshToken();
      } catch (error) {
        this.emit('token_error', { type: 'token_error', error });
      }
    }
    return this.#token;
  }

  /**
   * Opens a chat socket for one conversation.
   * @param {number} conversationId
   * @param {object} [options]
   * @param {number} [options.after] Id of the last message the app already has (for
   *   example the newest one of the history it loaded over REST): the server replays
   *   what follows before going live, so nothing falls in between.
   * @returns {ChatSocket}
   */
  connectChat(conversationId, options = {}) {
    return this.#track(new ChatSocket(this, conversationId, options));
  }

  /**
   * Opens the notification socket of the signed-in user.
   * @param {object} [options]
   * @param {number} [options.after] Id of the last notification the app already has.
   *   Without it the socket starts from the newest stored notification.
   * @returns {NotificationSocket}
   */
  connectNotifications(options = {}) {
    return this.#track(new NotificationSocket(this, options));
  }

  /**
   * Disposes of the client: closes every socket opened through it and stops
   * refreshing the token (`getToken` is dropped). Create a new Parley to start over.
   */
  close() {
    this.#getToken = undefined;
    this.#scheduleRefresh();
    for (const socket of this.#sockets) socket.close();
  }

  /**
   * `GET /api/me`.
   * @returns {Promise<{user: {id: string, name: string}, unread_messages: number, unread_notifications: number}>}
   */
  me() {
    return this.request('GET', '/api/me');
  }

  /**
   * `GET /api/conversations`: most recent activity first.
   * @param {{limit?: number, before?: string}} [options] `before` is the previous page's `next_before`.
   * @returns {Promise<{conversations: object[], next_before: string|null}>}
   */
  listConversations({ limit, before } = {}) {
    return this.request('GET', '/api/conversations', { query: { limit, before } });
  }

  /**
   * `GET /api/conversations/{id}`. Marks the conversation read unless `markRead` is false.
   * @param {number} conversationId
   * @param {{markRead?: boolean}} [options]
   * @returns {Promise<object>} The conversation.
   */
  getConversation(conversationId, { markRead = true } = {}) {
    return this.request('GET', `/api/conversations/${conversationId}`, {
      query: { mark_read: markRead ? undefined : 'false' },
    });
  }

  /**
   * `GET /api/conversations/{id}/messages`: a page of messages, oldest first.
   * Neither cursor: the latest page; `before`: the page before that id; `after`: the
   * first page after that id.
   * @param {number} conversationId
   * @param {{before?: number, after?: number, limit?: number}} [options]
   * @returns {Promise<{messages: object[], has_more: boolean}>}
   */
  history(conversationId, { before, after, limit } = {}) {
    return this.request('GET', `/api/conversations/${conversationId}/messages`, {
      query: { before, after, limit },
    });
  }

  /**
   * `POST /api/conversations/{id}/read`: moves the read position to `messageId`
   * (or to the latest message when omitted).
   * @param {number} conversationId
   * @param {number} [messageId]
   * @returns {Promise<{unread_count: number}>}
   */
  markRead(conversationId, messageId) {
    return this.request('POST', `/api/conversations/${conversationId}/read`, {
      body: messageId == null ? undefined : { message_id: messageId },
    });
  }

  /**
   * `GET /api/unread`: the conversations with unread messages and the total.
   * @returns {Promise<{total: number, conversations: {id: number, unread_count: number, muted: boolean}[]}>}
   */
  unread() {
    return this.request('GET', '/api/unread');
  }

  /**
   * `GET /api/notifications`: newest first.
   * @param {{limit?: number, before?: number, unread?: boolean}} [options]
   * @returns {Promise<{notifications: object[], has_more: boolean}>}
   */
  notifications({ limit, before, unread } = {}) {
    return this.request('GET', '/api/notifications', {
      query: { limit, before, unread: unread ? 'true' : undefined },
    });
  }

  /**
   * Calls a REST endpoint with `Authorization: Bearer`. On a 401 with `getToken`
   * available, refreshes the token and tries once more.
   * @param {string} method
   * @param {string} path E.g. `/api/me`.
   * @param {{query?: Record<string, string|number|undefined>, body?: object}} [options]
   * @returns {Promise<any>} The decoded JSON body (null when empty or not JSON).
   * @throws {ParleyError} On a non-2xx answer.
   */
  async request(method, path, { query = {}, body } = {}) {
    const url = new URL(path, this.baseUrl);
    for (const [key, value] of Object.entries(query)) {
      if (value != null) url.searchParams.set(key, String(value));
    }
    const send = (token) =>
      fetch(url, {
        method,
        headers: {
          Authorization: `Bearer ${token}`,
          ...(body === undefined ? {} : { 'Content-Type': 'application/json' }),
        },
        body: body === undefined ? undefined : JSON.stringify(body),
      });

    let response = await send(await this.getFreshToken());
    if (response.status === 401 && this.#getToken) {
      const token = await this.refreshToken().catch((error) => {
        this.emit('token_error', { type: 'token_error', error });
        return null;
      });
      if (token) response = await send(token);
    }
    const data = await response.json().catch(() => null);
    if (!response.ok) {
      throw new ParleyError(response.status, data?.error?.code ?? 'http_error', data?.error?.message ?? response.statusText);
    }
    return data;
  }

  /**
   * Keeps a socket in the set that `close()` closes, until it closes.
   * @template {ParleySocket} T
   * @param {T} socket
   * @returns {T}
   */
  #track(socket) {
    this.#sockets.add(socket);
    socket.subscribe('state', ({ state }) => {
      if (state === State.CLOSED) this.#sockets.delete(socket);
    });
    return socket;
  }

  /**
   * Plans the next `getToken()` call: a minute before expiry, or at 80 % of a short
   * remaining lifetime. An already expired token gets no timer (that could spin if
   * `getToken()` keeps returning it); `getFreshToken()` refreshes it on demand.
   */
  #scheduleRefresh() {
    clearTimeout(this.#refreshTimer);
    this.#refreshAt = Infinity;
    if (!this.#getToken || this.#expiresAt === null) return;
    const remaining = this.#expiresAt - Date.now();
    if (remaining <= 0) {
      this.#refreshAt = 0;
      return;
    }
    const delay = Math.max(TOKEN_REFRESH_MIN_DELAY_MS, remaining - TOKEN_REFRESH_MARGIN_MS, remaining * 0.8);
    this.#refreshAt = Date.now() + delay;
    this.#refreshIn(delay);
  }

  /**
   * Refreshes after `delay` ms, retrying every few seconds while the token is valid.
   * @param {number} delay
   */
  #refreshIn(delay) {
    this.#refreshTimer = setTimeout(() => {
      this.refreshToken().catch((error) => {
        this.emit('token_error', { type: 'token_error', error });
        if (this.#expiresAt > Date.now()) this.#refreshIn(TOKEN_REFRESH_RETRY_MS);
      });
    }, delay);
  }
}

/**
 * What both sockets share: connecting with the token as a subprotocol, the state
 * machine, reconnection with backoff, heartbeats, and re-authentication when the
 * client's token changes. Subclasses implement the hooks marked protected.
 *
 * Events (via `subscribe`): every server frame under its own `type` (`ready`,
 * `error`, `pong`, `auth_ok`, ...), and
 * - `state` `{type, state, previous, closeError}`: the connection state changed;
 *   `closeError` (`{code, reason}`) is set when the server refused the connection
 *   for good (4001 `token_expired`/`unauthenticated`, 4003 `forbidden`).
 */
class ParleySocket extends Emitter {
  /** @type {Parley} */
  #parley;
  /** @type {string} */
  #path;
  /** @type {WebSocket|null} */
  #ws = null;
  /** The token the current connection was opened with. @type {string|null} */
  #wsToken = null;
  #state = State.CONNECTING;
  /** @type {{code: number, reason: string}|null} */
  #closeError = null;
  #attempt = 0;
  #retryTimer = 0;
  #heartbeatTimer = 0;
  #deadlineTimer = 0;
  /** @type {() => void} */
  #unsubscribeToken;

  /**
   * @param {Parley} parley
   * @param {string} path Socket path, e.g. `/ws/notifications/`.
   */
  constructor(parley, path) {
    super();
    this.#parley = parley;
    this.#path = path;
    this.#unsubscribeToken = parley.subscribe('token', ({ token }) => {
      if (this.#state === State.OPEN) this.transmit({ type: 'auth', token });
    });
    // Deferred so that the subclass constructor finishes first.
    queueMicrotask(() => this.#open());
  }

  /** The connection state (see {@link State}). @type {string} */
  get state() {
    return this.#state;
  }

  /** Why the server refused the connection for good, or null. @type {{code: number, reason: string}|null} */
  get closeError() {
    return this.#closeError;
  }

  /** The client this socket belongs to. @type {Parley} */
  get parley() {
    return this.#parley;
  }

  /** Closes the socket for good; it does not reconnect. */
  close() {
    if (this.#state === State.CLOSED) return;
    this.#detach()?.close(1000, 'client_closed');
    this.#finish(null);
  }

  /**
   * Sends a frame if the connection is open (the server has sent `ready`).
   * @param {object} frame
   * @returns {boolean} Whether it was sent.
   * @protected
   */
  transmit(frame) {
    if (this.#state !== State.OPEN || this.#ws?.readyState !== WebSocket.OPEN) return false;
    this.#ws.send(JSON.stringify(frame));
    return true;
  }

  /**
   * Query parameters for the next connection.
   * @returns {Record<string, string|number>}
   * @protected
   */
  connectParams() {
    return {};
  }

  /**
   * Sees every frame before subscribers do (`ready` once the state is open).
   * @param {object} frame
   * @returns {boolean} Whether to emit it to subscribers (false drops a duplicate).
   * @protected
   */
  // eslint-disable-next-line no-unused-vars
  handleFrame(frame) {
    return true;
  }

  /**
   * Called when the connection is lost (before reconnecting) and when the socket closes.
   * @protected
   */
  handleDisconnect() {}

  /** Opens one connection attempt. */
  async #open() {
    const token = await this.#parley.getFreshToken();
    if (this.#state === State.CLOSED) return;
    const url = new URL(this.#path, this.#parley.baseUrl);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    for (const [key, value] of Object.entries(this.connectParams())) url.searchParams.set(key, String(value));

    let ws;
    try {
      ws = new WebSocket(url, ['parley', `bearer.${token}`]);
    } catch {
      // The token cannot even be a subprotocol (stray characters): it is no token.
      this.#finish({ code: 4001, reason: 'unauthenticated' });
      return;
    }
    this.#ws = ws;
    this.#wsToken = token;
    ws.onmessage = (event) => {
      if (ws === this.#ws) this.#receive(event.data);
    };
    ws.onclose = (event) => {
      if (ws === this.#ws) this.#lost(event.code, event.reason);
    };
    // A close event always follows an error; handling it also keeps Node's `ws` from throwing.
    ws.onerror = () => {};
    this.#armDeadline(READY_TIMEOUT_MS);
  }

  /** @param {unknown} data */
  #receive(data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    if (frame === null || typeof frame !== 'object' || typeof frame.type !== 'string') return;

    if (frame.type === 'ready') {
      this.#attempt = 0;
      clearTimeout(this.#deadlineTimer);
      this.#heartbeatTimer = setInterval(() => {
        if (this.transmit({ type: 'ping' })) this.#armDeadline(PONG_TIMEOUT_MS);
      }, HEARTBEAT_INTERVAL_MS);
      this.#setState(State.OPEN);
      // The token was refreshed while this connection was being opened.
      if (this.#wsToken !== this.#parley.token) this.transmit({ type: 'auth', token: this.#parley.token });
    } else if (frame.type === 'pong') {
      clearTimeout(this.#deadlineTimer);
    }
    if (this.handleFrame(frame)) this.emit(frame.type, frame);
  }

  /**
   * Treats the connection as dead unless `ready` or `pong` clears the timer in time.
   * @param {number} ms
   */
  #armDeadline(ms) {
    clearTimeout(this.#deadlineTimer);
    this.#deadlineTimer = setTimeout(() => {
      this.#detach()?.close(4000, 'heartbeat_timeout');
      this.#reconnect();
    }, ms);
  }

  /**
   * @param {number} code
   * @param {string} reason
   */
  #lost(code, reason) {
    this.#detach();
    if (FATAL_CLOSE_CODES.has(code)) this.#finish({ code, reason });
    else this.#reconnect();
  }

  #reconnect() {
    this.handleDisconnect();
    this.#setState(State.RECONNECTING);
    this.#retryTimer = setTimeout(() => this.#open(), backoffDelay(this.#attempt++));
  }

  /**
   * Stops the timers and forgets the current connection.
   * @returns {WebSocket|null} The connection that was current.
   */
  #detach() {
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#deadlineTimer);
    clearInterval(this.#heartbeatTimer);
    const ws = this.#ws;
    this.#ws = null;
    return ws;
  }

  /** @param {{code: number, reason: string}|null} closeError */
  #finish(closeError) {
    this.handleDisconnect();
    this.#unsubscribeToken();
    this.#closeError = closeError;
    this.#setState(State.CLOSED);
  }

  /** @param {string} state */
  #setState(state) {
    if (state === this.#state) return;
    const previous = this.#state;
    this.#state = state;
    this.emit('state', { type: 'state', state, previous, closeError: this.#closeError });
  }
}

/**
 * A pending (sent but not yet acknowledged) message.
 * @typedef {object} PendingMessage
 * @property {string} clientId
 * @property {string} content
 * @property {string} messageType
 * @property {object|null} metadata
 */

/**
 * The chat socket of one conversation (`/ws/chat/{id}/`).
 *
 * Besides the server frames (`ready`, `message`, `ack`, `typing`, `read_receipt`,
 * `presence`, `synced`, `error`, ...) and `state`, it emits:
 * - `failed` `{type, client_id, code, message}`: the server refused a send for good.
 *
 * Guarantees: `message` events arrive once each, in id order, across reconnects
 * (each reconnect resumes with `after` = the last id seen); each `send()` gets
 * exactly one `ack` (or `failed`), even when the connection drops in between.
 */
export class ChatSocket extends ParleySocket {
  #conversationId;
  /** @type {number|null} */
  #lastMessageId;
  /** @type {string|null} */
  #userId = null;
  /** Unacknowledged sends in send order. @type {Map<string, {frame: object, sentOn: number, retryAt: number}>} */
  #outbox = new Map();
  /** Counts connections, so the outbox knows what was sent on the current one. */
  #generation = 0;
  /** Whether this connection asked for a replay that has not finished yet. */
  #replaying = false;
  /** Open and caught up: sends go out now. */
  #live = false;
  #pumpTimer = 0;
  #typingSentAt = 0;
  #typingTimer = 0;

  /**
   * Use {@link Parley#connectChat}.
   * @param {Parley} parley
   * @param {number} conversationId
   * @param {{after?: number}} options
   */
  constructor(parley, conversationId, { after } = {}) {
    super(parley, `/ws/chat/${conversationId}/`);
    this.#conversationId = conversationId;
    this.#lastMessageId = after ?? null;
  }

  /** @type {number} */
  get conversationId() {
    return this.#conversationId;
  }

  /** Id of the newest message seen (the resume point), or null before `ready`. @type {number|null} */
  get lastMessageId() {
    return this.#lastMessageId;
  }

  /** Sends not yet acknowledged, oldest first. @type {PendingMessage[]} */
  get pending() {
    return Array.from(this.#outbox.values(), ({ frame }) => ({
      clientId: frame.client_id,
      content: frame.content,
      messageType: frame.message_type,
      metadata: frame.metadata,
    }));
  }

  /**
   * Sends a message. It is queued until the socket is open and caught up, re-sent
   * after a reconnect until acknowledged, and idempotent server-side by client id.
   * Watch `ack` / `failed` (and `message`) events for its fate.
   * @param {string} content
   * @param {{messageType?: string, metadata?: object|null, clientId?: string}} [options]
   * @returns {string} The client id of the message.
   */
  send(content, { messageType = 'TEXT', metadata = null, clientId = newClientId() } = {}) {
    if (this.state === State.CLOSED) throw new Error('Parley: the chat socket is closed');
    const frame = { type: 'message', content, message_type: messageType, metadata, client_id: clientId };
    this.#outbox.set(clientId, { frame, sentOn: -1, retryAt: 0 });
    this.stopTyping();
    this.#pump();
    return clientId;
  }

  /**
   * Call on every keystroke: tells the others "typing" at most every 2 s, and
   * "stopped" after 2 s without a call.
   */
  typing() {
    if (!this.#live) return;
    const now = Date.now();
    if (now - this.#typingSentAt >= TYPING_INTERVAL_MS) {
      this.transmit({ type: 'typing', is_typing: true });
      this.#typingSentAt = now;
    }
    clearTimeout(this.#typingTimer);
    this.#typingTimer = setTimeout(() => this.stopTyping(), TYPING_INTERVAL_MS);
  }

  /** Tells the others that typing stopped (no-op when it was not announced). */
  stopTyping() {
    clearTimeout(this.#typingTimer);
    if (!this.#typingSentAt) return;
    this.#typingSentAt = 0;
    this.transmit({ type: 'typing', is_typing: false });
  }

  /**
   * Moves the read position to `messageId` (the latest message when omitted); the
   * server answers with `read_receipt`.
   * @param {number} [messageId]
   * @returns {boolean} Whether it was sent (false while not connected: use
   *   {@link Parley#markRead} then).
   */
  markRead(messageId) {
    return this.transmit(messageId == null ? { type: 'read' } : { type: 'read', message_id: messageId });
  }

  /** @protected */
  connectParams() {
    this.#replaying = this.#lastMessageId !== null;
    return this.#replaying ? { after: this.#lastMessageId } : {};
  }

  /** @protected */
  handleFrame(frame) {
    switch (frame.type) {
      case 'ready':
        this.#generation += 1;
        this.#userId = frame.user?.id ?? null;
        this.#lastMessageId ??= frame.last_message_id ?? 0;
        if (!this.#replaying) this.#goLive();
        return true;
      case 'synced':
        if (frame.has_more) {
          this.transmit({ type: 'sync', after: frame.last_message_id });
        } else {
          this.#replaying = false;
          this.#goLive();
        }
        return true;
      case 'message':
        return this.#handleMessage(frame);
      case 'ack':
        return this.#settle(frame.client_id, frame);
      case 'error':
        this.#handleError(frame);
        return true;
      default:
        return true;
    }
  }

  /** @protected */
  handleDisconnect() {
    this.#live = false;
    clearTimeout(this.#pumpTimer);
    clearTimeout(this.#typingTimer);
    this.#typingSentAt = 0;
  }

  #goLive() {
    this.#live = true;
    this.#pump();
  }

  /**
   * Drops duplicates (ids are increasing within a conversation) and settles the
   * pending send whose ack was lost with a connection.
   * @param {object} frame
   * @returns {boolean} Whether to deliver it.
   */
  #handleMessage(frame) {
    const message = frame.message;
    if (typeof message?.id !== 'number') return false;
    if (this.#lastMessageId !== null && message.id <= this.#lastMessageId) return false;
    this.#lastMessageId = message.id;
    if (message.client_id != null && message.sender_id === this.#userId) {
      this.#settle(message.client_id, {
        type: 'ack',
        client_id: message.client_id,
        message_id: message.id,
        timestamp: message.timestamp,
      });
    }
    return true;
  }

  /**
   * Removes a send from the outbox and emits its single `ack`.
   * @param {string} clientId
   * @param {object} ack
   * @returns {boolean} False: the caller must not emit (this did, or it is stale).
   */
  #settle(clientId, ack) {
    if (!this.#outbox.delete(clientId)) return false;
    this.emit('ack', ack);
    this.#pump();
    return false;
  }

  /** @param {{code: string, message: string, ref: string|null}} frame */
  #handleError(frame) {
    const entry = frame.ref == null ? undefined : this.#outbox.get(frame.ref);
    if (!entry) return;
    if (frame.code === 'rate_limited') {
      entry.sentOn = -1;
      entry.retryAt = Date.now() + RATE_LIMIT_RETRY_MS;
    } else {
      this.#outbox.delete(frame.ref);
      this.emit('failed', { type: 'failed', client_id: frame.ref, code: frame.code, message: frame.message });
    }
    this.#pump();
  }

  /** Sends queued messages in order, at most SEND_WINDOW unacknowledged at a time. */
  #pump() {
    clearTimeout(this.#pumpTimer);
    if (!this.#live) return;
    let inFlight = 0;
    for (const entry of this.#outbox.values()) {
      if (entry.sentOn === this.#generation) {
        inFlight += 1;
        continue;
      }
      if (inFlight >= SEND_WINDOW) return;
      const wait = entry.retryAt - Date.now();
      if (wait > 0) {
        this.#pumpTimer = setTimeout(() => this.#pump(), wait);
        return;
      }
      if (!this.transmit(entry.frame)) return;
      entry.sentOn = this.#generation;
      inFlight += 1;
    }
  }
}

/**
 * The notification socket of the signed-in user (`/ws/notifications/`).
 *
 * Besides the server frames (`ready`, `synced`, `notifications_read`, each
 * notification under its own type such as `new_message` or `friend_request`, ...)
 * and `state`, it emits every notification also as `notification`.
 *
 * After a reconnect it sends `sync` with the last notification id seen, so stored
 * notifications are replayed (with `replay: true`) and none are lost or repeated.
 * Collapsed `new_message` notifications keep their id while their counts change,
 * so refresh unread counts over REST after a reconnect (`ready`). A live frame that
 * repeats one already had (same id and `created_at`: the server's catch-up after
 * its database connection came back may send a few again) is dropped.
 */
export class NotificationSocket extends ParleySocket {
  /** @type {number|null} */
  #lastNotificationId;

  /** `created_at` of the latest notifications had, by id (insertion order, bounded). */
  #seen = new Map();

  /**
   * Use {@link Parley#connectNotifications}.
   * @param {Parley} parley
   * @param {{after?: number}} options
   */
  constructor(parley, { after } = {}) {
    super(parley, '/ws/notifications/');
    this.#lastNotificationId = after ?? null;
  }

  /** Id of the newest notification seen (the resume point), or null. @type {number|null} */
  get lastNotificationId() {
    return this.#lastNotificationId;
  }

  /**
   * Marks one notification read (every tab gets `notifications_read`).
   * @param {number} id
   * @returns {boolean} Whether it was sent.
   */
  markRead(id) {
    return this.transmit({ type: 'read', id });
  }

  /**
   * Marks all notifications read.
   * @returns {boolean} Whether it was sent.
   */
  markAllRead() {
    return this.transmit({ type: 'read_all' });
  }

  /** @protected */
  handleFrame(frame) {
    if (frame.type === 'ready') {
      this.#catchUp();
      return true;
    }
    if (frame.type === 'synced') {
      if (frame.has_more) this.transmit({ type: 'sync', after: frame.last_notification_id });
      return true;
    }
    if (typeof frame.id !== 'number') return true; // not a notification
    if (frame.replay && frame.id <= (this.#lastNotificationId ?? 0)) return false;
    if (this.#seen.get(frame.id) === frame.created_at) return false;
    this.#seen.delete(frame.id);
    this.#seen.set(frame.id, frame.created_at);
    if (this.#seen.size > 256) this.#seen.delete(this.#seen.keys().next().value);
    this.#lastNotificationId = Math.max(this.#lastNotificationId ?? 0, frame.id);
    this.emit('notification', frame);
    return true;
  }

  /** Replays what was missed, or learns where "now" is on a first connection. */
  async #catchUp() {
    if (this.#lastNotificationId !== null) {
      this.transmit({ type: 'sync', after: this.#lastNotificationId });
      return;
    }
    try {
      const { notifications } = await this.parley.notifications({ limit: 1 });
      this.#lastNotificationId = Math.max(this.#lastNotificationId ?? 0, notifications[0]?.id ?? 0);
    } catch {
      // Left unknown: the next connection tries again.
    }
  }
}
