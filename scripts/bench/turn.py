#!/usr/bin/env python3
"""TURN relay benchmark: coturn (Debian `coturn`) and Switchboard's embedded TURN server, side by
side on this machine, driven by the same client (`turnutils_uclient`) against the same echo peer
(`turnutils_peer`), in interleaved rounds (coturn, ours, coturn, ...), the first round after each
start discarded. Both use the TURN REST API secret (`-W`), loopback, and comparable relay ranges
(coturn 20000-29999, ours 30000-39999, outside the kernel's ephemeral range).

Reported (medians over the kept rounds, and the ratio ours/coturn):
  cpu_us_per_pkt   server CPU time (utime+stime from /proc/PID/stat) per relayed packet at a
                   fixed offered load (client -> peer and back = 2 relayed packets per echo)
  echo_loss_pct    share of echoes lost at that load
  c2c_msgs_per_s   client-to-client through two allocations (-y), messages received per second
  mbit_per_s       payload throughput with 1000-byte packets
  send_ind_cpu_us  CPU per relayed packet on the Send-indication path (-s)

Not yet measured (issue 7 follow-up): saturation with a loss criterion, RSS per allocation and
allocations per second with a Rust client, RSS growth under unauthenticated Allocate floods, and
the TCP client leg (no TURN over TCP yet).

--smoke: one tiny round each, to keep the script from rotting (scripts/test.sh runs it).
--write-docs: rewrite the TURN section of docs/benchmarks.md with the table.
"""
import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SECRET = "bench-secret"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_udp_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def wait_udp(port, timeout=15):
    """Waits until something answers a STUN Binding request on 127.0.0.1:port."""
    req = bytes([0, 1, 0, 0, 0x21, 0x12, 0xA4, 0x42]) + b"\x07" * 12
    deadline = time.time() + timeout
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.2)
    while time.time() < deadline:
        try:
            s.sendto(req, ("127.0.0.1", port))
            s.recvfrom(512)
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing answers STUN on port {port}")


class Server:
    def __init__(self, name, cmd, env=None):
        self.name = name
        self.cmd = cmd
        self.env = env
        self.proc = None

    def start(self, port):
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_udp(port)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def uclient(port, peer_port, args):
    cmd = ["turnutils_uclient", "-p", str(port), "-W", SECRET, "-u", "bench", "-e", "127.0.0.1", "-r", str(peer_port)]
    cmd += args + ["127.0.0.1"]
    started = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    elapsed = time.time() - started
    text = out.stdout + out.stderr
    totals = [l for l in text.splitlines() if "tot_send_msgs=" in l and "msz=" not in l]
    if not totals:
        raise RuntimeError(f"uclient printed no totals:\n{text[-2000:]}")
    sent = int(re.search(r"tot_send_msgs=(\d+)", totals[-1]).group(1))
    recv = int(re.search(r"tot_recv_msgs=(\d+)", totals[-1]).group(1))
    m = re.search(r"Total transmit time is (\d+)", text)
    transmit = int(m.group(1)) if m else elapsed
    return sent, recv, max(transmit, 1e-3), elapsed


def measure(server, port, peer_port, load):
    """One round of every workload against a running server: a dict of figures."""
    pid = server.proc.pid
    r = {}
    # 1. CPU per relayed packet at a fixed offered load (echo through a peer).
    c0 = cpu_seconds(pid)
    sent, recv, _, _ = uclient(port, peer_port, ["-m", str(load["m"]), "-n", str(load["n"]), "-l", "100", "-z", str(load["z"])])
    c1 = cpu_seconds(pid)
    relayed = sent + recv
    r["cpu_us_per_pkt"] = (c1 - c0) * 1e6 / max(relayed, 1)
    r["echo_loss_pct"] = 100.0 * (sent - recv) / max(sent, 1)
    # 2. Client to client through two allocations on the same server.
    sent, recv, t, _ = uclient(port, peer_port, ["-y", "-m", str(load["m"]), "-n", str(load["n"]), "-l", "100", "-z", "0"])
    r["c2c_msgs_per_s"] = recv / t
    r["c2c_loss_pct"] = 100.0 * (sent - recv) / max(sent, 1)
    # 3. Payload throughput with 1000-byte packets.
    sent, recv, t, _ = uclient(port, peer_port, ["-m", str(load["m"]), "-n", str(load["n_big"]), "-l", "1000", "-z", "0"])
    r["mbit_per_s"] = recv * 1000 * 8 / t / 1e6
    # 4. Send indications instead of channels.
    c0 = cpu_seconds(pid)
    sent, recv, _, _ = uclient(port, peer_port, ["-s", "-m", str(load["m"]), "-n", str(load["n"]), "-l", "100", "-z", str(load["z"])])
    c1 = cpu_seconds(pid)
    r["send_ind_cpu_us"] = (c1 - c0) * 1e6 / max(sent + recv, 1)
    return r


METRICS = [
    ("cpu_us_per_pkt", "server CPU per relayed packet (µs), 100 B, channels", "lower"),
    ("echo_loss_pct", "echo loss at that load (%)", "lower"),
    ("c2c_msgs_per_s", "client-to-client messages/s (-y)", "higher"),
    ("c2c_loss_pct", "client-to-client loss (%)", "lower"),
    ("mbit_per_s", "payload Mbit/s, 1000 B packets", "higher"),
    ("send_ind_cpu_us", "server CPU per relayed packet (µs), Send indications", "lower"),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--binary", default=os.environ.get("SWITCHBOARD_BIN"))
    args = ap.parse_args()
    for tool in ["turnserver", "turnutils_uclient", "turnutils_peer"]:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: apt-get install coturn")
    binary = args.binary or str(ROOT / "target" / ("debug" if args.smoke else "release") / "switchboard")
    if not Path(binary).exists():
        profile = [] if args.smoke else ["--release"]
        subprocess.run(["cargo", "build", "--quiet", *profile], cwd=ROOT, check=True)
    rounds = 1 if args.smoke else args.rounds
    load = {"m": 1, "n": 200, "n_big": 200, "z": 5} if args.smoke else {"m": 4, "n": 50000, "n_big": 20000, "z": 0}

    tmp = Path(tempfile.mkdtemp(prefix="sb-turn-bench-"))
    cport, sport, peer_port = free_udp_port(), free_udp_port(), free_udp_port()
    coturn = Server("coturn", [
        "turnserver", "-n", "--listening-ip=127.0.0.1", f"--listening-port={cport}", "--relay-ip=127.0.0.1",
        "--min-port=20000", "--max-port=29999", "--use-auth-secret", f"--static-auth-secret={SECRET}",
        "--realm=switchboard", "--no-tls", "--no-dtls", "--allow-loopback-peers", "--no-cli",
        "--no-stdout-log", f"--log-file={tmp}/coturn.log", "--simple-log", f"--pidfile={tmp}/coturn.pid",
    ])
    env = dict(os.environ)
    env.update({
        "SWITCHBOARD_DATA_DIR": str(tmp / "data"),
        "SWITCHBOARD_HTTP__LISTEN": "127.0.0.1:0",
        "SWITCHBOARD_TURN__LISTEN_UDP": f"127.0.0.1:{sport}",
        "SWITCHBOARD_TURN__RELAY_PORTS": "30000-39999",
        "SWITCHBOARD_TURN__SECRET": SECRET,
        "SWITCHBOARD_TURN__ALLOW_PEERS": '["127.0.0.1/32"]',  # the echo peer (benchmark only)
        "SWITCHBOARD_TURN__USER_QUOTA": "100000",
        "SWITCHBOARD_TURN__TOTAL_QUOTA": "100000",
        "SWITCHBOARD_LOG__LEVEL": "warn",
    })
    ours = Server("switchboard", [binary], env)
    peer = subprocess.Popen(["turnutils_peer", "-L", "127.0.0.1", "-p", str(peer_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = {"coturn": [], "switchboard": []}
    try:
        coturn.start(cport)
        ours.start(sport)
        # Warm-up round, discarded, for each.
        for server, port in [(coturn, cport), (ours, sport)]:
            measure(server, port, peer_port, load)
        for i in range(rounds):
            for server, port in [(coturn, cport), (ours, sport)]:
                r = measure(server, port, peer_port, load)
                results[server.name].append(r)
                print(f"round {i + 1} {server.name}: " + ", ".join(f"{k}={v:.2f}" for k, v in r.items()), flush=True)
    finally:
        ours.stop()
        coturn.stop()
        peer.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in results.items()}
    lines = [
        f"| metric | coturn 4.6 | Switchboard | ours / coturn | better |",
        "|---|---|---|---|---|",
    ]
    for key, label, better in METRICS:
        c, s = med["coturn"][key], med["switchboard"][key]
        ratio = s / c if c else float("nan")
        lines.append(f"| {label} | {c:.2f} | {s:.2f} | {ratio:.2f} | {better} |")
    table = "\n".join(lines)
    print()
    print(table)
    if args.smoke:
        print("\n(smoke mode: tiny load, one round; figures are not meaningful)")
        return
    if args.write_docs:
        write_docs(table, rounds, load)


def write_docs(table, rounds, load):
    body = (
        f"Machine: {report.machine()}. Command: `scripts/bench/turn.sh --rounds {rounds} --write-docs`.\n"
        f"Load per workload: `-m {load['m']} -n {load['n']} -z {load['z']}` (100 B), `-n {load['n_big']}` (1000 B); "
        f"medians of {rounds} interleaved rounds after a discarded warm-up.\n\n{table}"
    )
    report.write_section("turn", "TURN relay (ours vs coturn)", body)


if __name__ == "__main__":
    main()
