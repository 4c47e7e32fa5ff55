"""Counters lines, added up, in the Prometheus text exposition format (not hot).

Every proxy copy writes one ``counters`` line on SIGUSR1 and one as it exits
(fastsni.server); fastsni-listen adds them up across its copies (fastsni.listen), and
``fastsni-metrics`` reads such lines on stdin. Counter names are the lines' keys:
``alert_N`` and ``status_N`` become one family labelled by ``alert`` or ``status``,
their causes (``alert_112_refused``) one labelled by both; ``open`` and ``copies`` are
gauges; every other key is a counter ``<program>_<key>_total``.
"""

from __future__ import annotations

import re
import sys

COUNTERS = re.compile(r"^(?:\S+ )?(fastsni|fasthttpdir): counters (.*)$")  # a time may lead
ANSWER = re.compile(r"^(alert|status)_(\d+)(?:_([a-z_]+))?$")
NOT_SUMMED = frozenset(("pid", "uptime"))
GAUGES = frozenset(("open", "copies"))
HELP = {
    "accepted": "connections accepted",
    "routed": "connections (fastsni) or requests (fasthttpdir) handed to a backend",
    "closed_early": "clients that closed before naming a host",
    "hello_ech": "ClientHellos offering encrypted_client_hello (RFC 9849)",
    "hello_grease": "ClientHellos carrying GREASE values (RFC 8701)",
    "relay_resets": "relays the backend ended with a reset or broken pipe",
    "refused_fair_share": "new connections refused for their source's fair share",
    "shed_fair_share": "unrouted connections closed when accept found no descriptor",
    "owner_log_sent": "lines sent to owners' log sockets",
    "owner_log_dropped": "lines for owners' log sockets dropped (receiver absent or full)",
    "bytes_up": "bytes relayed towards backends",
    "bytes_up_spliced": "bytes relayed towards backends by splice(2)",
    "bytes_down": "bytes relayed towards clients",
    "bytes_down_spliced": "bytes relayed towards clients by splice(2)",
    "open": "connections open",
    "copies": "copies whose counters are added up",
}


def parse(text: str) -> tuple[str, dict[str, int]] | None:
    """A counters line -> (program, {key: value}) without pid and uptime; None for other lines."""
    match = COUNTERS.match(text.rstrip("\n"))
    if match is None:
        return None
    fields: dict[str, int] = {}
    for field in match[2].split():
        key, _, value = field.partition("=")
        if key in NOT_SUMMED or key.startswith("total") or not value.isdigit():
            continue
        fields[key] = int(value)
    return match[1], fields


def add(totals: dict[str, int], fields: dict[str, int]) -> None:
    for key, value in fields.items():
        totals[key] = totals.get(key, 0) + value


def exposition(program: str, totals: dict[str, int]) -> str:
    """Prometheus text format (version 0.0.4) of one program's totals."""
    families: dict[str, tuple[str, str, list[str]]] = {}  # name -> (type, help, samples)

    def sample(name: str, kind: str, text: str, labels: str, value: int) -> None:
        if kind == "counter":
            name += "_total"  # the text format names a counter with its suffix, TYPE line too
        families.setdefault(name, (kind, text, []))[2].append(f"{name}{labels} {value}")

    for key, value in sorted(totals.items()):
        answer = ANSWER.match(key)
        if answer is not None:
            kind, code, why = answer.groups()
            plural = "alerts" if kind == "alert" else "answers"
            if why is None:
                text, labels = f"{plural} sent, by {kind}", f'{{{kind}="{code}"}}'
                sample(f"{program}_{plural}", "counter", text, labels, value)
            else:
                text, labels = f"{plural} sent, by {kind} and cause", f'{{{kind}="{code}",cause="{why}"}}'
                sample(f"{program}_{plural}_by_cause", "counter", text, labels, value)
        elif key in GAUGES:
            sample(f"{program}_{key}", "gauge", HELP.get(key, key), "", value)
        else:
            sample(f"{program}_{key}", "counter", HELP.get(key, key.replace("_", " ")), "", value)
    lines = []
    for name, (kind, text, samples) in families.items():
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *samples]
    return "\n".join(lines) + "\n" if lines else ""


def last_lines(lines) -> dict[str, dict[str, dict[str, int]]]:
    """Per program, per pid: the fields of the last counters line of each process."""
    latest: dict[str, dict[str, dict[str, int]]] = {}
    for text in lines:
        parsed = parse(text)
        if parsed is None:
            continue
        pid = re.search(r" pid=(\d+)", text)
        latest.setdefault(parsed[0], {})[pid[1] if pid else ""] = parsed[1]
    return latest


def main() -> None:
    """``fastsni-metrics``: counters lines on stdin (e.g. ``journalctl -o cat``), the last
    of each process added up per program, as Prometheus text on stdout."""
    if sys.argv[1:]:
        sys.stderr.write(
            "usage: fastsni-metrics <LINES\n\nReads counters lines (journalctl -o cat -u fastsni.service) "
            "and prints the last one of each process, added up, in the Prometheus text format.\n"
        )
        raise SystemExit(0 if sys.argv[1:] in (["--help"], ["-h"]) else 2)
    out = []
    for program, processes in sorted(last_lines(sys.stdin).items()):
        totals: dict[str, int] = {"copies": 0}
        for fields in processes.values():
            add(totals, fields)
            totals["copies"] += 1
        out.append(exposition(program, totals))
    sys.stdout.write("".join(out))


if __name__ == "__main__":
    main()
