"""Side-by-side benchmarks of fastsni (compiled and pure twins) against haproxy, nginx
and sniproxy: ``python3 perf/bench.py [--quick] [--save-baseline]``.

Every proxy runs single-worker pinned to CPU 1; the C load generator (perf/loadgen.c)
and the C backend (perf/backend.c, on Unix sockets) share CPU 0, as do h2load and the
TLS backend nginx of workload F (perf/perf_tls.py).  The comparable figure
is proxy CPU time per operation, read from /proc/<pid>/stat before and after each run.
See perf/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from perf_peers import PEERS, Peer, peer_command, write_peer_config
from perf_report import compare_baseline, machine_info, ratios, render_table
from perf_tls import (
    TLS_CLIENTS,
    TLS_HOSTS,
    backend_config,
    h2load_long,
    h2load_short,
    latency_percentiles,
    make_certificate,
    parse_h2load,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROXY_CPU = "1"
LOAD_CPU = "0"
BACKENDS = {  # key: (host name, socket name, perf/backend.c's mode and arguments)
    "echo": ("echo.test", "tls-socket", ["echo"]),
    "source": ("bulk.test", "tls-socket", ["source", "262144"]),
    "source-1m": ("bulk1m.test", "tls-socket", ["source", "1048576"]),
    "http": ("echo.test", "http-socket", ["http"]),
}
BULK_SHAPES = {  # workload: (backend key, the load generator's recv() size)
    "C": ("source", 256 * 1024),  # the backend's send()s of 256 KiB
    "Cb": ("source-1m", 256 * 1024),  # send()s of 1 MiB
}
CLK_TCK = os.sysconf("SC_CLK_TCK")
APT_PACKAGES = {
    "haproxy": "haproxy",
    "nginx": "nginx",
    "/usr/lib/nginx/modules/ngx_stream_module.so": "libnginx-mod-stream",
    "sniproxy": "sniproxy",
    "wrk": "wrk",
    "h2load": "nghttp2-client",
    "openssl": "openssl",
}


@dataclass
class Settings:
    """Sizes and time bounds of each workload; every loop is bounded by both."""

    conn_seconds: float
    conn_count: int
    msg_seconds: float
    msg_count: int
    bulk_seconds: float
    bulk_bytes: int
    idle_conns: int
    concurrency: int = 32
    msg_size: int = 64
    tls_count: int = 8000  # F(a): TLS connections, one request each (~900/s: CPU 0 bound)
    tls_seconds: float = 5.0  # F(b): h2load -D
    tls_timeout: float = 60.0  # F: h2load is killed (and F marked broken) past this

    @classmethod
    def for_run(cls, quick: bool, smoke: bool = False) -> Settings:
        if smoke:  # a functional check of the harness, not a measurement
            return cls(0.5, 20_000, 0.5, 200_000, 0.5, 1 << 30, 200, tls_count=200, tls_seconds=0.5)
        if quick:
            return cls(2.5, 400_000, 2.5, 4_000_000, 2.0, 40 << 30, 2000, tls_count=2000, tls_seconds=2.0)
        return cls(8.0, 2_000_000, 8.0, 20_000_000, 5.0, 200 << 30, 5000)


@dataclass
class Procs:
    """Every process this harness starts, each in its own session; all reaped at exit."""

    running: list[subprocess.Popen] = field(default_factory=list)

    def spawn(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
        self.running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.running)):
            self.stop(proc)


PINNING = {"on": (os.cpu_count() or 1) >= 2}  # off with --no-pin


def pinned(cpu: str, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *cmd] if PINNING["on"] else cmd


# ---------------------------------------------------------------- setup


def ensure_installed() -> list[str]:
    """apt-get install whatever peer is missing (one update); return notes on failures."""
    missing = sorted({pkg for what, pkg in APT_PACKAGES.items() if not _present(what)})
    notes: list[str] = []
    if missing and shutil.which("apt-get") and os.geteuid() == 0:
        policy = subprocess.run(["apt-cache", "policy", *missing], capture_output=True, text=True)
        print(policy.stdout, file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], env=env, check=False)
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], env=env, check=False)
    for what, pkg in APT_PACKAGES.items():
        if not _present(what):
            notes.append(f"{pkg} is not installed")
    try:
        import fastsni  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-e", str(REPO)], check=True)
    try:
        import uvloop  # noqa: F401  (the uvloop-relay peer)
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "uvloop"], check=False)
    return notes


def _present(what: str) -> bool:
    return Path(what).exists() if what.startswith("/") else shutil.which(what) is not None


def build(tmp: Path) -> dict[str, Path]:
    tools = {}
    for name in ("backend", "loadgen"):
        out = tmp / name
        subprocess.run(["gcc", "-O2", "-o", str(out), str(HERE / f"{name}.c")], check=True)
        tools[name] = out
    return tools


def write_hellos(tmp: Path) -> dict[str, Path]:
    sys.path.insert(0, str(REPO / "tests"))
    from backends import client_hello

    files = {}
    for key, (name, _, _) in BACKENDS.items():
        files[key] = tmp / f"hello-{name}"
        files[key].write_bytes(client_hello(name))
    return files


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (65536, max(hard, 65536)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def wait_path(path: Path, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not path.exists():
        time.sleep(0.02)
    return path.exists()


# ---------------------------------------------------------------- /proc


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (nginx's worker, for instance)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = [pid], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        tree += children
        frontier = children
    return tree


def cpu_times(pids: list[int]) -> tuple[float, float]:
    """(utime + stime, utime) of ``pids`` from one read of each /proc/PID/stat; softirq
    work done while one of them ran (the loopback TCP receive of what it sent, say) is
    in its stime."""
    total = user = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK, user / CLK_TCK


def cpu_seconds(pids: list[int]) -> float:
    return cpu_times(pids)[0]


def children_cpu() -> float:
    """CPU seconds of this process's reaped children (wrk, once subprocess.run returns)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


# ---------------------------------------------------------------- workloads


@dataclass
class Bench:
    settings: Settings
    tools: dict[str, Path]
    hellos: dict[str, Path]
    sockets: dict[str, Path]
    backend_pids: list[int]
    tls_port: int | None = None  # the TLS backend's own 127.0.0.1 listener (F's direct)
    tls_pids: list[int] = field(default_factory=list)

    def loadgen(self, mode: str, target: str, hello: str, *args: int | float) -> list[str]:
        cmd = [str(self.tools["loadgen"]), mode, target, str(self.hellos[hello]), *map(str, args)]
        return pinned(LOAD_CPU, cmd)

    def measured(self, proxy_pids: list[int], cmd: list[str]) -> dict[str, Any]:
        """Run one bounded load generator; add proxy/backend CPU seconds it caused."""
        limit = self.settings.conn_seconds + self.settings.msg_seconds + 60
        before = cpu_times(proxy_pids), cpu_seconds(self.backend_pids)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        after = cpu_times(proxy_pids), cpu_seconds(self.backend_pids)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["proxy_cpu_s"] = after[0][0] - before[0][0]
        result["backend_cpu_s"] = after[1] - before[1]
        result["proxy_user_s"] = after[0][1] - before[0][1]
        return result

    def connections(self, target: str, pids: list[int]) -> dict[str, Any]:
        s = self.settings
        cmd = self.loadgen("conn", target, "echo", s.concurrency, s.conn_count, s.conn_seconds)
        r = self.measured(pids, cmd)
        ops = max(r["ops"], 1)
        return {
            "conn_per_s": r["ops"] / r["seconds"],
            "p50_us": r["p50_us"],
            "p99_us": r["p99_us"],
            "proxy_cpu_us_per_conn": r["proxy_cpu_s"] / ops * 1e6 if pids else None,
            "proxy_user_us_per_conn": r["proxy_user_s"] / ops * 1e6 if pids else None,
            **cpu_shares(r),
        }

    def messages(self, target: str, pids: list[int]) -> dict[str, Any]:
        s = self.settings
        cmd = self.loadgen("msg", target, "echo", s.concurrency, s.msg_count, s.msg_seconds, s.msg_size)
        r = self.measured(pids, cmd)
        ops = max(r["ops"], 1)
        return {
            "msg_per_s": r["ops"] / r["seconds"],
            "msg_p99_us": r["p99_us"],
            "proxy_cpu_us_per_msg": r["proxy_cpu_s"] / ops * 1e6 if pids else None,
            "proxy_user_us_per_msg": r["proxy_user_s"] / ops * 1e6 if pids else None,
            **cpu_shares(r),
        }

    def bulk(self, target: str, pids: list[int], workload: str = "C") -> dict[str, Any]:
        s = self.settings
        backend, read_size = BULK_SHAPES[workload]
        cmd = self.loadgen("bulk", target, backend, 1, 1, s.bulk_seconds, s.bulk_bytes, read_size)
        r = self.measured(pids, cmd)
        gb = max(r["bytes"], 1) / 1e9
        return {
            "mb_per_s": r["bytes"] / 1e6 / r["seconds"],
            "proxy_cpu_s_per_gb": r["proxy_cpu_s"] / gb if pids else None,
            **cpu_shares(r),
        }

    def http(self, port: str, pids: list[int], new_connections: bool = False) -> dict[str, Any]:
        """wrk: 32 connections of GET / with Host: echo.test, kept alive or (new_connections)
        with ``Connection: close``, so that every request comes on a new connection."""
        s = self.settings
        url = f"http://127.0.0.1:{port}/"
        close = ["-H", "Connection: close"] if new_connections else []
        cmd = [
            "wrk",
            "-t1",
            "-c32",
            f"-d{max(1, round(s.msg_seconds))}s",
            "--latency",
            "-H",
            "Host: echo.test",
            *close,
            url,
        ]
        wall = max(1, round(s.msg_seconds))
        before = cpu_times(pids), cpu_seconds(self.backend_pids)
        children = children_cpu()
        out = subprocess.run(
            pinned(LOAD_CPU, cmd), capture_output=True, text=True, timeout=s.msg_seconds + 30
        )
        wrk_cpu = children_cpu() - children
        after = cpu_times(pids), cpu_seconds(self.backend_pids)
        figures = parse_wrk(out.stdout)
        if "req_per_s" not in figures:
            return {"broken": f"wrk: {(out.stdout + out.stderr).strip()[-300:]}"}
        requests = max(figures.get("requests", 0), 1)
        return {
            **figures,
            "proxy_cpu_us_per_req": (after[0][0] - before[0][0]) / requests * 1e6,
            "proxy_user_us_per_req": (after[0][1] - before[0][1]) / requests * 1e6,
            "cpu_pct": {
                "proxy": round(100 * (after[0][0] - before[0][0]) / wall),
                "loadgen": round(100 * wrk_cpu / wall),
                "backend": round(100 * (after[1] - before[1]) / wall),
            },
        }

    def tls(self, target: str, pids: list[int], procs: Procs, tmp: Path) -> dict[str, Any]:
        """F: h2load through the proxy to the TLS nginx backend: (a) one request per TLS
        connection, (b) a few long HTTP/2 connections with many streams."""
        s = self.settings
        log = tmp / "h2load.log"
        short = h2load_short(target, TLS_CLIENTS, s.tls_count, log)
        out: dict[str, Any] = {"Fa": self.h2load(short, log, pids, procs)}
        if "broken" not in out["Fa"]:  # one request per connection: per request = per connection
            out["Fa"]["conn_per_s"] = out["Fa"]["req_per_s"]
            out["Fa"]["proxy_cpu_us_per_conn"] = out["Fa"]["proxy_cpu_us_per_req"]
        out["Fb"] = self.h2load(h2load_long(target, s.tls_seconds, log), log, pids, procs)
        return out

    def h2load(self, cmd: list[str], log: Path, pids: list[int], procs: Procs) -> dict[str, Any]:
        """Run one h2load on CPU 0, killed past tls_timeout; requests/s, p50/p99, CPU."""
        log.unlink(missing_ok=True)
        before = cpu_seconds(pids), cpu_seconds(self.tls_pids), children_cpu()
        started = time.monotonic()
        proc = procs.spawn(pinned(LOAD_CPU, cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = proc.communicate(timeout=self.settings.tls_timeout)
        except subprocess.TimeoutExpired:
            return {"broken": f"h2load ran past {self.settings.tls_timeout:g} s and was killed"}
        finally:
            procs.stop(proc)
        wall = max(time.monotonic() - started, 1e-9)
        after = cpu_seconds(pids), cpu_seconds(self.tls_pids), children_cpu()
        figures = parse_h2load(stdout)
        done = figures.get("succeeded", 0)
        if not done or "seconds" not in figures:
            return {"broken": f"h2load: {(stdout + stderr).strip()[-300:]}"}
        failed = figures.get("failed", 0)
        return {
            "req_per_s": done / figures["seconds"],
            **latency_percentiles(log),
            "proxy_cpu_us_per_req": (after[0] - before[0]) / done * 1e6 if pids else None,
            "succeeded": done,
            "seconds": figures["seconds"],
            "errors": f"{failed} failed; {figures.get('status', '')}" if failed else 0,
            "cpu_pct": {
                "proxy": round(100 * (after[0] - before[0]) / wall),
                "loadgen": round(100 * (after[2] - before[2]) / wall),
                "backend": round(100 * (after[1] - before[1]) / wall),
            },
        }

    def idle(self, target: str, pids: list[int], procs: Procs) -> dict[str, Any]:
        """RSS growth of the proxy per idle relayed connection."""
        s = self.settings
        cmd = self.loadgen("idle", target, "echo", 64, s.idle_conns, 60)
        before = rss_kib(pids)
        proc = procs.spawn(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            ready = json.loads(proc.stdout.readline() or "{}")
            time.sleep(0.3)
            after = rss_kib(process_tree(pids[0]))
        finally:
            proc.stdin.close()
            proc.wait(30)
            procs.stop(proc)
        held = ready.get("ready", 0)
        return {
            "idle_conns": held,
            "idle_errors": ready.get("errors"),
            "kib_per_idle_conn": (after - before) / held if held else None,
        }


def parse_wrk(text: str) -> dict[str, Any]:
    """Requests/sec, total requests, p50/p99 latency in µs and errors from wrk's output."""
    units = {"us": 1.0, "ms": 1e3, "s": 1e6}
    figures: dict[str, Any] = {}
    for line in text.splitlines():
        words = line.split()
        if line.startswith("Requests/sec:"):
            figures["req_per_s"] = float(words[1])
        elif "requests in" in line:
            figures["requests"] = int(words[0])
        elif len(words) == 2 and words[0] in ("50%", "99%"):
            number = words[1].rstrip("usm")
            unit = words[1][len(number) :]
            figures[f"http_p{words[0][:2]}_us"] = float(number) * units.get(unit, 1.0)
        elif "Non-2xx" in line or "Socket errors" in line:
            figures["errors"] = line.strip()
    return figures


def cpu_shares(r: dict[str, Any]) -> dict[str, Any]:
    """CPU use in % of the wall time: 100 means that process saturated its core."""
    wall = max(r["seconds"], 1e-9)
    return {
        "errors": r["errors"],
        "cpu_pct": {
            "proxy": round(100 * r["proxy_cpu_s"] / wall),
            "loadgen": round(100 * r["cpu_s"] / wall),
            "backend": round(100 * r["backend_cpu_s"] / wall),
        },
    }


def run_peer(peer: Peer, bench: Bench, procs: Procs, tmp: Path) -> dict[str, Any]:
    """Start one peer, run its workloads, stop it; a failure is recorded, not raised."""
    if peer.name == "direct":
        targets = {mode: f"unix:{path}" for mode, path in bench.sockets.items()}
        targets["tls"] = f"127.0.0.1:{bench.tls_port}"
        return run_workloads(peer, bench, procs, targets, [], tmp)
    port = free_port()
    workdir = tmp / peer.name
    workdir.mkdir()
    write_peer_config(peer, workdir, port, bench.sockets)
    cmd, env, cwd = peer_command(peer, workdir, port, tmp / "hosts")
    log = (workdir / "stderr.log").open("w")
    proc = procs.spawn(pinned(PROXY_CPU, cmd), env={**os.environ, **env}, cwd=cwd, stdout=log, stderr=log)
    try:
        if not wait_listening(port, proc):
            return {"broken": f"did not listen: {tail(workdir / 'stderr.log')}"}
        time.sleep(0.2)
        target = f"tcp:127.0.0.1:{port}"
        targets = {"echo": target, "source": target, "source-1m": target, "tls": f"127.0.0.1:{port}"}
        return run_workloads(peer, bench, procs, targets, [proc.pid], workdir)
    finally:
        procs.stop(proc)
        log.close()


def run_workloads(
    peer: Peer, bench: Bench, procs: Procs, targets: dict[str, str], pids: list[int], workdir: Path
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    target = targets["echo"]
    if peer.workloads == ("E",):
        print(f"  {peer.name}: workload E", file=sys.stderr, flush=True)
        port, tree = target.rsplit(":", 1)[1], process_tree(pids[0])
        return {"E": bench.http(port, tree), "En": bench.http(port, tree, new_connections=True)}
    smoke = subprocess.run(bench.loadgen("conn", target, "echo", 4, 200, 2), capture_output=True, text=True)
    warm = json.loads(smoke.stdout.strip().splitlines()[-1])
    if warm["ops"] == 0:
        return {"broken": f"no connection completed: {warm}"}
    tree = process_tree(pids[0]) if pids else []
    for workload in peer.workloads:
        print(f"  {peer.name}: workload {workload}", file=sys.stderr, flush=True)
        if workload == "D" and tree:
            results["D"] = bench.idle(target, tree, procs)
        elif workload == "A":
            results["A"] = bench.connections(target, tree)
        elif workload == "B":
            results["B"] = bench.messages(target, tree)
        elif workload in BULK_SHAPES:
            results[workload] = bench.bulk(targets[BULK_SHAPES[workload][0]], tree, workload)
        elif workload == "F" and bench.tls_port:
            results.update(bench.tls(targets["tls"], process_tree(pids[0]) if pids else [], procs, workdir))
    return results


def runnable(package: str, cwd: Path) -> bool:
    """Whether ``python3 -m package`` can run from a directory outside the repository."""
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec('{package}.__main__') is None)"
    try:
        return subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True).returncode == 0
    except OSError:
        return False


def tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def start_backends(tmp: Path, tools: dict[str, Path], procs: Procs) -> tuple[dict[str, Path], list[int]]:
    sockets, pids = {}, []
    for key, (name, socket_name, args) in BACKENDS.items():
        path = tmp / "hosts" / name / socket_name
        path.parent.mkdir(parents=True, exist_ok=True)
        proc = procs.spawn(pinned(LOAD_CPU, [str(tools["backend"]), str(path), *args]))
        if not wait_path(path):
            raise RuntimeError(f"backend {key} did not start")
        sockets[key], pids = path, [*pids, proc.pid]
    return sockets, pids


def start_tls_backend(tmp: Path, procs: Procs) -> tuple[dict[str, Path], int, list[int]]:
    """F's backend: its own nginx (prefix, conf, pid, logs under tmp/tls-backend), one
    worker, on CPU 0; Unix sockets hosts/<name>/tls-socket and one 127.0.0.1 port."""
    workdir = tmp / "tls-backend"
    workdir.mkdir()
    sockets = {kind: tmp / "hosts" / name / "tls-socket" for kind, name in TLS_HOSTS.items()}
    for path in sockets.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    cert, key = make_certificate(workdir)
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(backend_config(workdir, sockets, port, cert, key))
    cmd = ["nginx", "-p", f"{workdir}/", "-c", str(conf), "-e", str(workdir / "error.log")]
    log = (workdir / "stderr.log").open("w")
    # umask 0: the socket files must be writable by the proxies' unprivileged workers
    proc = procs.spawn(pinned(LOAD_CPU, cmd), stdout=log, stderr=log, umask=0)
    log.close()
    if not wait_listening(port, proc) or not all(wait_path(path) for path in sockets.values()):
        raise RuntimeError(f"TLS backend nginx did not start: {tail(workdir / 'error.log')}")
    time.sleep(0.2)
    return sockets, port, process_tree(proc.pid)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short regression run (about 2 minutes)")
    parser.add_argument("--save-baseline", action="store_true", help="write perf/baseline.json")
    parser.add_argument("--smoke", action="store_true", help="0.5 s per workload: checks the harness only")
    parser.add_argument("--peers", help="comma-separated subset of: " + ",".join(p.name for p in PEERS))
    parser.add_argument("--workloads", help="comma-separated subset of: A,B,C,Cb,D,E,F (default: all)")
    parser.add_argument("--no-pin", action="store_true", help="no taskset: the scheduler places everything")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    notes = ensure_installed()
    raise_nofile()
    if args.no_pin:
        PINNING["on"] = False
    if PINNING["on"]:
        os.sched_setaffinity(0, {int(LOAD_CPU)})
    chosen = [p for p in PEERS if not args.peers or p.name in args.peers.split(",")]
    if args.workloads:
        wanted = args.workloads.split(",")
        chosen = [replace(p, workloads=tuple(w for w in p.workloads if w in wanted)) for p in chosen]
        chosen = [p for p in chosen if p.workloads]
    settings = Settings.for_run(args.quick, args.smoke)
    procs = Procs()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="fastsni-bench-") as tmpdir:
        tmp = Path(tmpdir)
        tmp.chmod(0o755)  # nginx's workers and sniproxy reach the backends as other users
        try:
            results = run_all(chosen, settings, procs, tmp, notes)
        finally:
            procs.stop_all()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)),
        "command": " ".join(["python3", "perf/bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(),
        "settings": settings.__dict__,
        "notes": notes,
        "results": results,
        "ratios": ratios(results),
    }
    return finish(report, args)


def run_all(
    peers: list[Peer], settings: Settings, procs: Procs, tmp: Path, notes: list[str]
) -> dict[str, Any]:
    tools = build(tmp)
    hellos = write_hellos(tmp)
    sockets, backend_pids = start_backends(tmp, tools, procs)
    bench = Bench(settings, tools, hellos, sockets, backend_pids)
    if any("F" in peer.workloads for peer in peers):
        if not (shutil.which("h2load") and shutil.which("nginx") and shutil.which("openssl")):
            notes.append("F skipped: it needs h2load (nghttp2-client), nginx and openssl")
        else:
            try:
                tls_sockets, bench.tls_port, bench.tls_pids = start_tls_backend(tmp, procs)
                sockets.update(tls_sockets)
            except (RuntimeError, subprocess.CalledProcessError) as error:
                notes.append(f"F skipped: {error}")
    results: dict[str, Any] = {}
    for peer in peers:
        if peer.binary and not shutil.which(peer.binary):
            results[peer.name] = {"broken": f"{peer.binary} not installed"}
            continue
        if "E" in peer.workloads and not shutil.which("wrk"):
            results[peer.name] = {"broken": "wrk not installed"}
            continue
        if peer.kind == "fasthttpdir" and not runnable("fasthttpdir", tmp):
            results[peer.name] = {"broken": "fasthttpdir is not written yet (no fasthttpdir.__main__)"}
            continue
        print(f"bench: {peer.name}", file=sys.stderr, flush=True)
        results[peer.name] = run_peer(peer, bench, procs, tmp)
        if "broken" in results[peer.name]:
            notes.append(f"{peer.name}: {results[peer.name]['broken']}")
        for part in ("Fa", "Fb"):  # F's halves can fail alone
            if "broken" in results[peer.name].get(part, {}):
                notes.append(f"{peer.name} {part}: {results[peer.name][part]['broken']}")
    return results


def finish(report: dict[str, Any], args: argparse.Namespace) -> int:
    print(render_table(report))
    out = HERE / "results" / "latest.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(REPO)}")
    baseline = HERE / "baseline.json"
    if args.save_baseline:
        baseline.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {baseline.relative_to(REPO)}")
    elif args.quick and baseline.exists():
        flags = compare_baseline(report, json.loads(baseline.read_text()))
        print("\n".join(flags) if flags else "no figure is more than 10% worse than perf/baseline.json")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started was stopped", file=sys.stderr)
        sys.exit(130)
