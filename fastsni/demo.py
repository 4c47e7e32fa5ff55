"""``fastsni-demo [--once]``: fastsni and fasthttpdir on loopback ports in front of sample backends.

Makes a temporary hosts directory with ``demo.localhost/tls-socket`` served by a
small HTTPS server (a self-signed certificate made with the openssl command) and
``demo.localhost/http-socket`` served by a small HTTP server, starts fastsni and
fasthttpdir on 127.0.0.1 with that directory as their current directory, fetches one
page through each to show they work, prints the curl lines that reach them, and keeps
serving until Ctrl-C or SIGTERM (with --once: exits after the checks).  Everything is
removed at exit.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

NAME = "demo.localhost"


def make_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-days", "2", "-subj", f"/CN={NAME}", "-addext", f"subjectAltName=DNS:{NAME}"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The sample backends: one HTTP/1.1 response per connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        writer.close()
        return
    tls = writer.get_extra_info("ssl_object")
    if tls is not None:
        body = f"Hello from the {NAME} backend: TLS {tls.version()} ended here, not in fastsni.\n".encode()
    else:
        forwarded = [line for line in head.split(b"\r\n") if line.lower().startswith(b"x-forwarded-for:")]
        body = f"Hello from the {NAME} HTTP backend via fasthttpdir ({forwarded[0].decode()}).\n".encode()
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    writer.close()


def fetch(port: int, cert: Path | None) -> str:
    """GET / from demo.localhost on a loopback port, over TLS when ``cert`` is given."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        conn = (
            ssl.create_default_context(cafile=str(cert)).wrap_socket(raw, server_hostname=NAME)
            if cert
            else raw
        )
        with conn:
            conn.sendall(f"GET / HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
    return data.decode(errors="replace").split("\r\n\r\n", 1)[-1]


async def start(program: str, hosts: Path) -> tuple[asyncio.subprocess.Process, int]:
    """Start ``program`` with a listening socket on a free loopback port as fd 0."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    # The demo's hosts directory is its own private temporary one, so no host owner can
    # abuse a proxy running as root there: let it (the proxies refuse root elsewhere).
    env = dict(os.environ, FASTSNI_ALLOW_ROOT="1")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", program, stdin=listener.fileno(), cwd=hosts, env=env
    )
    listener.close()
    return process, port


async def run(once: bool) -> int:
    # SIGTERM (and SIGINT) cancel the demo, so its proxies are stopped and its files removed.
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    with tempfile.TemporaryDirectory(prefix="fastsni-demo-") as temporary:
        top = Path(temporary)
        cert, key = make_certificate(top)
        hosts = top / "hosts"
        (hosts / NAME).mkdir(parents=True)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        context.set_alpn_protocols(["http/1.1"])
        backends = [
            await asyncio.start_unix_server(answer, str(hosts / NAME / "tls-socket"), ssl=context),
            await asyncio.start_unix_server(answer, str(hosts / NAME / "http-socket")),
        ]
        proxies = {program: await start(program, hosts) for program in ("fastsni", "fasthttpdir")}
        try:
            tls_port, http_port = proxies["fastsni"][1], proxies["fasthttpdir"][1]
            body = await asyncio.to_thread(fetch, tls_port, cert)
            print(f"fetched through fastsni: {body.strip()}", flush=True)
            body = await asyncio.to_thread(fetch, http_port, None)
            print(f"fetched through fasthttpdir: {body.strip()}", flush=True)
            print(
                f"\nhosts directory: {hosts}\ntry:  curl --cacert {cert} "
                f"--resolve {NAME}:{tls_port}:127.0.0.1 https://{NAME}:{tls_port}/\n"
                f"      curl --resolve {NAME}:{http_port}:127.0.0.1 http://{NAME}:{http_port}/",
                flush=True,
            )
            if not once:
                print("Ctrl-C stops the demo.", flush=True)
                await asyncio.wait([asyncio.ensure_future(p.wait()) for p, _ in proxies.values()])
        finally:
            for process, _ in proxies.values():
                if process.returncode is None:
                    process.terminate()
                    await process.wait()
            for backend in backends:
                backend.close()
    return 0


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["--once"]):
        sys.stderr.write("usage: fastsni-demo [--once]\n")
        raise SystemExit(2)
    try:
        raise SystemExit(asyncio.run(run(once=bool(args))))
    except (KeyboardInterrupt, asyncio.CancelledError):
        raise SystemExit(0) from None


if __name__ == "__main__":
    main()
