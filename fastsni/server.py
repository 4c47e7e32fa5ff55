"""The contract both proxies share: no options, fd 0 is the listening socket (or fd 3 as
systemd passes it natively), the current directory is the hosts directory, SIGHUP drains,
SIGTERM/SIGINT stop.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable
from types import ModuleType

from fastsni import __version__, twins
from fastsni.addresses import describe
from fastsni.confine import confine
from fastsni.logs import failures
from fastsni.ownerlog import counts as owner_log_counts
from fastsni.ownerlog import owner_log
from fastsni.tls import check_hostname

DRAIN_SECONDS = 10.0
DRAIN_POLL = 0.05  # seconds between looks at whether the drain is done
BACKLOG = 65535  # the kernel caps it at net.core.somaxconn; asyncio would use 100
HOW_TO_LISTEN = (
    "pass a listening TCP socket as fd 0 (`fastsni-listen [HOST:]PORT {program}`, "
    "systemd StandardInput=socket, inetd (wait) or s6-tcpserver-socketbinder), "
    "or as fd 3 the way systemd passes sockets natively (LISTEN_FDS=1 and LISTEN_PID=<its pid>: "
    "a socket unit without StandardInput=socket, or `systemd-socket-activate -l PORT {program}`)"
)
SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): the first descriptor systemd passes


class UsageError(SystemExit):
    def __init__(self, message: str) -> None:
        sys.stderr.write(message.rstrip("\n") + "\n")
        super().__init__(2)


def parse_arguments(program: str, summary: str, argv: list[str], twin: str) -> None:
    """Accept no options: --help and --version print and exit 0, anything else exits 2."""
    usage = (
        f"usage: {program} [--help | --version] <&LISTENING_SOCKET\n\n{summary}\n\n"
        + HOW_TO_LISTEN.format(program=program)
    )
    if not argv:
        return
    if argv == ["--help"] or argv == ["-h"]:
        print(usage)
        raise SystemExit(0)
    if argv == ["--version"]:
        print(f"{program} {__version__} ({twin})")
        raise SystemExit(0)
    raise UsageError(f"{program}: takes no arguments, got {' '.join(argv)!r}\n{usage}")


def _what_is(fd: int) -> str:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return "closed"
    if stat.S_ISCHR(mode):
        return "a terminal" if os.isatty(fd) else "a character device"
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISFIFO(mode):
        return "a pipe"
    if stat.S_ISDIR(mode):
        return "a directory"
    if not stat.S_ISSOCK(mode):
        return "not a socket"
    probe = socket.socket(fileno=fd)
    try:
        if probe.family not in (socket.AF_INET, socket.AF_INET6):
            return {socket.AF_UNIX: "a Unix socket"}.get(probe.family, f"a socket of family {probe.family}")
        if probe.type != socket.SOCK_STREAM:
            return "a UDP socket" if probe.type == socket.SOCK_DGRAM else "not a stream socket"
        if not probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return "a TCP socket that is not listening"
        return "listening"
    finally:
        probe.detach()


def passed_descriptor(program: str) -> tuple[int, str]:
    """Where the listening socket is: fd 3 if systemd passed exactly one socket to this
    process (sd_listen_fds(3): LISTEN_FDS=1 and LISTEN_PID equal to our pid), else fd 0.

    The LISTEN_* variables are removed either way, so no child process takes them as its own.
    """
    pid, count = os.environ.pop("LISTEN_PID", None), os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if count is None or pid != str(os.getpid()):
        return 0, "fd 0"
    if count != "1":
        raise UsageError(
            f"{program}: systemd passed LISTEN_FDS={count} sockets; it takes exactly one "
            "(one ListenStream= in the socket unit)"
        )
    return SD_LISTEN_FDS_START, "fd 3 (LISTEN_FDS=1)"


def listening_socket(program: str) -> socket.socket:
    """The passed listening TCP socket, or exit 2 with one line saying what is there instead."""
    fd, name = passed_descriptor(program)
    what = _what_is(fd)
    if what != "listening":
        raise UsageError(
            f"{program}: {name} is {what}, not a listening TCP socket; "
            + HOW_TO_LISTEN.format(program=program)
        )
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


def refuse_root(program: str) -> None:
    """As root, any host owner could point a socket symlink at a root-only socket (such as
    /run/docker.sock) and have the proxy connect to it: exit 2 unless told otherwise."""
    if 0 not in os.getresuid() or os.environ.get("FASTSNI_ALLOW_ROOT", "") not in ("", "0"):
        return
    raise UsageError(
        f"{program}: refusing to run as root: a host owner's symlink could reach any socket root can "
        f"(e.g. /run/docker.sock). Run it as its own user: `fastsni-listen --user USER PORT {program}`, "
        "User= in its systemd unit, or s6-setuidgid; or set FASTSNI_ALLOW_ROOT=1 to run as root anyway"
    )


def hold_hosts(program: str, engine: ModuleType) -> int:
    """Hold the working directory as the hosts tree, or exit 1 with one line saying what
    the kernel lacks: without openat2(2) and /proc/self/fd no connection could be kept
    inside the tree, and there is no weaker mode."""
    try:
        return engine.open_hosts()
    except OSError as exc:
        code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        if exc.filename == "openat2(2)":
            why = (
                f"openat2(2) with RESOLVE_BENEATH failed ({code}): it keeps every backend path inside the "
                "hosts directory; it needs Linux 5.6 or later, and a seccomp filter (a container runtime's, "
                "SystemCallFilter=) must allow openat2"
            )
        elif str(exc.filename).startswith("/proc/"):
            why = f"/proc/self/fd is not there ({code}): backends are connected through it; mount /proc"
        elif exc.errno == errno.EACCES:
            why = (
                f"uid {os.geteuid()} may not search the working directory, the hosts directory (EACCES): "
                "let the proxy's user search it and every directory above it (chmod o+x, or "
                "setfacl -m u:USER:x)"
            )
        else:
            why = f"cannot open the working directory, the hosts directory ({code}): {exc.strerror}"
        sys.stderr.write(f"{program}: {why}; refusing to start\n")
        raise SystemExit(1) from None


def raise_nofile_limit() -> None:
    """Supervisors often leave the soft limit at 1024: take what the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def counters_line(program: str, started: float, live: int, engine: ModuleType, proxy: ModuleType) -> str:
    """The SIGUSR1 line (and the last line of a copy): what this copy of the proxy did
    since it started, as key=value; ``alert_N`` or ``status_N`` each followed by its
    causes (``alert_112_refused``), which add up to it where every cause is known."""
    moved, done = engine.counts(), proxy.counts()
    by_reason = done.pop("alerts", None)
    key = "alert"
    if by_reason is None:
        by_reason, key = done.pop("answered"), "status"
    causes = done.pop("causes")
    up, down = moved["up"] + done.pop("up", 0), moved["down"] + done.pop("down", 0)
    answers = []
    for reason, count in sorted(by_reason.items()):
        answers.append(f"{key}_{reason}={count}")
        prefix = f"{key}_{reason}_"
        answers.extend(f"{name}={value}" for name, value in sorted(causes.items()) if name.startswith(prefix))
    fields = [
        f"pid={os.getpid()}",
        f"uptime={time.monotonic() - started:.0f}s",
        f"accepted={moved['accepted']}",
        f"open={live}",
        *(f"{name}={value}" for name, value in done.items()),
        *(f"{name}={value}" for name, value in owner_log_counts().items()),
        *answers,
        f"bytes_up={up}",
        f"bytes_up_spliced={moved['up_spliced']}",
        f"bytes_down={down}",
        f"bytes_down_spliced={moved['down_spliced']}",
    ]
    return f"{program}: counters " + " ".join(fields) + "\n"


def start_warnings(program: str) -> list[str]:
    """What would make every connection fail, to say after the start line: a hosts
    directory without a single entry a name could be routed to (one the proxy's user
    cannot search is refused by hold_hosts).  Looked at before confinement, which makes
    the tree unreadable."""
    where = os.getcwd()
    try:
        names = os.listdir(".")
    except OSError:
        return []  # searchable but not listable: the entries cannot be counted, and need not be
    for entry in names:
        name = entry[2:] if entry.startswith("*.") else entry
        if check_hostname(name.encode("ascii", "replace")) == name:
            return []
    return [
        f"{program}: warning: the hosts directory {where} has no entry a name could be routed to "
        "(a directory named after a host, holding its socket): every connection will be refused "
        "until one is made (fastsni-deploy, or see the README)\n"
    ]


def serve(program: str, summary: str, argv: list[str], twin: ModuleType, start: Callable) -> None:
    """The contract: arguments, fd 0, limits, the start line, signals, drain, exit 0.

    The proxy runs on the engine (fastsni.engine.Service): ``start(service, fd, peer)``
    serves each accepted descriptor (from ``peer``) with an object that has a ``drain()``
    method for SIGHUP.
    """
    kind = "compiled" if twins.is_compiled(twin) else "pure"
    parse_arguments(program, summary, argv, kind)
    refuse_root(program)
    sock = listening_socket(program)
    sock.listen(BACKLOG)
    # No Nagle stalls (a small write held for the peer's delayed ACK, ~40 ms): accepted
    # sockets inherit TCP_NODELAY from the listening socket on Linux, so one call here.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    raise_nofile_limit()
    engine = twins.load("fastsni.engine", "fastsni._engine")
    hosts = hold_hosts(program, engine)
    service = engine.Service(sock, start)
    service.listener.start()
    loop, live = service.reactor, service.live
    stopping: list[str] = []

    def stop(how: str) -> None:
        if not stopping:
            stopping.append(how)
            loop.stop()

    failures.start(program, loop.call_later)
    warnings = start_warnings(program)
    owner_log.open()
    started = time.monotonic()

    def report() -> None:
        failures.say(counters_line(program, started, len(live), engine, twin))

    loop.add_signal_handler(signal.SIGUSR1, report)
    loop.add_signal_handler(signal.SIGHUP, stop, "drain")
    loop.add_signal_handler(signal.SIGTERM, stop, "now")
    loop.add_signal_handler(signal.SIGINT, stop, "now")
    where = f"listening on {describe(sock.getsockname())} serving {os.getcwd()}"
    engine.enter_proc_fd()  # the tree is held by its descriptor: nothing is named from here any more
    # Last, with everything open that the proxy will ever need (fastsni.confine).
    confined = confine(hosts)
    # The start line comes once every signal is handled: whoever waits for it may signal.
    sys.stderr.write(f"{program} {__version__} ({kind}, epoll) {where}; {confined}\n")
    for warning in warnings:
        failures.say(warning)
    loop.run_forever()
    service.listener.close()
    if stopping == ["drain"]:
        sys.stderr.write(
            f"{program}: SIGHUP: stopped accepting; draining {len(live)} connections for up to "
            f"{DRAIN_SECONDS:g} s\n"
        )
        for connection in list(live):
            connection.drain()  # e.g. close idle keep-alive connections now
        loop.add_signal_handler(signal.SIGTERM, loop.stop)
        loop.add_signal_handler(signal.SIGINT, loop.stop)
        deadline = loop.time() + DRAIN_SECONDS

        def check() -> None:
            if live and loop.time() < deadline:
                loop.call_later(DRAIN_POLL, check)
            else:
                loop.stop()

        check()
        loop.run_forever()
    cut = len(live)
    failures.flush()
    report()  # the last word on what this copy did, for the journal and fastsni-listen
    sys.stderr.write(f"{program}: exiting, {cut} connections cut\n" if cut else f"{program}: exiting\n")
    raise SystemExit(0)
