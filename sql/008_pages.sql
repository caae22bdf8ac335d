-- Latest pages cached by the servers (src/pages.c). A worker keeps the
-- latest page of a conversation it served, with a stamp of everything the
-- page was made from, and asks parley_latest_pages for it again with that
-- stamp: when nothing changed, it gets the stamp back and no rows, and
-- answers from memory. What goes into a page, and so into its stamp:
-- the messages (a new one moves last_message_id and message_count; an
-- UPDATE or DELETE, which only other programs make, moves
-- history_version), the senders' names (a rename of a user who has sent
-- moves the one row of parley_names: a message's sender may have left),
-- and the read positions that make is_read (parley_read_floor). Who may
-- read is checked at every call, hit or not.
select set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

alter table conversations add column if not exists history_version bigint not null default 0;

-- Renames matter to kept pages only for users who have sent something
-- (has_sent, set by their first message). Most renames are a first
-- connect replacing the placeholder name a conversation gave a user who
-- had not connected yet: counting those in one row would make every
-- first connect wait on that row.
create table if not exists parley_names (
    only_row  boolean primary key default true check (only_row),
    version   bigint not null default 0
);
insert into parley_names default values on conflict do nothing;

alter table users add column if not exists has_sent boolean not null default false;
update users u set has_sent = true
  from (select distinct sender_id from messages where sender_id is not null) s
 where u.id = s.sender_id and not u.has_sent;

create or replace function parley_history_changed() returns trigger
language plpgsql
set search_path from current
as $$
begin
    update conversations c set history_version = c.history_version + 1
     where c.id in (select conversation_id from changed);
    return null;
end
$$;

create or replace trigger messages_updated after update on messages
    referencing old table as changed
    for each statement execute function parley_history_changed();
create or replace trigger messages_deleted after delete on messages
    referencing old table as changed
    for each statement execute function parley_history_changed();

create or replace function parley_senders_seen() returns trigger
language plpgsql
set search_path from current
as $$
begin
    update users u set has_sent = true
      from (select distinct sender_id from inserted where sender_id is not null) s
     where u.id = s.sender_id and not u.has_sent;
    return null;
end
$$;

create or replace trigger messages_senders_seen after insert on messages
    referencing new table as inserted
    for each statement execute function parley_senders_seen();

create or replace function parley_sender_renamed() returns trigger
language plpgsql
set search_path from current
as $$
begin
    update parley_names set version = version + 1;
    return null;
end
$$;

create or replace trigger users_renamed after update of name on users
    for each row when (old.has_sent and old.name is distinct from new.name)
    execute function parley_sender_renamed();

-- The conversation, if p_viewer may read it: a user one they take part in,
-- a service (p_viewer null) any that exists. Inlined where it is called in
-- FROM, as parley_floor_rows is (no SET clause). The participant is a scalar
-- subquery, a probe of one key: as EXISTS the planner may hash every
-- conversation of the viewer instead.
create or replace function parley_readable(p_conversation bigint, p_viewer text)
returns setof conversations
language sql stable
as $$
    select c.* from conversations c
     where c.id = p_conversation
       and (p_viewer is null
            or (select true from participants p
                 where p.conversation_id = c.id and p.user_id = p_viewer))
$$;

-- A page of history, oldest first, as rows: the server renders the message
-- objects (src/message.c, message_render; JSON built here costs ~15 us a
-- message, ten times the query). The columns are the fields of
-- parley_message_json() in its order; `extra` marks the one row past the page
-- (limit+1 rows are read) that says has_more. With p_forward: the first page
-- after p_after (below p_before when given); otherwise the latest page (below
-- p_before when given). Each direction is a range scan of messages
-- (conversation_id, id), backward or forward; callers pass p_forward as a
-- constant, so the other direction is planned away. A plan that kept both
-- behind run-time guards cost about a twentieth more CPU per deep page
-- (pgbench: 280 -> 265 us), starting up the scan it did not run.
--
-- A SQL function without SET clauses, which PostgreSQL inlines into its
-- caller's statement. The reader check is an InitPlan in a one-time filter of
-- the whole statement, so it runs first, even when the page is empty, and
-- fails the call as parley_fail does (404). Callers run a generic plan
-- (planning it at every call took longer than running it), in which the
-- page's size is a parameter, guessed at a tenth of the conversation: joined to
-- users, it read the whole users table into a hash at every page (100 ms with
-- 200,000 users). So each sender's name is looked up by key, and once per
-- sender of the page rather than once per row (a page of a two-person
-- conversation made 51 lookups for 2 names; deep pages in pgbench: 5,000 ->
-- 6,000/s).
create or replace function parley_history_rows(p_conversation bigint, p_viewer text,
    p_before bigint, p_after bigint, p_limit integer, p_forward boolean)
returns table (id bigint, conversation_id bigint, sender_id text, sender_name text,
               content text, type text, metadata text, client_id text,
               ts text, is_read boolean, extra boolean)
language sql stable
as $$
    with page as materialized (
        (select b.*, row_number() over (order by b.id desc) as n
           from messages b
          where not p_forward and b.conversation_id = p_conversation
            and b.id < coalesce(p_before, 9223372036854775807)
          order by b.id desc
          limit least(greatest(coalesce(p_limit, 50), 1), 1000) + 1)
        union all
        (select a.*, row_number() over (order by a.id) as n
           from messages a
          where p_forward and a.conversation_id = p_conversation
            and a.id > p_after and a.id < coalesce(p_before, 9223372036854775807)
          order by a.id
          limit least(greatest(coalesce(p_limit, 50), 1), 1000) + 1)),
    names as materialized (
        select s.sender_id, (select u.name from users u where u.id = s.sender_id) as name
          from (select distinct p.sender_id from page p) s
         where s.sender_id is not null)
    select m.id, m.conversation_id, m.sender_id,
           case when m.sender_id is not null
                then coalesce(x.name, 'user ' || m.sender_id) end,
           m.content, m.type, m.metadata::text, m.client_id, parley_ts(m.created_at),
           parley_is_read(m.id, m.sender_id, f.min_user, f.min_read, f.next_read),
           m.n > least(greatest(coalesce(p_limit, 50), 1), 1000)
      from page m
      left join names x on x.sender_id = m.sender_id
      cross join parley_read_floor(p_conversation) f
     where (select case when exists (select from parley_readable(p_conversation, p_viewer))
                        then true
                        else parley_fail(404, 'not_found',
                                         'no such conversation, or not a participant') is null
                   end)
     order by m.id
$$;

-- parley_history_rows for the server (REST pages, socket replays): with
-- p_after, the first page after it, else the latest (below p_before when
-- given). Each branch is a statement of its own with its own generic plan.
create or replace function parley_history(p_conversation bigint, p_viewer text,
    p_before bigint, p_after bigint, p_limit integer)
returns table (id bigint, conversation_id bigint, sender_id text, sender_name text,
               content text, type text, metadata text, client_id text,
               ts text, is_read boolean, extra boolean)
language plpgsql stable
set search_path from current
set plan_cache_mode = force_generic_plan
as $$
begin
    if p_after is null then
        return query select * from parley_history_rows(p_conversation, p_viewer,
                                                       p_before, null, p_limit, false);
    else
        return query select * from parley_history_rows(p_conversation, p_viewer,
                                                       p_before, p_after, p_limit, true);
    end if;
end
$$;


-- The latest pages that a worker's waiting requests ask for, in one call:
-- p_batch is [{"c":conversation,"v":viewer (absent for a service),"l":limit,
-- "s":the stamp of the page the worker keeps (absent: none)}]. For each
-- element (idx its position) a header row: status 404 when the viewer may
-- not read, else 200 with `extra` true when the kept page is unchanged and
-- `stamp` the page's stamp now. Then, for each changed page, its rows
-- (parley_history_rows, status 200, stamp null). One snapshot for all (a stable
-- function), so each stamp is exactly that of its rows. The headers are one
-- statement for the whole batch: a page answered from memory costs the
-- database a few index lookups of a shared call, not a call of its own
-- (nor two PL/pgSQL calls: inlined, the headers of a batch of 8 went from
-- 7,800 to 14,000 statements/s in pgbench).
create or replace function parley_latest_pages(p_batch jsonb)
returns table (id bigint, conversation_id bigint, sender_id text, sender_name text,
               content text, type text, metadata text, client_id text,
               ts text, is_read boolean, extra boolean, stamp text,
               idx integer, status integer)
language plpgsql stable
set search_path from current
set plan_cache_mode = force_generic_plan
as $$
#variable_conflict use_column
declare
    a record;
begin
    for a in
        select x.i::integer - 1 as idx, (x.e->>'c')::bigint as conv,
               x.e->>'v' as viewer, (x.e->>'l')::integer as lim, x.e->>'s' as known,
               (select concat_ws(':', x.e->>'l', c.last_message_id, c.message_count,
                                 c.history_version, (select n.version from parley_names n),
                                 (select array_agg(row(f.user_id, f.pos)
                                                   order by f.pos, f.user_id)::text
                                    from parley_floor_rows(c.id) f))
                  from parley_readable((x.e->>'c')::bigint, x.e->>'v') c) as stamp
          from jsonb_array_elements(p_batch) with ordinality x(e, i)
    loop
        -- The header: the message columns stay null.
        idx := a.idx;
        status := case when a.stamp is null then 404 else 200 end;
        stamp := a.stamp;
        extra := a.stamp is not null and a.stamp = a.known;
        return next;
        if a.stamp is not null and a.stamp is distinct from a.known then
            return query select h.*, null::text, a.idx, 200
                           from parley_history_rows(a.conv, a.viewer, null, null,
                                                    a.lim, false) h;
        end if;
    end loop;
end
$$;
