#!/usr/bin/env bash
# Parley benchmarks. Starts its own PostgreSQL cluster and the server binary
# (built with the project's scripts/lib.sh, started like tests/helpers.py
# does), runs the scenarios named on the command line (default: all), and
# writes bench/results/<scenario>.json and appends to bench/results/SUMMARY.md.
#
#   bench/run.sh                      all six scenarios
#   bench/run.sh throughput storm     just these
#   BENCH_QUICK=1 bench/run.sh        short steps, small populations (smoke test)
#
# Scenarios: throughput pgbench fanout idle history storm. Knobs are the
# environment variables read below; bench/README.md explains them.
set -eu
source "$(dirname "$0")/../scripts/lib.sh"

BENCH=$PARLEY_ROOT/bench
RESULTS=$BENCH/results
RAW=$RESULTS/raw
PY=/usr/bin/python3
QUICK=${BENCH_QUICK:-0}
PORT=${BENCH_PORT:-18888}
PG_PORT=${BENCH_PG_PORT:-15432}
PG_DIR=${BENCH_PG_DIR:-/var/tmp/parley-bench-pg}
SECRET=${BENCH_SECRET:-parley-bench-secret}
URL=ws://127.0.0.1:$PORT
API=http://127.0.0.1:$PORT
FLAVOR=${BENCH_FLAVOR:-prod}
SERVER_PID=0
SERVER_LOG=
PG_PID=0
LG="$BENCH/loadgen --url $URL --secret $SECRET"

# PostgreSQL as configured for every scenario: durable commits, memory for
# a 2-core / 24 GiB machine. Override with BENCH_PG_SETTINGS. Huge pages:
# with 4 KiB pages every backend takes a page fault for each page of
# shared_buffers it touches first (deep history pages ran 3-6x slower, the
# more so the more backends); setup() reserves them when it may.
PG_SETTINGS=${BENCH_PG_SETTINGS:-"shared_buffers=2GB effective_cache_size=8GB
work_mem=16MB maintenance_work_mem=512MB max_connections=400 wal_buffers=32MB
min_wal_size=4GB max_wal_size=16GB checkpoint_timeout=30min fsync=on synchronous_commit=on
huge_pages=try"}

q() { [ "$QUICK" = 1 ] && echo "$1" || echo "$2"; }

psql_db() {
	local db=$1
	shift
	as_pg "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" \
	    -U postgres "$@" "$db"
}

git_rev() {
	local rev
	rev=$(git -C "$PARLEY_ROOT" rev-parse --short HEAD 2>/dev/null || echo none)
	git -C "$PARLEY_ROOT" diff --quiet HEAD -- src sql conf 2>/dev/null || rev="$rev+dirty"
	echo "$rev"
}

setup() {
	install_deps wrk python3-matplotlib
	mkdir -p "$RAW"
	make -s -C "$BENCH"
	BIN=${BENCH_BIN:-$(build "$FLAVOR")}
	log "server binary: $BIN"

	pg_start "$PG_DIR" "$PG_PORT"
	# Exactly these settings: whatever an earlier run or a profiling
	# session set (pg_stat_statements with track=all costs every nested
	# statement) is reset first.
	psql_db postgres -c "ALTER SYSTEM RESET ALL"
	local s dotted=
	for s in $PG_SETTINGS; do
		case ${s%%=*} in
		*.*)	dotted="$dotted $s" ;;
		*)	psql_db postgres -c "ALTER SYSTEM SET ${s%%=*} = '${s#*=}'" ;;
		esac
	done
	as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/log" -w restart >/dev/null
	# A module's settings (pg_stat_statements.track) exist once the
	# restart above loaded it.
	if [ -n "$dotted" ]; then
		for s in $dotted; do
			psql_db postgres -c "ALTER SYSTEM SET ${s%%=*} = '${s#*=}'"
		done
		as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/log" -w \
		    restart >/dev/null
	fi
	if [ "$(huge_pages_used)" = no ] && reserve_huge_pages; then
		as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/log" -w \
		    restart >/dev/null
	fi
	PG_PID=$(head -1 "$PG_DIR/data/postmaster.pid")
	log "PostgreSQL $PG_DIR (port $PG_PORT, pid $PG_PID)"
	PG_DESC="$(echo $PG_SETTINGS) (huge pages in use: $(huge_pages_used))"
	trap cleanup EXIT
}

# Enough 2 MiB huge pages for the cluster's shared memory as it is now
# configured (PostgreSQL says how many), when this user may set
# vm.nr_hugepages. True when it reserved more.
reserve_huge_pages() {
	local need have
	need=$(psql_db postgres -tAc "SHOW shared_memory_size_in_huge_pages")
	have=$(cat /proc/sys/vm/nr_hugepages 2>/dev/null || echo 0)
	[ "${need:-0}" -gt "$have" ] || return 1
	if ! echo "$need" >/proc/sys/vm/nr_hugepages 2>/dev/null; then
		log "cannot reserve $need huge pages: PostgreSQL uses 4 KiB pages"
		return 1
	fi
}

huge_pages_used() {
	awk '/^HugePages_(Total|Free)/ { v[$1] = $2 }
	    END { print (v["HugePages_Total:"] > v["HugePages_Free:"]) ? "yes" : "no" }' \
	    /proc/meminfo
}

# The server always; the cluster unless BENCH_KEEP_PG=1 (its data, the
# history table included, stays on disk for the next run either way).
cleanup() {
	stop_server
	if [ "${BENCH_KEEP_PG:-0}" != 1 ] && [ "$PG_PID" != 0 ]; then
		as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null || true
	fi
}

# A fresh database (unless it is the persistent history one).
fresh_db() {
	psql_db postgres -c "DROP DATABASE IF EXISTS $1 WITH (FORCE)"
	psql_db postgres -c "CREATE DATABASE $1"
}

# populate DB: once the server has migrated it, BENCH_FILLER (100,000)
# other two-person conversations, so that tables, statistics and plans are
# those of a site in use rather than of an empty database (on a table of a
# few hundred rows PostgreSQL rightly scans it whole, which a live site
# never does).
populate() {
	local n=${BENCH_FILLER:-100000}
	psql_db "$1" <<EOF
insert into users (id, name)
select 'filler' || i, 'Filler ' || i from generate_series(1, 2 * $n) i;
insert into conversations (title, member_hash)
select 'filler ' || i, 'filler' || i from generate_series(1, $n) i;
insert into participants (conversation_id, user_id)
select c.id, 'filler' || (2 * substr(c.member_hash, 7)::integer - k)
  from conversations c, (values (0), (1)) v(k)
 where c.member_hash like 'filler%';
EOF
	# Vacuumed now, so that autovacuum does not take these fresh tables on
	# (and PostgreSQL's CPU with it) during the first measured steps.
	psql_db "$1" -c "vacuum (analyze)"
}

start_server() {
	local db=$1 workers=${2:-${BENCH_WORKERS:-2}} dir=$RAW/server-$1
	mkdir -p "$dir"
	(
		cd "$dir"
		ulimit -n "$(ulimit -Hn)"
		exec env PARLEY_LISTEN="127.0.0.1:$PORT" PARLEY_WORKERS="$workers" \
		    PARLEY_DATABASE_URL="postgresql://postgres@127.0.0.1:$PG_PORT/$db" \
		    PARLEY_JWT_SECRET="$SECRET" ${BENCH_SERVER_ENV:-} \
		    "$BIN" -f -n -r >"$dir/server.log" 2>&1
	) &
	SERVER_PID=$!
	SERVER_LOG=$dir/server.log
	local i
	for i in $(seq 1 300); do
		curl -fs "$API/readyz" >/dev/null 2>&1 && break
		kill -0 "$SERVER_PID" 2>/dev/null || {
			tail -20 "$dir/server.log"
			log "server exited"
			exit 1
		}
		sleep 0.2
	done
	curl -fs "$API/readyz" >/dev/null || { log "server not ready"; exit 1; }
	log "server pid $SERVER_PID on $API, $workers workers, database $db"
}

stop_server() {
	if [ "$SERVER_PID" != 0 ] && kill -0 "$SERVER_PID" 2>/dev/null; then
		kill -TERM "$SERVER_PID"
		local i
		for i in $(seq 1 100); do
			kill -0 "$SERVER_PID" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$SERVER_PID" 2>/dev/null || true
		wait "$SERVER_PID" 2>/dev/null || true
	fi
	SERVER_PID=0
}

# measure LABEL CMD... [::: CMD...]: run a load step, recording the CPU of
# the server, PostgreSQL and the generator into $RAW/$SCEN-LABEL.json.
measure() {
	local label=$1
	shift
	# A checkpoint first, as a server in steady state has had: it recycles
	# the WAL segments written since the last one into the next ones. Else
	# (max_wal_size 16GB, checkpoint_timeout 30min) every 16 MB of WAL is a
	# new segment, zero-filled and fsynced while a commit waits for it
	# (IO:WALInitWrite): p99 at 5,000 msgs/s 26-69 ms with it, 15-18 ms
	# without (bench/README.md, twelfth round).
	psql_db postgres -c checkpoint
	STEPS+=("$RAW/$SCEN-$label.json")
	"$PY" "$BENCH/bench.py" measure --out "$RAW/$SCEN-$label.json" \
	    --label "$label" --server-pid "$SERVER_PID" --pg-pid "$PG_PID" \
	    --server-log "$SERVER_LOG" \
	    --metrics-url "http://127.0.0.1:$PORT/metrics" \
	    -- "$@" || log "$SCEN $label: a command failed (see $RAW/$SCEN-$label.json)"
}

# params KEY=VALUE...: the scenario's parameters, for its result file.
params() {
	"$PY" - "$RAW/$SCEN.params.json" "git=$(git_rev)" "pg_settings=$PG_DESC" \
	    "server_binary=$BIN" "$@" <<'EOF'
import json, sys
d = {}
for i, a in enumerate(sys.argv[2:]):
    k, v = a.split("=", 1)
    # The first three are text (a commit such as 32636e6 reads as a number).
    if i >= 3:
        try:
            v = json.loads(v)
        except ValueError:
            pass
    d[k] = v
json.dump(d, open(sys.argv[1], "w"))
EOF
}

finish() {
	"$PY" "$BENCH/bench.py" scenario "$SCEN" "$RAW/$SCEN.params.json" \
	    "${STEPS[@]}" >"$RESULTS/$SCEN.json"
	if [ ! -e "$RESULTS/SUMMARY.md" ]; then
		cat >"$RESULTS/SUMMARY.md" <<'EOF'
# Parley benchmark results

Appended by `bench/run.sh`, newest last. The server, PostgreSQL and the load
generator share the machine's cores: every row says what each of them used,
as a percentage of one core (a 2-core machine has 200 %), measured from
/proc/<pid>/stat of each process tree before and after the step, and the
whole machine's busy share from /proc/stat (anything else running shows
there). See bench/README.md for what each scenario does.
EOF
	fi
	"$PY" "$BENCH/bench.py" summary "$RESULTS/$SCEN.json" >>"$RESULTS/SUMMARY.md"
	log "$SCEN: $(
		"$PY" -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["verdict"]))' \
		    "$RESULTS/$SCEN.json")"
}

# over_limit FILE LIMIT_MS: true when the step lost, duplicated, broke
# sockets or went past the p99 limit.
over_limit() {
	"$PY" - "$1" "$2" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
lg = None
for o in s["outputs"]:
    for line in o.splitlines():
        if line.startswith("{"):
            lg = json.loads(line)
bad = (lg is None or lg["lost"] > 0 or lg["duplicates"] > 0
       or lg["open_at_end"] < lg["sockets"]
       or lg["latency_ms"]["p99"] > float(sys.argv[2]))
if lg:
    print("rate %s: sent %s/s, p50 %.2f ms, p99 %.2f ms, lost %d, dup %d, "
          "open %d/%d" % (lg["offered_rate"], lg["send_rate"],
          lg["latency_ms"]["p50"], lg["latency_ms"]["p99"], lg["lost"],
          lg["duplicates"], lg["open_at_end"], lg["sockets"]), file=sys.stderr)
sys.exit(0 if bad else 1)
EOF
}

# Conversations made in SQL (no server involved), ids printed one a line:
# user <prefix><i>_0 creates conversation i with <prefix><i>_1..k-1.
sql_conversations() {
	local db=$1 prefix=$2 n=$3 k=$4
	psql_db "$db" -tA <<EOF
select (parley_create_conversation('${prefix}' || i || '_0',
        (select jsonb_agg('${prefix}' || i || '_' || j) from generate_series(1, $k - 1) j),
        'loadgen ${prefix}' || i, null, null, null)::json -> 'conversation' ->> 'id')
  from generate_series(0, $n - 1) i order by i;
EOF
}

# create_conversations DB PREFIX N K FILE: through the REST API (what a
# client does), or in SQL with BENCH_CREATE=sql.
create_conversations() {
	local db=$1 prefix=$2 n=$3 k=$4 file=$5
	if [ "${BENCH_CREATE:-rest}" = sql ]; then
		sql_conversations "$db" "$prefix" "$n" "$k" >"$file"
	else
		$LG --conversations "$n" --users-per-conversation "$k" \
		    --user-prefix "$prefix" --create-only --conv-file "$file"
	fi
}

# 1. Throughput: step the offered rate until p99 > 50 ms or anything is lost.
scen_throughput() {
	SCEN=throughput STEPS=()
	local c=${TP_CONVERSATIONS:-$(q 20 200)} k=${TP_USERS:-2}
	local d=${TP_STEP_SECONDS:-$(q 4 20)} limit=${TP_P99_MS:-50}
	local rates=${TP_RATES:-$(q "100 400" "100 250 500 1000 1500 2000 2500 3000 4000 5000 6000 7000 8000 9000 10000 12000")}
	fresh_db parley_bench
	# Every socket sends rate/(c*k) msgs/s: over the default limit of 10/s
	# per socket from 4,000 msgs/s on, so the limit is raised here.
	BENCH_SERVER_ENV="PARLEY_RATE_MESSAGES=1000 ${BENCH_SERVER_ENV:-}" \
	    start_server parley_bench
	populate parley_bench
	create_conversations parley_bench tp "$c" "$k" "$RAW/tp.ids"
	params conversations="$c" users="$k" step_seconds="$d" p99_limit_ms="$limit" \
	    rates="\"$rates\"" send_form='"compat"' auth='"query"'
	local r
	for r in $rates; do
		measure "rate$r" $LG --conversations "$c" --users-per-conversation "$k" \
		    --user-prefix tp --conv-file "$RAW/tp.ids" --rate "$r" --duration "$d" \
		    --grace 5 --label "rate=$r"
		if over_limit "${STEPS[-1]}" "$limit"; then
			log "throughput: stopping at $r msgs/s"
			break
		fi
		sleep 2
	done
	stop_server
	finish
	"$PY" "$BENCH/bench.py" plot "$RESULTS/throughput.json" "$RESULTS/throughput.png" ||
	    log "plot failed"
}


# 2. pgbench: the database's ceiling for parley_post_message, one message
# per transaction, with the server up (it LISTENs, nobody is connected);
# then the batched call a worker makes, PB_BATCH sends of as many
# conversations per parley_post_messages call, at 2 clients (one per worker).
scen_pgbench() {
	SCEN=pgbench STEPS=()
	local n=${PB_CONVERSATIONS:-100} d=${PB_SECONDS:-$(q 5 20)}
	local clients=${PB_CLIENTS:-$(q "1 8" "1 2 4 8 16 32 64")}
	local batch=${PB_BATCH:-16}
	fresh_db parley_bench
	start_server parley_bench
	populate parley_bench
	sql_conversations parley_bench pb "$n" 2 >"$RAW/pb.ids"
	local lo hi
	lo=$(sort -n "$RAW/pb.ids" | head -1)
	hi=$(sort -n "$RAW/pb.ids" | tail -1)
	[ $((hi - lo + 1)) -eq "$n" ] || { log "pgbench: conversation ids not contiguous"; exit 1; }
	cat >"$RAW/pgbench.sql" <<'EOF'
\set n random(0, :nconv - 1)
\set conv :base + :n
SELECT parley_post_message(:conv, 'pb' || :n::text || '_0', 'TEXT', 'hello', NULL, NULL);
EOF
	cat >"$RAW/pgbench-batch.sql" <<'EOF'
\set n random(0, :nconv - :batch)
\set last :n + :batch - 1
SELECT count(*) FROM parley_post_messages((SELECT jsonb_agg(jsonb_build_object(
    'c', :base::bigint + i, 's', 'pb' || i || '_0', 't', 'TEXT', 'b', 'hello'))
    FROM generate_series(:n::integer, :last::integer) i));
EOF
	params conversations="$n" seconds="$d" clients="\"$clients\"" batch="$batch" \
	    script="\"SELECT parley_post_message(:conv, :sender, 'TEXT', 'hello', NULL, NULL)\"" \
	    batch_script="\"SELECT parley_post_messages(<$batch sends, one per conversation>)\""
	local c
	for c in $clients; do
		pgbench_step "c$c" pgbench.sql "$c"
	done
	pgbench_step "batch${batch}c2" pgbench-batch.sql 2 -D batch="$batch"
	stop_server
	finish
}

# pgbench_step label script clients [pgbench options]: one step of scenario 2
# (with its lo, n and d).
pgbench_step() {
	local label=$1 script=$2 c=$3
	shift 3
	measure "$label" "$PG_BIN/pgbench" -h 127.0.0.1 -p "$PG_PORT" -U postgres \
	    -n -M prepared -f "$RAW/$script" -D base="$lo" -D nconv="$n" "$@" \
	    -c "$c" -j $((c < 2 ? 1 : 2)) -T "$d" parley_bench
}

# 3. Fan-out: one conversation of 1000 participants, 50 msgs/s.
scen_fanout() {
	SCEN=fanout STEPS=()
	local k=${FO_USERS:-$(q 200 1000)} r=${FO_RATE:-50} d=${FO_SECONDS:-$(q 5 30)}
	local senders=${FO_SENDERS:-50}
	fresh_db parley_bench
	start_server parley_bench
	populate parley_bench
	# Over the REST limit of 256 members, so made in SQL.
	local id
	id=$(sql_conversations parley_bench fo 1 "$k")
	params conversations=1 users="$k" rate="$r" senders="$senders" seconds="$d"
	measure "rate$r" $LG --conversations 1 --users-per-conversation "$k" \
	    --senders "$senders" --user-prefix fo --conv-ids "$id" --rate "$r" \
	    --duration "$d" --grace 10 --concurrency 200 --label "fanout" --progress
	stop_server
	finish
}

# 4. Idle sockets: open N authenticated sockets, heartbeat, hold; the
# server's memory per socket. Split over several generator processes, each
# from its own source address, when the fd limit is below N.
scen_idle() {
	SCEN=idle STEPS=()
	local n=${IDLE_SOCKETS:-$(q 2000 50000)} k=10 hold=${IDLE_SECONDS:-$(q 10 60)}
	local hard per procs c i workers=${IDLE_WORKERS:-}
	hard=$(ulimit -Hn)
	per=$((hard - 1000))
	# A server worker holds about as many sockets as its fd limit allows
	# (src/parley.c); where root cannot raise the hard limit, more workers
	# than the usual 2 hold the target.
	if [ -z "$workers" ]; then
		workers=$(((n + per - 1) / per))
		[ "$workers" -lt 2 ] && workers=2
	fi
	if [ "$n" -gt $((workers * per)) ]; then
		log "idle: $n sockets do not fit $workers workers with a hard fd limit of $hard"
		n=$((workers * per))
	fi
	[ "$workers" -gt 2 ] &&
	    log "idle: $workers server workers to hold $n sockets under a hard fd limit of $hard"
	c=$(((n + k - 1) / k))
	procs=$(((c * k + per - 1) / per))
	fresh_db parley_bench
	start_server parley_bench "$workers"
	sleep 2
	create_conversations parley_bench id "$c" "$k" "$RAW/idle.ids"
	params sockets="$((c * k))" users_per_conversation="$k" hold_seconds="$hold" \
	    processes="$procs" fd_hard_limit="$hard" ping_interval_s=30 \
	    server_workers="$workers"
	local per_c=$(((c + procs - 1) / procs)) args=() off=0 cnt
	for i in $(seq 1 "$procs"); do
		cnt=$((c - off < per_c ? c - off : per_c))
		sed -n "$((off + 1)),$((off + cnt))p" "$RAW/idle.ids" >"$RAW/idle.ids.$i"
		[ ${#args[@]} -gt 0 ] && args+=(":::")
		args+=($LG --idle --conversations "$cnt" --users-per-conversation "$k"
		    --user-prefix id --conv-offset "$off" --conv-file "$RAW/idle.ids.$i"
		    --source-ips "127.0.$i.1,127.0.$i.2,127.0.$i.3,127.0.$i.4" \
		    --duration "$hold" --connect-timeout 60
		    --retries 2 --label "idle-$i")
		off=$((off + cnt))
	done
	measure "n$((c * k))" "${args[@]}"
	stop_server
	finish
}

# 5. History: REST pages over a 10M-row messages table, 32 keep-alive
# clients (wrk), latest page and deep before= cursors.
scen_history() {
	SCEN=history STEPS=()
	local rows=${HIST_ROWS:-$(q 200000 10000000)} nc=${HIST_CONVERSATIONS:-100}
	local d=${HIST_SECONDS:-$(q 5 30)} conns=${HIST_CONNECTIONS:-32}
	local db=parley_history_$rows have want
	# Generated once per cluster and schema (migrations are edited in place
	# before 1.0): a database made by other sql/ files is made again. It
	# gets the other scenarios' filler users and conversations too: with
	# 200 users, a plan that read users whole at every page (100 ms with
	# 200,000) went unseen, and the pages' reader checks were sequential
	# scans of tables of a few hundred rows.
	want="$rows ${BENCH_FILLER:-100000} $(cat "$PARLEY_ROOT"/sql/*.sql | md5sum | cut -c1-12)"
	have=$(psql_db "$db" -tAc "select coalesce((select v from bench_meta where k = 'rows'), '0')" \
	    2>/dev/null || echo 0)
	[ "$have" = "$want" ] || fresh_db "$db"
	start_server "$db"
	create_conversations "$db" hi "$nc" 2 "$RAW/hist.ids"
	if [ "$have" != "$want" ]; then
		log "history: generating $rows messages in SQL (once per cluster)"
		local t0=$SECONDS
		populate "$db"
		psql_db "$db" <<EOF
create table if not exists bench_meta (k text primary key, v text);
set session_replication_role = replica;   -- no triggers: bulk history
set synchronous_commit = off;
create temp table c (n integer, id bigint);
insert into c values $(awk '{ printf "%s(%d, %s)", (NR > 1 ? "," : ""), NR - 1, $1 }' "$RAW/hist.ids");
insert into messages (id, conversation_id, sender_id, type, content, created_at)
select nextval('messages_id_seq'), c.id, 'hi' || c.n || '_' || (g % 2), 'TEXT',
       'history message ' || g || ' of a long conversation', now() - (g || ' s')::interval
  from generate_series(1, $rows / $nc) g, c
 order by g desc, c.n;
update conversations c set last_message_id = m.id, last_message_at = m.created_at,
       updated_at = m.created_at, message_count = m.n
  from (select distinct on (conversation_id) conversation_id, id, created_at,
               count(*) over (partition by conversation_id) as n
          from messages order by conversation_id, id desc) m
 where m.conversation_id = c.id;
insert into bench_meta values ('rows', '$want') on conflict (k) do update set v = excluded.v;
EOF
		psql_db "$db" -c "vacuum analyze messages"
		log "history: generated in $((SECONDS - t0)) s"
	fi
	# The wrk script: a token and an id range per conversation.
	{
		echo "convs = {"
		local i=0 id lo hi tok
		while read -r id; do
			read -r lo hi < <(psql_db "$db" -tA -F ' ' -c \
			    "select min(id), max(id) from messages where conversation_id = $id")
			tok=$($LG --mint "hi${i}_0")
			echo "  {id=$id, lo=${lo:-1}, hi=${hi:-1}, tok=\"$tok\"},"
			i=$((i + 1))
		done <"$RAW/hist.ids"
		echo "}"
		cat "$BENCH/history.lua"
	} >"$RAW/history.lua"
	# Steady state: the table in shared_buffers, as on a busy site.
	psql_db "$db" -c "CREATE EXTENSION IF NOT EXISTS pg_prewarm" \
	    -c "SELECT pg_prewarm('messages'), pg_prewarm('messages_conversation')" >/dev/null
	params rows="$rows" conversations="$nc" seconds="$d" connections="$conns" limit=50
	local mode
	for mode in latest deep; do
		measure "$mode" env WRK_MODE=$mode wrk -t2 -c"$conns" -d"${d}s" --latency \
		    -s "$RAW/history.lua" "$API"
	done
	stop_server
	finish
}

# 6. Reconnect storm: drop 5,000 sockets at once while the conversations
# stay busy (at a rate well under the server's capacity, so that what the
# storm does shows), reconnect them with after=<last id seen>; time to
# catch up, nothing lost or duplicated.
scen_storm() {
	SCEN=storm STEPS=()
	local drop=${STORM_SOCKETS:-$(q 500 5000)} k=11 r=${STORM_RATE:-$(q 50 100)}
	local d=${STORM_SECONDS:-$(q 8 30)} at=${STORM_AT:-$(q 3 10)} down=${STORM_DOWN:-2}
	local c=$(((drop + k - 2) / (k - 1)))
	fresh_db parley_bench
	start_server parley_bench
	populate parley_bench
	create_conversations parley_bench st "$c" "$k" "$RAW/storm.ids"
	params conversations="$c" users="$k" dropped="$drop" rate="$r" seconds="$d" \
	    storm_at_s="$at" down_s="$down"
	measure "drop$drop" $LG --conversations "$c" --users-per-conversation "$k" \
	    --senders 1 --user-prefix st --conv-file "$RAW/storm.ids" --rate "$r" \
	    --duration "$d" --grace 60 --storm "$drop" --storm-at "$at" \
	    --storm-down "$down" --label "storm" --progress
	stop_server
	finish
}

ALL="throughput pgbench fanout idle history storm"
scenarios=${*:-$ALL}
for s in $scenarios; do
	case " $ALL " in
	*" $s "*) ;;
	*) echo "unknown scenario $s (have: $ALL)" >&2; exit 2 ;;
	esac
done
setup
log "machine: $("$PY" "$BENCH/bench.py" machine)"
for s in $scenarios; do
	log "scenario $s"
	"scen_$s"
done
