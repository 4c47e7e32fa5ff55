"""The table, the ratios and the baseline comparison of perf/bench.py."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any

# (workload, key, label, higher_is_better)
METRICS: list[tuple[str, str, str, bool]] = [
    ("A", "conn_per_s", "new conn/s", True),
    ("A", "p50_us", "conn p50 µs", False),
    ("A", "p99_us", "conn p99 µs", False),
    ("A", "proxy_cpu_us_per_conn", "proxy CPU µs/conn", False),
    ("A", "proxy_user_us_per_conn", "proxy user µs/conn", False),  # of it, in user mode
    ("B", "msg_per_s", "64 B msg/s", True),
    ("B", "msg_p99_us", "msg p99 µs", False),
    ("B", "proxy_cpu_us_per_msg", "proxy CPU µs/msg", False),
    ("B", "proxy_user_us_per_msg", "proxy user µs/msg", False),  # of it, in user mode
    ("C", "mb_per_s", "bulk MB/s", True),
    ("C", "proxy_cpu_s_per_gb", "proxy CPU s/GB", False),
    ("Cb", "mb_per_s", "bulk MB/s", True),
    ("Cb", "proxy_cpu_s_per_gb", "proxy CPU s/GB", False),
    ("D", "kib_per_idle_conn", "RSS KiB/idle conn", False),
    ("E", "req_per_s", "HTTP req/s", True),
    ("E", "http_p99_us", "HTTP p99 µs", False),
    ("E", "proxy_cpu_us_per_req", "proxy CPU µs/req", False),
    ("E", "proxy_user_us_per_req", "proxy user µs/req", False),  # of it, in user mode
    ("En", "req_per_s", "HTTP req/s", True),
    ("En", "http_p99_us", "HTTP p99 µs", False),
    ("En", "proxy_cpu_us_per_req", "proxy CPU µs/req", False),
    ("En", "proxy_user_us_per_req", "proxy user µs/req", False),  # of it, in user mode
    ("Fa", "conn_per_s", "TLS conn/s", True),
    ("Fa", "p99_us", "req p99 µs", False),
    ("Fa", "proxy_cpu_us_per_conn", "proxy CPU µs/conn", False),
    ("Fb", "req_per_s", "h2 req/s", True),
    ("Fb", "p99_us", "h2 req p99 µs", False),
    ("Fb", "proxy_cpu_us_per_req", "proxy CPU µs/req", False),
]
TWINS = ("fastsni", "fastsni-pure", "fasthttpdir", "fasthttpdir-pure")


def twins(workload: str) -> tuple[str, str]:
    """Ours, compiled and pure: fasthttpdir for the HTTP workloads, fastsni for the rest."""
    return ("fasthttpdir", "fasthttpdir-pure") if workload.startswith("E") else ("fastsni", "fastsni-pure")


WORKLOAD_NAMES = {
    "A": "A new connections",
    "B": "B small messages",
    "C": "C bulk download",
    "Cb": "C bulk 1MiB/256KiB",
    "D": "D idle connections",
    "E": "E HTTP via wrk",
    "En": "E HTTP, conn/req",
    "Fa": "F TLS 1 req/conn",
    "Fb": "F TLS h2 4x32",
}


def value(results: dict[str, Any], peer: str, workload: str, key: str) -> float | None:
    figure = results.get(peer, {}).get(workload, {}).get(key)
    return float(figure) if isinstance(figure, (int, float)) and figure >= 0 else None


def ratios(results: dict[str, Any]) -> dict[str, float]:
    """fastsni twin / peer for every figure both have: "fastsni/nginx A.conn_per_s"."""
    out: dict[str, float] = {}
    for workload, key, _, _ in METRICS:
        for twin in twins(workload):
            for peer in results:
                ours, theirs = value(results, twin, workload, key), value(results, peer, workload, key)
                if ours is not None and theirs:
                    out[f"{twin}/{peer} {workload}.{key}"] = ours / theirs
    return out


def fmt(figure: float | None) -> str:
    if figure is None:
        return "-"
    if figure >= 100:
        return f"{figure:,.0f}"
    return f"{figure:.3g}" if figure >= 1 else f"{figure:.3f}"


def render_table(report: dict[str, Any]) -> str:
    results, rat = report["results"], report["ratios"]
    header = f"{'workload':<20} {'metric':<18} {'peer':<15} {'value':>10} {'ours/':>9} {'pure/':>7}"
    header += "  cpu% proxy/lg/be"
    lines = [header, "-" * len(header)]
    for workload, key, label, higher in METRICS:
        for peer in results:
            figure = value(results, peer, workload, key)
            if figure is None:
                continue
            mine = [rat.get(f"{twin}/{peer} {workload}.{key}") for twin in twins(workload)]
            cpu = results[peer][workload].get("cpu_pct", {})
            shares = "/".join(str(cpu.get(p, "-")) for p in ("proxy", "loadgen", "backend")) if cpu else ""
            lines.append(
                f"{WORKLOAD_NAMES[workload]:<20} {label + (' ↑' if higher else ' ↓'):<18} {peer:<15} "
                f"{fmt(figure):>10} {ratio_text(mine[0]):>9} {ratio_text(mine[1]):>7}  {shares}"
            )
    broken = [f"{peer}: {res['broken']}" for peer, res in results.items() if "broken" in res]
    lines += ["", "↑ higher is better, ↓ lower is better."]
    lines += [
        "ours/, pure/ = fastsni's (E: fasthttpdir's) compiled or pure twin's figure ÷ this row's, same run."
    ]
    lines += ["cpu% = CPU time ÷ wall time of the run (100 = one core saturated); lg = load generator."]
    lines += [f"BROKEN {line}" for line in broken]
    lines += [f"note: {note}" for note in report.get("notes", [])]
    return "\n".join(lines)


def ratio_text(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def compare_baseline(report: dict[str, Any], baseline: dict[str, Any], tolerance: float = 0.10) -> list[str]:
    """Flag every ratio more than ``tolerance`` worse (in its own direction) than the baseline's."""
    higher = {f"{w}.{k}": h for w, k, _, h in METRICS}
    flags = []
    for name, now in report["ratios"].items():
        before = baseline.get("ratios", {}).get(name)
        if not before or name.split(" ")[0].split("/")[1] in TWINS:
            continue
        change = now / before
        worse = change < 1 - tolerance if higher[name.split(" ")[1]] else change > 1 + tolerance
        if worse:
            flags.append(f"REGRESSION {name}: ratio {now:.3f} vs baseline {before:.3f} ({change - 1:+.0%})")
    return flags


def machine_info() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": peer_versions(),
    }


def peer_versions() -> dict[str, str]:
    commands = {
        "fastsni": ["python3", "-c", "import fastsni; print(fastsni.__version__)"],
        "nginx": ["nginx", "-v"],
        "haproxy": ["haproxy", "-v"],
        "sniproxy": ["sniproxy", "-V"],
        "gcc": ["gcc", "--version"],
    }
    versions = {}
    for name, cmd in commands.items():
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            versions[name] = "not installed"
            continue
        text = (out.stdout + out.stderr).strip().splitlines()
        versions[name] = text[0] if text else "?"
    return versions
