/**
 * The Parley chat page: sign in with a pasted token, a live conversation list with
 * unread badges, a message view with delivery marks, typing and presence, and
 * notification toasts. Built on parley.js only.
 */
import { Parley, ParleyError, State } from './parley.js';

const TOKEN_KEY = 'parley.token';
const HISTORY_PAGE = 50;
const CONVERSATION_PAGE = 50;
const TOAST_MS = 8_000;
const MAX_TOASTS = 4;
const TYPING_STALE_MS = 8_000;
const NEAR_BOTTOM_PX = 80;

/** @param {string} id @returns {HTMLElement} */
const byId = (id) => /** @type {HTMLElement} */ (document.getElementById(id));

const ui = {
  app: byId('app'),
  signedOut: byId('signed-out'),
  signInForm: /** @type {HTMLFormElement} */ (byId('sign-in-form')),
  tokenInput: /** @type {HTMLTextAreaElement} */ (byId('token-input')),
  signIn: /** @type {HTMLButtonElement} */ (byId('sign-in')),
  signedOutReason: byId('signed-out-reason'),
  workspace: byId('workspace'),
  badge: byId('connection-badge'),
  badgeText: byId('connection-text'),
  currentUser: byId('current-user'),
  signOut: byId('sign-out'),
  list: byId('conversation-list'),
  listEmpty: byId('conversation-empty'),
  loadMoreConversations: byId('load-more-conversations'),
  totalUnread: byId('total-unread'),
  placeholder: byId('conversation-placeholder'),
  view: byId('conversation-view'),
  title: byId('conversation-title'),
  subtitle: byId('conversation-subtitle'),
  participants: byId('participants'),
  conversationError: byId('conversation-error'),
  scroller: byId('message-scroller'),
  loadOlder: /** @type {HTMLButtonElement} */ (byId('load-older')),
  messages: byId('messages'),
  jumpLatest: byId('jump-latest'),
  typing: byId('typing-indicator'),
  composer: /** @type {HTMLFormElement} */ (byId('composer')),
  input: /** @type {HTMLTextAreaElement} */ (byId('message-input')),
  send: /** @type {HTMLButtonElement} */ (byId('send')),
  toasts: byId('toasts'),
};

const SIGNED_OUT_TEXT = {
  token_expired: 'Your session has expired. Paste a new token to continue.',
  unauthenticated: 'The server did not accept this token. Paste a valid one to continue.',
  rejected: 'This token was not accepted: it is invalid or has expired.',
  service: 'This is a service token; sign in with a user token.',
  network: 'Could not reach the server. Check the connection and try again.',
};

const BADGE_TEXT = {
  connecting: 'Connecting…',
  connected: 'Connected',
  reconnecting: 'Reconnecting…',
  error: 'Connection error',
};

const STATUS_LABEL = { pending: 'Sending', sent: 'Sent', read: 'Read', failed: 'Not sent' };

// ---------------------------------------------------------------- helpers

/**
 * Creates an element.
 * @param {string} tag
 * @param {Record<string, string|boolean|number|null|undefined>} [attrs] `class`, `text`,
 *   `hidden`, and attributes (`null`/`undefined`/`false` ones are skipped).
 * @param {...(Node|string)} children
 * @returns {HTMLElement}
 */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value == null || value === false) continue;
    if (key === 'class') node.className = String(value);
    else if (key === 'text') node.textContent = String(value);
    else node.setAttribute(key, value === true ? '' : String(value));
  }
  node.append(...children);
  return node;
}

/** @param {string} name @returns {string} Up to two initials. */
function initials(name) {
  const words = name.trim().split(/\s+/).filter(Boolean);
  return (words.length > 1 ? words[0][0] + words.at(-1)[0] : (words[0] ?? '?').slice(0, 2)).toUpperCase();
}

/** @param {string} key @returns {number} A stable hue for an avatar. */
function hue(key) {
  let h = 0;
  for (const ch of key) h = (h * 31 + ch.codePointAt(0)) % 360;
  return h;
}

/** @param {string} name @param {string} key */
function avatar(name, key, className = 'avatar') {
  const node = el('span', { class: className, 'aria-hidden': 'true', text: initials(name) });
  node.style.setProperty('--hue', String(hue(key)));
  return node;
}

const timeFormat = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });
const dateFormat = new Intl.DateTimeFormat(undefined, { month: 'short', day: 'numeric' });
const fullFormat = new Intl.DateTimeFormat(undefined, { dateStyle: 'full', timeStyle: 'short' });

/** @param {string} iso @returns {HTMLTimeElement} The time, with the date unless today. */
function timeElement(iso) {
  const date = new Date(iso);
  const today = date.toDateString() === new Date().toDateString();
  const text = today ? timeFormat.format(date) : `${dateFormat.format(date)}, ${timeFormat.format(date)}`;
  return /** @type {HTMLTimeElement} */ (el('time', { datetime: iso, title: fullFormat.format(date), text }));
}

/** @param {string} type e.g. `friend_accepted` @returns {string} e.g. `Friend accepted` */
function humanize(type) {
  const words = type.replace(/[._]+/g, ' ').trim();
  return words.charAt(0).toUpperCase() + words.slice(1);
}

/** @param {string|undefined} url @returns {boolean} Only the link forms Parley stores. */
function safeUrl(url) {
  return typeof url === 'string' && (/^https:\/\//i.test(url) || /^\/(?!\/)/.test(url));
}

/** @returns {boolean} Whether the person can see the page right now. */
const pageVisible = () => document.visibilityState === 'visible';

// ---------------------------------------------------------------- toasts

/**
 * Shows a toast.
 * @param {{title: string, body?: string, kind?: string, type?: string, id?: number, onOpen?: () => void}} toast
 */
function showToast({ title, body, kind = 'info', type, id, onOpen }) {
  const close = el('button', { type: 'button', class: 'toast-close', 'aria-label': 'Dismiss notification', text: '×' });
  const content = el('div', { class: 'toast-content' },
    el('strong', { class: 'toast-title', text: title }),
    ...(body ? [el('p', { class: 'toast-body', text: body })] : []));
  const toast = el('div', {
    class: `toast toast-${kind}`,
    role: kind === 'error' ? 'alert' : 'status',
    'data-notification-type': type,
    'data-notification-id': id,
  }, content, close);

  const dismiss = () => {
    clearTimeout(timer);
    toast.remove();
  };
  const timer = setTimeout(dismiss, TOAST_MS);
  close.addEventListener('click', dismiss);
  if (onOpen) {
    content.classList.add('clickable');
    content.tabIndex = 0;
    content.setAttribute('role', 'button');
    const open = () => {
      dismiss();
      onOpen();
    };
    content.addEventListener('click', open);
    content.addEventListener('keydown', (event) => {
      if (event.key === 'Enter' || event.key === ' ') {
        event.preventDefault();
        open();
      }
    });
  }
  ui.toasts.append(toast);
  while (ui.toasts.children.length > MAX_TOASTS) ui.toasts.firstElementChild?.remove();
}

// ---------------------------------------------------------------- conversation list

/**
 * The sidebar: conversations by recent activity, with live unread badges.
 */
class ConversationList {
  /** @type {Map<number, object>} */
  conversations = new Map();
  /** @type {Map<number, HTMLLIElement>} */
  #items = new Map();
  /** @type {string|null} */
  #nextBefore = null;
  /** @type {number|null} */
  activeId = null;
  total = 0;

  /** @param {Session} session */
  constructor(session) {
    this.session = session;
  }

  /** Loads the first page of conversations. */
  async load() {
    this.#nextBefore = null;
    ui.list.replaceChildren();
    this.#items.clear();
    this.conversations.clear();
    await this.loadMore();
  }

  /** Loads the next page. */
  async loadMore() {
    const page = await this.session.parley.listConversations({
      limit: CONVERSATION_PAGE,
      before: this.#nextBefore ?? undefined,
    });
    for (const conversation of page.conversations) this.conversations.set(conversation.id, conversation);
    this.#nextBefore = page.next_before;
    ui.loadMoreConversations.hidden = !page.next_before;
    this.#render();
  }

  /**
   * Adds or replaces a conversation.
   * @param {object} conversation
   */
  upsert(conversation) {
    this.conversations.set(conversation.id, conversation);
    this.#render();
  }

  /**
   * Updates one conversation's fields (unknown ids are fetched).
   * @param {number} id
   * @param {object} changes
   */
  async update(id, changes) {
    const conversation = this.conversations.get(id);
    if (conversation) {
      Object.assign(conversation, changes);
      this.#render();
      return;
    }
    try {
      this.upsert({ ...(await this.session.parley.getConversation(id, { markRead: false })), ...changes });
    } catch {
      // Not visible to this user (any more): nothing to show.
    }
  }

  /**
   * Records a message as the conversation's latest.
   * @param {object} message
   */
  noteMessage(message) {
    const conversation = this.conversations.get(message.conversation_id);
    if (!conversation || (conversation.last_message && conversation.last_message.id > message.id)) return;
    this.update(message.conversation_id, { last_message: message, updated_at: message.timestamp });
  }

  /**
   * Sets the unread count of a conversation and the total.
   * @param {number} id
   * @param {number} unread
   * @param {number} [total] The server's total; else adjusted by the difference.
   */
  setUnread(id, unread, total) {
    const conversation = this.conversations.get(id);
    const before = conversation?.unread_count ?? 0;
    this.setTotal(total ?? Math.max(0, this.total - before + unread));
    if (conversation) this.update(id, { unread_count: unread });
  }

  /** @param {number} total */
  setTotal(total) {
    this.total = total;
    ui.totalUnread.hidden = total === 0;
    ui.totalUnread.textContent = String(total);
    ui.totalUnread.setAttribute('aria-label', `${total} unread messages in total`);
    document.title = total ? `(${total}) Parley` : 'Parley';
  }

  /** @param {number|null} id */
  setActive(id) {
    this.activeId = id;
    this.#render();
  }

  /**
   * A conversation's display title: its title, else the other participants' names.
   * @param {object} conversation
   * @returns {string}
   */
  titleOf(conversation) {
    if (conversation.title) return conversation.title;
    const others = conversation.participants.filter((p) => p.id !== this.session.user.id);
    return others.map((p) => p.name).join(', ') || 'Just you';
  }

  /** Re-renders the items, reusing elements (keyed by id) and keeping focus. */
  #render() {
    const sorted = [...this.conversations.values()].sort((a, b) => String(b.updated_at).localeCompare(String(a.updated_at)));
    ui.listEmpty.hidden = sorted.length > 0;
    sorted.forEach((conversation, index) => {
      const item = this.#renderItem(conversation);
      if (ui.list.children[index] !== item) ui.list.insertBefore(item, ui.list.children[index] ?? null);
    });
  }

  /**
   * @param {object} conversation
   * @returns {HTMLLIElement}
   */
  #renderItem(conversation) {
    const title = this.titleOf(conversation);
    const last = conversation.last_message;
    const unread = conversation.unread_count ?? 0;
    const preview = last ? `${last.sender_id === this.session.user.id ? 'You: ' : ''}${messagePreview(last)}` : 'No messages yet';

    const badge = el('span', {
      class: 'unread-badge',
      'data-count': unread,
      'aria-label': `${unread} unread`,
      hidden: unread === 0,
      text: unread > 99 ? '99+' : unread,
    });
    const link = el('a', {
      class: 'conversation-item',
      href: `#/c/${conversation.id}`,
      'data-conversation-id': conversation.id,
      'data-unread': unread,
      'aria-current': conversation.id === this.activeId ? 'page' : null,
    },
    avatar(title, `c${conversation.id}`),
    el('span', { class: 'conversation-text' },
      el('span', { class: 'conversation-name', text: title }),
      el('span', { class: 'conversation-preview', text: preview })),
    el('span', { class: 'conversation-meta' },
      ...(last ? [timeElement(last.timestamp)] : []),
      badge));

    let item = this.#items.get(conversation.id);
    if (!item) {
      item = /** @type {HTMLLIElement} */ (el('li'));
      this.#items.set(conversation.id, item);
    }
    const focused = item.contains(document.activeElement);
    item.replaceChildren(link);
    if (focused) link.focus();
    return item;
  }
}

/** @param {object} message @returns {string} One line describing a message. */
function messagePreview(message) {
  switch (message.message_type) {
    case 'IMAGE': return `📷 ${message.content || 'Photo'}`;
    case 'FILE': return `📎 ${message.metadata?.name ?? (message.content || 'File')}`;
    case 'LOCATION': return `📍 ${message.content || 'Location'}`;
    default: return message.content;
  }
}

// ---------------------------------------------------------------- conversation view

/**
 * The open conversation: history, live messages over its chat socket, delivery
 * marks, typing and presence.
 */
class ConversationView {
  /** @type {import('./parley.js').ChatSocket|null} */
  chat = null;
  /** Confirmed message elements by id. @type {Map<number, HTMLLIElement>} */
  #byId = new Map();
  /** Own unconfirmed message elements by client id. @type {Map<string, HTMLLIElement>} */
  #pending = new Map();
  /** How far each other participant has read. @type {Map<string, number>} */
  #readUpTo = new Map();
  /** @type {Set<string>} */
  #online = new Set();
  /** @type {Map<string, {name: string, timer: number}>} */
  #typing = new Map();
  /** @type {Array<() => void>} */
  #unsubscribe = [];
  #hasOlder = false;
  #lastReadSent = 0;
  #readTimer = 0;
  #closed = false;

  /**
   * @param {Session} session
   * @param {number} id
   */
  constructor(session, id) {
    this.session = session;
    this.id = id;
    /** @type {object|null} */
    this.conversation = null;
  }

  /** Loads the conversation and its latest messages, then goes live. */
  async open() {
    const { parley } = this.session;
    this.#updateComposer();
    ui.messages.replaceChildren();
    ui.conversationError.hidden = true;
    this.#renderTyping();
    ui.title.textContent = 'Loading…';
    ui.subtitle.textContent = '';
    ui.participants.replaceChildren();
    ui.loadOlder.hidden = true;
    ui.jumpLatest.hidden = true;

    let conversation;
    let page;
    try {
      [conversation, page] = await Promise.all([parley.getConversation(this.id), parley.history(this.id, { limit: HISTORY_PAGE })]);
    } catch (error) {
      if (this.#closed) return;
      ui.title.textContent = 'Conversation unavailable';
      this.#showError(error instanceof ParleyError && error.status === 404
        ? 'This conversation does not exist or you are not a participant.'
        : 'Could not load this conversation. Try again later.');
      this.session.handleRestError(error);
      return;
    }
    if (this.#closed) return;

    this.conversation = conversation;
    this.session.list.setUnread(this.id, 0);
    this.session.list.upsert({ ...conversation, unread_count: 0 });
    for (const participant of conversation.participants) {
      if (participant.id !== this.session.user.id) this.#readUpTo.set(participant.id, 0);
    }
    this.#renderHeader();
    this.#hasOlder = page.has_more;
    ui.loadOlder.hidden = !page.has_more;
    for (const message of page.messages) this.#addMessage(message);
    this.scrollToLatest();

    const chat = parley.connectChat(this.id, { after: page.messages.at(-1)?.id ?? 0 });
    this.chat = chat;
    this.#unsubscribe.push(
      chat.subscribe('state', (event) => this.#onState(event)),
      chat.subscribe('ready', (event) => {
        this.#online = new Set(event.online);
        this.#renderHeader();
      }),
      chat.subscribe('message', ({ message }) => this.#onMessage(message)),
      chat.subscribe('ack', (ack) => this.#onAck(ack)),
      chat.subscribe('failed', (failure) => this.#onFailed(failure)),
      chat.subscribe('typing', (event) => this.#onTyping(event)),
      chat.subscribe('read_receipt', (event) => this.#onReadReceipt(event)),
      chat.subscribe('presence', (event) => this.#onPresence(event)),
      chat.subscribe('error', (event) => {
        if (event.ref == null && event.code !== 'rate_limited') showToast({ title: 'Chat error', body: event.message, kind: 'error' });
      }),
    );
    this.session.updateBadge();
    this.#updateComposer();
  }

  /** Leaves the conversation: closes its socket and timers. */
  close() {
    this.#closed = true;
    for (const unsubscribe of this.#unsubscribe) unsubscribe();
    this.chat?.close();
    clearTimeout(this.#readTimer);
    for (const { timer } of this.#typing.values()) clearTimeout(timer);
  }

  /** Sends what is in the composer. */
  sendComposer() {
    const text = ui.input.value.trim();
    if (!text || !this.chat || this.chat.state === State.CLOSED) return;
    const clientId = this.chat.send(text);
    ui.input.value = '';
    autoGrow();
    const item = this.#renderMessage({
      client_id: clientId,
      sender_id: this.session.user.id,
      sender_name: this.session.user.name,
      content: text,
      message_type: 'TEXT',
      metadata: null,
      timestamp: new Date().toISOString(),
    }, 'pending');
    this.#pending.set(clientId, item);
    ui.messages.append(item);
    this.scrollToLatest();
  }

  /** Called on every keystroke in the composer. */
  typing() {
    this.chat?.typing();
  }

  /** Loads the page before the oldest message shown, keeping the scroll position. */
  async loadOlder() {
    const oldest = Math.min(...this.#byId.keys());
    ui.loadOlder.disabled = true;
    try {
      const page = await this.session.parley.history(this.id, { before: oldest, limit: HISTORY_PAGE });
      const previousHeight = ui.scroller.scrollHeight;
      for (const message of page.messages) this.#addMessage(message);
      ui.scroller.scrollTop += ui.scroller.scrollHeight - previousHeight;
      this.#hasOlder = page.has_more;
    } catch (error) {
      this.session.handleRestError(error);
    } finally {
      ui.loadOlder.disabled = false;
      ui.loadOlder.hidden = !this.#hasOlder;
    }
  }

  /** Marks what is shown as read, soon (coalescing bursts), if the page is visible. */
  scheduleRead() {
    clearTimeout(this.#readTimer);
    this.#readTimer = setTimeout(() => {
      if (!pageVisible() || !this.chat) return;
      const latest = Math.max(0, ...this.#byId.keys());
      if (latest > this.#lastReadSent && this.chat.markRead(latest)) this.#lastReadSent = latest;
    }, 250);
  }

  /** @param {{state: string, closeError: {code: number, reason: string}|null}} event */
  #onState({ state, closeError }) {
    this.session.updateBadge();
    this.#updateComposer();
    if (state === State.OPEN) this.scheduleRead();
    if (state !== State.CLOSED || !closeError) return;
    if (closeError.code === 4001) this.session.expire(closeError.reason);
    else this.#showError('You no longer have access to this conversation.');
  }

  /** @param {object} message */
  #onMessage(message) {
    const atBottom = this.#nearBottom();
    this.#addMessage(message);
    this.session.list.noteMessage(message);
    if (message.sender_id && message.sender_id !== this.session.user.id) {
      this.#clearTyping(message.sender_id);
      this.scheduleRead();
    }
    if (atBottom || message.sender_id === this.session.user.id) this.scrollToLatest();
    else ui.jumpLatest.hidden = false;
  }

  /** @param {{client_id: string, message_id: number}} ack */
  #onAck({ client_id: clientId, message_id: id }) {
    const item = this.#pending.get(clientId);
    if (!item) return;
    this.#pending.delete(clientId);
    this.#confirm(item, id);
    this.#setStatus(item, this.#isRead(id) ? 'read' : 'sent');
  }

  /** @param {{client_id: string, code: string, message: string}} failure */
  #onFailed({ client_id: clientId, message }) {
    const item = this.#pending.get(clientId);
    if (!item) return;
    this.#pending.delete(clientId);
    this.#setStatus(item, 'failed');
    item.querySelector('.message-status')?.setAttribute('title', message);
    showToast({ title: 'Message not sent', body: message, kind: 'error' });
  }

  /** @param {{user_id: string, username: string, is_typing: boolean}} event */
  #onTyping({ user_id: userId, username, is_typing: isTyping }) {
    if (!isTyping) {
      this.#clearTyping(userId);
      return;
    }
    clearTimeout(this.#typing.get(userId)?.timer);
    // The server sends is_typing:false by itself; this only guards against a lost one.
    const timer = setTimeout(() => this.#clearTyping(userId), TYPING_STALE_MS);
    this.#typing.set(userId, { name: username, timer });
    this.#renderTyping();
  }

  /** @param {{user_id: string, message_id: number}} event */
  #onReadReceipt({ user_id: userId, message_id: messageId }) {
    if (userId === this.session.user.id) {
      this.session.list.setUnread(this.id, 0);
      return;
    }
    this.#readUpTo.set(userId, Math.max(this.#readUpTo.get(userId) ?? 0, messageId));
    this.#refreshReadMarks();
  }

  /** @param {{user_id: string, status: string}} event */
  #onPresence({ user_id: userId, status }) {
    if (status === 'online') this.#online.add(userId);
    else {
      this.#online.delete(userId);
      this.#clearTyping(userId);
    }
    this.#renderHeader();
  }

  /**
   * Shows a confirmed message once, in id order (above own pending ones); turns
   * the matching pending element into it when it is one of ours.
   * @param {object} message
   */
  #addMessage(message) {
    if (this.#byId.has(message.id)) return;
    if (message.is_read && message.sender_id === this.session.user.id) this.#markReadUpTo(message.id);
    const pending = message.client_id == null ? undefined : this.#pending.get(message.client_id);
    let item;
    if (pending && message.sender_id === this.session.user.id) {
      this.#pending.delete(message.client_id);
      item = pending;
    } else {
      item = this.#renderMessage(message, message.sender_id === this.session.user.id ? 'sent' : null);
    }
    this.#confirm(item, message.id);
    if (item.dataset.own === 'true') this.#setStatus(item, this.#isRead(message.id) ? 'read' : 'sent');
  }

  /**
   * Gives an element its message id and moves it to its place by id.
   * @param {HTMLLIElement} item
   * @param {number} id
   */
  #confirm(item, id) {
    item.dataset.messageId = String(id);
    this.#byId.set(id, item);
    let next = null;
    for (const other of ui.messages.children) {
      const otherId = Number(/** @type {HTMLElement} */ (other).dataset.messageId);
      if (other !== item && (!otherId || otherId > id)) {
        next = other;
        break;
      }
    }
    if (item.nextElementSibling !== next || item.parentNode !== ui.messages) ui.messages.insertBefore(item, next);
  }

  /**
   * @param {object} message
   * @param {string|null} status For own messages: pending, sent or read.
   * @returns {HTMLLIElement}
   */
  #renderMessage(message, status) {
    if (message.message_type === 'SYSTEM') {
      return /** @type {HTMLLIElement} */ (el('li', { class: 'message system', 'data-message-type': 'SYSTEM' },
        el('p', { class: 'message-text', text: message.content })));
    }
    const own = message.sender_id === this.session.user.id;
    const group = (this.conversation?.participants.length ?? 2) > 2;
    const meta = el('span', { class: 'message-meta' }, timeElement(message.timestamp));
    if (own) meta.append(el('span', { class: 'message-status', role: 'img' }));

    const bubble = el('div', { class: 'bubble' },
      ...(!own && group ? [el('span', { class: 'message-sender', text: message.sender_name ?? 'Unknown' })] : []),
      ...renderContent(message),
      meta);
    const item = /** @type {HTMLLIElement} */ (el('li', {
      class: `message ${own ? 'own' : 'other'}`,
      'data-own': String(own),
      'data-sender-id': message.sender_id,
      'data-client-id': message.client_id,
      'data-message-type': message.message_type,
    }, ...(!own && group ? [avatar(message.sender_name ?? '?', message.sender_id, 'avatar small')] : []), bubble));
    if (own && status) this.#setStatus(item, status);
    return item;
  }

  /**
   * @param {HTMLElement} item
   * @param {'pending'|'sent'|'read'|'failed'} status
   */
  #setStatus(item, status) {
    item.dataset.status = status;
    const mark = item.querySelector('.message-status');
    if (!mark) return;
    mark.setAttribute('aria-label', STATUS_LABEL[status]);
    mark.setAttribute('title', STATUS_LABEL[status]);
  }

  /** @param {number} id @returns {boolean} Whether every other participant read it. */
  #isRead(id) {
    if (this.#readUpTo.size === 0) return false;
    for (const upTo of this.#readUpTo.values()) if (upTo < id) return false;
    return true;
  }

  /** @param {number} id Everyone else has read up to here (from a message's is_read). */
  #markReadUpTo(id) {
    for (const [userId, upTo] of this.#readUpTo) this.#readUpTo.set(userId, Math.max(upTo, id));
  }

  #refreshReadMarks() {
    for (const [id, item] of this.#byId) {
      if (item.dataset.status === 'sent' && this.#isRead(id)) this.#setStatus(item, 'read');
    }
  }

  /** @param {string} userId */
  #clearTyping(userId) {
    const entry = this.#typing.get(userId);
    if (!entry) return;
    clearTimeout(entry.timer);
    this.#typing.delete(userId);
    this.#renderTyping();
  }

  #renderTyping() {
    const names = [...this.#typing.values()].map((entry) => entry.name);
    let text = '';
    if (names.length === 1) text = `${names[0]} is typing…`;
    else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
    else if (names.length > 2) text = `${names.length} people are typing…`;
    ui.typing.textContent = text;
    ui.typing.dataset.active = String(names.length > 0);
  }

  #renderHeader() {
    if (!this.conversation) return;
    const me = this.session.user.id;
    const others = this.conversation.participants.filter((p) => p.id !== me);
    ui.title.textContent = this.session.list.titleOf(this.conversation);
    if (others.length === 1) {
      ui.subtitle.textContent = this.#online.has(others[0].id) ? 'Online' : 'Offline';
    } else {
      const online = others.filter((p) => this.#online.has(p.id)).length;
      ui.subtitle.textContent = `${this.conversation.participants.length} participants · ${online} online`;
    }
    ui.participants.replaceChildren(...others.map((p) => {
      const online = this.#online.has(p.id);
      return el('li', {
        class: 'participant presence',
        'data-user-id': p.id,
        'data-status': online ? 'online' : 'offline',
        title: `${p.name} (${online ? 'online' : 'offline'})`,
        'aria-label': `${p.name}, ${online ? 'online' : 'offline'}`,
      }, avatar(p.name, p.id, 'avatar small'), el('span', { class: 'presence-dot', 'aria-hidden': 'true' }));
    }));
  }

  #updateComposer() {
    const closed = !this.chat || this.chat.state === State.CLOSED;
    ui.input.disabled = closed;
    ui.send.disabled = closed;
  }

  /** @param {string} text */
  #showError(text) {
    ui.conversationError.textContent = text;
    ui.conversationError.hidden = false;
    this.#updateComposer();
  }

  /** @returns {boolean} */
  #nearBottom() {
    return ui.scroller.scrollHeight - ui.scroller.scrollTop - ui.scroller.clientHeight < NEAR_BOTTOM_PX;
  }

  /** Scrolls to the newest message. */
  scrollToLatest() {
    ui.scroller.scrollTop = ui.scroller.scrollHeight;
    ui.jumpLatest.hidden = true;
  }
}

/**
 * The body of a message: text, and an image, file or map link from its metadata.
 * @param {object} message
 * @returns {HTMLElement[]}
 */
function renderContent(message) {
  const parts = [];
  const meta = message.metadata ?? {};
  if (message.message_type === 'IMAGE' && safeUrl(meta.url)) {
    parts.push(el('a', { href: meta.url, target: '_blank', rel: 'noopener', class: 'message-image' },
      el('img', { src: meta.url, alt: meta.name ?? message.content ?? 'Image', loading: 'lazy' })));
  } else if (message.message_type === 'FILE' && safeUrl(meta.url)) {
    parts.push(el('a', { href: meta.url, target: '_blank', rel: 'noopener', class: 'message-file', text: `📎 ${meta.name ?? 'File'}` }));
  } else if (message.message_type === 'LOCATION' && typeof meta.lat === 'number' && typeof meta.lng === 'number') {
    parts.push(el('a', {
      href: `https://www.openstreetmap.org/?mlat=${meta.lat}&mlon=${meta.lng}#map=16/${meta.lat}/${meta.lng}`,
      target: '_blank',
      rel: 'noopener',
      class: 'message-location',
      text: `📍 ${meta.lat.toFixed(5)}, ${meta.lng.toFixed(5)}`,
    }));
  }
  if (message.content) parts.push(el('p', { class: 'message-text', text: message.content }));
  return parts;
}

// ---------------------------------------------------------------- session

/**
 * Everything that exists while signed in: the client, the notification socket,
 * the list and the open conversation.
 */
class Session {
  /** @type {ConversationView|null} */
  view = null;

  /**
   * @param {Parley} parley
   * @param {{id: string, name: string}} user
   */
  constructor(parley, user) {
    this.parley = parley;
    this.user = user;
    this.list = new ConversationList(this);
    this.notifications = parley.connectNotifications();
    this.notifications.subscribe('state', ({ state, closeError }) => {
      this.updateBadge();
      if (state === State.CLOSED && closeError) this.expire(closeError.reason);
    });
    // Also after every reconnect: collapsed new_message counts may have changed.
    this.notifications.subscribe('ready', () => this.refreshUnread());
    this.notifications.subscribe('notification', (notification) => this.#onNotification(notification));
  }

  /** Shows the workspace and loads the list. */
  async start() {
    ui.currentUser.textContent = this.user.name;
    ui.currentUser.prepend(avatar(this.user.name, this.user.id, 'avatar small'));
    showView('workspace');
    this.updateBadge();
    try {
      await this.list.load();
    } catch (error) {
      this.handleRestError(error);
    }
    this.route();
  }

  /** Opens the conversation named by the URL hash (`#/c/45`), or none. */
  route() {
    const match = /^#\/c\/(\d+)$/.exec(location.hash);
    const id = match ? Number(match[1]) : null;
    ui.app.dataset.pane = id === null ? 'list' : 'conversation';
    if (id === this.view?.id) return;
    this.view?.close();
    this.view = null;
    this.list.setActive(id);
    ui.placeholder.hidden = id !== null;
    ui.view.hidden = id === null;
    if (id !== null) {
      this.view = new ConversationView(this, id);
      this.view.open();
      ui.input.focus({ preventScroll: true });
    }
    this.updateBadge();
  }

  /** Reloads the unread counts of every conversation and the total. */
  async refreshUnread() {
    try {
      const { total, conversations } = await this.parley.unread();
      const counts = new Map(conversations.map((c) => [c.id, c.unread_count]));
      // The conversation on screen is read as messages arrive.
      const viewing = pageVisible() ? this.view?.id : undefined;
      for (const id of this.list.conversations.keys()) {
        this.list.update(id, { unread_count: id === viewing ? 0 : counts.get(id) ?? 0 });
      }
      this.list.setTotal(total - (counts.get(viewing) ?? 0));
    } catch (error) {
      this.handleRestError(error);
    }
  }

  /** Sets the connection badge from the states of both sockets. */
  updateBadge() {
    const sockets = [this.notifications, this.view?.chat].filter(Boolean);
    let state = 'connected';
    if (sockets.some((s) => s.state === State.CLOSED && s.closeError)) state = 'error';
    else if (sockets.some((s) => s.state === State.RECONNECTING)) state = 'reconnecting';
    else if (sockets.some((s) => s.state === State.CONNECTING)) state = 'connecting';
    ui.badge.dataset.state = state;
    ui.badgeText.textContent = BADGE_TEXT[state];
  }

  /**
   * Signs out because the server refused the token.
   * @param {string} reason Close reason, e.g. `token_expired`.
   */
  expire(reason) {
    signOut(reason in SIGNED_OUT_TEXT ? reason : 'unauthenticated');
  }

  /** @param {unknown} error A failed REST call: a 401 ends the session. */
  handleRestError(error) {
    if (error instanceof ParleyError && error.status === 401) this.expire('token_expired');
    else console.error(error);
  }

  /** Closes every socket. */
  dispose() {
    this.view?.close();
    this.parley.close();
  }

  /** @param {object} notification */
  #onNotification(notification) {
    if (notification.type === 'new_message') {
      this.#onNewMessage(notification);
      return;
    }
    const from = notification.from_user;
    const text = ['message', 'text', 'body', 'title'].map((key) => notification[key]).find((v) => typeof v === 'string');
    const sender = from && (from.username ?? from.name ?? from.id);
    showToast({
      title: humanize(notification.type),
      body: [sender && `From ${sender}`, text].filter(Boolean).join(' · '),
      type: notification.type,
      id: notification.id,
      onOpen: () => this.notifications.markRead(notification.id),
    });
  }

  /** @param {object} notification A `new_message` notification. */
  #onNewMessage(notification) {
    const id = notification.conversation_id;
    const viewing = this.view?.id === id && pageVisible();
    if (viewing) {
      // Read as it arrives: the server's counts predate that.
      this.list.setTotal(Math.max(0, notification.total_unread - notification.unread_count));
    } else {
      this.list.setUnread(id, notification.unread_count, notification.total_unread);
    }
    if (notification.message && this.list.conversations.get(id)?.last_message?.id !== notification.message.id) {
      this.list.update(id, {
        last_message: {
          id: notification.message.id,
          content: notification.message.content,
          sender_id: notification.from_user?.id ?? null,
          message_type: 'TEXT',
          timestamp: notification.created_at,
        },
        updated_at: notification.created_at,
      });
    }
    if (viewing || notification.replay) return;
    showToast({
      title: notification.from_user?.username ?? 'New message',
      body: notification.message?.content,
      type: 'new_message',
      id: notification.id,
      onOpen: () => {
        location.hash = `#/c/${id}`;
      },
    });
  }
}

// ---------------------------------------------------------------- sign in / out

/** @type {Session|null} */
let session = null;

/** @param {'loading'|'signed-out'|'workspace'} view */
function showView(view) {
  ui.app.dataset.view = view;
  ui.signedOut.hidden = view !== 'signed-out';
  ui.workspace.hidden = view !== 'workspace';
}

/**
 * Ends the session and shows the sign-in form, with why.
 * @param {keyof SIGNED_OUT_TEXT|'signed_out'} reason
 */
function signOut(reason) {
  session?.dispose();
  session = null;
  sessionStorage.removeItem(TOKEN_KEY);
  ui.toasts.replaceChildren();
  ui.signedOut.dataset.reason = reason;
  ui.signedOutReason.textContent = SIGNED_OUT_TEXT[reason] ?? '';
  ui.signedOutReason.hidden = !SIGNED_OUT_TEXT[reason];
  ui.tokenInput.value = '';
  document.title = 'Parley';
  showView('signed-out');
  ui.tokenInput.focus();
}

/**
 * Checks a token with `GET /api/me` and starts a session with it.
 * @param {string} token
 */
async function signIn(token) {
  const parley = new Parley({ token });
  let me;
  try {
    me = await parley.me();
  } catch (error) {
    parley.close();
    if (error instanceof ParleyError) {
      signOut(error.status === 403 ? 'service' : 'rejected');
    } else {
      signOut('network');
      ui.tokenInput.value = token; // the token may be fine: keep it for a retry
    }
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  session = new Session(parley, me.user);
  session.list.setTotal(me.unread_messages);
  await session.start();
}

// ---------------------------------------------------------------- composer

/** Grows the composer with its content, up to the CSS max-height. */
function autoGrow() {
  ui.input.style.height = 'auto';
  ui.input.style.height = `${ui.input.scrollHeight}px`;
}

// ---------------------------------------------------------------- wiring

ui.signInForm.addEventListener('submit', async (event) => {
  event.preventDefault();
  const token = ui.tokenInput.value.trim().replace(/^Bearer\s+/i, '');
  if (!token) {
    ui.tokenInput.focus();
    return;
  }
  ui.signIn.disabled = true;
  ui.signIn.textContent = 'Signing in…';
  try {
    await signIn(token);
  } finally {
    ui.signIn.disabled = false;
    ui.signIn.textContent = 'Sign in';
  }
});

ui.signOut.addEventListener('click', () => signOut('signed_out'));
ui.loadMoreConversations.addEventListener('click', () => session?.list.loadMore().catch((e) => session?.handleRestError(e)));
ui.loadOlder.addEventListener('click', () => session?.view?.loadOlder());
ui.jumpLatest.addEventListener('click', () => session?.view?.scrollToLatest());
ui.scroller.addEventListener('scroll', () => {
  if (ui.scroller.scrollHeight - ui.scroller.scrollTop - ui.scroller.clientHeight < NEAR_BOTTOM_PX) ui.jumpLatest.hidden = true;
});

ui.composer.addEventListener('submit', (event) => {
  event.preventDefault();
  session?.view?.sendComposer();
});
ui.input.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});
ui.input.addEventListener('input', () => {
  autoGrow();
  if (ui.input.value.trim()) session?.view?.typing();
});

window.addEventListener('hashchange', () => session?.route());
document.addEventListener('visibilitychange', () => {
  if (pageVisible()) session?.view?.scheduleRead();
});

const saved = sessionStorage.getItem(TOKEN_KEY);
if (saved) signIn(saved);
else signOut('signed_out');
