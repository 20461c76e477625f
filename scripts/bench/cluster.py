#!/usr/bin/env python3
"""Several nodes (PROTOCOL §8): the /ws workloads of ws.py on one node with SQLite, one node with
PostgreSQL, and two nodes sharing PostgreSQL and Redis with the clients split between them (client
i on node i mod 2: in chats of 2 every delivery crosses nodes; in `call` the caller is on the first
node, the callee on the second). Same load client (`ws-load`), same machine, all in one run.

Targets (issue 16): cross-node end-to-end p50 <= single-node p50 + 1 ms (single node on
PostgreSQL, so the difference is the Redis hop), and PostgreSQL send->ack next to SQLite.

A real `redis-server` and a throwaway PostgreSQL (scripts/pg-temp.sh; synchronous_commit on,
fsync on, as installed) are started here and removed at the end.

  scripts/bench/cluster.sh [--smoke] [--rounds N] [--write-docs]   (scripts/bench/ws.sh runs it too)
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402
from ws import free_port, load, make_setups, stop, wait_http  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def start_redis(tmp):
    port = free_port()
    d = tmp / "redis"
    d.mkdir()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(d)],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            import socket

            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"redis://127.0.0.1:{port}/"
        except OSError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def start_postgres():
    out = subprocess.run([str(ROOT / "scripts" / "pg-temp.sh")], capture_output=True, text=True, check=True).stdout
    env = dict(line.replace("export ", "").split("=", 1) for line in out.splitlines() if "=" in line)
    return env["SB_TEST_POSTGRES_URL"], env["PG_TEMP_DIR"]


def create_db(admin_url, name):
    subprocess.run(["psql", admin_url, "-qc", f"CREATE DATABASE {name}"], check=True, stdout=subprocess.DEVNULL)
    return admin_url.rsplit("/", 1)[0] + "/" + name


class Deployment:
    """One or two Switchboard processes on one database."""

    def __init__(self, bin_path, tmp, name, database_url="", redis_url="", nodes=1):
        self.procs, self.urls, self.bases = [], [], []
        secret = os.urandom(16).hex()
        for n in range(nodes):
            port = free_port()
            env = dict(os.environ)
            env.update({
                "SWITCHBOARD_DATA_DIR": str(tmp / f"{name}-{n}"),
                "SWITCHBOARD_HTTP__LISTEN": f"127.0.0.1:{port}",
                "SWITCHBOARD_TURN__ENABLED": "false",
                "SWITCHBOARD_WS__RATE_LIMIT": "0",
                "SWITCHBOARD_WS__USER_MESSAGE_RATE": "0",
                "SWITCHBOARD_AUTH__REGISTER_MAX_PER_IP": "0",
                "SWITCHBOARD_LOG__LEVEL": "warn",
                "SWITCHBOARD_AUTH__JWT_SECRET": secret,
            })
            if database_url:
                env["SWITCHBOARD_DATABASE__URL"] = database_url
            if redis_url:
                env["SWITCHBOARD_CLUSTER__REDIS_URL"] = redis_url
                env["SWITCHBOARD_CLUSTER__NODE_ID"] = f"{name}-{n}"
            self.procs.append(subprocess.Popen([str(bin_path)], env=env, stdout=subprocess.DEVNULL))
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/readyz")
            self.bases.append(base)
            self.urls.append(f"ws://127.0.0.1:{port}/ws")

    def setup(self, sizes, tmp, name):
        return make_setups(self.bases[0], sizes, tmp, f"{name}-")

    def stop(self):
        for p in self.procs:
            stop(p)


def measure(load_bin, url, setups, sizes):
    row = {}
    f2 = load(load_bin, "fanout", url, "sb", clients=sizes["clients"], group=2, messages=sizes["msgs2"], setup=setups[2])
    row["fanout2_deliveries_per_s"], row["fanout2_p50_ms"], row["fanout2_p99_ms"] = f2["deliveries_per_s"], f2["p50_ms"], f2["p99_ms"]
    g = sizes["group"]
    fg = load(load_bin, "fanout", url, "sb", clients=sizes["clients"], group=g, messages=sizes["msgs50"], setup=setups[g])
    row["fanout50_deliveries_per_s"], row["fanout50_p50_ms"], row["fanout50_p99_ms"] = fg["deliveries_per_s"], fg["p50_ms"], fg["p99_ms"]
    e = load(load_bin, "e2e", url, "sb", messages=sizes["ack"], setup=setups[2])
    row["e2e_p50_ms"], row["e2e_p99_ms"] = e["p50_ms"], e["p99_ms"]
    a = load(load_bin, "ack", url, "sb", messages=sizes["ack"], setup=setups[2])
    row["ack_p50_ms"], row["ack_p99_ms"] = a["p50_ms"], a["p99_ms"]
    c = load(load_bin, "call", url, "sb", calls=sizes["calls"], setup=setups[2])
    row["call_p50_ms"], row["call_p99_ms"] = c["p50_ms"], c["p99_ms"]
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    for tool in ("redis-server", "psql"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: apt-get install redis-server postgresql")
    profile = "debug" if args.smoke else "release"
    subprocess.run(["cargo", "build", "--quiet", *([] if args.smoke else ["--release"]), "--bin", "switchboard", "--bin", "ws-load"], cwd=ROOT, check=True)
    sb_bin = ROOT / "target" / profile / "switchboard"
    load_bin = ROOT / "target" / profile / "ws-load"
    sizes = (
        {"users": 20, "clients": 20, "msgs2": 20, "msgs50": 10, "group": 10, "ack": 20, "calls": 5}
        if args.smoke
        else {"users": 1000, "clients": 1000, "msgs2": 20000, "msgs50": 1000, "group": 50, "ack": 1000, "calls": 200}
    )
    rounds = 1 if args.smoke else args.rounds
    tmp = Path(tempfile.mkdtemp(prefix="sb-cluster-bench-"))
    redis, redis_url = start_redis(tmp)
    pg_url, pg_dir = start_postgres()
    names = ["sqlite", "postgres", "cluster"]
    results = {n: [] for n in names}
    try:
        deployments = {
            "sqlite": lambda: Deployment(sb_bin, tmp, "sqlite"),
            "postgres": lambda: Deployment(sb_bin, tmp, "postgres", create_db(pg_url, "sb_bench_single")),
            "cluster": lambda: Deployment(sb_bin, tmp, "cluster", create_db(pg_url, "sb_bench_cluster"), redis_url, nodes=2),
        }
        for name in names:
            d = deployments[name]()
            try:
                setups = d.setup(sizes, tmp, name)
                url = ",".join(d.urls)
                for r in range(rounds):
                    row = measure(load_bin, url, setups, sizes)
                    results[name].append(row)
                    print(f"round {r + 1} {name}: " + ", ".join(f"{k}={v:.2f}" for k, v in row.items()), flush=True)
            finally:
                d.stop()
    finally:
        stop(redis)
        subprocess.run([str(ROOT / "scripts" / "pg-temp.sh"), "stop", pg_dir], check=False)
        shutil.rmtree(tmp, ignore_errors=True)

    med = {n: report.medians(rs) for n, rs in results.items()}
    labels = [
        ("e2e_p50_ms", "one message at a time, send -> delivery p50 (ms)"),
        ("e2e_p99_ms", "  p99 (ms)"),
        ("fanout2_deliveries_per_s", f"deliveries/s, {sizes['clients']} clients in chats of 2"),
        ("fanout2_p50_ms", "  end-to-end latency p50 (ms)"),
        ("fanout2_p99_ms", "  end-to-end latency p99 (ms)"),
        ("fanout50_deliveries_per_s", f"deliveries/s, {sizes['clients']} clients in chats of {sizes['group']}"),
        ("fanout50_p50_ms", "  end-to-end latency p50 (ms)"),
        ("fanout50_p99_ms", "  end-to-end latency p99 (ms)"),
        ("ack_p50_ms", "send -> ack latency p50 (ms)"),
        ("ack_p99_ms", "send -> ack latency p99 (ms)"),
        ("call_p50_ms", "call setup (initiate -> offer at callee) p50 (ms)"),
        ("call_p99_ms", "call setup p99 (ms)"),
    ]
    lines = [
        "| metric | one node, SQLite | one node, PostgreSQL | two nodes, PostgreSQL + Redis (clients split) | two nodes / one node (PostgreSQL) |",
        "|---|---|---|---|---|",
    ]
    for k, label in labels:
        s, p, c = med["sqlite"][k], med["postgres"][k], med["cluster"][k]
        lines.append(f"| {label} | {report.fmt(s)} | {report.fmt(p)} | {report.fmt(c)} | {report.ratio(c, p)} |")
    table = "\n".join(lines)
    p, c, s = med["postgres"], med["cluster"], med["sqlite"]
    verdict = (
        f"Cross-node end-to-end p50 minus one node's (PostgreSQL), one message at a time: {c['e2e_p50_ms'] - p['e2e_p50_ms']:+.2f} ms "
        f"(target: at most +1 ms); under the saturating fan-out, where latency is mostly queueing: chats of 2 "
        f"{c['fanout2_p50_ms'] - p['fanout2_p50_ms']:+.2f} ms, chats of {sizes['group']} {c['fanout50_p50_ms'] - p['fanout50_p50_ms']:+.2f} ms. "
        f"PostgreSQL send->ack p50 {p['ack_p50_ms']:.2f} ms vs SQLite {s['ack_p50_ms']:.2f} ms ({report.ratio(p['ack_p50_ms'], s['ack_p50_ms'])}x); "
        f"call setup across nodes {c['call_p50_ms']:.2f} ms vs {p['call_p50_ms']:.2f} ms on one node."
    )
    print()
    print(table)
    print()
    print(verdict)
    if args.smoke:
        print("\n(smoke mode: tiny sizes, one round; figures are not meaningful)")
        return
    if args.write_docs:
        body = (
            f"Machine: {report.machine()}; every server, Redis, PostgreSQL and the load client on the same cores. "
            f"Command: `scripts/bench/cluster.sh --rounds {rounds} --write-docs`. Medians of {rounds} rounds. "
            "In the two-node run client i connects to node i mod 2 (in chats of 2 every delivery crosses nodes through Redis); "
            "in `call` the caller is on the first node and the callee on the second.\n\n"
            f"{table}\n\n{verdict}"
        )
        headline = (
            f"- Two nodes on PostgreSQL + Redis, clients split between them: {report.ratio(c['fanout2_deliveries_per_s'], p['fanout2_deliveries_per_s'])}x "
            f"one PostgreSQL node's fan-out in chats of 2, send-to-delivery p50 across nodes {c['e2e_p50_ms'] - p['e2e_p50_ms']:+.2f} ms against one node; "
            f"PostgreSQL send-to-ack p50 {p['ack_p50_ms']:.2f} ms ({report.ratio(p['ack_p50_ms'], s['ack_p50_ms'])}x SQLite's)."
        )
        report.publish("cluster", "Several nodes (PostgreSQL + Redis)", body, None, headline)


if __name__ == "__main__":
    main()
