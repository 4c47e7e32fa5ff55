"""``fastsni-listen [HOST:]PORT COMMAND [ARG...]``: bind a listening TCP socket, put it
on fd 0 and exec COMMAND (the inetd or s6-tcpserver-socketbinder role, without systemd).
"""

from __future__ import annotations

import os
import socket
import sys

USAGE = """usage: fastsni-listen [HOST:]PORT COMMAND [ARG...]

Bind a listening TCP socket on HOST:PORT (SO_REUSEADDR), place it on fd 0 and exec
COMMAND. HOST is an IPv4 address or a bracketed IPv6 address such as [::1]; without
HOST the socket listens on every address, IPv4 and IPv6 (dual-stack).
Example: fastsni-listen 443 fastsni"""


def parse_address(text: str) -> tuple[str | None, int]:
    """'443' -> (None, 443); '127.0.0.1:443'; '[::1]:443'. Raises ValueError."""
    host: str | None = None
    port_text = text
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected [IPV6]:PORT, got {text!r}")
        socket.inet_pton(socket.AF_INET6, host)
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        socket.inet_pton(socket.AF_INET, host)
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"bad port {port_text!r}")
    return host, int(port_text)


def bind(host: str | None, port: int) -> socket.socket:
    if host is None:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        host = "::"
    else:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(socket.SOMAXCONN)
    return sock


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args in (["--help"], ["-h"]):
        print(USAGE)
        raise SystemExit(0)
    if len(args) < 2:
        sys.stderr.write(USAGE + "\n")
        raise SystemExit(2)
    try:
        host, port = parse_address(args[0])
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"fastsni-listen: {exc}\n{USAGE}\n")
        raise SystemExit(2) from None
    try:
        sock = bind(host, port)
    except OSError as exc:
        sys.stderr.write(f"fastsni-listen: cannot listen on {args[0]}: {exc.strerror}\n")
        raise SystemExit(1) from None
    os.dup2(sock.fileno(), 0)  # dup2 clears FD_CLOEXEC on the copy
    sock.close()
    try:
        os.execvp(args[1], args[1:])
    except OSError as exc:
        sys.stderr.write(f"fastsni-listen: cannot run {args[1]}: {exc.strerror}\n")
        raise SystemExit(127) from None


if __name__ == "__main__":
    main()
