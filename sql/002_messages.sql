-- 002_messages.sql: shared helpers, the single write path for messages (triggers),
-- and the message functions the server calls.
--
-- Functions that touch tables pin search_path to the schema this migration runs in
-- ("set search_path from current" captures the value set on the next line), so the
-- triggers behave the same for another program whose search_path differs. Small pure
-- helpers carry no SET clause so the planner can inline them.
select set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

------------------------------------------------------------------------------------
-- Helpers shared by all files
------------------------------------------------------------------------------------

-- Wire time: ISO 8601 UTC with milliseconds, e.g. 2026-01-15T10:30:00.123Z.
create or replace function parley_ts(p_ts timestamptz) returns text
language sql stable parallel safe
as $$ select to_char(p_ts at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') $$;

-- Errors the server maps to HTTP/socket errors: SQLSTATE PX<http status>,
-- message = protocol error code, detail = human text.
create or replace function parley_fail(p_status integer, p_code text, p_detail text)
returns void
language plpgsql
as $$
begin
    raise exception using errcode = 'PX' || p_status, message = p_code, detail = p_detail;
end
$$;

-- A user id as the protocol allows it (1-64 bytes).
create or replace function parley_check_user_id(p_id text) returns void
language plpgsql
as $$
begin
    if p_id is null or octet_length(p_id) not between 1 and 64 then
        perform parley_fail(400, 'invalid_payload', 'a user id is a string of 1-64 bytes');
    end if;
end
$$;

-- One NOTIFY on channel 'parley': <kind>:<seq>:<conv>:<uidlen>:<uid>:<json>.
-- uidlen is in bytes because user ids may contain ':'. A message ('m') or
-- notification ('n') too large for NOTIFY goes by reference ('M'/'N', empty json):
-- the server then calls parley_message_frame / parley_notification_frame(seq).
-- 'f' (all fields empty) says parley_fanout has work for the servers' drain.
-- Other kinds are small by construction; one that is not is dropped with a warning
-- rather than failing the writer's transaction.
create or replace function parley_event_head(p_seq bigint, p_conv bigint, p_uid text)
returns text
language sql immutable
as $$
    select ':' || coalesce(p_seq, 0)::text || ':' || coalesce(p_conv, 0)::text || ':'
           || coalesce(octet_length(p_uid), 0)::text || ':' || coalesce(p_uid, '') || ':'
$$;

-- The payload, or null when it is too large and not an 'm' or 'n'. One
-- expression, so that PostgreSQL inlines it into the statement that calls it
-- (the insert trigger NOTIFYs a batch's frames in one statement).
create or replace function parley_event(p_kind text, p_seq bigint, p_conv bigint,
                                        p_uid text, p_json text)
returns text
language sql immutable
as $$
    select case when 1 + octet_length(parley_event_head(p_seq, p_conv, p_uid))
                     + coalesce(octet_length(p_json), 0) <= 7900
                then p_kind || parley_event_head(p_seq, p_conv, p_uid) || coalesce(p_json, '')
                when p_kind in ('m', 'n')
                then upper(p_kind) || parley_event_head(p_seq, p_conv, p_uid)
           end
$$;

create or replace function parley_emit(p_kind text, p_seq bigint, p_conv bigint,
                                       p_uid text, p_json text)
returns void
language plpgsql
as $$
declare
    v_event text := parley_event(p_kind, p_seq, p_conv, p_uid, p_json);
begin
    if p_kind not in ('m', 'e', 'n', 'r', 'f') then
        raise exception 'parley_emit: unknown kind %', p_kind;
    end if;
    if v_event is not null then
        perform pg_notify('parley', v_event);
    else
        raise warning 'parley_emit: % event of % bytes dropped, too large for NOTIFY',
            p_kind, octet_length(p_json);
    end if;
end
$$;

-- Display name of a user, 'user <id>' for one Parley has not seen.
create or replace function parley_user_name(p_id text) returns text
language plpgsql stable
set search_path from current
as $$
begin
    return coalesce((select name from users where id = p_id), 'user ' || p_id);
end
$$;

-- Unread messages of a user over the conversations they did not mute.
create or replace function parley_total_unread(p_user text) returns integer
language plpgsql stable
set search_path from current
as $$
begin
    return (select coalesce(sum(c.message_count - p.read_count), 0)
              from participants p
              join conversations c on c.id = p.conversation_id
             where p.user_id = p_user and not p.muted);
end
$$;

-- Unread messages of a user in one conversation (0 for a non-participant).
create or replace function parley_unread_count(p_conversation bigint, p_user text)
returns bigint
language plpgsql stable
set search_path from current
as $$
begin
    return coalesce((select c.message_count - p.read_count
                       from participants p
                       join conversations c on c.id = p.conversation_id
                      where p.conversation_id = p_conversation and p.user_id = p_user), 0);
end
$$;

-- A new participant has read nothing yet but has nothing unread either:
-- they start at the conversation's current count (any program's INSERT).
create or replace function parley_participants_before_insert() returns trigger
language plpgsql
set search_path from current
as $$
begin
    new.read_count := coalesce((select message_count from conversations
                                 where id = new.conversation_id), 0);
    return new;
end
$$;

create trigger participants_before_insert before insert on participants
    for each row execute function parley_participants_before_insert();

-- Unread stored notifications of a user (all types: disabled ones are listed too).
create or replace function parley_unread_notifications(p_user text) returns integer
language plpgsql stable
set search_path from current
as $$
begin
    return (select count(*) from notifications where user_id = p_user and read_at is null);
end
$$;

------------------------------------------------------------------------------------
-- Message JSON
------------------------------------------------------------------------------------

-- is_read = every participant other than the sender has read up to the message.
-- Instead of a per-message subquery, callers fetch once per conversation the two
-- lowest read positions and whose the lowest is (parley_read_floor); the lowest
-- position among "the others" is then the second one when the sender holds the
-- first, else the first.
--
-- parley_floor_rows gives the two lowest positions as rows, parley_read_floor
-- the three values as one row. Both are SQL functions without SET clauses,
-- which PostgreSQL inlines where they are called in FROM (a PL/pgSQL call costs
-- ~10 us; called only from functions that set search_path).
create or replace function parley_floor_rows(p_conversation bigint)
returns table (user_id text, pos bigint)
language sql stable
as $$
    select p.user_id, p.last_read_message_id
      from participants p
     where p.conversation_id = p_conversation
     order by p.last_read_message_id, p.user_id
     limit 2
$$;

create or replace function parley_read_floor(p_conversation bigint)
returns table (min_user text, min_read bigint, next_read bigint)
language sql stable
as $$
    select (array_agg(f.user_id order by f.pos, f.user_id))[1],
           (array_agg(f.pos order by f.pos, f.user_id))[1],
           (array_agg(f.pos order by f.pos, f.user_id))[2]
      from parley_floor_rows(p_conversation) f
$$;

create or replace function parley_is_read(p_id bigint, p_sender text,
    p_min_user text, p_min_read bigint, p_next_read bigint)
returns boolean
language sql immutable parallel safe
as $$
    select p_id <= coalesce(case when p_sender = p_min_user then p_next_read else p_min_read end,
                            9223372036854775807)   -- nobody else to read it
$$;

-- The message object of the protocol; the only place that builds it.
create or replace function parley_message_json(m messages, p_sender_name text, p_is_read boolean)
returns json
language sql stable
as $$
    select json_build_object(
        'id', m.id,
        'conversation_id', m.conversation_id,
        'sender_id', m.sender_id,
        'sender_name', case when m.sender_id is not null
                            then coalesce(p_sender_name, 'user ' || m.sender_id) end,
        'message_text', m.content,
        'content', m.content,
        'message_type', m.type,
        'metadata', m.metadata,
        'client_id', m.client_id,
        'timestamp', parley_ts(m.created_at),
        'created_at', parley_ts(m.created_at),
        'is_read', p_is_read)
$$;

-- The message object of one stored message (null when there is none).
create or replace function parley_message_json(p_id bigint) returns json
language plpgsql stable
set search_path from current
as $$
declare
    m messages;
    f record;
begin
    select * into m from messages where id = p_id;
    if not found then
        return null;
    end if;
    select * into f from parley_read_floor(m.conversation_id);
    return parley_message_json(m, (select name from users where id = m.sender_id),
                               parley_is_read(m.id, m.sender_id,
                                              f.min_user, f.min_read, f.next_read));
end
$$;

-- The socket 'message' event around a message object (replays are rendered by
-- the server, with "replay":true).
create or replace function parley_message_event(p_message json)
returns text
language sql stable
as $$
    select json_build_object('type', 'message', 'message', p_message)::text
$$;

-- The 'message' event of one stored message (null when there is none); the server
-- calls it for 'M' references.
create or replace function parley_message_frame(p_id bigint) returns text
language plpgsql stable
set search_path from current
as $$
declare
    j json := parley_message_json(p_id);
begin
    return case when j is not null then parley_message_event(j) end;
end
$$;

------------------------------------------------------------------------------------
-- The write path: triggers on messages. A plain INSERT by any program has exactly
-- the API's effects.
------------------------------------------------------------------------------------

create or replace function parley_messages_before_insert() returns trigger
language plpgsql
set search_path from current
as $$
declare
    v_member boolean;
begin
    -- Serialise the writers of one conversation and draw the id only once the lock
    -- is held: ids then grow in commit order within the conversation, which
    -- sync/after rely on. (NO KEY UPDATE: enough against other inserts, and it does
    -- not block foreign-key checks such as adding participants.) The sender's
    -- membership is read by the same statement: one query per row, not two
    -- (a batch's rows cost 3 % less; bench/README.md, sixteenth round).
    select exists (select 1 from participants
                    where conversation_id = new.conversation_id
                      and user_id = new.sender_id)
      into v_member
      from conversations
     where id = new.conversation_id
       for no key update;
    if not found then
        perform parley_fail(404, 'not_found', 'no such conversation');
    end if;

    if new.sender_id is null then
        new.type := 'SYSTEM';                 -- no sender: a system message
    elsif new.type = 'SYSTEM' then
        perform parley_fail(400, 'invalid_payload', 'a SYSTEM message has no sender');
    elsif not v_member then
        perform parley_fail(403, 'forbidden', 'the sender is not a participant');
    end if;

    new.type := coalesce(new.type, 'TEXT');
    if new.type not in ('TEXT', 'LOCATION', 'IMAGE', 'FILE', 'SYSTEM') then
        perform parley_fail(400, 'invalid_payload', 'unknown message type');
    end if;
    new.content := coalesce(new.content, '');
    new.metadata := nullif(new.metadata, 'null'::jsonb);   -- JSON null = no metadata

    new.id := nextval('messages_id_seq');
    new.created_at := clock_timestamp();
    return new;
end
$$;

-- The collapsed new_message notifications of a set of messages (one
-- statement's, or a deferred range of one conversation's): one unread per
-- user and conversation, updated in place (same id) with the latest message
-- from someone else and the number of messages it stands for. A sender's
-- stands for the others' messages only (none: no notification). A reader
-- already past the latest message (a deferred range: they read it before
-- the drain) gets a new one already read, as if their read had come after
-- it. Its insert/update trigger (004_notifications.sql) sends the 'n' event
-- of unread ones with the live counts.
-- Set-based: per recipient one row written, whatever the number of messages.
-- Its plan is the generic one: with an array of one to four messages
-- PostgreSQL found custom plans cheaper and planned the statement again at
-- every call, a third of a small batch's CPU (bench/README.md, twelfth
-- round); the generic plan is the one it picks from eight messages on.
create or replace function parley_collapse_notifications(p_messages messages[])
returns void
language plpgsql
set search_path from current
set plan_cache_mode = force_generic_plan
as $$
begin
    with batch as materialized (
        select * from unnest(p_messages)),
    per_conversation as (
        select distinct on (conversation_id) conversation_id, id,
               count(*) over (partition by conversation_id) as n
          from batch
         order by conversation_id, id desc),
    per_sender as (
        select s.conversation_id, s.sender_id, s.n,
               (select max(b.id) from batch b
                 where b.conversation_id = s.conversation_id
                   and b.sender_id is distinct from s.sender_id) as latest_other
          from (select conversation_id, sender_id, count(*) as n
                  from batch
                 where sender_id is not null
                 group by conversation_id, sender_id) s),
    -- The payload of each message that may become someone's notification
    -- (built once per message, not once per recipient).
    payloads as materialized (
        select b.id, b.conversation_id, b.created_at,
               jsonb_build_object(
                   'conversation_id', b.conversation_id,
                   'from_user', case when b.sender_id is not null
                                     then jsonb_build_object('id', b.sender_id,
                                              'username', coalesce(u.name, 'user ' || b.sender_id)) end,
                   'message', jsonb_build_object('id', b.id, 'content', b.content)) as payload
          from batch b
          left join users u on u.id = b.sender_id),
    recipients as (
        select q.user_id, m.conversation_id, m.payload, m.created_at,
               l.n - coalesce(s.n, 0) as n,
               case when q.last_read_message_id >= m.id
                    then clock_timestamp() end as read_at
          from per_conversation l
          join participants q on q.conversation_id = l.conversation_id and not q.muted
          left join per_sender s on s.conversation_id = q.conversation_id
                                and s.sender_id = q.user_id
          join payloads m on m.id = case when s.sender_id is null then l.id
                                         else s.latest_other end
         where l.n > coalesce(s.n, 0)
           and not exists (select 1 from notification_preferences np
                            where np.user_id = q.user_id
                              and 'new_message' = any (np.disabled_types)))
    -- (A read one is outside the collapse key: a plain insert.)
    insert into notifications as n (user_id, type, payload, conversation_id, count,
                                    created_at, read_at)
    select x.user_id, 'new_message', x.payload, x.conversation_id, x.n, x.created_at,
           x.read_at
      from recipients x
     order by x.user_id collate "C", x.conversation_id      -- a stable lock order
    on conflict (user_id, conversation_id) where type = 'new_message' and read_at is null
    do update set payload = excluded.payload,
                  created_at = excluded.created_at,
                  count = n.count + excluded.count;
end
$$;

-- Up to this many participants a conversation's notifications are written in
-- the sending transaction. A bigger one's would hold every send to it for a
-- row per recipient (about 35 us each here): they are queued in parley_fanout
-- and written just after the commit by the servers (parley_fanout_drain), so
-- its messages are delivered at the speed of a small conversation's.
create or replace function parley_fanout_inline_max() returns integer
language sql immutable parallel safe
as $$ select 32 $$;

-- After each INSERT statement, over all its rows at once (a batch of sends is
-- one statement): the live frames, then in one statement the conversations'
-- last-message fields and counts, the senders' read counts and the queue of
-- deferred notifications, then the notifications of the other conversations.
-- Set-based, so a batch costs these few statements rather than a few per
-- message.
create or replace function parley_messages_inserted() returns trigger
language plpgsql
set search_path from current
as $$
declare
    v_deferred bigint[];
begin
    -- The live frames, in id order: per conversation that is commit order
    -- (the insert trigger holds the conversation's lock), and NOTIFY keeps it
    -- (pg_notify is volatile, so it runs after the sort). One statement, not a
    -- loop calling parley_emit per row: that was a tenth of a batch.
    -- Nobody has read a message just inserted: it is read only when nobody but
    -- its sender is there to read it. (Joined here, not a SQL function called
    -- per row: one with a subquery is never inlined, and is planned again at
    -- each call.)
    perform pg_notify('parley', parley_event('m', f.id, f.conversation_id, null, f.frame))
       from (select i.id, i.conversation_id,
                    parley_message_event(parley_message_json(i, u.name,
                        not exists (select 1 from participants q
                                     where q.conversation_id = i.conversation_id
                                       and q.user_id is distinct from i.sender_id))) as frame
               from inserted i
               left join users u on u.id = i.sender_id
             offset 0) f        -- kept a subquery: parley_event is inlined on columns
      order by f.id;

    with per_conversation as (
        select distinct on (conversation_id) conversation_id, id, created_at,
               count(*) over (partition by conversation_id) as n,
               min(id) over (partition by conversation_id) as first_id
          from inserted
         order by conversation_id, id desc),
    conversations_moved as (
        update conversations c
           set last_message_id = l.id,
               last_message_at = l.created_at,
               updated_at = l.created_at,
               message_count = c.message_count + l.n
          from per_conversation l
         where c.id = l.conversation_id),
    -- Everyone else has these messages unread now (message_count moved); a
    -- sender's own count as read.
    senders_read as (
        update participants p
           set read_count = p.read_count + s.n
          from (select conversation_id, sender_id, count(*) as n
                  from inserted
                 where sender_id is not null
                 group by conversation_id, sender_id) s
         where p.conversation_id = s.conversation_id
           and p.user_id = s.sender_id),
    -- A big conversation, or one with notifications still queued (they are
    -- written in order), queues these too.
    deferred as (
        insert into parley_fanout (conversation_id, first_id, last_id)
        select l.conversation_id, l.first_id, l.id
          from per_conversation l
         where (select count(*) from participants q
                 where q.conversation_id = l.conversation_id) > parley_fanout_inline_max()
            or exists (select 1 from parley_fanout f where f.conversation_id = l.conversation_id)
        returning conversation_id)
    select array_agg(conversation_id) into v_deferred from deferred;

    perform parley_collapse_notifications(array(
        select i::messages from inserted i
         where i.conversation_id <> all (coalesce(v_deferred, '{}'))));
    if v_deferred is not null then
        perform parley_emit('f', 0, 0, null, null);     -- wakes the servers' drain
    end if;
    return null;
end
$$;

-- The servers' side of parley_fanout: writes the queued notifications of up
-- to 64 conversations. A conversation is drained by one server at a time (an
-- advisory lock; the others skip it), its rows in order; a row is seen once
-- its sender committed, whose commit also wakes the drains. True when it did
-- something (call again), false when there was nothing it could take.
-- A conversation's key in the advisory locks taken per conversation: the
-- drains' 'parley-fanout' and the readers' 'parley-read'.
create or replace function parley_conversation_key(p_conversation bigint) returns integer
language sql immutable
as $$ select (p_conversation % 2147483647)::integer $$;

create or replace function parley_fanout_drain() returns boolean
language plpgsql
set search_path from current
as $$
declare
    v_conv bigint;
    v_rows bigint[];
    v_done boolean := false;
begin
    -- The 64 conversations waiting longest (the 64 lowest ids, always busy,
    -- could hold the others back for good), taken in id order: the order
    -- in which parley_read_all_notifications locks a user's rows.
    for v_conv in select o.conversation_id
                    from (select f.conversation_id from parley_fanout f
                           group by f.conversation_id
                           order by min(f.id) limit 64) o
                   order by o.conversation_id loop
        continue when not pg_try_advisory_xact_lock(hashtext('parley-fanout'),
                                                    parley_conversation_key(v_conv));
        v_rows := array(select id from parley_fanout
                         where conversation_id = v_conv
                         order by id
                           for update skip locked);
        continue when cardinality(v_rows) = 0;
        -- A read of the conversation in progress commits first, so that the
        -- collapse below sees how far its reader got; a read that comes
        -- later waits for this commit, and then marks what it wrote
        -- (parley_mark_read). Else a read between the two would leave a
        -- notification unread for a message already read.
        perform pg_advisory_xact_lock(hashtext('parley-read'),
                                      parley_conversation_key(v_conv));
        perform parley_collapse_notifications(array(
            select m from parley_fanout f
              join messages m on m.conversation_id = f.conversation_id
                             and m.id between f.first_id and f.last_id
             where f.id = any (v_rows)
             order by m.id));
        delete from parley_fanout where id = any (v_rows);
        v_done := true;
    end loop;
    return v_done;
end
$$;

create trigger messages_before_insert before insert on messages
    for each row execute function parley_messages_before_insert();
create trigger messages_inserted after insert on messages
    referencing new table as inserted
    for each statement execute function parley_messages_inserted();

------------------------------------------------------------------------------------
-- Functions the server calls
------------------------------------------------------------------------------------

-- Remember a user's latest display name; writes only when it changed (every
-- connect calls this).
create or replace function parley_touch_user(p_id text, p_name text) returns void
language plpgsql
set search_path from current
as $$
declare
    v_name text := coalesce(p_name, 'user ' || p_id);
begin
    perform parley_check_user_id(p_id);
    perform 1 from users where id = p_id and name = v_name;
    if found then
        return;                       -- the usual case: no write, no lock
    end if;
    insert into users (id, name) values (p_id, v_name)
    on conflict (id) do update set name = excluded.name, updated_at = now()
        where users.name is distinct from excluded.name;
end
$$;

-- The stored message for (conversation, sender, client_id), as a "duplicate"
-- answer when the repeat matches it, PX409 when it does not; null when none.
create or replace function parley_repeat_send(p_conversation bigint, p_sender text,
    p_client_id text, p_type text, p_content text, p_metadata jsonb)
returns text
language plpgsql
set search_path from current
as $$
declare
    m messages;
begin
    select * into m
      from messages
     where conversation_id = p_conversation
       and coalesce(sender_id, '') = coalesce(p_sender, '')
       and client_id = p_client_id;
    if not found then
        return null;
    end if;
    if m.type <> p_type or m.content <> p_content
       or m.metadata is distinct from p_metadata then
        perform parley_fail(409, 'conflict',
                            'this client_id was already used for a different message');
    end if;
    return json_build_object('status', 'duplicate',
                             'message', parley_message_json(m.id))::text;
end
$$;

-- One send (socket or REST). p_sender null = SYSTEM. Input is validated and
-- trimmed by the server; the triggers do the rest.
create or replace function parley_post_message(p_conversation bigint, p_sender text,
    p_type text, p_content text, p_metadata jsonb, p_client_id text)
returns text
language plpgsql
set search_path from current
as $$
declare
    v_type text := case when p_sender is null then 'SYSTEM' else coalesce(p_type, 'TEXT') end;
    v_content text := coalesce(p_content, '');
    v_metadata jsonb := nullif(p_metadata, 'null'::jsonb);
    v_answer text;
    m messages;
begin
    if p_sender is null then
        perform 1 from conversations where id = p_conversation;
    else
        perform 1 from participants where conversation_id = p_conversation and user_id = p_sender;
    end if;
    if not found then
        perform parley_fail(404, 'not_found', 'no such conversation, or not a participant');
    end if;

    if p_client_id is not null then
        v_answer := parley_repeat_send(p_conversation, p_sender, p_client_id,
                                       v_type, v_content, v_metadata);
        if v_answer is not null then
            return v_answer;
        end if;
    end if;

    if p_client_id is null then
        -- Nothing to collide with: a plain insert skips the speculative one.
        insert into messages (conversation_id, sender_id, type, content, metadata)
        values (p_conversation, p_sender, v_type, v_content, v_metadata)
        returning * into m;
    else
        insert into messages (conversation_id, sender_id, type, content, metadata, client_id)
        values (p_conversation, p_sender, v_type, v_content, v_metadata, p_client_id)
        on conflict (conversation_id, coalesce(sender_id, ''), client_id)
           where client_id is not null
        do nothing
        returning * into m;
    end if;

    if m.id is null then
        -- A concurrent send with the same client_id committed first: answer as a repeat.
        return parley_repeat_send(p_conversation, p_sender, p_client_id,
                                  v_type, v_content, v_metadata);
    end if;
    return json_build_object('status', 'created',
                             'message', parley_message_json(m.id))::text;
end
$$;

-- The read_receipt event: live from parley_mark_read, and again from the
-- catch-up of a worker whose LISTEN connection came back (005_sockets.sql).
create or replace function parley_read_receipt_json(p_conversation bigint, p_user text,
                                                    p_message_id bigint, p_at timestamptz)
returns text
language sql stable
as $$
    select json_build_object('type', 'read_receipt', 'conversation_id', p_conversation,
                             'user_id', p_user, 'message_id', p_message_id,
                             'read_at', parley_ts(p_at))::text
$$;

-- Move a reader's position forward (never back), recount their unread messages,
-- send the read_receipt and mark the conversation's new_message notification read.
create or replace function parley_mark_read(p_conversation bigint, p_user text,
                                            p_message_id bigint)
returns text
language plpgsql
set search_path from current
as $$
declare
    v_old bigint;
    v_last bigint;
    v_pos bigint;
    v_unread integer;
    v_count bigint;
    v_now timestamptz := clock_timestamp();
    v_ids bigint[];
begin
    -- Lock our participant row first: a batch with messages of ours cannot
    -- commit (it adds to our read_count) until we do, and then adds to the
    -- count we wrote. Other messages are either in the recount's snapshot, in
    -- both its message_count and its count of unread, or in neither.
    select last_read_message_id into v_old
      from participants
     where conversation_id = p_conversation and user_id = p_user
       for update;
    if not found then
        perform parley_fail(404, 'not_found', 'no such conversation, or not a participant');
    end if;

    select coalesce(last_message_id, 0) into v_last from conversations where id = p_conversation;
    v_pos := greatest(v_old, least(coalesce(p_message_id, v_last), v_last));

    select c.message_count,
           (select count(*) from messages m
             where m.conversation_id = p_conversation and m.id > v_pos
               and m.sender_id is distinct from p_user)
      into v_count, v_unread
      from conversations c
     where c.id = p_conversation;

    update participants
       set last_read_message_id = v_pos, read_count = v_count - v_unread,
           last_read_at = case when v_pos > v_old then v_now else last_read_at end
     where conversation_id = p_conversation and user_id = p_user
       and (last_read_message_id, read_count) is distinct from (v_pos, v_count - v_unread);

    if v_pos > v_old then
        perform parley_emit('e', 0, p_conversation, null,
                            parley_read_receipt_json(p_conversation, p_user, v_pos, v_now));

        -- After a drain writing this conversation's notifications, or before
        -- it (parley_fanout_drain).
        perform pg_advisory_xact_lock_shared(hashtext('parley-read'),
                                             parley_conversation_key(p_conversation));

        -- Only once the reader has reached the message it stands for: a read
        -- of an older message leaves it unread, as the unread count does.
        with marked as (
            update notifications set read_at = v_now
             where user_id = p_user and conversation_id = p_conversation
               and type = 'new_message' and read_at is null
               and coalesce((payload->'message'->>'id')::bigint, 0) <= v_pos
            returning notifications.id)
        select array_agg(marked.id order by marked.id) into v_ids from marked;

        if v_ids is not null then
            perform parley_emit('r', 0, 0, p_user,
                json_build_object('type', 'notifications_read', 'ids', v_ids,
                                  'unread_notifications',
                                  parley_unread_notifications(p_user))::text);
        end if;
    end if;

    return json_build_object('unread_count', v_unread, 'message_id', v_pos,
                             'moved', v_pos > v_old)::text;
end
$$;

-- What the chat socket's ready frame needs; PX404 doubles as the access check.
create or replace function parley_conversation_ready(p_conversation bigint, p_user text)
returns text
language plpgsql
set search_path from current
as $$
declare
    v_answer text;
begin
    select json_build_object('last_message_id', c.last_message_id,
                             'unread_count', c.message_count - p.read_count)::text
      into v_answer
      from participants p
      join conversations c on c.id = p.conversation_id
     where p.conversation_id = p_conversation and p.user_id = p_user;
    if v_answer is null then
        perform parley_fail(404, 'not_found', 'no such conversation, or not a participant');
    end if;
    return v_answer;
end
$$;

-- Typing is not stored; the typist's own sockets are excluded (uid of the event).
create or replace function parley_emit_typing(p_conversation bigint, p_user text,
                                              p_is_typing boolean)
returns void
language plpgsql
set search_path from current
as $$
begin
    perform parley_emit('e', 0, p_conversation, p_user,
        json_build_object('type', 'typing', 'conversation_id', p_conversation,
                          'user_id', p_user, 'username', parley_user_name(p_user),
                          'is_typing', coalesce(p_is_typing, false))::text);
end
$$;

-- The presence event; the only place that builds it.
create or replace function parley_presence_json(p_conversation bigint, p_user text,
                                                p_status text)
returns text
language sql immutable
as $$
    select json_build_object('type', 'presence', 'conversation_id', p_conversation,
                             'user_id', p_user, 'status', p_status)::text
$$;

-- Presence to the conversation's sockets, excluding the user's own; the
-- change is remembered for a bus catch-up (parley_presence, 005_sockets.sql).
create or replace function parley_emit_presence(p_conversation bigint, p_user text,
                                                p_status text)
returns void
language plpgsql
set search_path from current
as $$
begin
    if p_status is null or p_status not in ('online', 'offline') then
        perform parley_fail(400, 'invalid_payload', 'presence is online or offline');
    end if;
    insert into parley_presence (conversation_id, user_id, changed_at)
    values (p_conversation, p_user, clock_timestamp())
    on conflict (conversation_id, user_id)
    do update set changed_at = excluded.changed_at;
    perform parley_emit('e', 0, p_conversation, p_user,
        parley_presence_json(p_conversation, p_user, p_status));
end
$$;
