"""``fasthttpdir`` / ``python -m fasthttpdir``: route HTTP/1.1 requests on fd 0 by Host."""

from __future__ import annotations

import sys

from fastsni import server, twins

SUMMARY = """Route each HTTP/1.1 request accepted on fd 0 by its Host header to the Unix socket
<name>/http-socket under the current directory, or *.<rest>/http-socket if no entry
<name> exists (each new backend connection starts with a PROXY v2 header if
<name>/send-proxy-v2 exists, else a v1 line if send-proxy-v1 does), adding
X-Forwarded-For; a host with only a tls-socket gets a 308 redirect to https.
No options, no configuration: the directory tree is the configuration, looked up
afresh for every backend connection. SIGHUP: stop accepting and let open connections
finish (up to 10 s). SIGTERM, SIGINT: exit."""


def main(argv: list[str] | None = None) -> None:
    proxy = twins.load("fasthttpdir.proxy", "fasthttpdir._http")
    arguments = sys.argv[1:] if argv is None else argv
    server.serve("fasthttpdir", SUMMARY, arguments, proxy, proxy.HttpConnection)


if __name__ == "__main__":
    main()
