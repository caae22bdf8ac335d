-- Write batching (bench/README.md): a worker sends every message that arrived
-- while its previous write was in flight in one call, one transaction. Each
-- send still goes through parley_post_message (the same rules, triggers and
-- NOTIFY as a single send), inside its own subtransaction so that one refused
-- send does not undo the others. Conversations are taken in id order so that
-- two workers' batches lock conversation rows in the same order and cannot
-- deadlock.
select set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

-- p_batch: [{"c":conversation_id,"s":sender,"t":type,"b":content,
--            "m":metadata (absent for none),"k":client_id (absent for none)}]
-- One row per element: idx is its position in p_batch; status 200 with the
-- parley_post_message answer in body, or the error's HTTP-like status with
-- the protocol error code and a human message.
create or replace function parley_post_messages(p_batch jsonb)
returns table (idx integer, status integer, body text, code text, message text)
language plpgsql
set search_path from current
as $$
declare
    v_item jsonb;
    v_state text;
    v_detail text;
begin
    for idx, v_item in
        select (e.ordinality - 1)::integer, e.value
          from jsonb_array_elements(p_batch) with ordinality as e
         order by (e.value->>'c')::bigint, e.ordinality
    loop
        begin
            body := parley_post_message((v_item->>'c')::bigint, v_item->>'s',
                                        v_item->>'t', v_item->>'b',
                                        v_item->'m', v_item->>'k');
            status := 200;
            code := null;
            message := null;
        exception when others then
            get stacked diagnostics v_state = returned_sqlstate,
                                    v_detail = pg_exception_detail;
            body := null;
            if v_state like 'PX%' then
                status := substr(v_state, 3)::integer;
                code := sqlerrm;
                message := coalesce(nullif(v_detail, ''), sqlerrm);
            else
                raise warning 'parley_post_messages: % %', v_state, sqlerrm;
                status := 500;
                code := 'internal';
                message := 'internal error';
            end if;
        end;
        return next;
    end loop;
end
$$;
