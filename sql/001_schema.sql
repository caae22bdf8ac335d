-- 001_schema.sql: Parley's tables and indexes.
--
-- Applied once per database, inside a transaction the server opens. Functions in
-- later files pin their search_path to the schema these tables are created in, so a
-- backend with another search_path can still INSERT into messages/notifications.
-- docs/DATA.md describes which columns other programs may write.

-- Users Parley has seen (from tokens) or that a service named. The name is the
-- latest display name; others see it.
create table users (
    id          text primary key check (octet_length(id) between 1 and 64),
    name        text not null,
    updated_at  timestamptz not null default now()
);

create table conversations (
    id               bigserial primary key,
    title            text,
    context_kind     text,
    context_ref      text,
    -- md5 of the sorted (byte order), distinct member ids joined with E'\x1f':
    -- the get-or-create key together with the context.
    member_hash      text not null,
    last_message_id  bigint,
    last_message_at  timestamptz,
    -- Messages stored in it: unread counts derive from it (participants.read_count).
    message_count    bigint not null default 0,
    created_at       timestamptz not null default now(),
    updated_at       timestamptz not null default now()
) with (fillfactor = 70);

-- "No context matches no context": nulls must collide here (PostgreSQL 15).
create unique index conversations_key
    on conversations (member_hash, context_kind, context_ref) nulls not distinct;
-- No index on updated_at: every message updates it, and an index on it would
-- make each of those updates a non-HOT one (the fillfactor keeps room on each
-- page for those HOT updates). Lists are per user: they reach
-- conversations through participants_user and sort a user's few rows.

create table participants (
    conversation_id       bigint not null references conversations (id) on delete cascade,
    user_id               text not null references users (id),
    role                  text,
    -- How many of the conversation's messages this participant has read or
    -- sent; unread = conversations.message_count - read_count. So a message
    -- writes its sender's row, not every other participant's (a 1,000-member
    -- conversation used to rewrite 999 rows per message). Set on insert to the
    -- conversation's count (a new member starts with nothing unread), moved by
    -- reads (002_messages.sql).
    read_count            bigint not null default 0,
    last_read_message_id  bigint not null default 0,
    last_read_at          timestamptz,             -- when last_read_message_id last moved
    muted                 boolean not null default false,
    joined_at             timestamptz not null default now(),
    primary key (conversation_id, user_id)
) with (fillfactor = 80);

-- A user's conversations (list, /api/unread, totals). Nothing indexes
-- read_count: its updates stay HOT only while no index (or index predicate)
-- mentions it.
create index participants_user on participants (user_id, conversation_id);

-- Message ids come from this sequence, drawn by the BEFORE INSERT trigger only after
-- the conversation row is locked (002_messages.sql): ids then grow in commit order
-- within a conversation. No column default, so nothing draws an id before the lock.
create sequence messages_id_seq;

create table messages (
    id               bigint primary key,
    conversation_id  bigint not null references conversations (id) on delete cascade,
    -- null = SYSTEM. No foreign key: the insert trigger requires the sender to
    -- be a participant, and participants reference users; a key check here
    -- would lock the sender's users row on every message.
    sender_id        text,
    type             text not null default 'TEXT'
                     check (type in ('TEXT', 'LOCATION', 'IMAGE', 'FILE', 'SYSTEM')),
    content          text not null default '',
    metadata         jsonb,
    client_id        text check (octet_length(client_id) between 1 and 64),
    created_at       timestamptz not null default clock_timestamp()
);

alter sequence messages_id_seq owned by messages.id;

-- History and sync: id ranges within one conversation.
create index messages_conversation on messages (conversation_id, id);

-- Idempotent sends: one row per (conversation, sender, client_id). SYSTEM (null
-- sender) is folded to '' (never a valid user id) so service sends with a client_id
-- are idempotent too; rows without client_id are not indexed and never collide.
create unique index messages_client_id
    on messages (conversation_id, coalesce(sender_id, ''), client_id)
    where client_id is not null;

-- Notifications are stored per user id; no foreign key because a service may notify
-- users Parley has not seen yet.
create table notifications (
    id               bigserial primary key,
    user_id          text not null check (octet_length(user_id) between 1 and 64),
    type             text not null check (type ~ '^[a-z0-9_.]{1,64}$'),
    payload          jsonb not null default '{}'
                     check (jsonb_typeof(payload) = 'object')
                     -- the flat frame puts these envelope keys beside the payload's
                     check (not payload ?| array['type', 'id', 'created_at', 'read', 'replay']),
    conversation_id  bigint,                              -- set for new_message
    count            integer not null default 1,          -- messages a new_message stands for
    created_at       timestamptz not null default clock_timestamp(),
    read_at          timestamptz
) with (fillfactor = 70);          -- room for HOT updates of collapsed new_message rows

-- The collapse key: at most one unread new_message per user and conversation.
create unique index notifications_collapse
    on notifications (user_id, conversation_id)
    where type = 'new_message' and read_at is null;
-- Listing and sync by id per user.
create index notifications_user on notifications (user_id, id);
-- Unread counts and the unread-only list.
create index notifications_unread on notifications (user_id, id) where read_at is null;
-- What a user read since a time: the bus catch-up (005_sockets.sql), which
-- would otherwise read every notification the user ever had.
create index notifications_read on notifications (user_id, read_at) where read_at is not null;

-- Messages of big conversations whose new_message notifications are still
-- to be written (002_messages.sql): one row per INSERT statement and
-- conversation, ids first_id..last_id. Appended by the senders (no row is
-- shared, so a sender never waits for the servers that drain it right after
-- the commit, outside the sending transaction).
create table parley_fanout (
    id               bigserial primary key,
    conversation_id  bigint not null references conversations (id) on delete cascade,
    first_id         bigint not null,
    last_id          bigint not null
);
create index parley_fanout_conversation on parley_fanout (conversation_id);

create table notification_preferences (
    user_id         text primary key check (octet_length(user_id) between 1 and 64),
    disabled_types  text[] not null default '{}'
);
