"""Real third-party servers as backends on Unix sockets: nginx and haproxy, each in its
own temporary directory, in the foreground, logging to stderr, reaped at teardown.

They are the PROXY protocol's real consumers: each answers every request with the
client address and port (and the server's) it read from the PROXY header, so a test
checks what an ordinary backend would log, not what our own decoder thinks.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from backends import reap

READY_TIMEOUT = 10.0  # seconds for a server to accept on its socket
NGINX_ANSWER = (
    "$proxy_protocol_addr $proxy_protocol_port $proxy_protocol_server_addr $proxy_protocol_server_port"
)
HAPROXY_ANSWER = "%[src] %[src_port] %[dst] %[dst_port] %[fc_pp_authority]"  # the last: the PP2 TLV


def need(program: str) -> str:
    path = shutil.which(program) or shutil.which(program, path="/usr/sbin:/usr/local/sbin")
    if path is None:
        pytest.skip(f"{program} is not installed (Debian: apt-get install {program})")
    return path


def write_tls_files(ca, name: str, where: Path) -> tuple[Path, Path]:
    """A certificate for ``name`` from the test CA: (chain PEM, key PEM)."""
    cert = ca.issue_cert(name)
    chain, key = where / f"{name}.crt", where / f"{name}.key"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key.write_bytes(cert.private_key_pem.bytes())
    return chain, key


class Servers:
    """Start nginx or haproxy processes; stop() terminates and reaps all of them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.processes: list[subprocess.Popen] = []

    def _start(self, command: list[str], socket_path: Path) -> subprocess.Popen:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.processes.append(process)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:  # bounded: until it accepts on its socket, exits, or the deadline
            if process.poll() is not None:
                raise AssertionError(f"{command[0]} exited: {process.stderr.read().decode(errors='replace')}")
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(str(socket_path))
                return process
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{command[0]} not accepting on {socket_path}") from None
                time.sleep(0.02)

    def nginx(self, socket_path: Path, tls: tuple[Path, Path] | None = None) -> subprocess.Popen:
        """nginx answering ``<proxy client addr> <port> <proxy server addr> <port>``."""
        binary = need("nginx")
        prefix = self.tmp / f"nginx{len(self.processes)}"
        prefix.mkdir()
        ssl = f"ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]};" if tls else ""
        conf = prefix / "nginx.conf"
        conf.write_text(
            f"""
daemon off;
master_process off;
pid {prefix}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    default_type text/plain;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen unix:{socket_path} proxy_protocol{" ssl" if tls else ""};
        {ssl}
        return 200 "{NGINX_ANSWER}\\n";
    }}
}}
"""
        )
        return self._start([binary, "-p", str(prefix), "-e", "stderr", "-c", str(conf)], socket_path)

    def haproxy(self, socket_path: Path, tls_pem: Path | None = None) -> subprocess.Popen:
        """haproxy answering ``<src> <src_port> <dst> <dst_port> <PP2 authority>``."""
        binary = need("haproxy")
        conf = self.tmp / f"haproxy{len(self.processes)}.cfg"
        ssl = f" ssl crt {tls_pem}" if tls_pem else ""
        conf.write_text(
            f"""
global
    maxconn 64
defaults
    mode http
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend proxied
    bind unix@{socket_path} accept-proxy{ssl}
    http-request return status 200 content-type text/plain lf-string "{HAPROXY_ANSWER}\\n"
"""
        )
        return self._start([binary, "-db", "-f", str(conf)], socket_path)

    def stop(self) -> None:
        for process in self.processes:
            reap(process)
            process.stderr.close()


def pem_for_haproxy(chain: Path, key: Path) -> Path:
    """haproxy's ``crt``: the chain and the key in one file."""
    pem = chain.with_suffix(".pem")
    pem.write_bytes(chain.read_bytes() + key.read_bytes())
    os.chmod(pem, 0o600)
    return pem
