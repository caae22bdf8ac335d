-- Write batching (bench/README.md): a worker sends every message that arrived
-- while its previous write was in flight in one call, one transaction.
--
-- The usual path inserts the whole batch with one INSERT statement, so the
-- triggers of 002 do their work once per batch instead of once per message,
-- and once per row they touch however many of the batch's messages share a
-- conversation (a big conversation's recipients are updated once a batch).
-- Sends it can answer without writing (not a participant, a client_id
-- repeat) are answered first and left out of the insert. Should the insert
-- still fail (a conversation deleted meanwhile, a participant removed), the
-- batch is taken again one send at a time, each in its own subtransaction,
-- so that one refused send does not undo the others. Either way rows are
-- inserted in conversation id order, so two workers' batches lock
-- conversation rows in the same order and cannot deadlock.
select set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

-- p_batch: [{"c":conversation_id,"s":sender,"t":type,"b":content,
--            "m":metadata (absent for none),"k":client_id (absent for none)}]
-- One row per element: idx is its position in p_batch; status 200 with what
-- the socket's ack needs in body (parley_send_ack), or the error's HTTP-like
-- status with the protocol error code and a human message. (The message
-- object itself reaches the sender with everyone else's, in its live frame:
-- rendering it a second time for the answer cost a quarter of a batch.)
create or replace function parley_send_ack(p_status text, p_id bigint, p_ts text)
returns text
language sql stable                     -- as json_build_object: then it is inlined
as $$
    select json_build_object('status', p_status, 'message_id', p_id,
                             'timestamp', p_ts)::text
$$;

create or replace function parley_post_messages(p_batch jsonb)
returns table (idx integer, status integer, body text, code text, message text)
language plpgsql
set search_path from current
as $$
begin
    begin
        -- A plpgsql set-returning function hands over its rows only once it
        -- has finished, so a failure here leaves no partial answer behind.
        return query select * from parley_post_messages_together(p_batch);
        return;
    exception when others then
        null;                   -- answered one by one below, errors included
    end;

    -- One by one, a send by u after someone else's to u would lock u's
    -- notification before u's participant row, the order parley_mark_read
    -- takes them in reverse: lock the conversations and the senders' rows
    -- first, in the order every writer takes them.
    perform 1 from conversations
     where id in (select i.c from parley_batch_items(p_batch) i)
     order by id
       for no key update;
    perform 1 from participants p
     where (p.conversation_id, p.user_id) in
           (select i.c, i.s from parley_batch_items(p_batch) i)
     order by p.conversation_id, p.user_id
       for no key update;
    return query select * from parley_batch_each('send', p_batch);
end
$$;

-- The batch as rows; sends without type or content get the defaults of
-- parley_post_message.
create or replace function parley_batch_items(p_batch jsonb)
returns table (idx integer, c bigint, s text, t text, b text, m jsonb, k text)
language sql immutable
as $$
    select (e.ordinality - 1)::integer, (e.value->>'c')::bigint, e.value->>'s',
           case when e.value->>'s' is null then 'SYSTEM'
                else coalesce(e.value->>'t', 'TEXT') end,
           coalesce(e.value->>'b', ''), nullif(e.value->'m', 'null'::jsonb),
           e.value->>'k'
      from jsonb_array_elements(p_batch) with ordinality as e
$$;

-- One INSERT for every send that needs one, in (conversation, position)
-- order; the before-insert trigger draws ids in that order, so the n-th new
-- id answers the n-th send inserted. A send that a concurrent transaction
-- stored meanwhile (same client_id) leaves a gap in that pairing: then this
-- raises, and the batch goes one by one.
create or replace function parley_post_messages_together(p_batch jsonb)
returns table (idx integer, status integer, body text, code text, message text)
language plpgsql
set search_path from current
as $$
declare
    v_answers jsonb;
    v_sent bigint;
    v_stored bigint;
begin
    with item as (
        select i.*,
               case when i.s is null
                    then exists (select 1 from conversations v where v.id = i.c)
                    else exists (select 1 from participants p
                                  where p.conversation_id = i.c and p.user_id = i.s)
               end as allowed,
               (select x from messages x
                 where i.k is not null
                   and x.conversation_id = i.c
                   and coalesce(x.sender_id, '') = coalesce(i.s, '')
                   and x.client_id = i.k) as prior
          from parley_batch_items(p_batch) i),
    sent as (
        select i.*, row_number() over (order by i.c, i.idx) as rank
          from item i
         where i.allowed and (i.prior).id is null),
    fresh as (
        insert into messages as x (conversation_id, sender_id, type, content, metadata, client_id)
        select i.c, i.s, i.t, i.b, i.m, i.k
          from sent i
         order by i.rank
        on conflict (conversation_id, coalesce(sender_id, ''), client_id)
           where client_id is not null
        do nothing
        returning x.id, x.created_at),
    stored as (
        select f.id, f.created_at, row_number() over (order by f.id) as rank
          from fresh f),
    answer as (
        select i.idx, 404 as status, null::text as body, 'not_found' as code,
               'no such conversation, or not a participant' as message
          from item i
         where not i.allowed
        union all
        select i.idx, 409, null, 'conflict',
               'this client_id was already used for a different message'
          from item i
         where i.allowed and (i.prior).id is not null
           and ((i.prior).type <> i.t or (i.prior).content <> i.b
                or (i.prior).metadata is distinct from i.m)
        union all
        select i.idx, 200,
               parley_send_ack('duplicate', (i.prior).id, parley_ts((i.prior).created_at)),
               null, null
          from item i
         where i.allowed and (i.prior).id is not null
           and (i.prior).type = i.t and (i.prior).content = i.b
           and (i.prior).metadata is not distinct from i.m
        union all
        select i.idx, 200, parley_send_ack('created', f.id, parley_ts(f.created_at)),
               null, null
          from sent i
          join stored f using (rank))
    select coalesce(jsonb_agg(to_jsonb(a)), '[]'),
           (select count(*) from sent), (select count(*) from stored)
      into v_answers, v_sent, v_stored
      from answer a;

    if v_sent <> v_stored then
        raise exception 'parley_post_messages: a send was stored meanwhile';
    end if;
    return query
        select (a->>'idx')::integer, (a->>'status')::integer, a->>'body',
               a->>'code', a->>'message'
          from jsonb_array_elements(v_answers) a;
end
$$;

-- One element of a batch in its own subtransaction (the function's
-- exception block), so that one refused does not undo the others: status
-- 200 and the answer, or the error's status with the protocol code and a
-- human text (PX<status> errors, raised by parley_fail; anything else is
-- internal). p_kind 'send': an element of parley_post_messages; 'open': of
-- parley_sockets_open.
create or replace function parley_batch_call(p_kind text, p_item jsonb,
    out status integer, out body text, out code text, out message text)
language plpgsql
set search_path from current
as $$
declare
    v_state text;
    v_detail text;
    v_sent json;
begin
    if p_kind = 'send' then
        v_sent := parley_post_message((p_item->>'c')::bigint, p_item->>'s', p_item->>'t',
                                      p_item->>'b', p_item->'m', p_item->>'k');
        body := parley_send_ack(v_sent->>'status', (v_sent->'message'->>'id')::bigint,
                                v_sent->'message'->>'timestamp');
    elsif p_item ? 'c' then
        body := parley_chat_open(p_item->>'n', (p_item->>'s')::bigint, (p_item->>'c')::bigint,
                                 p_item->>'u', p_item->>'m', (p_item->>'x')::integer);
    else
        body := parley_notify_open(p_item->>'n', (p_item->>'s')::bigint, p_item->>'u',
                                   p_item->>'m', (p_item->>'x')::integer);
    end if;
    status := 200;
exception when others then
    get stacked diagnostics v_state = returned_sqlstate, v_detail = pg_exception_detail;
    body := null;
    if v_state like 'PX%' then
        status := substr(v_state, 3)::integer;
        code := sqlerrm;
        message := coalesce(nullif(v_detail, ''), sqlerrm);
    else
        raise warning 'parley: % %', v_state, sqlerrm;
        status := 500;
        code := 'internal';
        message := 'internal error';
    end if;
end
$$;

-- Every element of a batch through parley_batch_call, in lock order:
-- sends by conversation, opens by user (two batches then take their locks
-- in the same order and cannot deadlock).
create or replace function parley_batch_each(p_kind text, p_batch jsonb)
returns table (idx integer, status integer, body text, code text, message text)
language plpgsql
set search_path from current
as $$
declare
    v record;
begin
    for v in select e.value, (e.ordinality - 1)::integer as i
               from jsonb_array_elements(p_batch) with ordinality as e
              order by case when p_kind = 'open' then e.value->>'u' end,
                       (e.value->>'c')::bigint, e.ordinality loop
        idx := v.i;
        select * into status, body, code, message from parley_batch_call(p_kind, v.value);
        return next;
    end loop;
end
$$;

-- Socket opens batched like sends (a worker sends the sockets that opened
-- while its previous call ran): one transaction, one commit for many
-- sockets, where a reconnect storm queued thousands of commits that each
-- NOTIFY (presence), and such commits wait for one another. p_batch:
-- [{"n":node,"s":socket id,"c":conversation (absent: a notification
-- socket),"u":user,"m":display name,"x":the user's socket cap}]; answers as
-- parley_post_messages', the body being the ready frame.
create or replace function parley_sockets_open(p_batch jsonb)
returns table (idx integer, status integer, body text, code text, message text)
language sql
as $$
    select * from parley_batch_each('open', p_batch)
$$;
