"""``fastsni`` / ``python -m fastsni``: route TLS connections on fd 0 by SNI name."""

from __future__ import annotations

import sys

from fastsni import server, twins

SUMMARY = """Route each TLS connection accepted on fd 0 by the server_name of its ClientHello,
undecrypted, to the Unix socket <name>/tls-socket under the current directory, or
*.<rest>/tls-socket if no entry <name> exists (written first: a PROXY v2 header with
the name if <name>/send-proxy-v2 exists, else a v1 line if send-proxy-v1 does). No
options, no configuration: the directory tree is the configuration, looked up afresh
for every connection.
SIGHUP: stop accepting and let open connections finish (up to 10 s). SIGTERM, SIGINT: exit."""


def main(argv: list[str] | None = None) -> None:
    proxy = twins.load("fastsni.proxy", "fastsni._proxy")
    arguments = sys.argv[1:] if argv is None else argv
    server.serve("fastsni", SUMMARY, arguments, proxy, proxy.TlsConnection)


if __name__ == "__main__":
    main()
