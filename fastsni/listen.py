"""``fastsni-listen [OPTIONS] [HOST:]PORT COMMAND [ARG...]``: bind a listening TCP socket
and give it to COMMAND on fd 0 (the inetd or s6-tcpserver-socketbinder role, without
systemd), optionally as another user (the s6-setuidgid role).

Without --copies or --cpus it execs COMMAND, which then *is* the process you started.
With them it stays as the socket holder: it keeps the listening socket, runs that many
copies of COMMAND on it, passes signals on, restarts a copy that dies, and on SIGHUP
replaces every copy with a fresh one (a newly installed version takes over) without
refusing a connection.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pwd
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from fastsni import __version__, metrics
from fastsni.addresses import describe
from fastsni.engine import ignore_signal

USAGE = """usage: fastsni-listen [--user USER] [--copies N] [--cpus LIST] [--metrics FILE]
                      [HOST:]PORT COMMAND [ARG...]

Bind a listening TCP socket on HOST:PORT (SO_REUSEADDR, TCP_DEFER_ACCEPT 1 s) and give it
to COMMAND on fd 0.
HOST is an IPv4 address, a bracketed IPv6 address such as [::1], or a name such as
localhost (the first address getaddrinfo gives is bound: COMMAND gets one socket);
without HOST the socket listens on every address, IPv4 and IPv6 (dual-stack).

  --user USER   after binding, become USER with USER's groups (initgroups, setgid,
                setuid), e.g. to bind port 443 as root and serve as an unprivileged user
  --copies N    stay as the socket holder and run N copies of COMMAND on the socket:
                SIGTERM/SIGINT stop them all, SIGUSR1 is passed on, a copy that dies is
                restarted (after 1 s, doubling up to 30 s while it keeps dying), and
                SIGHUP starts N fresh copies, waits until each has printed its
                "listening on" line, then sends SIGHUP to the old ones, which drain;
                SIGUSR1 also writes the counters of all copies added up, including
                those that exited since the start (their last line)
  --cpus LIST   pin copy i to the i-th CPU of LIST (e.g. 0,1 or 0-3); implies
                --copies with one copy per CPU
  --metrics FILE  with --copies or --cpus: every 15 s, ask the copies for their
                counters and write the totals to FILE in the Prometheus text format
                (atomically: for node_exporter's textfile collector, FILE ending .prom)

Without --copies or --cpus, fastsni-listen execs COMMAND in its place.
Examples: fastsni-listen --user fastsni 443 fastsni
          fastsni-listen --user fastsni --cpus 0,1 443 fastsni"""

USAGE_LINE = " ".join(part.strip() for part in USAGE.splitlines()[:2])
READY_TEXT = b"listening on"  # both proxies' start line: "<program> <version> (...) listening on ..."
READY_TIMEOUT = 30.0  # seconds a new copy has to print it before an upgrade is abandoned
RESTART_DELAY = 1.0  # seconds before a copy that died is started again ...
RESTART_DELAY_MAX = 30.0  # ... doubling while it keeps dying, up to this
STABLE_AFTER = 60.0  # a copy that ran this long before dying starts the doubling afresh
STOP_TIMEOUT = 15.0  # seconds copies have to exit after SIGTERM/SIGINT before SIGKILL
ANSWER_TIMEOUT = 2.0  # seconds copies have to answer SIGUSR1 before the totals are written anyway
METRICS_EVERY = 15.0  # seconds between two --metrics files
LINE_MAX = 65536  # bytes of a copy's unfinished stderr line held before it is passed on anyway
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
LIBC = ctypes.CDLL(None, use_errno=True)


class UsageError(ValueError):
    """A bad command line: exit 2 with the message and the usage."""


@dataclass
class Options:
    address: str
    command: list[str]
    user: str | None = None
    copies: int | None = None  # None: exec COMMAND (no supervision)
    cpus: list[int] | None = None
    metrics: str | None = None  # where to write the Prometheus text, with copies


def parse_cpus(text: str) -> list[int]:
    """'0,1' or '0-3' or '0,2-3' -> CPU numbers in that order, each one available to us."""
    cpus: list[int] = []
    for part in text.split(","):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise UsageError(f"--cpus {text!r}: expected CPU numbers like 0,1 or 0-3")
        cpus.extend(range(int(first), int(last if dash else first) + 1))
    original = os.sched_getaffinity(0)
    try:
        for cpu in cpus:  # the kernel knows which CPUs exist and which the cpuset allows
            try:
                os.sched_setaffinity(0, {cpu})
            except OSError:
                raise UsageError(
                    f"--cpus: CPU {cpu} is not available here (CPUs: 0-{os.cpu_count() - 1})"
                ) from None
    finally:
        os.sched_setaffinity(0, original)
    if len(set(cpus)) != len(cpus):
        raise UsageError(f"--cpus {text!r} names a CPU twice: give one CPU per copy")
    return cpus


def parse_arguments(args: list[str]) -> Options:
    """Options first, then [HOST:]PORT and COMMAND; '--' ends the options."""
    values: dict[str, str] = {}
    while args and args[0].startswith("--") and args[0] != "--":
        name, equals, value = args[0][2:].partition("=")
        if name not in ("user", "copies", "cpus", "metrics"):
            raise UsageError(f"unknown option {args[0]!r}")
        if not equals:
            if len(args) < 2:
                raise UsageError(f"--{name} needs a value")
            value, args = args[1], args[1:]
        values[name] = value
        args = args[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    if len(args) < 2:
        raise UsageError("expected [HOST:]PORT and a COMMAND")
    options = Options(address=args[0], command=args[1:], user=values.get("user"))
    options.metrics = values.get("metrics")
    if "cpus" in values:
        options.cpus = parse_cpus(values["cpus"])
        options.copies = len(options.cpus)
    if "copies" in values:
        copies = values["copies"]
        if not copies.isdigit() or not 1 <= int(copies) <= 1024:
            raise UsageError(f"--copies {copies!r}: expected a number from 1 to 1024")
        if options.cpus is not None and int(copies) != len(options.cpus):
            raise UsageError(
                f"--copies {copies} with {len(options.cpus)} CPUs in --cpus: give one CPU per copy"
            )
        options.copies = int(copies)
    if options.metrics is not None and options.copies is None:
        raise UsageError("--metrics needs --copies or --cpus: without them fastsni-listen execs COMMAND")
    return options


def parse_address(text: str) -> tuple[str | None, int]:
    """'443' -> (None, 443); '127.0.0.1:443', 'localhost:443' -> (host, 443); '[::1]:443' -> ('::1', 443)."""
    host: str | None = None
    port_text = text
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise UsageError(f"expected [IPV6]:PORT, got {text!r}")
        try:
            socket.inet_pton(socket.AF_INET6, host)
        except OSError:
            raise UsageError(f"{host!r} in brackets is not an IPv6 address") from None
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        if ":" in host:
            raise UsageError(f"an IPv6 address goes in brackets: [{host}]:{port_text}")
        if not host:
            raise UsageError(f"expected HOST:PORT or PORT, got {text!r}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"bad port {port_text!r}: expected a number from 0 to 65535")
    return host, int(port_text)


def resolve(host: str | None, port: int) -> tuple[socket.AddressFamily, tuple]:
    """The one address to bind: every address (dual-stack) without HOST, else the first
    address getaddrinfo gives for HOST (RFC 6724 order, /etc/gai.conf), said on stderr
    when HOST has several."""
    if host is None:
        return socket.AF_INET6, ("::", port)
    try:
        answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"cannot resolve {host!r}: {exc.strerror}; HOST is an address or a name") from None
    family, _, _, _, sockaddr = answers[0]
    others = sorted({answer[4][0] for answer in answers} - {sockaddr[0]})
    if others:
        sys.stderr.write(
            f"fastsni-listen: {host} is also {', '.join(others)}; listening on {sockaddr[0]} only "
            "(COMMAND gets one socket: name an address to choose)\n"
        )
    return family, sockaddr


def unprivileged_port_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as setting:
            return int(setting.read())
    except (OSError, ValueError):
        return 1024


DEFER_ACCEPT_SECONDS = 1  # as nginx's `deferred` and haproxy's `defer-accept`


def bind(family: socket.AddressFamily, sockaddr: tuple) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6 and sockaddr[0] == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # tcp(7) TCP_DEFER_ACCEPT: TLS and HTTP clients speak first, so a connection is
        # handed over with its first bytes and the proxy's read at accept finds them; a
        # client that stays silent is handed over after one SYN-ACK retransmit (~1 s).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_SECONDS)
        sock.bind(sockaddr)
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return sock


def explain_bind_error(exc: OSError, port: int) -> str:
    """What to do next, for the errors an operator meets."""
    if exc.errno == errno.EACCES and port < unprivileged_port_start():
        return (
            f"ports below {unprivileged_port_start()} need privilege "
            "(net.ipv4.ip_unprivileged_port_start). Either run fastsni-listen as root with "
            "--user USER (it binds, then becomes USER), or allow the port: "
            f"`sysctl net.ipv4.ip_unprivileged_port_start={port}`, or CAP_NET_BIND_SERVICE "
            "(systemd AmbientCapabilities=, or setcap on a dedicated interpreter), "
            "or let systemd bind it (a .socket unit with StandardInput=socket)"
        )
    if exc.errno == errno.EADDRINUSE:
        return (
            "another socket listens there (`ss -ltnp`). To run several copies on one socket "
            "use --copies; to upgrade them, send SIGHUP to that fastsni-listen"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return "no interface of this machine has that address"
    return ""


def drop_privileges(user: str) -> None:
    """Become ``user`` with its supplementary groups, for good (the s6-setuidgid role)."""
    entry = pwd.getpwnam(user)
    os.initgroups(entry.pw_name, entry.pw_gid)  # setgroups(2) from /etc/group
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)  # as root this sets real, effective and saved uid
    if os.getresuid() != (entry.pw_uid,) * 3 or os.getresgid() != (entry.pw_gid,) * 3:
        raise SystemExit(
            f"fastsni-listen: --user {user}: uids {os.getresuid()}, gids {os.getresgid()} remain"
        )
    for regain in (os.setuid, os.setgid):
        try:
            regain(0)
        except PermissionError:
            continue
        raise SystemExit(f"fastsni-listen: --user {user}: could become root again; refusing to go on")


def check_user(user: str) -> None:
    """Before binding: the user exists, is not root, and we may become it."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise UsageError(
            f"--user {user}: no such user; create one for the proxy, e.g. "
            f"`useradd --system --no-create-home --shell /usr/sbin/nologin {user}`"
        ) from None
    if entry.pw_uid == 0:
        raise UsageError(f"--user {user}: that is root; name the unprivileged user the proxy should run as")
    if os.geteuid() != 0:
        raise UsageError(
            f"--user {user}: only root can change user; start fastsni-listen as root "
            f"(it drops to {user} right after binding) or leave --user out"
        )


@dataclass
class Copy:
    """One running copy of COMMAND."""

    process: subprocess.Popen
    slot: int  # which of the N places it fills (and which CPU of --cpus it runs on)
    started: float
    ready: bool = False  # it printed its "listening on" line
    line: bytearray = field(default_factory=bytearray)  # the unfinished stderr line


class Supervisor:
    """The socket holder: N copies of COMMAND on one listening socket.

    One loop over a selector: each copy's stderr (passed on line by line to ours, and
    watched for the start line), and the pipe the C-level signal handler writes each
    signal's number to.  Reaping is on SIGCHLD.
    """

    def __init__(
        self,
        sock: socket.socket,
        command: list[str],
        copies: int,
        cpus: list[int] | None,
        metrics_file: str | None = None,
    ) -> None:
        self.sock = sock
        self.metrics_file = metrics_file
        self.counted: dict[int, tuple[str, dict[str, int]]] = {}  # pid -> its latest counters line
        self.exited_totals: dict[str, dict[str, int]] = {}  # program -> last lines of exited copies
        self.exited_copies: dict[str, int] = {}
        self.asked: set[int] = set()  # copies asked for counters that have not answered yet
        self.asked_deadline = 0.0
        self.loud = False  # the operator asked (SIGUSR1): pass their lines on, write the totals
        self.metrics_due = time.monotonic() + 1.0 if metrics_file else None
        self.command = command
        self.copies = copies
        self.cpus = cpus
        self.selector = selectors.DefaultSelector()
        self.serving: list[Copy | None] = [None] * copies  # per slot
        self.upgrade: list[Copy] | None = None  # the next generation, while it starts
        self.upgrade_deadline = 0.0
        self.old: list[Copy] = []  # told to drain or stop, not yet exited
        self.failures = [0] * copies  # per slot: deaths in a row, for the restart delay
        self.restart_at: dict[int, float] = {}  # slot -> when to start it again
        self.announced = False
        self.stop_deadline: float | None = None  # set by SIGTERM/SIGINT
        self.wakeup, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        self.selector.register(self.wakeup, selectors.EVENT_READ, None)
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGUSR1):
            signal.signal(signum, ignore_signal)

    # -- starting copies

    def spawn(self, slot: int) -> Copy:
        """Start a copy of COMMAND with the socket on fd 0, pinned if --cpus; OSError if it cannot run."""
        cpu = None if self.cpus is None else self.cpus[slot]
        holder = os.getpid()

        def in_the_child() -> None:  # between fork and exec
            # The copy's stderr is a pipe to us: should we die, it could not even log.
            # prctl(2) PR_SET_PDEATHSIG: our death sends it SIGTERM.
            LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if os.getppid() != holder:  # we died before prctl
                os._exit(1)
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})

        try:
            process = subprocess.Popen(
                self.command, stdin=self.sock.fileno(), stderr=subprocess.PIPE, preexec_fn=in_the_child
            )
        except subprocess.SubprocessError:  # sched_setaffinity failed in the child
            raise OSError(errno.EINVAL, f"cannot run it on CPU {cpu}") from None
        os.set_blocking(process.stderr.fileno(), False)
        copy = Copy(process, slot, time.monotonic())
        self.selector.register(process.stderr.fileno(), selectors.EVENT_READ, copy)
        return copy

    def start(self) -> None:
        """The first copies; OSError (after stopping those already started) if COMMAND cannot run."""
        try:
            for slot in range(self.copies):
                self.serving[slot] = self.spawn(slot)
        except OSError:
            for copy in self.all_copies():
                self.kill(copy, signal.SIGKILL)
                copy.process.wait()
            raise

    def start_upgrade(self) -> None:
        if self.upgrade is not None:
            self.say("SIGHUP: an upgrade is already under way; ignored")
            return
        self.say(f"SIGHUP: starting {count_copies(self.copies)} of {shlex.join(self.command)}")
        started: list[Copy] = []
        try:
            for slot in range(self.copies):
                started.append(self.spawn(slot))
        except OSError as exc:
            self.say(f"cannot run {self.command[0]}: {exc.strerror}; the old copies keep serving")
            self.stop_copies(started, signal.SIGTERM)
            return
        self.upgrade = started
        self.upgrade_deadline = time.monotonic() + READY_TIMEOUT

    def finish_upgrade(self) -> None:
        """Every new copy accepts: the old ones drain (SIGHUP) and exit on their own."""
        new, self.upgrade = self.upgrade, None
        old = [copy for copy in self.serving if copy is not None]
        for copy in new:
            self.serving[copy.slot] = copy
            self.restart_at.pop(copy.slot, None)
        self.say(f"new copies {self.pids(new)} ready; SIGHUP to old copies {self.pids(old)}, which drain")
        self.stop_copies(old, signal.SIGHUP)

    def abandon_upgrade(self, why: str) -> None:
        new, self.upgrade = self.upgrade, None
        self.say(f"upgrade abandoned: {why}; the old copies keep serving")
        self.stop_copies(new, signal.SIGTERM)

    def stop_copies(self, copies: list[Copy], signum: int) -> None:
        """Send ``signum``; their exit is expected (no restart)."""
        for copy in copies:
            if copy not in self.old:
                self.old.append(copy)
            self.kill(copy, signum)

    def kill(self, copy: Copy, signum: int) -> None:
        if copy.process.returncode is None:
            try:
                copy.process.send_signal(signum)
            except ProcessLookupError:
                pass

    # -- what happens to copies

    def read_stderr(self, copy: Copy) -> None:
        """Pass the copy's complete lines on to our stderr; note its start line."""
        fd = copy.process.stderr.fileno()
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        if chunk:
            copy.line += chunk
            end = copy.line.rfind(b"\n") + 1
            if not end and len(copy.line) >= LINE_MAX:
                end = len(copy.line)
        else:  # EOF: the copy closed its stderr (it is exiting)
            self.selector.unregister(fd)
            copy.process.stderr.close()
            if copy.line and not copy.line.endswith(b"\n"):
                copy.line += b"\n"
            end = len(copy.line)
        if end:
            lines, copy.line = bytes(copy.line[:end]), copy.line[end:]
            write_all(2, self.take_counters(copy, lines))
            if self.asked_deadline and not self.asked:
                self.answered()  # after the last copy's line, which it adds up
            if not copy.ready and READY_TEXT in lines:
                copy.ready = True
                self.became_ready(copy)
        if not chunk:
            self.retire(copy)

    # -- counters

    def take_counters(self, copy: Copy, lines: bytes) -> bytes:
        """Note each counters line of ``copy``; what to pass on (all but the ones a
        --metrics poll asked for)."""
        if b" counters " not in lines:
            return lines
        kept = []
        for text in lines.splitlines(keepends=True):
            parsed = metrics.parse(text.decode("utf-8", "replace"))
            if parsed is None:
                kept.append(text)
                continue
            self.counted[copy.process.pid] = parsed
            if self.loud or copy.process.pid not in self.asked:
                kept.append(text)
            self.asked.discard(copy.process.pid)
        return b"".join(kept)

    def retire(self, copy: Copy) -> None:
        """A copy closed its stderr (it exits): its last counters line stays in the totals."""
        self.asked.discard(copy.process.pid)
        known = self.counted.pop(copy.process.pid, None)
        if known is not None:
            program, fields = known
            metrics.add(self.exited_totals.setdefault(program, {}), {**fields, "open": 0})
            self.exited_copies[program] = self.exited_copies.get(program, 0) + 1
        if self.asked_deadline and not self.asked:
            self.answered()

    def ask_counters(self, loud: bool) -> None:
        """SIGUSR1 to every copy that handles it (ready); the totals once all answered."""
        self.loud = self.loud or loud
        ready = [copy for copy in self.all_copies() if copy.ready and copy.process.returncode is None]
        for copy in ready:
            self.kill(copy, signal.SIGUSR1)
            self.asked.add(copy.process.pid)
        self.asked_deadline = time.monotonic() + ANSWER_TIMEOUT
        if not self.asked:
            self.answered()

    def answered(self) -> None:
        """Every copy asked has answered (or the time is up): the totals line, the file."""
        loud, self.loud = self.loud, False
        self.asked.clear()
        self.asked_deadline = 0.0
        totals = self.totals()
        if loud:
            for program, fields in sorted(totals.items()):
                text = " ".join(f"{key}={value}" for key, value in fields.items())
                self.say(f"{program} totals {text}")
        if self.metrics_file is not None:
            self.write_metrics(totals)

    def totals(self) -> dict[str, dict[str, int]]:
        """Per program: the copies running (their latest lines) and those that exited."""
        totals: dict[str, dict[str, int]] = {}
        running: dict[str, int] = {}
        for program, fields in self.counted.values():
            metrics.add(totals.setdefault(program, {}), fields)
            running[program] = running.get(program, 0) + 1
        for program, fields in self.exited_totals.items():
            metrics.add(totals.setdefault(program, {}), fields)
        return {
            program: {
                "copies": running.get(program, 0),
                "exited": self.exited_copies.get(program, 0),
                **fields,
            }
            for program, fields in totals.items()
        }

    def write_metrics(self, totals: dict[str, dict[str, int]]) -> None:
        """The Prometheus text, written beside FILE and renamed over it (never half a file)."""
        text = "".join(metrics.exposition(program, fields) for program, fields in sorted(totals.items()))
        path = self.metrics_file
        temporary = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}")
        try:
            with open(temporary, "w") as out:
                out.write(text)
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)
        except OSError as exc:
            self.say(f"--metrics {path}: {exc.strerror}; trying again in {METRICS_EVERY:g} s")

    def became_ready(self, copy: Copy) -> None:
        if self.upgrade is not None and copy in self.upgrade:
            if all(new.ready for new in self.upgrade):
                self.finish_upgrade()
        elif not self.announced and all(c is not None and c.ready for c in self.serving):
            self.announced = True
            self.say(
                f"{count_copies(self.copies)} of {shlex.join(self.command)} serving "
                f"{describe(self.sock.getsockname())}: {self.pids(self.serving)}"
            )

    def reap(self) -> None:
        for copy in self.all_copies():
            status = copy.process.poll()
            if status is not None:
                self.exited(copy, status)

    def exited(self, copy: Copy, status: int) -> None:
        how = (
            f"was killed by {signal.Signals(-status).name}" if status < 0 else f"exited with status {status}"
        )
        stopping = self.stop_deadline is not None
        if copy in self.old:
            self.old.remove(copy)
            if not stopping:
                self.say(f"old copy {copy.process.pid} {how}")
        elif self.upgrade is not None and copy in self.upgrade:
            self.upgrade.remove(copy)
            if not stopping:
                self.abandon_upgrade(f"new copy {copy.process.pid} {how} before it was ready")
        else:
            self.serving[copy.slot] = None
            if not stopping:
                self.restart_later(copy, how)

    def restart_later(self, copy: Copy, how: str) -> None:
        """An unexpected exit: start that slot again after 1 s, doubling while it keeps dying."""
        lived = time.monotonic() - copy.started
        self.failures[copy.slot] = 1 if lived >= STABLE_AFTER else self.failures[copy.slot] + 1
        delay = min(RESTART_DELAY_MAX, RESTART_DELAY * 2 ** (self.failures[copy.slot] - 1))
        self.say(f"copy {copy.process.pid} {how}; starting another in {delay:g} s")
        self.restart_at[copy.slot] = time.monotonic() + delay

    def restart_due(self, now: float) -> None:
        for slot, when in list(self.restart_at.items()):
            if when <= now:
                del self.restart_at[slot]
                try:
                    self.serving[slot] = self.spawn(slot)
                except OSError as exc:
                    self.failures[slot] += 1
                    self.restart_at[slot] = now + RESTART_DELAY_MAX
                    self.say(
                        f"cannot run {self.command[0]}: {exc.strerror}; again in {RESTART_DELAY_MAX:g} s"
                    )

    # -- signals

    def handle_signals(self) -> None:
        try:
            numbers = os.read(self.wakeup, 512)
        except BlockingIOError:
            return
        for signum in numbers:
            if signum == signal.SIGHUP and self.stop_deadline is None:
                self.start_upgrade()
            elif signum in (signal.SIGTERM, signal.SIGINT):
                if self.stop_deadline is None:
                    self.stop_deadline = time.monotonic() + STOP_TIMEOUT
                    self.restart_at.clear()
                for copy in self.all_copies():
                    self.kill(copy, signum)
            elif signum == signal.SIGUSR1:
                self.ask_counters(loud=True)

    # -- the loop

    def run(self) -> int:
        """Until SIGTERM/SIGINT and every copy has exited: returns 0."""
        while True:
            now = time.monotonic()
            if self.stop_deadline is not None:
                if not self.all_copies():
                    if self.metrics_file is not None:
                        self.write_metrics(self.totals())
                    self.say("every copy has exited; exiting")
                    return 0
                if now >= self.stop_deadline:
                    for copy in self.all_copies():
                        self.kill(copy, signal.SIGKILL)
                    self.stop_deadline = now + STOP_TIMEOUT
            if self.upgrade is not None and now >= self.upgrade_deadline:
                waiting = self.pids(copy for copy in self.upgrade if not copy.ready)
                self.abandon_upgrade(f"{waiting} said no {READY_TEXT.decode()!r} within {READY_TIMEOUT:g} s")
            self.restart_due(now)
            if self.asked_deadline and now >= self.asked_deadline:
                self.answered()  # some copy did not answer: the totals as far as known
            if self.metrics_due is not None and now >= self.metrics_due and not self.asked_deadline:
                self.metrics_due = now + METRICS_EVERY
                self.ask_counters(loud=False)
            for key, _ in self.selector.select(self.timeout(now)):
                if key.data is None:
                    self.handle_signals()
                else:
                    self.read_stderr(key.data)
            self.reap()

    def timeout(self, now: float) -> float | None:
        deadlines = list(self.restart_at.values())
        if self.upgrade is not None:
            deadlines.append(self.upgrade_deadline)
        if self.stop_deadline is not None:
            deadlines.append(self.stop_deadline)
        if self.asked_deadline:
            deadlines.append(self.asked_deadline)
        if self.metrics_due is not None:
            deadlines.append(self.metrics_due)
        return max(0.0, min(deadlines) - now) if deadlines else None

    def all_copies(self) -> list[Copy]:
        copies = [copy for copy in self.serving if copy is not None] + self.old
        return copies + (self.upgrade or [])

    @staticmethod
    def pids(copies) -> str:
        return ", ".join(str(copy.process.pid) for copy in copies if copy is not None)

    @staticmethod
    def say(message: str) -> None:
        write_all(2, f"fastsni-listen: {message}\n".encode())


def count_copies(count: int) -> str:
    return "1 copy" if count == 1 else f"{count} copies"


def write_all(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data) :]
    except OSError:
        pass  # our stderr is gone: the copies keep serving


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args in (["--help"], ["-h"]):
        print(USAGE)
        raise SystemExit(0)
    if args == ["--version"]:
        print(f"fastsni-listen {__version__}")
        raise SystemExit(0)
    try:
        options = parse_arguments(args)
        if options.user is not None:
            check_user(options.user)
        host, port = parse_address(options.address)
        family, sockaddr = resolve(host, port)
    except UsageError as exc:
        sys.stderr.write(f"fastsni-listen: {exc}\n{USAGE_LINE}\n(fastsni-listen --help says more)\n")
        raise SystemExit(2) from None
    try:
        sock = bind(family, sockaddr)
    except OSError as exc:
        advice = explain_bind_error(exc, port)
        sys.stderr.write(
            f"fastsni-listen: cannot listen on {options.address}: {exc.strerror}"
            + (f"; {advice}\n" if advice else "\n")
        )
        raise SystemExit(1) from None
    if options.user is not None:
        drop_privileges(options.user)
    if options.copies is None:
        exec_command(sock, options.command)
    supervisor = Supervisor(sock, options.command, options.copies, options.cpus, options.metrics)
    try:
        supervisor.start()
    except OSError as exc:  # later failures (restarts, upgrades) are said and retried
        sys.stderr.write(f"fastsni-listen: cannot run {options.command[0]}: {exc.strerror}\n")
        raise SystemExit(127) from None
    raise SystemExit(supervisor.run())


def exec_command(sock: socket.socket, command: list[str]) -> None:
    os.dup2(sock.fileno(), 0)  # dup2 clears FD_CLOEXEC on the copy
    sock.close()
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        sys.stderr.write(f"fastsni-listen: cannot run {command[0]}: {exc.strerror}\n")
        raise SystemExit(127) from None


if __name__ == "__main__":
    main()
