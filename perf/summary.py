"""Medians over several perf/bench.py runs: each figure of ours, and its ratio to the best
peer of the same run (median and range over the runs).

    python3 perf/summary.py RUN.json [RUN.json ...]

RUN.json is a copy of perf/results/latest.json from one run.  Lower is better for every
figure here except throughput (MB/s), where the "best" peer is the fastest.
"""

from __future__ import annotations

import json
import statistics
import sys

# (workload, figure, ours, peers, lower is better)
ROWS = [
    ("A", "proxy_cpu_us_per_conn", "fastsni", ("nginx", "haproxy", "sniproxy"), True),
    ("A", "proxy_user_us_per_conn", "fastsni", ("nginx", "haproxy", "sniproxy"), True),
    ("B", "proxy_cpu_us_per_msg", "fastsni", ("nginx", "haproxy", "sniproxy"), True),
    ("B", "proxy_user_us_per_msg", "fastsni", ("nginx", "haproxy", "sniproxy"), True),
    ("C", "mb_per_s", "fastsni", ("nginx", "haproxy", "nginx-buf256k", "haproxy-splice"), False),
    ("C", "proxy_cpu_s_per_gb", "fastsni", ("nginx", "haproxy", "nginx-buf256k", "haproxy-splice"), True),
    ("Cb", "mb_per_s", "fastsni", ("nginx", "haproxy", "nginx-buf256k", "haproxy-splice"), False),
    ("Cb", "proxy_cpu_s_per_gb", "fastsni", ("nginx", "haproxy", "nginx-buf256k", "haproxy-splice"), True),
    ("D", "kib_per_idle_conn", "fastsni", ("nginx", "haproxy", "sniproxy"), True),
    ("E", "proxy_cpu_us_per_req", "fasthttpdir", ("nginx-http", "haproxy-http"), True),
    ("E", "proxy_cpu_us_per_req", "fasthttpdir", ("nginx-http-fresh", "haproxy-http-fresh"), True),
    ("En", "proxy_cpu_us_per_req", "fasthttpdir", ("nginx-http", "haproxy-http"), True),
    ("En", "proxy_cpu_us_per_req", "fasthttpdir", ("nginx-http-fresh", "haproxy-http-fresh"), True),
    ("E", "proxy_user_us_per_req", "fasthttpdir", ("nginx-http", "haproxy-http"), True),
    ("En", "proxy_user_us_per_req", "fasthttpdir", ("nginx-http", "haproxy-http"), True),
    ("Fa", "proxy_cpu_us_per_conn", "fastsni", ("nginx", "haproxy", "sniproxy"), True),
    ("Fb", "proxy_cpu_us_per_req", "fastsni", ("nginx", "haproxy", "sniproxy"), True),
]
RELAYS = ("uvloop-relay", "asyncio-relay", "fastsni-pure")  # shown beside A and B, not as peers
OTHERS = {"A": RELAYS, "B": RELAYS, "E": ("fasthttpdir-pure",), "En": ("fasthttpdir-pure",)}


def figure(run: dict, peer: str, workload: str, name: str) -> float | None:
    value = run["results"].get(peer, {}).get(workload, {}).get(name)
    return value if isinstance(value, (int, float)) and value > 0 else None


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.4g} ({min(values):.4g}-{max(values):.4g})"


def main() -> None:
    runs = [json.load(open(path)) for path in sys.argv[1:]]
    print(f"{len(runs)} runs")
    for workload, name, ours, peers, lower in ROWS:
        mine, ratios, best_names, best_values = [], [], [], []
        for run in runs:
            value = figure(run, ours, workload, name)
            theirs = {peer: figure(run, peer, workload, name) for peer in peers}
            theirs = {peer: v for peer, v in theirs.items() if v is not None}
            if value is None or not theirs:
                continue
            best = (min if lower else max)(theirs, key=theirs.get)
            mine.append(value)
            best_values.append(theirs[best])
            best_names.append(best)
            ratios.append(value / theirs[best])
        if not ratios:
            print(f"{workload:3} {name:24} no figures")
            continue
        names = ",".join(sorted(set(best_names)))
        print(
            f"{workload:3} {name:24} {ours} {spread(mine)}  best peer ({names}) {spread(best_values)}"
            f"  ratio {spread(ratios)}"
        )
        for other in OTHERS.get(workload, ()) if name.startswith("proxy_") else ():
            values = [v for run in runs if (v := figure(run, other, workload, name)) is not None]
            if values:
                print(f"    {other}: {spread(values)}")


if __name__ == "__main__":
    main()
