"""Workload F of perf/bench.py: real TLS end to end, h2load → proxy → a TLS + HTTP/2 nginx
listening on Unix sockets (one per host name), plus a 127.0.0.1 listener of that nginx for
the "direct" ceiling (h2load cannot measure a Unix-socket backend through a proxy's port).

Two host names, both served by the same backend nginx process:

- ``once.test``: ``keepalive_requests 1``, so each connection carries exactly one
  request and the backend closes it; h2load ``--h1 -n COUNT`` reconnects after every
  response, one full TLS handshake per request (Fa).  h2load 1.52 does not reconnect
  after an HTTP/2 GOAWAY, and hangs with ``--h1 -D``, hence HTTP/1.1 and a count here.
  TLS 1.3 (X25519, ECDSA P-256) with no session tickets or cache: every connection is a
  full handshake, about 1 ms of CPU 0 for h2load and nginx together.
- ``h2.test``: no request limit per connection; h2load HTTP/2 ``-c 4 -m 32 -D SECONDS``
  (Fb), a few long connections with many concurrent streams.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

TLS_HOSTS = {"once": "once.test", "h2": "h2.test"}  # sockets key: host name
TLS_CLIENTS = 8  # Fa: more only queue for CPU 0, where both TLS ends run
H2_CLIENTS = 4
H2_STREAMS = 32


def make_certificate(workdir: Path) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for every TLS host name (h2load does not verify it)."""
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    names = ",".join(f"DNS:{name}" for name in TLS_HOSTS.values())
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            f"/CN={TLS_HOSTS['h2']}",
            "-addext",
            f"subjectAltName={names}",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def nginx_http_preamble(workdir: Path) -> str:
    """The start of every nginx configuration here, up to the first line inside ``http {``:
    one worker in the foreground, every file under ``workdir``, no access log."""
    return f"""worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
worker_rlimit_nofile 19000;
events {{ worker_connections 18000; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;"""


def backend_config(workdir: Path, sockets: dict[str, Path], port: int, cert: Path, key: Path) -> str:
    """nginx 1.22: one worker, TLS 1.2/1.3 with full handshakes (no tickets, no session
    cache), HTTP/2 and HTTP/1.1 by ALPN, ``return 200 "ok\\n"``, no access log."""
    servers = []
    for index, (kind, name) in enumerate(TLS_HOSTS.items()):
        # listen options on the shared TCP address may be given only once
        tcp = f"127.0.0.1:{port} ssl http2 backlog=4096 default_server" if index == 0 else f"127.0.0.1:{port}"
        limit = "keepalive_requests 1;" if kind == "once" else "keepalive_requests 1000000000;"
        servers.append(
            f"""    server {{
        listen unix:{sockets[kind]} ssl http2 backlog=4096;
        listen {tcp};
        server_name {name};
        {limit}
        location / {{ return 200 "ok\\n"; }}
    }}"""
        )
    body = "\n".join(servers)
    return f"""{nginx_http_preamble(workdir)}
    default_type text/plain;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_tickets off;
    ssl_session_cache off;
{body}
}}
"""


def h2load_short(target: str, clients: int, count: int, log: Path) -> list[str]:
    """Fa: ``count`` HTTP/1.1 requests over TLS, one per connection, ``clients`` at a time."""
    url = f"https://{TLS_HOSTS['once']}/"
    return ["h2load", "--h1", "-c", str(clients), "-n", str(count), "-m", "1"] + _common(target, log, url)


def h2load_long(target: str, seconds: float, log: Path) -> list[str]:
    """Fb: 4 HTTP/2 connections with 32 concurrent streams each for ``seconds``."""
    url = f"https://{TLS_HOSTS['h2']}/"
    duration = f"{max(1, round(seconds * 1000))}ms"
    cmd = ["h2load", "-c", str(H2_CLIENTS), "-m", str(H2_STREAMS), "-D", duration]
    return cmd + _common(target, log, url)


def _common(target: str, log: Path, url: str) -> list[str]:
    # the URL's host is the SNI and :authority; --connect-to is the proxy's port
    return ["--log-file", str(log), "--connect-to", target, url]


UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_h2load(text: str) -> dict[str, Any]:
    """Seconds and request counts from h2load's summary lines."""
    figures: dict[str, Any] = {}
    for line in text.splitlines():
        if line.startswith("finished in "):
            duration = line.split()[2].rstrip(",")
            number = duration.rstrip("abcdefghijklmnopqrstuvwxyz")
            figures["seconds"] = float(number) * UNITS.get(duration[len(number) :], 1.0)
        elif line.startswith("requests: "):
            for part in line[len("requests: ") :].split(","):
                words = part.split()
                if len(words) == 2 and words[0].isdigit():
                    figures[words[1]] = int(words[0])
        elif line.startswith("status codes: "):
            figures["status"] = line[len("status codes: ") :].strip()
    return figures


def latency_percentiles(log: Path) -> dict[str, float]:
    """p50/p99 in µs of h2load's per-request times (request sent → response end; the
    handshake is not in it), from ``--log-file``; failed streams (status -1) left out."""
    times = []
    try:
        with log.open() as rows:
            for row in rows:
                fields = row.split("\t")
                if len(fields) >= 3 and fields[1] != "-1":
                    times.append(int(fields[2]))
    except (OSError, ValueError):
        return {}
    if not times:
        return {}
    times.sort()
    return {f"p{q}_us": float(times[min(len(times) - 1, len(times) * q // 100)]) for q in (50, 99)}
