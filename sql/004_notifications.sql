-- 004_notifications.sql: notification frames, the push trigger, and the notification
-- functions the server calls.
select set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

-- Merge JSON objects given as text into one, keeping their key order (a jsonb merge
-- would sort the keys, and "type" first reads better). Null parts are skipped.
create or replace function parley_json_merge(variadic p_objects text[]) returns text
language plpgsql immutable
as $$
declare
    v_obj text;
    v_body text;
    v_out text := '';
begin
    foreach v_obj in array p_objects loop
        v_body := btrim(substr(v_obj, 2, length(v_obj) - 2));     -- without { }
        if v_body <> '' then
            v_out := case when v_out = '' then v_body else v_out || ', ' || v_body end;
        end if;
    end loop;
    return '{' || v_out || '}';
end
$$;

-- A notification type and payload as the protocol allows them (the server checks too;
-- this is the last line). The envelope keys of the flat frame are reserved.
create or replace function parley_check_notification(p_type text, p_payload jsonb) returns void
language plpgsql
as $$
begin
    if p_type is null or p_type !~ '^[a-z0-9_.]{1,64}$' then
        perform parley_fail(400, 'invalid_payload',
                            'a notification type matches ^[a-z0-9_.]{1,64}$');
    end if;
    if p_payload is null or jsonb_typeof(p_payload) <> 'object' then
        perform parley_fail(400, 'invalid_payload', 'the payload must be a JSON object');
    end if;
    if p_payload ?| array['type', 'id', 'created_at', 'read', 'replay'] then
        perform parley_fail(400, 'invalid_payload',
                            'the payload may not use the keys type, id, created_at, read, replay');
    end if;
    -- Compact, as the server measures it: jsonb's text puts a space after
    -- every ':' and ',' (and a string holding ": " or ", " counts a byte less
    -- here, never more).
    if octet_length(replace(replace(p_payload::text, ': ', ':'), ', ', ',')) > 8192 then
        perform parley_fail(400, 'invalid_payload', 'the payload is larger than 8 KiB');
    end if;
end
$$;

-- The flat notification object: envelope keys, the payload's keys, for new_message
-- the live counts, then p_tail's keys ({"read":..} for lists, {"replay":true} for
-- sync, null for the live frame).
create or replace function parley_notification_json(n notifications, p_tail json) returns text
language plpgsql stable
set search_path from current
as $$
begin
    return parley_json_merge(
        json_build_object('type', n.type, 'id', n.id,
                          'created_at', parley_ts(n.created_at))::text,
        n.payload::text,
        case when n.type = 'new_message' then
            json_build_object(
                'count', n.count,
                'unread_count', parley_unread_count(n.conversation_id, n.user_id),
                'total_unread', parley_total_unread(n.user_id))::text
        end,
        p_tail::text);
end
$$;

-- The live frame of a stored notification (what an 'n' event carries; the server
-- calls this for 'N' references).
create or replace function parley_notification_frame(p_id bigint) returns text
language plpgsql stable
set search_path from current
as $$
declare
    n notifications;
begin
    select * into n from notifications where id = p_id;
    return case when found then parley_notification_json(n, null) end;
end
$$;

-- Every insert, and every update that changes what the user sees, of an unread
-- notification is pushed to the user, whoever wrote it (a service call, the
-- new_message collapse, another program's INSERT). Statement-level: the
-- collapse of a message to a big conversation updates a row per recipient in
-- one statement, and these take them all in one query. Which rows are
-- pushed: parley_pushed_notifications (005_sockets.sql, with the sockets).
create or replace function parley_notifications_push(p_ids bigint[]) returns void
language plpgsql
set search_path from current
as $$
declare
    n notifications;
begin
    for n in select * from parley_pushed_notifications(p_ids) loop
        perform parley_emit('n', n.id, 0, n.user_id, parley_notification_json(n, null));
    end loop;
end
$$;

create or replace function parley_notifications_inserted() returns trigger
language plpgsql
as $$
begin
    perform parley_notifications_push(array(select id from inserted where read_at is null));
    return null;
end
$$;

-- The rows that changed, as a set difference rather than a join of the two
-- transition tables: PL/pgSQL keeps a statement's plan from the session's first
-- call, often an empty ON CONFLICT statement, and the join planned for empty
-- tables was a nested loop (120 ms for a big conversation's 1,000 rows).
create or replace function parley_notifications_updated() returns trigger
language plpgsql
as $$
begin
    perform parley_notifications_push(array(
        select id from (select id, type, payload, count, created_at from updated
                         where read_at is null
                        except
                        select id, type, payload, count, created_at from previous) changed));
    return null;
end
$$;

create trigger notifications_inserted after insert on notifications
    referencing new table as inserted
    for each statement execute function parley_notifications_inserted();
create trigger notifications_updated after update on notifications
    referencing old table as previous new table as updated
    for each statement execute function parley_notifications_updated();

-- The service call: store (for users not seen yet too) and push (via the trigger).
-- new_message is Parley's own type. A missing (SQL null) payload is an empty one.
create or replace function parley_post_notification(p_user text, p_type text, p_payload jsonb)
returns text
language plpgsql
set search_path from current
as $$
declare
    n notifications;
begin
    perform parley_check_user_id(p_user);
    perform parley_check_notification(p_type, coalesce(p_payload, '{}'));
    if p_type = 'new_message' then
        perform parley_fail(403, 'forbidden_type', 'new_message is created by Parley itself');
    end if;
    insert into notifications (user_id, type, payload)
    values (p_user, p_type, coalesce(p_payload, '{}'))
    returning * into n;
    return parley_notification_json(n, json_build_object('read', false));
end
$$;

-- Replay for the notification socket: stored notifications with id > p_after,
-- oldest first, with "replay":true; disabled types are not pushed, so not replayed.
create or replace function parley_notification_sync(p_user text, p_after bigint, p_limit integer)
returns table (id bigint, frame text)
language plpgsql
set search_path from current
as $$
declare
    v_disabled text[] := coalesce((select np.disabled_types from notification_preferences np
                                    where np.user_id = p_user), '{}');
begin
    return query
    select n.id, parley_notification_json(n, json_build_object('replay', true))
      from notifications n
     where n.user_id = p_user
       and n.id > coalesce(p_after, 0)
       and n.type <> all (v_disabled)
     order by n.id
     limit greatest(coalesce(p_limit, 200), 0);
end
$$;

-- REST list, newest first, each with "read". The two branches are exclusive; the
-- unread one can use the partial index.
create or replace function parley_list_notifications(p_user text, p_limit integer,
    p_before bigint, p_unread_only boolean)
returns text
language plpgsql
set search_path from current
as $$
declare
    v_limit integer := least(greatest(coalesce(p_limit, 50), 1), 1000);
    v_before bigint := coalesce(p_before, 9223372036854775807);
    v_unread boolean := coalesce(p_unread_only, false);
    v_list json;
    v_more boolean;
begin
    select coalesce(json_agg(parley_notification_json(page.n,
                                 json_build_object('read', (page.n).read_at is not null))::json
                             order by (page.n).id desc)
                        filter (where page.k <= v_limit), '[]'),
           count(*) > v_limit
      into v_list, v_more
      from (select sel.n, row_number() over (order by (sel.n).id desc) as k
              from ((select n from notifications n
                      where v_unread and n.user_id = p_user and n.read_at is null
                        and n.id < v_before
                      order by n.id desc limit v_limit + 1)
                    union all
                    (select n from notifications n
                      where not v_unread and n.user_id = p_user and n.id < v_before
                      order by n.id desc limit v_limit + 1)) sel) page;

    return json_build_object('notifications', v_list, 'has_more', v_more)::text;
end
$$;

-- The 'r' event that updates all of a user's notification sockets.
create or replace function parley_emit_notifications_read(p_user text, p_ids json,
                                                          p_unread integer)
returns void
language plpgsql
set search_path from current
as $$
begin
    perform parley_emit('r', 0, 0, p_user,
        json_build_object('type', 'notifications_read', 'ids', p_ids,
                          'unread_notifications', p_unread)::text);
end
$$;

-- Read one. The event goes out even when it was already read, so the socket that
-- asked always gets its answer.
create or replace function parley_read_notification(p_user text, p_id bigint) returns text
language plpgsql
set search_path from current
as $$
declare
    v_unread integer;
begin
    update notifications set read_at = clock_timestamp()
     where id = p_id and user_id = p_user and read_at is null;
    if not found then
        perform 1 from notifications where id = p_id and user_id = p_user;
        if not found then
            perform parley_fail(404, 'not_found', 'no such notification');
        end if;
    end if;
    v_unread := parley_unread_notifications(p_user);
    perform parley_emit_notifications_read(p_user, json_build_array(p_id), v_unread);
    return json_build_object('unread_notifications', v_unread)::text;
end
$$;

create or replace function parley_read_all_notifications(p_user text) returns text
language plpgsql
set search_path from current
as $$
declare
    v_unread integer;
begin
    -- Rows locked by conversation, the order in which a send or a drain
    -- that collapses several of the user's conversations takes them (by id,
    -- the two could deadlock).
    update notifications n set read_at = clock_timestamp()
      from (select id from notifications
             where user_id = p_user and read_at is null
             order by conversation_id, id
               for update) x
     where n.id = x.id;
    v_unread := parley_unread_notifications(p_user);   -- 0 unless one arrived meanwhile
    perform parley_emit_notifications_read(p_user, to_json('all'::text), v_unread);
    return json_build_object('unread_notifications', v_unread)::text;
end
$$;

create or replace function parley_get_preferences(p_user text) returns text
language plpgsql
set search_path from current
as $$
begin
    return json_build_object('disabled_types', coalesce(
        (select to_json(disabled_types) from notification_preferences where user_id = p_user),
        '[]'))::text;
end
$$;

-- Replace the disabled types: a JSON array of type names (duplicates merged, first
-- occurrence order kept).
create or replace function parley_set_preferences(p_user text, p_disabled jsonb) returns text
language plpgsql
set search_path from current
as $$
declare
    v_types text[];
begin
    perform parley_check_user_id(p_user);
    if p_disabled is null or jsonb_typeof(p_disabled) <> 'array'
       or jsonb_array_length(p_disabled) > 256 then
        perform parley_fail(400, 'invalid_payload',
                            'disabled_types must be an array of at most 256 types');
    end if;
    if exists (select 1 from jsonb_array_elements(p_disabled) e
                where jsonb_typeof(e) <> 'string'
                   or (e #>> '{}') !~ '^[a-z0-9_.]{1,64}$') then
        perform parley_fail(400, 'invalid_payload',
                            'each disabled type matches ^[a-z0-9_.]{1,64}$');
    end if;

    select coalesce(array_agg(t order by first_ord), '{}') into v_types
      from (select e #>> '{}' as t, min(ord) as first_ord
              from jsonb_array_elements(p_disabled) with ordinality as x(e, ord)
             group by 1) d;

    insert into notification_preferences (user_id, disabled_types)
    values (p_user, v_types)
    on conflict (user_id) do update set disabled_types = excluded.disabled_types;

    return json_build_object('disabled_types', to_json(v_types))::text;
end
$$;

-- What the notification socket's ready frame needs.
create or replace function parley_notify_ready(p_user text) returns text
language plpgsql
set search_path from current
as $$
begin
    return json_build_object('unread_notifications', parley_unread_notifications(p_user),
                             'unread_messages', parley_total_unread(p_user))::text;
end
$$;
