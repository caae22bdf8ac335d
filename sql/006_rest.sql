-- 006_rest.sql: the two REST calls whose answer needs another shape (a status
-- beside the body) or one more step than the functions of 002/003 take.
-- Both return (created boolean, body text): the server answers 201 or 200 with
-- the body as it is.
select set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

-- POST /api/conversations. p_creator null = a service. The creator's display
-- name is refreshed only after the create: its user inserts take their locks
-- in byte order, and touching the creator's row first could deadlock two new
-- users creating a conversation with each other at the same time.
create or replace function parley_rest_create_conversation(p_creator text, p_name text,
    p_members jsonb, p_title text, p_context_kind text, p_context_ref text,
    p_system_message text, out created boolean, out body text)
language plpgsql
set search_path from current
as $$
declare
    v_answer json;
begin
    v_answer := parley_create_conversation(p_creator, p_members, p_title, p_context_kind,
                                           p_context_ref, p_system_message)::json;
    created := (v_answer ->> 'created')::boolean;
    body := (v_answer -> 'conversation')::text;

    if p_creator is not null and exists (
           select 1 from users
            where id = p_creator
              and name is distinct from coalesce(p_name, 'user ' || p_creator)) then
        perform parley_touch_user(p_creator, p_name);
        body := parley_conversation_json((v_answer -> 'conversation' ->> 'id')::bigint,
                                         p_creator)::text;
    end if;
end
$$;

-- POST /api/conversations/{id}/messages. With p_name, a user sends as
-- themselves and their display name is refreshed first, so the message carries
-- it. A sender without p_name is a service sending on a participant's behalf:
-- PROTOCOL.md section 8 wants 403 when that user is not a participant, where
-- parley_post_message answers 404 for both cases. No sender: SYSTEM.
create or replace function parley_rest_post_message(p_conversation bigint, p_sender text,
    p_name text, p_type text, p_content text, p_metadata jsonb, p_client_id text,
    out created boolean, out body text)
language plpgsql
set search_path from current
as $$
declare
    v_answer json;
begin
    if p_sender is not null and p_name is not null then
        perform parley_touch_user(p_sender, p_name);
    elsif p_sender is not null then
        perform 1 from conversations where id = p_conversation;
        if not found then
            perform parley_fail(404, 'not_found', 'no such conversation');
        end if;
        perform 1 from participants
         where conversation_id = p_conversation and user_id = p_sender;
        if not found then
            perform parley_fail(403, 'forbidden', 'the sender is not a participant');
        end if;
    end if;

    v_answer := parley_post_message(p_conversation, p_sender, p_type, p_content,
                                    p_metadata, p_client_id)::json;
    created := v_answer ->> 'status' = 'created';
    body := (v_answer -> 'message')::text;
end
$$;
