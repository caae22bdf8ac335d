-- 003_conversations.sql: conversation objects, get-or-create, listing, mute, and the
-- per-user counters (/api/me, /api/unread).
select set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

-- The conversation object as the viewer sees it (viewer null = service: unread 0,
-- not muted). Null when there is no such conversation.
create or replace function parley_conversation_json(p_id bigint, p_viewer text) returns json
language plpgsql stable
set search_path from current
as $$
begin
    return (select json_build_object(
        'id', c.id,
        'title', c.title,
        'context', case when c.context_kind is not null or c.context_ref is not null
                        then json_build_object('kind', c.context_kind, 'ref', c.context_ref) end,
        'participants', (select coalesce(json_agg(json_build_object('id', p.user_id,
                                                                    'name', u.name,
                                                                    'role', p.role)
                                                  order by p.joined_at, p.user_id), '[]')
                           from participants p
                           join users u on u.id = p.user_id
                          where p.conversation_id = c.id),
        'last_message', parley_message_json(c.last_message_id),
        'unread_count', coalesce(c.message_count - v.read_count, 0),
        'muted', coalesce(v.muted, false),
        'updated_at', parley_ts(c.updated_at))
      from conversations c
      left join participants v on v.conversation_id = c.id and v.user_id = p_viewer
     where c.id = p_id);
end
$$;

-- Get-or-create on (member set, context kind, context ref). p_members is a JSON array
-- of {"id":..,"role":..} (plain ids accepted too); the first role given for an id
-- wins; the creator (null for a service) is added when missing. Concurrent identical
-- creates make one conversation: the unique index decides, the loser selects.
create or replace function parley_create_conversation(p_creator text, p_members jsonb,
    p_title text, p_context_kind text, p_context_ref text, p_system_message text)
returns text
language plpgsql
set search_path from current
as $$
declare
    v_ids text[];          -- distinct member ids in byte order
    v_roles text[];        -- their roles, same order
    v_hash text;
    v_id bigint;
    v_created boolean := false;
begin
    if p_members is null or jsonb_typeof(p_members) <> 'array'
       or jsonb_array_length(p_members) = 0 then
        perform parley_fail(400, 'invalid_payload', 'participants must be a non-empty array');
    end if;

    with given as (
        select case when jsonb_typeof(e) = 'object' then e -> 'id' else e end as id_json,
               case when jsonb_typeof(e) = 'object' then e ->> 'role' end as role,
               ord
          from jsonb_array_elements(p_members) with ordinality as t(e, ord)
    ), members as (
        select case when jsonb_typeof(id_json) in ('string', 'number')
                    then id_json #>> '{}' end as id, role, ord
          from given
        union all
        select p_creator, null, 9223372036854775807 where p_creator is not null
    ), distinct_members as (
        select distinct on (id) id, role from members order by id, ord
    )
    select array_agg(id order by id collate "C"), array_agg(role order by id collate "C")
      into v_ids, v_roles
      from distinct_members;

    if exists (select 1 from unnest(v_ids) x
                where x is null or octet_length(x) not between 1 and 64) then
        perform parley_fail(400, 'invalid_payload', 'a participant id is a string of 1-64 bytes');
    end if;

    v_hash := md5(array_to_string(v_ids, E'\x1f'));

    -- Users not seen yet are fine; byte order keeps concurrent creators' locks ordered.
    insert into users (id, name)
    select x, 'user ' || x from unnest(v_ids) x order by x collate "C"
    on conflict (id) do nothing;

    insert into conversations (title, context_kind, context_ref, member_hash)
    values (p_title, p_context_kind, p_context_ref, v_hash)
    on conflict (member_hash, context_kind, context_ref) do nothing
    returning id into v_id;

    if v_id is not null then
        v_created := true;
        insert into participants (conversation_id, user_id, role)
        select v_id, m.id, m.role from unnest(v_ids, v_roles) as m(id, role);
        if nullif(btrim(p_system_message), '') is not null then
            insert into messages (conversation_id, sender_id, type, content)
            values (v_id, null, 'SYSTEM', p_system_message);
        end if;
    else
        select id into v_id
          from conversations
         where member_hash = v_hash
           and context_kind is not distinct from p_context_kind
           and context_ref is not distinct from p_context_ref;
        -- md5 is only a key: make sure the member set really is the same.
        if v_id is null or v_ids is distinct from
               (select array_agg(user_id order by user_id collate "C")
                  from participants where conversation_id = v_id) then
            perform parley_fail(409, 'conflict', 'conversation key collision');
        end if;
    end if;

    return json_build_object('created', v_created,
                             'conversation', parley_conversation_json(v_id, p_creator))::text;
end
$$;

-- List cursor: "<updated_at in epoch microseconds>_<id>", exact for the keyset
-- (updated_at desc, id desc). Clients treat it as opaque.
create or replace function parley_cursor_encode(p_ts timestamptz, p_id bigint) returns text
language sql stable
as $$ select (extract(epoch from p_ts) * 1000000)::bigint || '_' || p_id $$;

create or replace function parley_cursor_decode(p_cursor text,
    out ts timestamptz, out id bigint)
language plpgsql stable
as $$
begin
    if p_cursor !~ '^-?[0-9]{1,18}_[0-9]{1,19}$' then
        perform parley_fail(400, 'invalid_payload', 'malformed cursor');
    end if;
    begin
        ts := timestamptz 'epoch' + split_part(p_cursor, '_', 1)::bigint * interval '1 microsecond';
        id := split_part(p_cursor, '_', 2)::bigint;
    exception when numeric_value_out_of_range or datetime_field_overflow
                   or interval_field_overflow then
        perform parley_fail(400, 'invalid_payload', 'malformed cursor');
    end;
end
$$;

-- A user's conversations, most recent activity first.
create or replace function parley_list_conversations(p_user text, p_limit integer,
                                                     p_before text)
returns text
language plpgsql
set search_path from current
as $$
declare
    v_limit integer := least(greatest(coalesce(p_limit, 20), 1), 1000);
    v_ts timestamptz;
    v_id bigint;
    v_list json;
    v_next text;
begin
    if p_before is not null then
        select c.ts, c.id into v_ts, v_id from parley_cursor_decode(p_before) c;
    end if;

    select coalesce(json_agg(parley_conversation_json(page.id, p_user) order by page.n)
                        filter (where page.n <= v_limit), '[]'),
           case when count(*) > v_limit
                then min(parley_cursor_encode(page.updated_at, page.id))
                         filter (where page.n = v_limit) end
      into v_list, v_next
      from (select c.id, c.updated_at,
                   row_number() over (order by c.updated_at desc, c.id desc) as n
              from participants p
              join conversations c on c.id = p.conversation_id
             where p.user_id = p_user
               and (v_ts is null or (c.updated_at, c.id) < (v_ts, v_id))
             order by c.updated_at desc, c.id desc
             limit v_limit + 1) page;

    return json_build_object('conversations', v_list, 'next_before', v_next)::text;
end
$$;

-- One conversation; marks it read for the viewer first when asked (with the
-- read_receipt). Viewer null = service: read-only.
create or replace function parley_get_conversation(p_id bigint, p_viewer text,
                                                   p_mark_read boolean)
returns text
language plpgsql
set search_path from current
as $$
begin
    if p_viewer is null then
        perform 1 from conversations where id = p_id;
    else
        perform 1 from participants where conversation_id = p_id and user_id = p_viewer;
    end if;
    if not found then
        perform parley_fail(404, 'not_found', 'no such conversation, or not a participant');
    end if;
    if p_viewer is not null and p_mark_read then
        perform parley_mark_read(p_id, p_viewer, null);
    end if;
    return parley_conversation_json(p_id, p_viewer)::text;
end
$$;

create or replace function parley_set_muted(p_id bigint, p_user text, p_muted boolean)
returns text
language plpgsql
set search_path from current
as $$
begin
    if p_muted is null then
        perform parley_fail(400, 'invalid_payload', 'muted must be a boolean');
    end if;
    update participants set muted = p_muted
     where conversation_id = p_id and user_id = p_user and muted <> p_muted;
    if not found then
        perform 1 from participants where conversation_id = p_id and user_id = p_user;
        if not found then
            perform parley_fail(404, 'not_found', 'no such conversation, or not a participant');
        end if;
    end if;
    return parley_conversation_json(p_id, p_user)::text;
end
$$;

create or replace function parley_me(p_user text) returns text
language plpgsql
set search_path from current
as $$
begin
    return json_build_object(
        'user', json_build_object('id', p_user, 'name', parley_user_name(p_user)),
        'unread_messages', parley_total_unread(p_user),
        'unread_notifications', parley_unread_notifications(p_user))::text;
end
$$;

create or replace function parley_unread(p_user text) returns text
language plpgsql
set search_path from current
as $$
begin
    return json_build_object(
        'total', parley_total_unread(p_user),
        'conversations', coalesce(
            (select json_agg(json_build_object('id', p.conversation_id,
                                               'unread_count', c.message_count - p.read_count,
                                               'muted', p.muted)
                             order by p.conversation_id)
               from participants p
               join conversations c on c.id = p.conversation_id
              where p.user_id = p_user and c.message_count > p.read_count), '[]'))::text;
end
$$;
