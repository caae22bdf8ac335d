-- Open sockets of every worker of every instance, so that presence and the
-- per-user socket cap hold across workers and instances (PROTOCOL.md 2, 8).
-- Each worker is a "node" that says it is alive every few seconds; sockets of
-- a node that stopped saying so (a crashed worker or instance) stop counting
-- and are swept, with the presence changes that implies.
--
-- As in 002: functions that touch tables pin search_path to this schema.
select set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

create unlogged table parley_nodes (
    node    text primary key,
    seen_at timestamptz not null default now()
);

-- No foreign key to parley_nodes: its check would lock the node's row for
-- every socket opened (the rows of a node are forgotten with it, in
-- parley_nodes_forget, and a socket of a node with no row is not live).
create unlogged table parley_sockets (
    node            text not null,
    socket_id       bigint not null,
    user_id         text not null,
    conversation_id bigint,         -- null for a notification socket
    opened_at       timestamptz not null default now(),
    -- socket_id first: a key led by node would tempt the planner to read a
    -- whole node's sockets (BitmapAnd with the user index) to find one user's
    primary key (socket_id, node)
);

-- When each user's presence in each conversation last changed (one row per
-- pair, written by parley_emit_presence): what a worker whose LISTEN
-- connection was down replays (parley_conversation_catchup). Apart from
-- participants, so that no send waits on a socket being opened or closed.
create unlogged table parley_presence (
    conversation_id bigint not null,
    user_id         text not null,
    changed_at      timestamptz not null,
    primary key (conversation_id, user_id)
);

-- With node: a user's lookup (user_id, node = any (live nodes)) is then all
-- index conditions, and no plan reads a node's sockets to find a user's.
create index parley_sockets_user on parley_sockets (user_id, node);
-- The live nodes, read by index under enable_seqscan = off (below).
create index parley_nodes_seen on parley_nodes (seen_at);
create index parley_sockets_conversation on parley_sockets (conversation_id, user_id)
    where conversation_id is not null;

-- A node is alive while it has said so within this interval.
create or replace function parley_node_ttl() returns interval
language sql immutable as $$ select interval '30 seconds' $$;

-- The registry goes from a few rows to tens of thousands within seconds (a
-- reconnect storm) and back, faster than statistics follow: a plan made
-- while it was small scans it whole, and a storm then costs the square of
-- its size. The functions that read it therefore carry SET enable_seqscan =
-- off (lookups by user or conversation always go through the indexes),
-- and jit = off: a plan that must scan a table anyway then costs over 10^10,
-- far past PostgreSQL's threshold for compiling the query (tens of
-- milliseconds, at every execution).
--
-- The live nodes are a handful: they are read once per query into an array
-- rather than joined, since a join let the planner loop over the nodes and
-- read each one's sockets whole (the key holds node, but second) for every
-- socket opened, which made a storm quadratic again.
--
-- No SET clause on these two: it would keep the planner from inlining them.
create or replace function parley_live_sockets() returns setof parley_sockets
language sql stable
as $$
    select s.* from parley_sockets s
     where s.node = any (array(select n.node from parley_nodes n
                                where n.seen_at > now() - parley_node_ttl()))
$$;

-- Whether the user has a live socket to the conversation.
create or replace function parley_user_online(p_conversation bigint, p_user text)
returns boolean
language sql stable
as $$
    select exists (select 1 from parley_live_sockets()
                    where conversation_id = p_conversation and user_id = p_user)
$$;

-- Serialises one user's socket changes until the transaction ends: the
-- socket cap, and the online/offline decisions, which would otherwise race
-- (two tabs closing at once each see the other still open: nobody goes
-- offline).
create or replace function parley_user_lock(p_user text) returns void
language sql
as $$ select pg_advisory_xact_lock(hashtext('parley-user'), hashtext(p_user)) $$;

-- Register a socket: the caller holds parley_user_lock, so the cap cannot be
-- raced past.
create or replace function parley_socket_register(p_node text, p_socket bigint,
                                                  p_user text, p_conversation bigint,
                                                  p_max integer)
returns void
language plpgsql
set search_path from current
as $$
begin
    if (select count(*) from parley_live_sockets() where user_id = p_user) >= p_max then
        perform parley_fail(429, 'too_many_connections',
                            'this user already has the maximum number of sockets open');
    end if;
    -- The node's heartbeat keeps seen_at; updating it here too would queue
    -- every socket opening of a worker on that one row.
    insert into parley_nodes (node) values (p_node) on conflict (node) do nothing;
    insert into parley_sockets (node, socket_id, user_id, conversation_id)
        values (p_node, p_socket, p_user, p_conversation);
end
$$;

-- Open a chat socket: access check, cap, presence; returns the ready frame.
create or replace function parley_chat_open(p_node text, p_socket bigint,
                                            p_conversation bigint, p_user text,
                                            p_name text, p_max integer)
returns text
language plpgsql
set search_path from current
set enable_seqscan = off
set jit = off
as $$
declare
    v_ready json;
    v_was_online boolean;
begin
    perform parley_touch_user(p_user, p_name);
    v_ready := parley_conversation_ready(p_conversation, p_user)::json;
    perform parley_user_lock(p_user);
    v_was_online := parley_user_online(p_conversation, p_user);
    perform parley_socket_register(p_node, p_socket, p_user, p_conversation, p_max);
    if not v_was_online then
        perform parley_emit_presence(p_conversation, p_user, 'online');
    end if;
    return json_build_object(
        'type', 'ready',
        'conversation_id', p_conversation,
        'user', json_build_object('id', p_user, 'name', parley_user_name(p_user)),
        'last_message_id', v_ready->'last_message_id',
        'unread_count', v_ready->'unread_count',
        'online', (select coalesce(json_agg(distinct user_id), '[]'::json)
                     from parley_live_sockets()
                    where conversation_id = p_conversation))::text;
end
$$;

-- Open a notification socket; returns the ready frame.
create or replace function parley_notify_open(p_node text, p_socket bigint,
                                              p_user text, p_name text,
                                              p_max integer)
returns text
language plpgsql
set search_path from current
set enable_seqscan = off
set jit = off
as $$
declare
    v_ready json;
begin
    perform parley_touch_user(p_user, p_name);
    perform parley_user_lock(p_user);
    perform parley_socket_register(p_node, p_socket, p_user, null, p_max);
    v_ready := parley_notify_ready(p_user)::json;
    return json_build_object(
        'type', 'ready',
        'user', json_build_object('id', p_user, 'name', parley_user_name(p_user)),
        'unread_notifications', v_ready->'unread_notifications',
        'unread_messages', v_ready->'unread_messages')::text;
end
$$;

-- Forget sockets (each worker sends the ones that closed while its previous
-- call ran: in a storm thousands share one transaction, one commit; each
-- commit with a NOTIFY waits for the one before it). p_batch:
-- [{"n":node,"s":socket id,"t":true when it was typing}]. A user's last
-- socket to a conversation makes them offline there and ends their typing.
-- Users are locked in one order so that two calls cannot deadlock.
create or replace function parley_sockets_close(p_batch jsonb)
returns void
language plpgsql
set search_path from current
set enable_seqscan = off
set jit = off
as $$
declare
    v_gone record;
begin
    -- The users first, in the order parley_nodes_forget takes them: a
    -- worker stopping forgets its node's sockets while its last closes may
    -- still run, and a close that deleted its rows before waiting for
    -- their user deadlocked with it.
    perform parley_user_lock(user_id)
       from (select distinct s.user_id
               from parley_sockets s,
                    jsonb_array_elements(p_batch) e
              where s.node = e->>'n' and s.socket_id = (e->>'s')::bigint
                and s.conversation_id is not null
              order by 1) u;
    for v_gone in
        with closed as (
            select e->>'n' as node, (e->>'s')::bigint as socket_id,
                   coalesce((e->>'t')::boolean, false) as typing
              from jsonb_array_elements(p_batch) e),
        gone as (
            delete from parley_sockets s
             using closed c
             where s.node = c.node and s.socket_id = c.socket_id
            returning s.user_id, s.conversation_id, c.typing)
        select user_id, conversation_id, bool_or(typing) as typing
          from gone
         where conversation_id is not null
         group by user_id, conversation_id
         order by user_id, conversation_id
    loop
        if v_gone.typing then
            perform parley_emit_typing(v_gone.conversation_id, v_gone.user_id, false);
        end if;
        if not parley_user_online(v_gone.conversation_id, v_gone.user_id) then
            perform parley_emit_presence(v_gone.conversation_id, v_gone.user_id, 'offline');
        end if;
    end loop;
end
$$;

-- Forget every socket of the given nodes; users left with no socket to a
-- conversation go offline there. Users are locked in one order so that two
-- sweeps cannot deadlock.
create or replace function parley_nodes_forget(p_nodes text[])
returns void
language plpgsql
set search_path from current
set enable_seqscan = off
set jit = off
as $$
declare
    v_gone record;
begin
    perform parley_user_lock(user_id)
       from (select distinct user_id from parley_sockets
              where node = any (p_nodes) order by 1) u;
    for v_gone in
        with gone as (
            delete from parley_sockets where node = any (p_nodes)
            returning conversation_id, user_id)
        select distinct conversation_id, user_id from gone
         where conversation_id is not null
    loop
        if not parley_user_online(v_gone.conversation_id, v_gone.user_id) then
            perform parley_emit_presence(v_gone.conversation_id, v_gone.user_id, 'offline');
        end if;
    end loop;
end
$$;

-- A node's heartbeat; it also sweeps nodes that stopped beating, so the
-- users they held go offline for everyone else.
create or replace function parley_node_alive(p_node text)
returns void
language plpgsql
set search_path from current
as $$
begin
    insert into parley_nodes (node) values (p_node)
        on conflict (node) do update set seen_at = now();
    perform parley_nodes_forget(array(
        select node from parley_nodes where seen_at < now() - parley_node_ttl()));
    delete from parley_nodes where seen_at < now() - parley_node_ttl();
end
$$;

-- A node shutting down forgets its sockets at once (presence goes offline).
create or replace function parley_node_gone(p_node text)
returns void
language plpgsql
set search_path from current
as $$
begin
    perform parley_nodes_forget(array[p_node]);
    delete from parley_nodes where node = p_node;
end
$$;

-- Which of these stored notifications are pushed live (the triggers of 004):
-- those of users with a notification socket open somewhere, except types the
-- user disabled (stored only). Building the live frame (with its unread
-- totals) and one NOTIFY per recipient is most of what a message costs in a
-- big conversation, and is wasted on users who are not connected: a socket
-- that opens later gets the totals in its ready frame and replays what it
-- missed with sync. One set-based query for the whole statement's rows.
-- PL/pgSQL rather than SQL: it keeps its plan, where a SQL function that is
-- not inlined (this one has SET clauses) is planned again on every call,
-- twice per message batch.
create or replace function parley_pushed_notifications(p_ids bigint[])
returns setof notifications
language plpgsql stable
set search_path from current
set enable_seqscan = off        -- the socket registry, see above
set jit = off
as $$
begin
    if cardinality(p_ids) > 0 then
        return query
        select n.* from notifications n
         where n.id = any (p_ids)
           and n.user_id in (select s.user_id from parley_live_sockets() s
                              where s.conversation_id is null)
           and not exists (select 1 from notification_preferences np
                            where np.user_id = n.user_id
                              and n.type = any (np.disabled_types))
         order by n.id;
    end if;
end
$$;

-- Live frames (no replay key) after a message id: what a worker delivers to
-- its sockets after its LISTEN connection was down.
create or replace function parley_catchup(p_conversation bigint, p_after bigint,
                                          p_limit integer)
returns table (id bigint, frame text)
language sql stable
set search_path from current
as $$
    select m.id, parley_message_frame(m.id)
      from messages m
     where m.conversation_id = p_conversation and m.id > p_after
     order by m.id
     limit p_limit
$$;

-- What a conversation's sockets may have missed while the worker's LISTEN
-- connection was down, besides messages (sent after the messages' catch-up):
-- the read receipt of each reader whose position moved since p_since (minus
-- the same slack as parley_notification_catchup below), at their current
-- position, then the presence of each user whose presence changed since
-- then, as it is now (skip_user: the user whose own sockets skip it, as
-- live presence does).
create or replace function parley_conversation_catchup(p_conversation bigint,
                                                       p_since timestamptz)
returns table (skip_user text, frame text)
language sql stable
set search_path from current
set enable_seqscan = off
set jit = off
as $$
    select skip_user, frame from (
        select 1 as part, p.last_read_at as at, null::text as skip_user,
               parley_read_receipt_json(p.conversation_id, p.user_id,
                                        p.last_read_message_id,
                                        p.last_read_at) as frame
          from participants p
         where p.conversation_id = p_conversation
           and p.last_read_at > p_since - interval '10 seconds'
        union all
        select 2, r.changed_at, r.user_id,
               parley_presence_json(r.conversation_id, r.user_id,
                   case when parley_user_online(r.conversation_id, r.user_id)
                        then 'online' else 'offline' end)
          from parley_presence r
         where r.conversation_id = p_conversation
           and r.changed_at > p_since - interval '10 seconds') e
     order by part, at
$$;

-- What a worker's notification sockets may have missed while its LISTEN
-- connection was down, for each of p_users (a JSON array of ids): the live
-- frames of the unread notifications stored or collapsed (which sets
-- created_at) since p_since, the latest 200, then one notifications_read with
-- those read since then. p_since is the server's clock at the bus's last
-- ping; ten seconds of slack cover a transaction that stored a notification
-- before it and committed after. Frames delivered already may come again:
-- clients deduplicate by id (PROTOCOL.md).
create or replace function parley_notification_catchup(p_users jsonb,
                                                       p_since timestamptz)
returns table (user_id text, frame text)
language plpgsql stable
set search_path from current
as $$
declare
    v_since timestamptz := p_since - interval '10 seconds';
begin
    return query
    select u.id, f.frame
      from jsonb_array_elements_text(p_users) with ordinality u(id, k)
     cross join lateral (
            (select parley_notification_json(n, null), n.created_at
               from notifications n
              where n.user_id = u.id and n.read_at is null
                and n.created_at > v_since
                and not exists (select 1 from notification_preferences np
                                 where np.user_id = n.user_id
                                   and n.type = any (np.disabled_types))
              order by n.created_at desc
              limit 200)
            union all
            (select json_build_object('type', 'notifications_read',
                        'ids', array_agg(n.id order by n.id),
                        'unread_notifications',
                        parley_unread_notifications(u.id))::text,
                    'infinity'::timestamptz
               from notifications n
              where n.user_id = u.id and n.read_at > v_since
             having count(*) > 0)) f(frame, at)
     order by u.k, f.at;
end
$$;
