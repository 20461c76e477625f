#!/usr/bin/env python3
"""TURN relay benchmark: coturn (Debian `coturn`) and Switchboard's embedded TURN server, side by
side on this machine, in interleaved rounds (coturn, ours, coturn, ...), the first round after
each start discarded. Both use the TURN REST API secret, loopback, and comparable relay ranges
(coturn 20000-29999, ours 30000-39999, outside the kernel's ephemeral range).

Each server is pinned to core 0 and every client and the echo peer to core 1 (`taskset`), so
the figures measure the server, not two processes fighting over shared cores. Two clients drive
both servers the same way:
- coturn's `turnutils_uclient` with a `turnutils_peer` echo peer, for the classic figures, and
  its TCP (`-t`) and TLS (`-t -S`) client legs;
- `turn-load` (src/bin/turn-load.rs, plain UDP sockets and the `stun` crate, one thread per
  worker), for what uclient cannot do: paced load with a loss criterion (100-byte packets, and
  1000-byte ones for the payload rate), allocations held open, floods of unauthenticated
  requests.

Reported (medians over the kept rounds, and the ratio ours/coturn):
  cpu_us_per_pkt    server CPU time (utime+stime, /proc/PID/stat) per relayed packet at a fixed
                    offered load, channels (client -> peer and back = 2 relayed packets per echo)
  send_ind_cpu_us   the same on the Send-indication path (-s)
  c2c_msgs_per_s    client to client through two allocations (uclient -y -m 8), messages/s
  tcp_c2c_msgs_per_s, tls_c2c_msgs_per_s, tcp_cpu_us, tls_cpu_us
                    the same with TCP and TLS clients (the relay legs stay UDP), and the
                    server CPU per message delivered
  sat_pps           saturation: the highest paced client-to-client rate (turn-load, 4 pairs)
                    delivered with at most 1 % loss, over a sweep of offered rates
  payload_mbit_s    the same sweep with 1000-byte packets (video-sized): payload Mbit/s at
                    ≤ 1 % loss
  lat_p50/p99_us    one-way client-to-client latency at a moderate paced load
  kb_per_alloc      server RSS growth per allocation, 2000 allocations held open
  allocs_per_s      allocations per second (32 at a time)
  flood_mb          server RSS growth after N unauthenticated Allocate requests from 1000 ports
  flood_per_s       rate at which those were answered

Every figure is the median of the kept rounds, with the spread (min–max) beside it.

--smoke: one tiny round each without warm-up, plot to a temp dir (scripts/test.sh runs it so
         it cannot rot).
--write-docs: rewrite the TURN sections of docs/benchmarks.md, its plot, and the README line.
--profile: one extra pass per server under perf and strace; with --write-docs, the profile
           section of docs/benchmarks.md. --profile-only: that pass alone.
"""
import argparse
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

ROOT = report.ROOT
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


def pin(core):
    """`taskset -c core` when there are two cores to split, else nothing."""
    if (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        return ["taskset", "-c", str(core)]
    return []


PIN_SERVER = pin(0)
PIN_LOAD = pin(1)


class Server:
    def __init__(self, name, cmd, port, env=None, tls_port=None):
        self.name = name
        self.cmd = PIN_SERVER + cmd
        self.port = port
        self.tls_port = tls_port
        self.env = env
        self.proc = None

    @property
    def pid(self):
        return self.proc.pid

    def start(self):
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_udp(self.port)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


UCLIENT_RUNS = itertools.count()


def uclient(port, peer_port, args):
    # uclient leaves its allocations behind (600 s); a later run whose socket got the same
    # address and port back from the kernel would be refused (437, then 400 on channel bind).
    # So each run binds an address of its own: 127.0.1.1, 127.0.1.2, ...
    local = f"127.0.1.{next(UCLIENT_RUNS) % 254 + 1}"
    cmd = PIN_LOAD + ["turnutils_uclient", "-L", local, "-p", str(port), "-W", SECRET, "-u", "bench", "-e", "127.0.0.1", "-r", str(peer_port)]
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
    return sent, recv, max(transmit, 1e-3)


def turn_load(load_bin, workload, port, on_ready=None, **kw):
    """Runs one turn-load workload; `on_ready` runs when it prints READY (allocations held)."""
    # Clients from 127.0.0.2: ports apart from uclient's, whose allocations outlive it.
    cmd = PIN_LOAD + [str(load_bin), workload, "--server", f"127.0.0.1:{port}", "--bind", "127.0.0.2", "--secret", SECRET]
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    result = None
    for line in p.stdout:
        if line.startswith("RESULT "):
            result = {k: float(v) if re.fullmatch(r"-?[\d.]+|nan", v) else v for k, v in (kv.split("=", 1) for kv in line.split()[1:])}
        if line.startswith("READY") and on_ready:
            on_ready()
    err = p.stderr.read()
    if p.wait() != 0 or result is None:
        raise RuntimeError(f"turn-load {workload} failed: {err[-1500:]}")
    if err.strip():
        print(f"  turn-load {workload} on port {port}: {err.strip()[-500:]}", flush=True)
    return result


def sweep(load_bin, port, rates, seconds, size=100):
    """Paced client-to-client relay at each offered rate: one dict per rate."""
    return [turn_load(load_bin, "relay", port, pairs=4, rate=r, seconds=seconds, size=size) for r in rates]


def measure(server, fresh, peer_port, load_bin, load):
    """One round of every workload against a running server (and the memory figures against
    `fresh()`, a new instance of it): a dict of figures, and the sweep."""
    pid, port = server.pid, server.port
    r = {}
    # Fixed offered load through an echo peer: CPU per relayed packet, channels then Send.
    for key, extra in [("cpu_us_per_pkt", []), ("send_ind_cpu_us", ["-s"])]:
        c0 = cpu_seconds(pid)
        sent, recv, _ = uclient(port, peer_port, extra + ["-m", str(load["m"]), "-n", str(load["n"]), "-l", "100", "-z", "0"])
        r[key] = (cpu_seconds(pid) - c0) * 1e6 / max(sent + recv, 1)
        if not extra:
            r["echo_loss_pct"] = 100.0 * (sent - recv) / max(sent, 1)
    sent, recv, t = uclient(port, peer_port, ["-y", "-m", str(load["c2c_m"]), "-n", str(load["n"]), "-l", "100", "-z", "0"])
    r["c2c_msgs_per_s"] = recv / t
    r["c2c_loss_pct"] = 100.0 * (sent - recv) / max(sent, 1)
    # The TCP and TLS client legs (client to client, the relays themselves are UDP).
    for key, leg_port, extra in [("tcp", port, ["-t"]), ("tls", server.tls_port, ["-t", "-S"])]:
        c0 = cpu_seconds(pid)
        sent, recv, t = uclient(leg_port, peer_port, extra + ["-y", "-m", str(load["c2c_m"]), "-n", str(load["n_stream"]), "-l", "100", "-z", "0"])
        r[f"{key}_c2c_msgs_per_s"] = recv / t
        r[f"{key}_cpu_us"] = (cpu_seconds(pid) - c0) * 1e6 / max(recv, 1)
        r[f"{key}_loss_pct"] = 100.0 * (sent - recv) / max(sent, 1)
    # Saturation with a loss criterion, and latency at a moderate load.
    points = sweep(load_bin, port, load["rates"], load["seconds"])
    ok = [p["delivered_pps"] for p in points if p["loss_pct"] <= 1.0]
    r["sat_pps"] = max(ok) if ok else 0.0
    big = sweep(load_bin, port, load["rates_big"], load["seconds"], size=1000)
    ok = [p["delivered_pps"] * 1000 * 8 / 1e6 for p in big if p["loss_pct"] <= 1.0]
    r["payload_mbit_s"] = max(ok) if ok else 0.0
    lat = turn_load(load_bin, "relay", port, pairs=4, rate=load["lat_rate"], seconds=load["seconds"])
    r["lat_p50_us"], r["lat_p99_us"] = lat["p50_us"], lat["p99_us"]
    r.update(memory(fresh(), load_bin, load))
    return r, points


def memory(server, load_bin, load):
    """Memory figures on a freshly started server, so that nothing an earlier workload left in
    its allocator hides what allocations and floods cost: RSS growth per allocation held open
    (and the allocation rate), then RSS growth after a flood of unauthenticated Allocates."""
    server.start()
    try:
        return memory_of(server, load_bin, load)
    finally:
        server.stop()


def memory_of(server, load_bin, load):
    pid, port, r = server.pid, server.port, {}
    time.sleep(0.5)
    before = report.rss_kb(pid)
    held = {}
    a = turn_load(load_bin, "allocs", port, on_ready=lambda: (time.sleep(1), held.update(rss=report.rss_kb(pid))), count=load["allocs"], concurrency=32, hold=1)
    r["kb_per_alloc"] = (held["rss"] - before) / max(a["ok"], 1)
    r["alloc_failed"] = a["failed"]
    r["allocs_per_s"] = a["allocs_per_s"]
    # A flood of unauthenticated Allocate requests from many source ports.
    before = report.rss_kb(pid)
    f = turn_load(load_bin, "flood", port, requests=load["flood"], sockets=1000, threads=16)
    time.sleep(1)
    r["flood_mb"] = (report.rss_kb(pid) - before) / 1024
    r["flood_per_s"] = f["per_s"]
    return r


METRICS = [
    ("cpu_us_per_pkt", "server CPU per relayed packet (µs), 100 B, channels", "lower"),
    ("send_ind_cpu_us", "server CPU per relayed packet (µs), Send indications", "lower"),
    ("echo_loss_pct", "echo loss at that load (%)", "lower"),
    ("c2c_msgs_per_s", "client-to-client messages/s (uclient -y -m 8)", "higher"),
    ("c2c_loss_pct", "client-to-client loss (%)", "lower"),
    ("tcp_c2c_msgs_per_s", "TCP clients: client-to-client messages/s (uclient -t -y -m {c2c_m})", "higher"),
    ("tcp_cpu_us", "  server CPU per message (µs), TCP clients", "lower"),
    ("tcp_loss_pct", "  loss (%), TCP clients", "lower"),
    ("tls_c2c_msgs_per_s", "TLS clients: client-to-client messages/s (uclient -t -S -y -m {c2c_m})", "higher"),
    ("tls_cpu_us", "  server CPU per message (µs), TLS clients", "lower"),
    ("tls_loss_pct", "  loss (%), TLS clients", "lower"),
    ("sat_pps", "saturation: client-to-client packets/s at ≤ 1 % loss (turn-load, 100 B)", "higher"),
    ("payload_mbit_s", "payload rate at ≤ 1 % loss, 1000 B packets (turn-load), Mbit/s", "higher"),
    ("lat_p50_us", "one-way latency p50 (µs) at {lat_rate} packets/s", "lower"),
    ("lat_p99_us", "one-way latency p99 (µs) at {lat_rate} packets/s", "lower"),
    ("kb_per_alloc", "server memory per allocation (kB), {allocs} held, fresh server", "lower"),
    ("allocs_per_s", "allocations per second", "higher"),
    ("alloc_failed", "  allocations that failed (of {allocs})", "lower"),
    ("flood_mb", "RSS growth (MB) after {flood} unauthenticated Allocates, fresh server", "lower"),
    ("flood_per_s", "  those answered per second", "higher"),
]


def plot(curves, path, rates, required):
    """Delivered rate, loss and latency against the offered rate, one line per server."""
    plt = report.pyplot(required)
    if plt is None:
        return
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, marker, color in [("coturn", "o", "tab:blue"), ("switchboard", "s", "tab:orange")]:
        pts = curves[name]
        ax[0].plot(rates, [p["delivered_pps"] for p in pts], marker=marker, color=color, label=name)
        ax[1].plot(rates, [p["loss_pct"] for p in pts], marker=marker, color=color, label=name)
        ax[2].plot(rates, [p["p50_us"] / 1000 for p in pts], marker=marker, color=color, label=f"{name} p50")
        ax[2].plot(rates, [p["p99_us"] / 1000 for p in pts], marker=marker, color=color, linestyle="--", label=f"{name} p99")
    ax[0].plot(rates, rates, "k:", label="offered")
    ax[0].set(title="delivered vs offered", xlabel="offered packets/s", ylabel="delivered packets/s")
    ax[1].axhline(1.0, color="grey", linestyle=":")
    ax[1].set(title="loss", xlabel="offered packets/s", ylabel="loss (%)")
    ax[2].set(title="one-way latency", xlabel="offered packets/s", ylabel="ms", yscale="log")
    for a in ax:
        a.set_xticks(rates, [f"{r // 1000}k" for r in rates], fontsize=8)
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.suptitle("TURN client to client (turn-load, 4 pairs, 100 B): medians of the rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"wrote {path}")


def take_profiles(servers, peer_port, load_bin, load, workdir):
    """perf and strace of each server under the fixed uclient load: where CPU goes, and
    system calls per relayed packet."""
    parts = []
    for server in servers:
        prof = report.Profile(server.pid, workdir)
        perf = prof.perf(lambda: uclient(server.port, peer_port, ["-m", str(load["m"]), "-n", str(load["n"]), "-l", "100", "-z", "0"]), f"{server.name}-perf")
        calls = prof.syscalls(lambda: uclient(server.port, peer_port, ["-m", "4", "-n", "5000", "-l", "100", "-z", "0"]), f"{server.name}-strace")
        # Under strace the server falls behind and the client's counts include what the kernel
        # dropped, so count relayed packets on the server's side: one send each.
        sends = sum((calls or {}).get(c, 0) for c in ("sendto", "sendmsg", "sendmmsg"))
        parts.append(report.profile_markdown(f"{server.name}: channels", "relayed packet (one send each)", sends, perf, calls))
        # The Send-indication path differs in user space: where that time goes.
        perf = prof.perf(lambda: uclient(server.port, peer_port, ["-s", "-m", str(load["m"]), "-n", str(load["n"]), "-l", "100", "-z", "0"]), f"{server.name}-send-perf", user_only=True)
        parts.append(report.profile_markdown(f"{server.name}: Send indications", "", None, perf, None))
    return "\n".join(parts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-only", action="store_true", help="no rounds: only the profiles (with --write-docs, only their section)")
    args = ap.parse_args()
    for tool in ["turnserver", "turnutils_uclient", "turnutils_peer"]:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: apt-get install coturn")
    profile_dir = "debug" if args.smoke else "release"
    subprocess.run(["cargo", "build", "--quiet", *([] if args.smoke else ["--release"]), "--bin", "switchboard", "--bin", "turn-load"], cwd=ROOT, check=True)
    binary = ROOT / "target" / profile_dir / "switchboard"
    load_bin = ROOT / "target" / profile_dir / "turn-load"
    rounds = 1 if args.smoke else args.rounds
    if args.smoke:
        load = {"m": 1, "n": 200, "c2c_m": 2, "n_stream": 100, "rates": [2000, 4000], "rates_big": [1000, 2000], "seconds": 1,
                "lat_rate": 2000, "allocs": 20, "flood": 2000}
    else:
        load = {"m": 4, "n": 50000, "c2c_m": 8, "n_stream": 5000,
                "rates": [10000, 20000, 40000, 60000, 80000, 100000, 120000, 150000, 200000],
                "rates_big": [10000, 20000, 40000, 60000, 80000, 100000, 120000, 150000],
                "seconds": 2, "lat_rate": 20000, "allocs": 2000, "flood": 1000000}

    tmp = Path(tempfile.mkdtemp(prefix="sb-turn-bench-"))
    # One certificate for both servers' TLS listeners.
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)

    def coturn(port):
        tls = free_udp_port()
        return Server("coturn", [
            "turnserver", "-n", "--listening-ip=127.0.0.1", f"--listening-port={port}", f"--tls-listening-port={tls}",
            f"--cert={cert}", f"--pkey={key}", "--relay-ip=127.0.0.1",
            "--min-port=20000", "--max-port=29999", "--use-auth-secret", f"--static-auth-secret={SECRET}",
            "--realm=switchboard", "--no-dtls", "--allow-loopback-peers", "--no-cli",
            "--no-stdout-log", f"--log-file={tmp}/coturn-{port}.log", "--simple-log", f"--pidfile={tmp}/coturn-{port}.pid",
        ], port, tls_port=tls)

    def ours(port):
        tls = free_udp_port()
        env = dict(os.environ)
        env.update({
            "SWITCHBOARD_DATA_DIR": str(tmp / f"data-{port}"),
            "SWITCHBOARD_HTTP__LISTEN": "127.0.0.1:0",
            "SWITCHBOARD_TURN__LISTEN_UDP": f"127.0.0.1:{port}",
            "SWITCHBOARD_TURN__LISTEN_TCP": f"127.0.0.1:{port}",
            "SWITCHBOARD_TURN__LISTEN_TLS": f"127.0.0.1:{tls}",
            "SWITCHBOARD_TURN__TLS_CERT_FILE": str(cert),
            "SWITCHBOARD_TURN__TLS_KEY_FILE": str(key),
            "SWITCHBOARD_TURN__RELAY_PORTS": "30000-39999",
            "SWITCHBOARD_TURN__SECRET": SECRET,
            "SWITCHBOARD_TURN__ALLOW_PEERS": '["127.0.0.1/32"]',  # the echo peer (benchmark only)
            "SWITCHBOARD_TURN__USER_QUOTA": "100000",
            "SWITCHBOARD_TURN__TOTAL_QUOTA": "100000",
            "SWITCHBOARD_LOG__LEVEL": "warn",
        })
        return Server("switchboard", [str(binary)], port, env, tls_port=tls)

    makers = {"coturn": coturn, "switchboard": ours}
    fresh = {name: (lambda make=make: make(free_udp_port())) for name, make in makers.items()}
    peer_port = free_udp_port()
    peer = subprocess.Popen(PIN_LOAD + ["turnutils_peer", "-L", "127.0.0.1", "-p", str(peer_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers = [coturn(free_udp_port()), ours(free_udp_port())]
    results = {s.name: [] for s in servers}
    curves = {s.name: [] for s in servers}
    profiles = None
    try:
        for s in servers:
            s.start()
        if args.profile_only:
            profiles = take_profiles(servers, peer_port, load_bin, load, tmp)
            print(profiles)
            if args.write_docs:
                report.write_section("turn-profile", "", profiles)
            return
        for s in servers if not args.smoke else []:  # warm-up round, discarded
            measure(s, fresh[s.name], peer_port, load_bin, load)
        for i in range(rounds):
            for s in servers:
                r, points = measure(s, fresh[s.name], peer_port, load_bin, load)
                results[s.name].append(r)
                curves[s.name].append(points)
                print(f"round {i + 1} {s.name}: " + ", ".join(f"{k}={v:.2f}" for k, v in r.items()), flush=True)
        if args.profile:
            profiles = take_profiles(servers, peer_port, load_bin, load, tmp)
    finally:
        for s in servers:
            s.stop()
        peer.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    med = {name: report.medians(rs) for name, rs in results.items()}
    spread = {name: report.spreads(rs) for name, rs in results.items()}
    med_curves = {name: [report.medians([c[i] for c in cs]) for i in range(len(load["rates"]))] for name, cs in curves.items()}
    rows = [(label.format(**load), med["coturn"][k], med["switchboard"][k], better, spread["coturn"][k], spread["switchboard"][k])
            for k, label, better in METRICS]
    table = report.table(["coturn 4.6", "Switchboard"], rows)
    print()
    print(table)
    if profiles:
        print()
        print(profiles)
    if args.smoke:
        plot(med_curves, Path(tempfile.gettempdir()) / "sb-turn-smoke.png", load["rates"], required=False)
        print("\n(smoke mode: tiny load, one round; figures are not meaningful)")
        return
    if args.write_docs:
        report.PLOTS.mkdir(parents=True, exist_ok=True)
        plot(med_curves, report.PLOTS / "turn-saturation.png", load["rates"], required=True)
        write_docs(table, med, rounds, load, profiles)


def write_docs(table, med, rounds, load, profiles):
    pinned = "each server pinned to core 0, every client and the echo peer to core 1 (taskset)" if PIN_SERVER else "servers and clients share the cores"
    body = (
        f"Machine: {report.machine()}; {pinned}. "
        f"Command: `scripts/bench/turn.sh --rounds {rounds} --write-docs{' --profile' if profiles else ''}`.\n"
        f"uclient load: `-m {load['m']} -n {load['n']} -l 100 -z 0` (CPU rows), `-y -m {load['c2c_m']}` (UDP), "
        f"`-t`/`-t -S -y -m {load['c2c_m']} -n {load['n_stream']}` (TCP/TLS); turn-load sweeps: "
        f"{', '.join(str(r) for r in load['rates'])} packets/s of 100 B and "
        f"{', '.join(str(r) for r in load['rates_big'])} packets/s of 1000 B, {load['seconds']} s each. "
        f"Medians of {rounds} interleaved rounds after a discarded warm-up, the spread over the rounds "
        f"(min–max) in brackets; the ratio's spread is the worst and best pairing of the rounds.\n\n{table}\n\n"
        "![TURN saturation sweep](bench/turn-saturation.png)"
    )
    c, s = med["coturn"], med["switchboard"]
    headline = (
        f"- TURN vs coturn 4.6: {report.ratio(s['cpu_us_per_pkt'], c['cpu_us_per_pkt'])}x the server CPU per relayed "
        f"packet, {report.ratio(s['sat_pps'], c['sat_pps'])}x the saturation rate at ≤ 1 % loss, "
        f"{report.ratio(s['payload_mbit_s'], c['payload_mbit_s'])}x the payload rate with 1000-byte packets, "
        f"{report.ratio(s['tcp_c2c_msgs_per_s'], c['tcp_c2c_msgs_per_s'])}x / "
        f"{report.ratio(s['tls_c2c_msgs_per_s'], c['tls_c2c_msgs_per_s'])}x the TCP / TLS client rates, "
        f"{report.ratio(s['kb_per_alloc'], c['kb_per_alloc'])}x the memory per allocation "
        f"({s['kb_per_alloc']:.1f} kB), {report.ratio(s['allocs_per_s'], c['allocs_per_s'])}x the allocation rate; "
        f"+{s['flood_mb']:.1f} MB (coturn +{c['flood_mb']:.1f} MB) after {load['flood']:,} unauthenticated Allocates."
    )
    report.publish("turn", "TURN relay (ours vs coturn)", body, profiles, headline)


if __name__ == "__main__":
    main()
