"""The proxies compared by perf/bench.py and their equivalent configurations: one
worker, frontend on 127.0.0.1:PORT, route echo.test and bulk.test (and F's once.test and
h2.test) by SNI to Unix sockets, no access log."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from perf_tls import TLS_HOSTS, nginx_http_preamble

NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


@dataclass(frozen=True)
class Peer:
    name: str
    kind: str  # fastsni, nginx, haproxy, sniproxy, uvloop (perf/uvloop_relay.py) or direct (no proxy)
    binary: str | None
    workloads: tuple[str, ...] = ("D", "A", "B", "C", "Cb", "F")
    variant: str = ""


PEERS = [
    Peer("fastsni", "fastsni", None),
    Peer("fastsni-pure", "fastsni", None, variant="pure"),
    Peer("nginx", "nginx", "nginx"),
    Peer("haproxy", "haproxy", "haproxy"),
    Peer("sniproxy", "sniproxy", "sniproxy"),
    Peer("direct", "direct", None, ("A", "B", "C", "Cb", "F")),  # F: the TLS backend's TCP port
    Peer("uvloop-relay", "uvloop", None, ("D", "A", "B", "C", "Cb")),  # the design card's shape
    Peer("asyncio-relay", "uvloop", None, ("D", "A", "B", "C", "Cb"), "asyncio"),  # the same on stock asyncio
    Peer("nginx-buf256k", "nginx", "nginx", ("C", "Cb"), "buf256k"),
    Peer("haproxy-splice", "haproxy", "haproxy", ("C", "Cb"), "splice"),
    Peer("fasthttpdir", "fasthttpdir", None, ("E",)),
    # Self-confinement off (FASTSNI_NO_CONFINE=1): what the seccomp filter and Landlock cost.
    Peer("fastsni-unconfined", "fastsni", None, ("A", "B"), "unconfined"),
    Peer("fasthttpdir-unconfined", "fasthttpdir", None, ("E",), "unconfined"),
    Peer("fasthttpdir-pure", "fasthttpdir", None, ("E",), "pure"),
    Peer("nginx-http", "nginx", "nginx", ("E",), "http"),
    Peer("haproxy-http", "haproxy", "haproxy", ("E",), "http"),
    # fasthttpdir connects to the backend afresh for each client connection (each one looks
    # its backend up anew, and may carry its own PROXY header): these two do the same.
    Peer("nginx-http-fresh", "nginx", "nginx", ("E",), "http-fresh"),
    Peer("haproxy-http-fresh", "haproxy", "haproxy", ("E",), "http-fresh"),
]


def write_peer_config(peer: Peer, workdir: Path, port: int, sockets: dict[str, Path]) -> None:
    routes = {
        "echo.test": sockets["echo"],
        "bulk.test": sockets["source"],
        "bulk1m.test": sockets["source-1m"],
    }
    routes.update({name: sockets[kind] for kind, name in TLS_HOSTS.items() if kind in sockets})  # F
    if peer.variant.startswith("http"):
        routes = {"echo.test": sockets["http"]}
    writer = {"nginx": nginx_config, "haproxy": haproxy_config, "sniproxy": sniproxy_config}.get(peer.kind)
    if writer is not None:
        (workdir / f"{peer.kind}.conf").write_text(writer(peer, workdir, port, routes))


def peer_command(peer: Peer, workdir: Path, port: int, hosts: Path) -> tuple[list[str], dict[str, str], Path]:
    """(argv, extra environment, working directory) of a peer running in the foreground."""
    conf = str(workdir / f"{peer.kind}.conf")
    if peer.kind in ("fastsni", "fasthttpdir"):
        env = {"FASTSNI_NO_EXTENSIONS": "1" if peer.variant == "pure" else "0", "FASTSNI_ALLOW_ROOT": "1"}
        env["FASTSNI_NO_CONFINE"] = "1" if peer.variant == "unconfined" else "0"
        python = sys.executable
        return [python, "-m", "fastsni.listen", f"127.0.0.1:{port}", python, "-m", peer.kind], env, hosts
    if peer.kind == "uvloop":
        relay = str(Path(__file__).resolve().parent / "uvloop_relay.py")
        python = sys.executable
        loop = [peer.variant] if peer.variant else []
        return [python, "-m", "fastsni.listen", f"127.0.0.1:{port}", python, relay, *loop], {}, hosts
    if peer.kind == "nginx":
        return ["nginx", "-p", f"{workdir}/", "-c", conf, "-e", str(workdir / "error.log")], {}, workdir
    if peer.kind == "haproxy":
        return ["haproxy", "-db", "-f", conf], {}, workdir
    if peer.kind == "sniproxy":
        return ["sniproxy", "-f", "-c", conf], {}, workdir
    raise ValueError(peer.kind)


def nginx_config(peer: Peer, workdir: Path, port: int, routes: dict[str, Path]) -> str:
    if peer.variant.startswith("http"):
        return nginx_http_config(workdir, port, routes, peer.variant == "http")
    buffer = "proxy_buffer_size 256k;" if peer.variant == "buf256k" else ""
    entries = "\n".join(f"        {name} unix:{path};" for name, path in routes.items())
    return f"""load_module {NGINX_STREAM_MODULE};
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
worker_rlimit_nofile 19000;
events {{ worker_connections 18000; }}
stream {{
    map $ssl_preread_server_name $backend {{
{entries}
        default unix:{workdir}/nobody.sock;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        ssl_preread on;
        proxy_pass $backend;
        {buffer}
    }}
}}
"""


def haproxy_config(peer: Peer, workdir: Path, port: int, routes: dict[str, Path]) -> str:
    """mode tcp, use_backend by req.ssl_sni (variant "splice": splice-auto); variant "http":
    mode http, use_backend by Host, default connection reuse to the backend ("http-fresh":
    http-reuse never, one backend connection per client connection)."""
    http = peer.variant.startswith("http")
    match = "hdr(host)" if http else "req.ssl_sni"
    rules = "\n".join(
        f"    use_backend be_{name.split('.')[0]} if {{ {match} -i {name} }}" for name in routes
    )
    backends = "\n".join(
        f"backend be_{name.split('.')[0]}\n    server s1 unix@{path}\n" for name, path in routes.items()
    )
    options = "    option splice-auto\n" if peer.variant == "splice" else ""
    if peer.variant == "http-fresh":
        options = "    http-reuse never\n"
    inspect = (
        ""
        if http
        else "    backlog 4096\n    tcp-request inspect-delay 5s\n"
        "    tcp-request content accept if { req.ssl_hello_type 1 }\n"
    )
    return f"""global
    nbthread 1
    maxconn 7000
    pidfile {workdir}/haproxy.pid

defaults
    mode {"http" if http else "tcp"}
    timeout connect 5s
    timeout client 120s
    timeout server 120s
{options}
frontend fe
    bind 127.0.0.1:{port} defer-accept
{inspect}{rules}

{backends}"""


def sniproxy_config(peer: Peer, workdir: Path, port: int, routes: dict[str, Path]) -> str:
    del peer
    entries = "\n".join(f"    ^{name}$ unix:{path}" for name, path in routes.items())
    return f"""pidfile {workdir}/sniproxy.pid

error_log {{
    filename {workdir}/error.log
    priority notice
}}

listener 127.0.0.1:{port} {{
    protocol tls
    table bench
}}

table bench {{
{entries}
}}
"""


def nginx_http_config(workdir: Path, port: int, routes: dict[str, Path], pooled: bool = True) -> str:
    """HTTP/1.1 reverse proxy by Host, keep-alive to the backend (32 idle upstream connections),
    or (``pooled`` false) a new upstream connection for each request."""
    keepalive = " keepalive 32;" if pooled else ""
    upstreams = "\n".join(
        f"    upstream u_{name.split('.')[0]} {{ server unix:{path};{keepalive} }}"
        for name, path in routes.items()
    )
    entries = "\n".join(f"        {name} u_{name.split('.')[0]};" for name in routes)
    return f"""{nginx_http_preamble(workdir)}
{upstreams}
    map $host $backend {{
{entries}
        default u_{next(iter(routes)).split(".")[0]};
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096 deferred;
        location / {{
            proxy_pass http://$backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
