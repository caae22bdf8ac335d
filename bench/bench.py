#!/usr/bin/python3
"""Helpers for bench/run.sh: measure a load step, assemble a scenario's
results, append the summary, plot.

  bench.py machine
  bench.py measure --out F --server-pid P --pg-pid Q -- CMD ... [::: CMD ...]
  bench.py scenario NAME PARAMS.json STEP.json ... > results/NAME.json
  bench.py summary results/NAME.json >> results/SUMMARY.md
  bench.py plot results/throughput.json results/throughput.png

'measure' runs the commands (concurrently when several are given), records
the CPU that the server's process tree, PostgreSQL's process tree and the
commands themselves used (from /proc/<pid>/stat before and after, and the
children's rusage), the whole machine's busy share (/proc/stat) and the
server's resident memory (sampled), and stores all that with each
command's standard output.
"""

import json
import os
import platform
import re
import resource
import subprocess
import sys
import threading
import time
import urllib.request

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def stat_fields(pid):
    s = read("/proc/%d/stat" % pid)
    if s is None:
        return None
    return s[s.rindex(")") + 2:].split()


def children_map():
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        f = stat_fields(int(d))
        if f is not None:
            kids.setdefault(int(f[1]), []).append(int(d))
    return kids


def tree(pid, kids=None):
    kids = kids if kids is not None else children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def tree_sum(pid, value):
    """value(stat fields) summed over the process and its live descendants."""
    if not pid:
        return None
    total = 0
    for p in tree(pid):
        f = stat_fields(p)
        if f is not None:
            total += value(f)
    return total


def tree_cpu(pid):
    """Seconds of CPU of the process, its live descendants and every
    descendant already reaped (cutime/cstime)."""
    ticks = tree_sum(pid, lambda f: sum(int(x) for x in f[11:15]))
    return None if ticks is None else ticks / TICK


def tree_rss_kb(pid):
    return tree_sum(pid, lambda f: int(f[21]) * PAGE // 1024)


def machine_ticks():
    """(all ticks, idle ticks, steal ticks): steal is time the hypervisor
    gave to other guests, busy for nobody on this machine."""
    v = [int(x) for x in read("/proc/stat").splitlines()[0].split()[1:]]
    idle = v[3] + v[4]
    return sum(v[:8]), idle, v[7]


def machine():
    cpu = "unknown"
    for line in (read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = re.search(r"MemTotal:\s+(\d+)", read("/proc/meminfo") or "")
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": round(int(mem.group(1)) / 1048576, 1) if mem else None,
        "kernel": platform.release(),
        "nofile_hard_limit": nofile[1],
        "port_range": (read("/proc/sys/net/ipv4/ip_local_port_range")
                       or "").split(),
    }


def measure(argv):
    opts = {"--out": None, "--server-pid": "0", "--pg-pid": "0",
            "--label": "", "--server-log": None, "--metrics-url": None}
    i = 0
    while i < len(argv) and argv[i] != "--":
        opts[argv[i]] = argv[i + 1]
        i += 2
    cmds, cur = [], []
    for a in argv[i + 1:]:
        if a == ":::":
            cmds.append(cur)
            cur = []
        else:
            cur.append(a)
    if cur:
        cmds.append(cur)
    spid, ppid = int(opts["--server-pid"]), int(opts["--pg-pid"])

    rss0 = tree_rss_kb(spid)
    peak = [rss0 or 0]
    timeline = []
    stop = threading.Event()
    t_start = time.monotonic()

    def sampler():
        # Twice a second: the server's memory, and everyone's CPU so far,
        # so that a phase of the step can be cut out afterwards.
        while not stop.wait(0.5):
            r = tree_rss_kb(spid)
            if r and r > peak[0]:
                peak[0] = r
            timeline.append([round(time.monotonic() - t_start, 2),
                             tree_cpu(spid), tree_cpu(ppid), r,
                             machine_ticks()])
    th = threading.Thread(target=sampler, daemon=True)
    th.start()

    log0 = log_size(opts["--server-log"])
    w0 = write_counters(opts["--metrics-url"])
    s0, p0 = tree_cpu(spid), tree_cpu(ppid)
    m0 = machine_ticks()
    t0 = time.monotonic()
    procs = []
    for n, c in enumerate(cmds):
        outf = open("%s.out%d" % (opts["--out"], n), "w+")
        procs.append((subprocess.Popen(c, stdout=outf), outf))
    gen_user = gen_sys = 0.0
    codes = []
    for p, _ in procs:
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        codes.append(p.returncode)
        gen_user += ru.ru_utime
        gen_sys += ru.ru_stime
    wall = time.monotonic() - t0
    m1 = machine_ticks()
    s1, p1 = tree_cpu(spid), tree_cpu(ppid)
    rss1 = tree_rss_kb(spid)
    w1 = write_counters(opts["--metrics-url"])
    stop.set()
    th.join()
    outputs = []
    for _, f in procs:
        f.seek(0)
        outputs.append(f.read())
        f.close()
        os.unlink(f.name)

    def share(cpu):
        return None if cpu is None else round(100.0 * cpu / wall, 1)
    dt = m1[0] - m0[0]
    rec = {
        "label": opts["--label"],
        "commands": cmds,
        "exit_codes": codes,
        "wall_s": round(wall, 3),
        "cpu": {
            "server": {"cpu_s": round(s1 - s0, 3) if spid else None,
                       "pct_of_core": share(s1 - s0) if spid else None},
            "postgres": {"cpu_s": round(p1 - p0, 3) if ppid else None,
                         "pct_of_core": share(p1 - p0) if ppid else None},
            "generator": {"cpu_s": round(gen_user + gen_sys, 3),
                          "user_s": round(gen_user, 3),
                          "sys_s": round(gen_sys, 3),
                          "pct_of_core": share(gen_user + gen_sys)},
            "machine_busy_pct": round(100.0 * (dt - (m1[1] - m0[1]) - (m1[2] - m0[2]))
                                      / dt, 1) if dt else None,
            "machine_steal_pct": round(100.0 * (m1[2] - m0[2]) / dt, 1) if dt else None,
            "cores": os.cpu_count(),
        },
        "server_rss_kb": {"before": rss0, "peak": peak[0], "after": rss1},
        "server_log": log_problems(opts["--server-log"], log0),
        "write_path": write_path(w0, w1),
        "timeline": timeline,
        "outputs": outputs,
    }
    with open(opts["--out"], "w") as f:
        json.dump(rec, f, indent=1)
    return 0 if all(c == 0 for c in codes) else 1


# What the server logged during a step that says a step's figures are not
# the server's normal work: a database connection dropped, a query that
# failed or was canceled. (A spurious query timeout, a timer bug fixed in
# the fourteenth round, showed only there.)
LOG_PROBLEM = re.compile(r"database connection lost|query failed|query canceled"
                         r"|drain failed|LISTEN connection")


def log_size(path):
    try:
        return os.path.getsize(path) if path else None
    except OSError:
        return None


WRITE_COUNTERS = ("parley_messages_stored_total", "parley_send_batches_total",
                  "parley_send_lane_splits_total")


def write_counters(url):
    """The server's write-path counters from /metrics (None without it)."""
    if not url:
        return None
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except (OSError, ValueError):
        return None
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in WRITE_COUNTERS:
            found[name] = int(float(value))
    return found


def write_path(before, after):
    """Sends stored, the batches that wrote them and the mean batch, and how
    often a worker split its sends into lanes, during the step."""
    if not before or not after:
        return None
    d = {k: after.get(k, 0) - before.get(k, 0) for k in WRITE_COUNTERS}
    stored, batches = d[WRITE_COUNTERS[0]], d[WRITE_COUNTERS[1]]
    return {"stored": stored, "batches": batches,
            "mean_batch": round(stored / batches, 1) if batches else None,
            "lane_splits": d[WRITE_COUNTERS[2]]}


def log_problems(path, start):
    if start is None:
        return None
    with open(path, errors="replace") as f:
        f.seek(start)
        lines = [ln.rstrip("\n") for ln in f if LOG_PROBLEM.search(ln)]
    return {"problems": len(lines), "first": lines[:5]}


def json_lines(text):
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def loadgen_results(step):
    res = []
    for o in step["outputs"]:
        res.extend(r for r in json_lines(o) if r.get("tool") == "loadgen")
    return res


def merge_loadgen(rs):
    """Several loadgen processes of one step (idle split): sum counts."""
    if len(rs) == 1:
        return rs[0]
    m = dict(rs[0])
    for k in ("sockets", "connected", "open_at_end", "reconnected", "sent",
              "delivered", "expected_deliveries", "lost", "duplicates",
              "pings", "pongs", "frames_in", "bytes_in", "conversations"):
        m[k] = sum(r.get(k, 0) for r in rs)
    m["errors"] = {k: sum(r["errors"].get(k, 0) for r in rs)
                   for k in rs[0]["errors"]}
    codes = {}
    for r in rs:
        for k, v in r.get("close_codes", {}).items():
            codes[k] = codes.get(k, 0) + v
    m["close_codes"] = codes
    m["connect_phase_s"] = max(r["connect_phase_s"] for r in rs)
    m["connect_ms"] = {"p99_max_of_processes": max(r["connect_ms"]["p99"]
                                                   for r in rs),
                       "max": max(r["connect_ms"]["max"] for r in rs)}
    m["loadgen_cpu"] = {
        "total_s": round(sum(r["loadgen_cpu"]["total_s"] for r in rs), 3),
        "traffic_s": round(sum(r["loadgen_cpu"]["traffic_s"] for r in rs), 3),
        "traffic_pct_of_core": round(sum(r["loadgen_cpu"]["traffic_pct_of_core"]
                                         for r in rs), 1),
        "max_rss_kb": sum(r["loadgen_cpu"]["max_rss_kb"] for r in rs)}
    m["processes"] = len(rs)
    return m


def parse_pgbench(text):
    r = {}
    for key, pat in (("tps", r"tps = ([\d.]+) \(without initial"),
                     ("latency_avg_ms", r"latency average = ([\d.]+) ms"),
                     ("latency_stddev_ms", r"latency stddev = ([\d.]+) ms"),
                     ("transactions", r"number of transactions actually processed: (\d+)"),
                     ("failed", r"number of failed transactions: (\d+)"),
                     ("clients", r"number of clients: (\d+)")):
        m = re.search(pat, text)
        if m:
            r[key] = float(m.group(1))
    return r


def parse_wrk(text):
    for line in text.splitlines():
        if line.startswith("WRKJSON "):
            return json.loads(line[8:])
    return {}


def window_cpu(step, t0, t1):
    """Server, PostgreSQL and machine CPU between two times of the step,
    from its timeline (percent of one core; machine: of all cores)."""
    tl = [x for x in step.get("timeline", []) if t0 <= x[0] <= t1]
    if len(tl) < 2:
        return None
    a, b = tl[0], tl[-1]
    dt = b[0] - a[0]
    busy = None
    if a[4] and b[4] and b[4][0] > a[4][0]:
        tot = b[4][0] - a[4][0]
        busy = round(100.0 * (tot - (b[4][1] - a[4][1]) - (b[4][2] - a[4][2])) / tot, 1)
    return {"from_s": a[0], "to_s": b[0],
            "server_pct": round(100 * (b[1] - a[1]) / dt, 1) if a[1] is not None else None,
            "postgres_pct": round(100 * (b[2] - a[2]) / dt, 1) if a[2] is not None else None,
            "machine_busy_pct": busy}


def busy_cell(c):
    """The machine busy cell: busy share, and the steal share beside it."""
    if c.get("machine_steal_pct") is None:
        return fmt(c["machine_busy_pct"])
    return "%s (%s)" % (fmt(c["machine_busy_pct"]), fmt(c["machine_steal_pct"]))


def cpu_of(step):
    c = step["cpu"]
    mine = sum(x["pct_of_core"] or 0 for x in (c["server"], c["postgres"],
                                                c["generator"]))
    other = None
    if c["machine_busy_pct"] is not None:
        other = round(max(0.0, c["machine_busy_pct"] * c["cores"] - mine), 1)
    return {"server_pct": c["server"]["pct_of_core"],
            "other_pct": other,
            "postgres_pct": c["postgres"]["pct_of_core"],
            "generator_pct": c["generator"]["pct_of_core"],
            "machine_busy_pct": c["machine_busy_pct"],
            "machine_steal_pct": c.get("machine_steal_pct"),
            "server_cpu_s": c["server"]["cpu_s"],
            "postgres_cpu_s": c["postgres"]["cpu_s"],
            "generator_cpu_s": c["generator"]["cpu_s"]}


def scenario(name, params_path, step_paths):
    params = json.load(open(params_path))
    steps = [json.load(open(p)) for p in step_paths]
    out = {"scenario": name, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                   time.gmtime()),
           "machine": machine(), "params": params, "steps": []}
    for s in steps:
        st = {"label": s["label"], "wall_s": s["wall_s"], "cpu": cpu_of(s),
              "server_rss_kb": s["server_rss_kb"], "exit_codes": s["exit_codes"],
              "server_log": s.get("server_log"),
              "write_path": s.get("write_path")}
        if name == "pgbench":
            st["pgbench"] = parse_pgbench(s["outputs"][0])
            # batch<k>c<n>: k sends per transaction; c<n>: one
            per_tx = re.match(r"batch(\d+)", s["label"])
            st["pgbench"]["msgs_per_tx"] = int(per_tx.group(1)) if per_tx else 1
            st["pgbench"]["msgs_per_s"] = round(st["pgbench"].get("tps", 0) *
                                                st["pgbench"]["msgs_per_tx"], 1)
        elif name == "history":
            st["wrk"] = parse_wrk(s["outputs"][0])
        else:
            rs = loadgen_results(s)
            st["loadgen"] = merge_loadgen(rs) if rs else None
        if name == "idle" and st["loadgen"]:
            # The CPU of holding the sockets, without the connects.
            st["hold_cpu"] = window_cpu(s, st["loadgen"]["connect_phase_s"] + 1,
                                        s["wall_s"] - 1)
        out["steps"].append(st)
    out["verdict"] = verdict(name, params, out["steps"])
    return out


def step_ok(lg, p99_limit):
    return (lg is not None and lg["lost"] == 0 and lg["duplicates"] == 0
            and lg["latency_ms"]["p99"] <= p99_limit
            and lg["open_at_end"] == lg["sockets"])


def verdict(name, params, steps):
    if name == "throughput":
        best = None
        for s in steps:
            lg = s["loadgen"]
            if step_ok(lg, params.get("p99_limit_ms", 50)):
                best = s
        if best is None:
            return {"max_sustained_rate": 0}
        lg = best["loadgen"]
        return {"max_sustained_rate": lg["offered_rate"],
                "send_rate": lg["send_rate"],
                "delivery_rate": lg["delivery_rate"],
                "p50_ms": lg["latency_ms"]["p50"],
                "p99_ms": lg["latency_ms"]["p99"],
                "cpu": best["cpu"]}
    if name == "pgbench":
        single = [s for s in steps if s["pgbench"]["msgs_per_tx"] == 1]
        best = max(single, key=lambda s: s["pgbench"].get("tps", 0))
        verdict = {"max_tps": best["pgbench"].get("tps"),
                   "at_clients": best["pgbench"].get("clients"),
                   "cpu": best["cpu"]}
        for s in steps:
            if s["pgbench"]["msgs_per_tx"] > 1:
                verdict[s["label"] + "_msgs_per_s"] = s["pgbench"]["msgs_per_s"]
        return verdict
    if name == "history":
        return {s["label"]: {"req_per_s": round(s["wrk"]["requests"] /
                                                (s["wrk"]["duration_us"] / 1e6), 1)
                             if s["wrk"] else None,
                             "p50_ms": s["wrk"]["latency_us"]["p50"] / 1000
                             if s["wrk"] else None,
                             "p99_ms": s["wrk"]["latency_us"]["p99"] / 1000
                             if s["wrk"] else None}
                for s in steps}
    if name == "idle":
        s = steps[0]
        lg = s["loadgen"]
        rss = s["server_rss_kb"]
        n = lg["open_at_end"] if lg else 0
        return {"sockets_open": n,
                "connect_phase_s": lg["connect_phase_s"] if lg else None,
                "server_rss_kb_per_socket": round((rss["peak"] - rss["before"]) / n, 2)
                if n and rss["peak"] and rss["before"] else None,
                "holding_cpu": s.get("hold_cpu"),
                "cpu_whole_step": s["cpu"]}
    lg = steps[0]["loadgen"]
    if lg is None:
        return {}
    v = {"lost": lg["lost"],
         "lost_of_messages_seen": lg.get("lost_of_messages_seen"),
         "messages_never_seen": lg.get("lost_messages_seen_by_none"),
         "lost_in_flight_at_end": lg.get("lost_in_flight_at_end"),
         "duplicates": lg["duplicates"],
         "out_of_order": lg["out_of_order"], "sent": lg["sent"],
         "echoes_missing": lg.get("echoes_missing"),
         "p50_ms": lg["latency_ms"]["p50"], "p99_ms": lg["latency_ms"]["p99"],
         "max_ms": lg["latency_ms"]["max"], "delivery_rate": lg["delivery_rate"],
         "cpu": steps[0]["cpu"]}
    if "storm" in lg:
        v["storm"] = lg["storm"]
        v["replayed"] = lg["replayed"]
    return v


def fmt(v, nd=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return ("%%.%df" % nd) % v
    return str(v)


def summary(path):
    r = json.load(open(path))
    m = r["machine"]
    p = r["params"]
    w = sys.stdout.write
    w("\n## %s — %s\n\n" % (r["scenario"], r["date"]))
    w("Machine: %s cores, %s, %s GiB, Linux %s; git %s. PostgreSQL: %s.\n\n" % (
        m["nproc"], m["cpu_model"], m["memory_gib"], m["kernel"],
        p.get("git", "?"), p.get("pg_settings", "?")))
    w("Parameters: %s\n\n" % ", ".join("%s=%s" % (k, v) for k, v in p.items()
                                       if k not in ("git", "pg_settings")))
    cpu_hdr = ("server %CPU | postgres %CPU | generator %CPU | "
               "anything else %CPU | machine busy % of all cores "
               "(hypervisor steal %)")
    n = r["scenario"]
    if n == "idle":
        w("| sockets | open at end | conn errors | processes | connect phase s "
          "| connect p99 ms | server RSS kB/socket | holding: server %CPU "
          "| holding: postgres %CPU | holding: machine busy % | whole step: "
          "server / postgres / generator / else %CPU |\n")
        w("|---" * 11 + "|\n")
        for s in r["steps"]:
            lg = s["loadgen"] or {}
            h = s.get("hold_cpu") or {}
            c = s["cpu"]
            cm = lg.get("connect_ms", {})
            w("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s / %s / %s / %s |\n" % (
                fmt(lg.get("sockets")), fmt(lg.get("open_at_end")),
                fmt(sum(lg.get("errors", {}).values()) if lg else None),
                fmt(lg.get("processes", 1)), fmt(lg.get("connect_phase_s")),
                fmt(cm.get("p99", cm.get("p99_max_of_processes"))),
                fmt(r["verdict"].get("server_rss_kb_per_socket"), 2),
                fmt(h.get("server_pct")), fmt(h.get("postgres_pct")),
                fmt(h.get("machine_busy_pct")), fmt(c["server_pct"]),
                fmt(c["postgres_pct"]), fmt(c["generator_pct"]),
                fmt(c["other_pct"])))
    elif n in ("throughput", "fanout", "storm"):
        w("| step | offered/s | sent/s | delivered/s | p50 ms | p99 ms | max ms "
          "| lost (of stored) | dup | conn errors | %s | loadgen self %%CPU |\n"
          % cpu_hdr)
        w("|---" * 16 + "|\n")
        for s in r["steps"]:
            lg = s["loadgen"] or {}
            c = s["cpu"]
            lat = lg.get("latency_ms", {})
            errs = sum(lg.get("errors", {}).values()) if lg else None
            w("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n" % (
                s["label"], fmt(lg.get("offered_rate")), fmt(lg.get("send_rate")),
                fmt(lg.get("delivery_rate")), fmt(lat.get("p50"), 2),
                fmt(lat.get("p99"), 2), fmt(lat.get("max"), 2),
                "%s (%s)" % (fmt(lg.get("lost")), fmt(lg.get("lost_of_messages_seen"))),
                fmt(lg.get("duplicates")), fmt(errs), fmt(c["server_pct"]),
                fmt(c["postgres_pct"]), fmt(c["generator_pct"]),
                fmt(c["other_pct"]), busy_cell(c),
                fmt(lg.get("loadgen_cpu", {}).get("traffic_pct_of_core"))))
    elif n == "pgbench":
        w("| clients | messages per transaction | tps | messages/s | latency avg ms "
          "| failed | %s |\n" % cpu_hdr)
        w("|---" * 11 + "|\n")
        for s in r["steps"]:
            pg = s["pgbench"]
            c = s["cpu"]
            w("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n" % (
                fmt(pg.get("clients"), 0), fmt(pg.get("msgs_per_tx", 1), 0),
                fmt(pg.get("tps")), fmt(pg.get("msgs_per_s")),
                fmt(pg.get("latency_avg_ms"), 3), fmt(pg.get("failed"), 0),
                fmt(c["server_pct"]), fmt(c["postgres_pct"]),
                fmt(c["generator_pct"]), fmt(c["other_pct"]),
                busy_cell(c)))
    elif n == "history":
        w("| run | req/s | p50 ms | p99 ms | max ms | non-2xx | socket errors | %s |\n"
          % cpu_hdr)
        w("|---" * 12 + "|\n")
        for s in r["steps"]:
            k = s["wrk"] or {}
            lat = k.get("latency_us", {})
            e = k.get("errors", {})
            c = s["cpu"]
            w("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n" % (
                s["label"], fmt(k["requests"] / (k["duration_us"] / 1e6)) if k else "-",
                fmt(lat.get("p50", 0) / 1000, 2), fmt(lat.get("p99", 0) / 1000, 2),
                fmt(lat.get("max", 0) / 1000, 2), fmt(e.get("status")),
                fmt(sum(v for kk, v in e.items() if kk != "status") if e else None),
                fmt(c["server_pct"]), fmt(c["postgres_pct"]),
                fmt(c["generator_pct"]), fmt(c["other_pct"]),
                busy_cell(c)))
    w("\nVerdict: `%s`\n" % json.dumps(r["verdict"]))
    logs = [(s["label"], s.get("server_log")) for s in r["steps"]]
    bad = [(label, g) for label, g in logs if g and g["problems"]]
    if any(g is not None for _, g in logs):
        w("\nServer log during the steps: %s\n" % ("; ".join(
            "%s: %d problem line(s), first `%s`" % (label, g["problems"], g["first"][0])
            for label, g in bad) if bad else "no problem lines"))
    writes = [(s["label"], s.get("write_path")) for s in r["steps"]]
    writes = [(label, g) for label, g in writes if g and g["batches"]]
    if writes:
        w("\nSends written (stored / batches = mean batch, lane splits): %s\n"
          % "; ".join("%s: %d / %d = %s, %d" % (label, g["stored"], g["batches"],
                                                g["mean_batch"], g["lane_splits"])
                      for label, g in writes))
    if n == "idle":
        s = r["steps"][0]
        w("\nServer RSS kB: `%s`; holding the sockets, after the connects: `%s`\n"
          % (json.dumps(s["server_rss_kb"]), json.dumps(s.get("hold_cpu"))))
    return 0


def plot(path, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    r = json.load(open(path))
    xs, p50, p99, mx, cpu_s, cpu_p, cpu_g, cpu_o = [], [], [], [], [], [], [], []
    for s in r["steps"]:
        lg = s["loadgen"]
        if not lg:
            continue
        xs.append(lg["offered_rate"])
        p50.append(lg["latency_ms"]["p50"])
        p99.append(lg["latency_ms"]["p99"])
        mx.append(lg["latency_ms"]["max"])
        cpu_s.append(s["cpu"]["server_pct"])
        cpu_p.append(s["cpu"]["postgres_pct"])
        cpu_g.append(s["cpu"]["generator_pct"])
        cpu_o.append(s["cpu"].get("other_pct"))
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    a1.plot(xs, p50, "o-", label="p50")
    a1.plot(xs, p99, "s-", label="p99")
    a1.plot(xs, mx, "^:", label="max")
    a1.axhline(r["params"].get("p99_limit_ms", 50), color="red", lw=0.8,
               ls="--", label="p99 limit")
    a1.set_yscale("log")
    a1.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    a1.set_ylabel("delivery latency (ms)")
    a1.legend()
    a1.grid(True, which="both", alpha=0.3)
    a1.set_title("Parley throughput: %s conversations x %s users (%s)" % (
        r["params"].get("conversations"), r["params"].get("users"),
        r["date"]))
    a2.plot(xs, cpu_s, "o-", label="server")
    a2.plot(xs, cpu_p, "s-", label="postgres")
    a2.plot(xs, cpu_g, "^-", label="generator")
    if any(x for x in cpu_o if x):
        a2.plot(xs, cpu_o, "x:", color="gray", label="anything else")
    a2.axhline(100.0 * (r["machine"]["nproc"] or 2), color="black", lw=0.6,
               ls=":")
    a2.set_xscale("log")
    a2.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    a2.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    a2.set_xticks(xs)
    a2.set_xlabel("offered messages/s")
    a2.set_ylabel("% of one core (2 cores = 200%)")
    a2.legend()
    a2.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return 0


def main():
    a = sys.argv[1:]
    if not a:
        print(__doc__)
        return 2
    if a[0] == "machine":
        json.dump(machine(), sys.stdout)
        print()
        return 0
    if a[0] == "measure":
        return measure(a[1:])
    if a[0] == "scenario":
        json.dump(scenario(a[1], a[2], a[3:]), sys.stdout, indent=1)
        print()
        return 0
    if a[0] == "summary":
        return summary(a[1])
    if a[0] == "plot":
        return plot(a[1], a[2])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
