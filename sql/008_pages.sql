-- Latest pages cached by the servers (src/pages.c). A worker keeps the
-- latest page of a conversation it served, with a stamp of everything the
-- page was made from, and asks parley_latest_page for it again with that
-- stamp: when nothing changed, it gets the stamp back and no rows, and
-- answers from memory. What goes into a page, and so into its stamp:
-- the messages (a new one moves last_message_id and message_count; an
-- UPDATE or DELETE, which only other programs make, moves
-- history_version), the senders' names (a rename moves the one row of
-- parley_names: renames are rare, and a message's sender may have left),
-- and the read positions that make is_read (parley_read_floor). Who may
-- read is checked at every call, hit or not.
select set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

alter table conversations add column if not exists history_version bigint not null default 0;

create table if not exists parley_names (
    only_row  boolean primary key default true check (only_row),
    version   bigint not null default 0
);
insert into parley_names default values on conflict do nothing;

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

create or replace function parley_names_changed() returns trigger
language plpgsql
set search_path from current
as $$
begin
    if exists (select 1 from renamed r join before b on b.id = r.id
                where b.name is distinct from r.name) then
        update parley_names set version = version + 1;
    end if;
    return null;
end
$$;

create or replace trigger users_renamed after update on users
    referencing old table as before new table as renamed
    for each statement execute function parley_names_changed();

-- A user reads a conversation they take part in; a service (p_viewer null)
-- any that exists. Otherwise PX404.
create or replace function parley_check_reader(p_conversation bigint, p_viewer text)
returns void
language plpgsql stable
set search_path from current
as $$
begin
    if p_viewer is null then
        perform 1 from conversations c where c.id = p_conversation;
    else
        perform 1 from participants p
         where p.conversation_id = p_conversation and p.user_id = p_viewer;
    end if;
    if not found then
        perform parley_fail(404, 'not_found', 'no such conversation, or not a participant');
    end if;
end
$$;

-- A page of history, oldest first, as rows: the server renders the message
-- objects (src/message.c, message_render; JSON built here costs ~15 us a
-- message, ten times the query). The columns are the fields of
-- parley_message_json() in its order; `extra` marks the one row past the page
-- (limit+1 rows are read) that says has_more. With p_after: the first page
-- after it (below p_before when given); otherwise the latest page (below
-- p_before when given). Each branch is a backward or forward range scan of
-- messages (conversation_id, id); the other one's guard is false. The plan is
-- the same for every call: planning it again each time (PL/pgSQL's default
-- here) took longer than running it.
create or replace function parley_history(p_conversation bigint, p_viewer text,
    p_before bigint, p_after bigint, p_limit integer)
returns table (id bigint, conversation_id bigint, sender_id text, sender_name text,
               content text, type text, metadata text, client_id text,
               ts text, is_read boolean, extra boolean)
language plpgsql stable
set search_path from current
set plan_cache_mode = force_generic_plan
as $$
#variable_conflict use_column
declare
    v_limit integer := least(greatest(coalesce(p_limit, 50), 1), 1000);
    v_before bigint := coalesce(p_before, 9223372036854775807);
    f record;
begin
    perform parley_check_reader(p_conversation, p_viewer);

    f := parley_read_floor(p_conversation);

    return query
    select m.id, m.conversation_id, m.sender_id,
           case when m.sender_id is not null
                then coalesce(u.name, 'user ' || m.sender_id) end,
           m.content, m.type, m.metadata::text, m.client_id, parley_ts(m.created_at),
           parley_is_read(m.id, m.sender_id, f.min_user, f.min_read, f.next_read),
           m.n > v_limit
      from ((select b.*, row_number() over (order by b.id desc) as n
               from messages b
              where p_after is null and b.conversation_id = p_conversation
                and b.id < v_before
              order by b.id desc
              limit v_limit + 1)
            union all
            (select a.*, row_number() over (order by a.id) as n
               from messages a
              where p_after is not null and a.conversation_id = p_conversation
                and a.id > p_after and a.id < v_before
              order by a.id
              limit v_limit + 1)) m
      left join users u on u.id = m.sender_id
     order by m.id;
end
$$;


-- The latest page for a cache holding the one stamped p_stamp (null: none).
-- The first row is a header: id null, extra true when the page is
-- unchanged, stamp the page's stamp now. Unless unchanged, the page's rows
-- (parley_history) follow, stamp null. One snapshot for both (a stable
-- function), so the stamp is exactly that of the rows.
create or replace function parley_latest_page(p_conversation bigint, p_viewer text,
    p_limit integer, p_stamp text)
returns table (id bigint, conversation_id bigint, sender_id text, sender_name text,
               content text, type text, metadata text, client_id text,
               ts text, is_read boolean, extra boolean, stamp text)
language plpgsql stable
set search_path from current
set plan_cache_mode = force_generic_plan
as $$
#variable_conflict use_column
declare
    v_stamp text;
begin
    perform parley_check_reader(p_conversation, p_viewer);
    select concat_ws(':', p_limit, c.last_message_id, c.message_count,
                     c.history_version, n.version, f.min_user, f.min_read,
                     f.next_read)
      into v_stamp
      from conversations c, parley_names n, parley_read_floor(p_conversation) f
     where c.id = p_conversation;
    return query select null::bigint, null::bigint, null::text, null::text,
                        null::text, null::text, null::text, null::text,
                        null::text, null::boolean,
                        v_stamp is not distinct from p_stamp, v_stamp;
    if v_stamp is distinct from p_stamp then
        return query select h.*, null::text
                       from parley_history(p_conversation, p_viewer, null, null,
                                           p_limit) h;
    end if;
end
$$;
