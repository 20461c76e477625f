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

--smoke: tiny sizes, one round (scripts/test.sh runs it so the harness cannot rot).
--write-docs: rewrite the WebSocket section of docs/benchmarks.md.
"""
import argparse
import json
import os
import re
import resource
import shutil
import socket
import statistics
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


def rss_kb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


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


def idle(bin_path, url, proto, pid, conns, setup):
    before = rss_kb(pid)
    cmd = [str(bin_path), "idle", "--url", url, "--proto", proto, "--conns", str(conns), "--hold", "8"]
    if setup:
        cmd += ["--setup", setup]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    result = None
    for line in p.stdout:
        if line.startswith("RESULT "):
            result = dict(kv.split("=", 1) for kv in line.split()[1:])
        if line.startswith("READY"):
            time.sleep(2)  # let the server settle
            after = rss_kb(pid)
            break
    p.wait()
    connected = int(result["connected"])
    return {
        "connected": connected,
        "kb_per_conn": (after - before) / max(connected, 1),
        "connect_per_s": float(result["connect_per_s"]),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    profile = "debug" if args.smoke else "release"
    if not shutil.which("node"):
        raise SystemExit("node is missing: apt-get install nodejs npm")
    subprocess.run(["cargo", "build", "--quiet", *([] if args.smoke else ["--release"]), "--bin", "switchboard", "--bin", "ws-load"], cwd=ROOT, check=True)
    if not (SIO_DIR / "node_modules" / "socket.io").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=SIO_DIR, check=True)
    sb_bin = ROOT / "target" / profile / "switchboard"
    load_bin = ROOT / "target" / profile / "ws-load"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    sizes = (
        {"users": 20, "idle": 50, "clients": 20, "msgs2": 20, "msgs50": 10, "group": 10, "ack": 20, "calls": 5}
        if args.smoke
        else {"users": 1000, "idle": 10000, "clients": 1000, "msgs2": 5000, "msgs50": 400, "group": 50, "ack": 1000, "calls": 200}
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
        "SWITCHBOARD_LOG__LEVEL": "warn",
    })
    sb = subprocess.Popen([str(sb_bin)], env=env, stdout=subprocess.DEVNULL)
    sio = subprocess.Popen(["node", "server.js"], cwd=SIO_DIR, env={**os.environ, "PORT": str(sport)}, stdout=subprocess.DEVNULL)
    results = {"switchboard": [], "socketio": []}
    try:
        base = f"http://127.0.0.1:{hport}"
        wait_http(f"{base}/readyz")
        time.sleep(0.5)
        # Users and chats for Switchboard (Socket.IO needs none: rooms are joined on the fly).
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
            path = tmp / f"setup-{group}.json"
            path.write_text(json.dumps({"tokens": tokens, "chats": chats(group), "direct": direct}))
            setups[group] = str(path)
        targets = [
            ("switchboard", f"ws://127.0.0.1:{hport}/ws", "sb", sb.pid),
            ("socketio", f"ws://127.0.0.1:{sport}", "sio", sio.pid),
        ]
        for r in range(rounds):
            for name, url, proto, pid in targets:
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
    finally:
        sb.terminate()
        sio.terminate()
        sb.wait(20)
        sio.wait(20)
        shutil.rmtree(tmp, ignore_errors=True)

    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in results.items()}
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
    lines = ["| metric | Socket.IO 4 (Node, no DB) | Switchboard (SQLite, fsync) | ours / Socket.IO | better |", "|---|---|---|---|---|"]
    for key, label, better in labels:
        s, o = med["socketio"][key], med["switchboard"][key]
        lines.append(f"| {label} | {s:.2f} | {o:.2f} | {o / s if s else float('nan'):.2f} | {better} |")
    table = "\n".join(lines)
    print()
    print(table)
    if args.smoke:
        print("\n(smoke mode: tiny sizes, one round; figures are not meaningful)")
        return
    if args.write_docs:
        body = (
            f"Machine: {report.machine()}, server and load client on the same cores. "
            f"Command: `scripts/bench/ws.sh --rounds {rounds} --write-docs`. Medians of {rounds} rounds.\n\n{table}"
        )
        report.write_section("ws", "WebSocket (ours vs Socket.IO)", body)


if __name__ == "__main__":
    main()
