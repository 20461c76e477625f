#!/usr/bin/env python3
"""WebSocket benchmark: Switchboard against the seeds' stack (Node + Socket.IO 4, rooms and
broadcast, no database: benches/baselines/socketio/server.js), same machine, same load client
(`ws-load`, a Rust binary in this repo, tokio-tungstenite; it speaks engine.io v4 to Socket.IO).

Workloads (medians over the rounds, ratio ours / Socket.IO):
  idle      memory per idle connection (server RSS growth / connections) and connect rate
  fanout    deliveries per second and p50/p99 end-to-end latency, 1,000 clients in chats of 2
            and of 50; every message is persisted by Switchboard (SQLite, fsync) as usual
  ack       send -> ack latency (one client, sequential)
  call      call setup latency, call:initiate -> call:offer at the callee

Then Socket.IO clients against both servers (Switchboard's /socket.io/, PROTOCOL §7, with
`socketio.legacy_events` off so both send one frame per delivery), over a WebSocket and over
Engine.IO long-polling: idle, fanout and ack as above.

--smoke: tiny sizes, one round, plots to a temp dir (scripts/test.sh runs it so the harness
         cannot rot).
--write-docs: rewrite the WebSocket sections of docs/benchmarks.md, its plots and the README line.
--skip-socketio: only the /ws table (for a quick before/after of the core).
SB_BENCH_BIN=path: run that server binary instead of the one this tree builds (the
         "before" of a before/after comparison).
--profile: after the rounds, the fan-out (chats of 2), ack and call workloads once more under
           perf and strace, and the fsync latency of the data directory's disk; with
           --write-docs, the profile section of docs/benchmarks.md.
"""
import argparse
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SIO_DIR = ROOT / "benches" / "baselines" / "socketio"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def post(url, body, token=None):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    if token:
        req.add_header("authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def wait_http(url, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except Exception:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def load(bin_path, workload, url, proto, **kw):
    cmd = [str(bin_path), workload, "--url", url, "--proto", proto]
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"ws-load {workload} {proto} failed:\n{out.stdout[-1500:]}\n{out.stderr[-1500:]}")
    return {k: float(v) if re.fullmatch(r"-?[\d.]+|nan", v) else v for k, v in (kv.split("=", 1) for kv in lines[-1].split()[1:])}


def wait_tcp(port, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on port {port}")


def stop(proc):
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def idle(bin_path, url, proto, pid, conns, setup, transport="websocket"):
    before = report.rss_kb(pid)
    cmd = [str(bin_path), "idle", "--url", url, "--proto", proto, "--transport", transport, "--conns", str(conns), "--hold", "8"]
    if setup:
        cmd += ["--setup", setup]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    result = None
    for line in p.stdout:
        if line.startswith("RESULT "):
            result = dict(kv.split("=", 1) for kv in line.split()[1:])
        if line.startswith("READY"):
            time.sleep(2)  # let the server settle
            after = report.rss_kb(pid)
            break
    p.wait()
    connected = int(result["connected"])
    return {
        "connected": connected,
        "kb_per_conn": (after - before) / max(connected, 1),
        "connect_per_s": float(result["connect_per_s"]),
    }


def make_setups(base, sizes, tmp, name=""):
    """Registers the load users on the server at `base` and creates their chats: chats of 2 and
    of `sizes["group"]` over consecutive users, and one direct chat for the ack and call
    workloads. {group size: path of the ws-load setup file}."""
    with ThreadPoolExecutor(8) as pool:
        regs = list(pool.map(lambda i: post(f"{base}/api/auth/register", {"username": f"load{i:05d}", "password": "password123"}), range(sizes["users"])))
    tokens = [r["accessToken"] for r in regs]
    ids = [r["user"]["id"] for r in regs]

    def chats(group):
        out = []
        for start in range(0, sizes["clients"], group):
            members = ids[start:start + group]
            body = {"participantIds": members[1:]}
            if group > 2:
                body["title"] = f"group {start}"
            out.append(post(f"{base}/api/chats", body, tokens[start])["chat"]["id"])
        return out

    direct = post(f"{base}/api/chats", {"participantIds": [ids[1]]}, tokens[0])["chat"]["id"]
    setups = {}
    for group in [2, sizes["group"]]:
        path = tmp / f"setup-{name}{group}.json"
        path.write_text(json.dumps({"tokens": tokens, "chats": chats(group), "direct": direct}))
        setups[group] = str(path)
    return setups


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--skip-socketio", action="store_true")
    args = ap.parse_args()
    profile = "debug" if args.smoke else "release"
    if not shutil.which("node"):
        raise SystemExit("node is missing: apt-get install nodejs npm")
    subprocess.run(["cargo", "build", "--quiet", *([] if args.smoke else ["--release"]), "--bin", "switchboard", "--bin", "ws-load"], cwd=ROOT, check=True)
    if not (SIO_DIR / "node_modules" / "socket.io").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=SIO_DIR, check=True)
    sb_bin = Path(os.environ.get("SB_BENCH_BIN") or ROOT / "target" / profile / "switchboard")
    load_bin = ROOT / "target" / profile / "ws-load"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    sizes = (
        {"users": 20, "idle": 50, "clients": 20, "msgs2": 20, "msgs50": 10, "group": 10, "ack": 20, "calls": 5}
        if args.smoke
        else {"users": 1000, "idle": 10000, "clients": 1000, "msgs2": 20000, "msgs50": 1000, "group": 50, "ack": 1000, "calls": 200}
    )
    rounds = 1 if args.smoke else args.rounds
    tmp = Path(tempfile.mkdtemp(prefix="sb-ws-bench-"))
    hport, sport = free_port(), free_port()
    env = dict(os.environ)
    env.update({
        "SWITCHBOARD_DATA_DIR": str(tmp / "data"),
        "SWITCHBOARD_HTTP__LISTEN": f"127.0.0.1:{hport}",
        "SWITCHBOARD_TURN__ENABLED": "false",
        "SWITCHBOARD_WS__RATE_LIMIT": "0",  # the per-connection abuse guard would throttle the load
        "SWITCHBOARD_WS__USER_MESSAGE_RATE": "0",  # so would the per-user one (the ack test is one sender)
        "SWITCHBOARD_AUTH__REGISTER_MAX_PER_IP": "0",  # every load user registers from 127.0.0.1
        "SWITCHBOARD_LOG__LEVEL": "warn",
        # One frame per delivery, as the baseline sends (the seeds' names would double them).
        "SWITCHBOARD_SOCKETIO__LEGACY_EVENTS": "false",
    })
    base = f"http://127.0.0.1:{hport}"
    starts = {
        "switchboard": lambda: subprocess.Popen([str(sb_bin)], env=env, stdout=subprocess.DEVNULL),
        "socketio": lambda: subprocess.Popen(["node", "server.js"], cwd=SIO_DIR, env={**os.environ, "PORT": str(sport)}, stdout=subprocess.DEVNULL),
    }
    ready = {"switchboard": lambda: wait_http(f"{base}/readyz"), "socketio": lambda: wait_tcp(sport)}
    procs = {}

    def restart(name):
        """A fresh process (the same data directory for Switchboard): what one round measured
        stays in the allocator of its process, and would hide the next round's memory growth."""
        stop(procs.pop(name, None))
        procs[name] = starts[name]()
        ready[name]()
        time.sleep(0.5)
        return procs[name].pid

    results = {"switchboard": [], "socketio": []}
    sio_results = {(n, t): [] for n in results for t in SIO_TRANSPORTS}
    profiles = None
    try:
        restart("switchboard")
        # Users and chats for Switchboard (Socket.IO needs none: rooms are joined on the fly).
        setups = make_setups(base, sizes, tmp)
        targets = [
            ("switchboard", f"ws://127.0.0.1:{hport}/ws", "sb"),
            ("socketio", f"ws://127.0.0.1:{sport}", "sio"),
        ]
        for r in range(rounds):
            for name, url, proto in targets:
                pid = restart(name)
                setup2 = setups[2] if proto == "sb" else None
                setupg = setups[sizes["group"]] if proto == "sb" else None
                row = {}
                i = idle(load_bin, url, proto, pid, sizes["idle"], setup2)
                row["kb_per_idle_conn"] = i["kb_per_conn"]
                row["connects_per_s"] = i["connect_per_s"]
                extra = {"setup": setup2} if setup2 else {}
                f2 = load(load_bin, "fanout", url, proto, clients=sizes["clients"], group=2, messages=sizes["msgs2"], **extra)
                row["fanout2_deliveries_per_s"] = f2["deliveries_per_s"]
                row["fanout2_p50_ms"] = f2["p50_ms"]
                row["fanout2_p99_ms"] = f2["p99_ms"]
                extra = {"setup": setupg} if setupg else {}
                fg = load(load_bin, "fanout", url, proto, clients=sizes["clients"], group=sizes["group"], messages=sizes["msgs50"], **extra)
                row["fanout50_deliveries_per_s"] = fg["deliveries_per_s"]
                row["fanout50_p50_ms"] = fg["p50_ms"]
                row["fanout50_p99_ms"] = fg["p99_ms"]
                extra = {"setup": setup2} if setup2 else {}
                a = load(load_bin, "ack", url, proto, messages=sizes["ack"], **extra)
                row["ack_p50_ms"], row["ack_p99_ms"] = a["p50_ms"], a["p99_ms"]
                c = load(load_bin, "call", url, proto, calls=sizes["calls"], **extra)
                row["call_p50_ms"], row["call_p99_ms"] = c["p50_ms"], c["p99_ms"]
                results[name].append(row)
                print(f"round {r + 1} {name}: " + ", ".join(f"{k}={v:.2f}" for k, v in row.items()), flush=True)
            sio_targets = [("switchboard", f"ws://127.0.0.1:{hport}", "sbio"), ("socketio", f"ws://127.0.0.1:{sport}", "sio")]
            for transport in () if args.skip_socketio else SIO_TRANSPORTS:
                for name, url, proto in sio_targets:
                    row = socketio_round(load_bin, url, proto, transport, restart(name), setups if proto == "sbio" else None, sizes)
                    sio_results[(name, transport)].append(row)
                    print(f"round {r + 1} {name} socket.io/{transport}: " + ", ".join(f"{k}={v:.2f}" for k, v in row.items()), flush=True)
        if args.profile:
            profiles = take_profiles(load_bin, [(*t, restart(t[0])) for t in targets], setups, sizes, tmp)
    finally:
        for p in procs.values():
            stop(p)
        shutil.rmtree(tmp, ignore_errors=True)

    med = {n: report.medians(rs) for n, rs in results.items()}
    labels = [
        ("kb_per_idle_conn", f"server memory per idle connection (kB), {sizes['idle']} connections", "lower"),
        ("connects_per_s", "connections opened per second", "higher"),
        ("fanout2_deliveries_per_s", f"deliveries/s, {sizes['clients']} clients in chats of 2", "higher"),
        ("fanout2_p50_ms", "  end-to-end latency p50 (ms)", "lower"),
        ("fanout2_p99_ms", "  end-to-end latency p99 (ms)", "lower"),
        ("fanout50_deliveries_per_s", f"deliveries/s, {sizes['clients']} clients in chats of {sizes['group']}", "higher"),
        ("fanout50_p50_ms", "  end-to-end latency p50 (ms)", "lower"),
        ("fanout50_p99_ms", "  end-to-end latency p99 (ms)", "lower"),
        ("ack_p50_ms", "send -> ack latency p50 (ms)", "lower"),
        ("ack_p99_ms", "send -> ack latency p99 (ms)", "lower"),
        ("call_p50_ms", "call setup (initiate -> offer at callee) p50 (ms)", "lower"),
        ("call_p99_ms", "call setup p99 (ms)", "lower"),
    ]
    rows = [(label, med["socketio"][k], med["switchboard"][k], better) for k, label, better in labels]
    table = report.table(["Socket.IO 4 (Node, no DB)", "Switchboard (SQLite, fsync)"], rows)
    print()
    print(table)
    if profiles:
        print()
        print(profiles)
    sio_med = {k: report.medians(v) for k, v in sio_results.items() if v}
    sio_tables = []
    for transport in () if args.skip_socketio else SIO_TRANSPORTS:
        s, o = sio_med[("socketio", transport)], sio_med[("switchboard", transport)]
        rows = [(label, s[k], o[k], better) for k, label, better in SIO_LABELS(sizes, transport)]
        sio_tables.append((transport, report.table([f"Socket.IO 4 (Node, no DB), {transport}", f"Switchboard /socket.io/ (SQLite, fsync), {transport}"], rows)))
    for transport, t in sio_tables:
        print(f"\nSocket.IO clients over {transport}:\n{t}")
    if args.smoke:
        plot(med, sizes, Path(tempfile.gettempdir()), "sb-ws-smoke-", required=False)
        print("\n(smoke mode: tiny sizes, one round; figures are not meaningful)")
        return
    if args.write_docs:
        report.PLOTS.mkdir(parents=True, exist_ok=True)
        plot(med, sizes, report.PLOTS, "ws-", required=True)
        flags = " --profile" if profiles else ""
        body = (
            f"Machine: {report.machine()}, server and load client on the same cores. "
            f"Command: `scripts/bench/ws.sh --rounds {rounds} --write-docs{flags}`. Medians of {rounds} rounds.\n\n{table}\n\n"
            "![WebSocket throughput](bench/ws-throughput.png)\n![WebSocket latency](bench/ws-latency.png)"
        )
        o, s = med["switchboard"], med["socketio"]
        headline = (
            f"- WebSocket vs a Socket.IO 4 server without a database: {report.ratio(o['kb_per_idle_conn'], s['kb_per_idle_conn'])}x "
            f"the memory per idle connection ({o['kb_per_idle_conn']:.1f} kB), {report.ratio(o['connects_per_s'], s['connects_per_s'])}x the connect rate, "
            f"{report.ratio(o['fanout2_deliveries_per_s'], s['fanout2_deliveries_per_s'])}x (chats of 2) and "
            f"{report.ratio(o['fanout50_deliveries_per_s'], s['fanout50_deliveries_per_s'])}x (chats of {sizes['group']}) the fan-out deliveries "
            f"per second with every message committed to SQLite first, {report.ratio(o['ack_p50_ms'], s['ack_p50_ms'])}x the send-to-ack "
            f"latency ({o['ack_p50_ms']:.2f} ms p50), {report.ratio(o['call_p50_ms'], s['call_p50_ms'])}x the call-setup latency."
        )
        report.publish("ws", "WebSocket (ours vs Socket.IO)", body, profiles, headline)
        if not args.skip_socketio:
            body = (
                f"Machine: {report.machine()}, server and load client on the same cores. "
                f"Command: `scripts/bench/ws.sh --rounds {rounds} --write-docs{flags}`. Medians of {rounds} rounds. "
                "The same `ws-load` client speaks Engine.IO v4 / Socket.IO v4 to both servers; Switchboard runs with "
                "`socketio.legacy_events = false` (one frame per delivery, as the baseline sends).\n\n"
                + "\n\n".join(f"Over {t}:\n\n{tab}" for t, tab in sio_tables)
            )
            ws_, poll = (sio_med[("switchboard", "websocket")], sio_med[("socketio", "websocket")]), (sio_med[("switchboard", "polling")], sio_med[("socketio", "polling")])
            headline = (
                "- Socket.IO clients (`socket.io-client` v4, PROTOCOL §7) vs the Node Socket.IO 4 server without a database: "
                f"{report.ratio(ws_[0]['kb_per_idle_conn'], ws_[1]['kb_per_idle_conn'])}x the memory per idle WebSocket connection "
                f"({ws_[0]['kb_per_idle_conn']:.1f} kB) and {report.ratio(poll[0]['kb_per_idle_conn'], poll[1]['kb_per_idle_conn'])}x per idle polling session, "
                f"{report.ratio(ws_[0]['connects_per_s'], ws_[1]['connects_per_s'])}x / {report.ratio(poll[0]['connects_per_s'], poll[1]['connects_per_s'])}x the connect rate, "
                f"{report.ratio(ws_[0]['fanout2_deliveries_per_s'], ws_[1]['fanout2_deliveries_per_s'])}x / {report.ratio(poll[0]['fanout2_deliveries_per_s'], poll[1]['fanout2_deliveries_per_s'])}x "
                "the fan-out deliveries per second in chats of 2 (WebSocket / polling)."
            )
            report.publish("sio", "Socket.IO clients (ours vs Socket.IO)", body, None, headline)


SIO_TRANSPORTS = ("websocket", "polling")


def SIO_LABELS(sizes, transport):
    return [
        ("kb_per_idle_conn", f"server memory per idle {transport} client (kB), {sizes['idle']} clients", "lower"),
        ("connects_per_s", "clients connected per second", "higher"),
        ("fanout2_deliveries_per_s", f"deliveries/s, {sizes['clients']} clients in chats of 2", "higher"),
        ("fanout2_p50_ms", "  end-to-end latency p50 (ms)", "lower"),
        ("fanout2_p99_ms", "  end-to-end latency p99 (ms)", "lower"),
        ("fanout50_deliveries_per_s", f"deliveries/s, {sizes['clients']} clients in chats of {sizes['group']}", "higher"),
        ("fanout50_p50_ms", "  end-to-end latency p50 (ms)", "lower"),
        ("ack_p50_ms", "send -> ack latency p50 (ms)", "lower"),
        ("ack_p99_ms", "send -> ack latency p99 (ms)", "lower"),
    ]


def socketio_round(load_bin, url, proto, transport, pid, setups, sizes):
    """Idle, fan-out and send -> ack with Socket.IO clients over `transport`."""
    s2 = {"setup": setups[2]} if setups else {}
    sg = {"setup": setups[sizes["group"]]} if setups else {}
    row = {}
    i = idle(load_bin, url, proto, pid, sizes["idle"], s2.get("setup"), transport)
    row["kb_per_idle_conn"], row["connects_per_s"] = i["kb_per_conn"], i["connect_per_s"]
    f2 = load(load_bin, "fanout", url, proto, transport=transport, clients=sizes["clients"], group=2, messages=sizes["msgs2"], **s2)
    row["fanout2_deliveries_per_s"], row["fanout2_p50_ms"], row["fanout2_p99_ms"] = f2["deliveries_per_s"], f2["p50_ms"], f2["p99_ms"]
    fg = load(load_bin, "fanout", url, proto, transport=transport, clients=sizes["clients"], group=sizes["group"], messages=sizes["msgs50"], **sg)
    row["fanout50_deliveries_per_s"], row["fanout50_p50_ms"] = fg["deliveries_per_s"], fg["p50_ms"]
    a = load(load_bin, "ack", url, proto, transport=transport, messages=sizes["ack"], **s2)
    row["ack_p50_ms"], row["ack_p99_ms"] = a["p50_ms"], a["p99_ms"]
    return row


def plot(med, sizes, outdir, prefix, required):
    """Bar charts: deliveries per second, and latencies (log scale), both servers side by side."""
    plt = report.pyplot(required)
    if plt is None:
        return
    names = [("socketio", "Socket.IO 4 (no DB)", "tab:blue"), ("switchboard", "Switchboard (SQLite)", "tab:orange")]
    groups = [("fanout2_deliveries_per_s", "chats of 2"), ("fanout50_deliveries_per_s", f"chats of {sizes['group']}")]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (key, label, color) in enumerate(names):
        xs = [j + (i - 0.5) * 0.38 for j in range(len(groups))]
        ax.bar(xs, [med[key][g] for g, _ in groups], width=0.38, color=color, label=label)
    ax.set_xticks(range(len(groups)), [l for _, l in groups])
    ax.set(title=f"fan-out, {sizes['clients']} clients: deliveries per second", ylabel="deliveries/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(outdir / f"{prefix}throughput.png", dpi=90)
    plt.close(fig)
    lat = [("fanout2_p50_ms", "fan-out 2\np50"), ("fanout2_p99_ms", "fan-out 2\np99"),
           ("fanout50_p50_ms", f"fan-out {sizes['group']}\np50"), ("fanout50_p99_ms", f"fan-out {sizes['group']}\np99"),
           ("ack_p50_ms", "send->ack\np50"), ("ack_p99_ms", "send->ack\np99"),
           ("call_p50_ms", "call setup\np50"), ("call_p99_ms", "call setup\np99")]
    fig, ax = plt.subplots(figsize=(10, 4))
    for i, (key, label, color) in enumerate(names):
        xs = [j + (i - 0.5) * 0.38 for j in range(len(lat))]
        ax.bar(xs, [med[key][k] for k, _ in lat], width=0.38, color=color, label=label)
    ax.set_xticks(range(len(lat)), [l for _, l in lat], fontsize=8)
    ax.set(title="latency (ms, log scale): lower is better", ylabel="ms", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(outdir / f"{prefix}latency.png", dpi=90)
    plt.close(fig)
    print(f"wrote {outdir / (prefix + 'throughput.png')}, {outdir / (prefix + 'latency.png')}")


def fsync_latency(directory, n=200):
    """p50 and p99 (ms) of write + fsync of one 4 KiB page in `directory`: the floor of a
    durable acknowledgement on this disk."""
    path = Path(directory) / "fsync-probe"
    times = []
    with open(path, "wb") as f:
        for _ in range(n):
            t = time.perf_counter()
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
            times.append((time.perf_counter() - t) * 1000)
    path.unlink()
    times.sort()
    return times[len(times) // 2], times[int(len(times) * 0.99)]


def take_profiles(load_bin, targets, setups, sizes, tmp):
    """Each server under the workloads where Switchboard is behind: perf (where CPU goes) and
    strace (system calls per message or call)."""
    parts = []
    p50, p99 = fsync_latency(tmp)
    parts.append(f"fsync of a 4 KiB write in the data directory: p50 {p50:.3f} ms, p99 {p99:.3f} ms "
                 "(Switchboard commits with `synchronous = FULL` before it acknowledges).\n")
    for name, url, proto, pid in targets:
        prof = report.Profile(pid, tmp)
        s2 = {"setup": setups[2]} if proto == "sb" else {}
        fan = lambda: load(load_bin, "fanout", url, proto, clients=sizes["clients"], group=2, messages=sizes["msgs2"], **s2)
        perf = prof.perf(fan, f"{name}-fanout")
        # strace slows the server down: a quarter of the messages (1,000 connections are opened
        # for them too, which the counts include).
        traced = sizes["msgs2"] // 4
        calls = prof.syscalls(lambda: load(load_bin, "fanout", url, proto, clients=sizes["clients"], group=2, messages=traced, **s2), f"{name}-fanout-strace")
        parts.append(report.profile_markdown(f"{name}: fan-out, chats of 2 (connecting the clients included)", "message", traced, perf, calls))
        time.sleep(3)  # let the fan-out clients' disconnects finish outside the next trace
        acks = sizes["ack"] // 2
        calls = prof.syscalls(lambda: load(load_bin, "ack", url, proto, messages=acks, **s2), f"{name}-ack-strace")
        parts.append(report.profile_markdown(f"{name}: send -> ack, one client", "message", acks, None, calls))
        time.sleep(1)
        n = sizes["calls"] // 2
        calls = prof.syscalls(lambda: load(load_bin, "call", url, proto, calls=n, **s2), f"{name}-call-strace")
        parts.append(report.profile_markdown(f"{name}: call setup", "call", n, None, calls))
    return "\n".join(parts)


if __name__ == "__main__":
    main()
