"""``fastsni-check [options] [NAME...]``: say what the proxies will do with each hosts entry, and why.

One line per finding, with a severity: ``error`` (the proxies cannot serve the entry,
or another owner can take it over), ``warning`` (it works today but something is
fragile or unreachable), ``info`` (what the proxies will do: PROXY headers,
wildcards, probe results).  A clean tree prints nothing.  Exit status 1 when any
error was found, 2 for bad usage, else 0.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import pwd
import stat
import sys
import time
from dataclasses import asdict, dataclass

from fastsni import probe, tree
from fastsni.tls import MAX_HOSTNAME

DNS_MAX_LABEL = 63  # RFC 1035 §2.3.4: labels are 63 octets or less
CONNECT_TIMEOUT = 2.0
ERROR, WARNING, INFO = "error", "warning", "info"
TREE = "."  # the entry name of findings about the hosts directory itself


@dataclass(frozen=True)
class Finding:
    severity: str
    entry: str
    code: str
    message: str

    def line(self) -> str:
        return f"{self.severity}: {self.entry}: {self.message} [{self.code}]"


@dataclass(frozen=True)
class User:
    """Whose permissions the proxy connects with."""

    uid: int
    gids: tuple[int, ...]
    name: str


def user_named(text: str) -> User:
    try:
        record = pwd.getpwuid(int(text)) if text.isdigit() else pwd.getpwnam(text)
    except KeyError:
        if text.isdigit():
            return User(int(text), (int(text),), f"uid {text}")
        raise ValueError(f"no user {text!r}") from None
    gids = tuple(os.getgrouplist(record.pw_name, record.pw_gid))
    return User(record.pw_uid, gids, record.pw_name)


def user_of(pid: int) -> User:
    """The effective uid and groups of a running process, from /proc/PID/status."""
    fields = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value.split()
    uid = int(fields["Uid"][1])
    gids = tuple({int(fields["Gid"][1]), *(int(gid) for gid in fields.get("Groups", []))})
    return User(uid, gids, f"{tree.user_name(uid)} (the proxy, pid {pid})")


def invoking_user() -> User:
    uid = os.geteuid()
    return User(uid, tuple({os.getegid(), *os.getgroups()}), tree.user_name(uid))


def connect_errors(paths: list[str], user: User) -> dict[str, int]:
    """errno of connecting to each socket as ``user`` (0: connected).

    As that user itself: just connect.  As root for someone else: connect in a forked
    child that took the user's uid and groups, so the kernel's own checks (modes, ACLs,
    every directory on the way) decide.  Otherwise: the mode bits say (see _mode_errno).
    """
    if user.uid == os.geteuid():
        return {path: _connect_errno(path) for path in paths}
    if os.geteuid() != 0:
        return {path: _mode_errno(path, user) for path in paths}
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become the user, connect, report, exit
        code = 1
        try:
            os.close(reader)
            os.setgroups(list(user.gids))
            os.setgid(user.gids[0])
            os.setuid(user.uid)
            os.write(writer, json.dumps({path: _connect_errno(path) for path in paths}).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(writer)
    with os.fdopen(reader, "rb") as results:
        data = results.read()
    os.waitpid(pid, 0)
    if not data:
        raise OSError(errno.EPERM, f"could not take the identity of {user.name}")
    return json.loads(data)


def _connect_errno(path: str) -> int:
    try:
        probe.connect_unix(path, CONNECT_TIMEOUT).close()
    except OSError as exc:
        return exc.errno or errno.EIO
    return 0


def _mode_errno(path: str, user: User) -> int:
    """Unprivileged and asked about another user: search permission on each directory and
    write permission on the socket (POSIX.1-2017 §4.5), from the mode bits alone."""
    parts = os.path.realpath(path).split(os.sep)
    for depth in range(1, len(parts) + 1):
        current = os.sep.join(parts[:depth]) or os.sep
        try:
            info = os.stat(current)
        except OSError as exc:
            return exc.errno or errno.EIO
        wanted = 0o2 if depth == len(parts) else 0o1
        if user.uid == info.st_uid:
            allowed = info.st_mode >> 6 & wanted
        elif info.st_gid in user.gids:
            allowed = info.st_mode >> 3 & wanted
        else:
            allowed = info.st_mode & wanted
        if not allowed:
            return errno.EACCES
    return _connect_errno(path)  # the modes allow it: whether anyone listens


PROTECTED_SYMLINKS = "/proc/sys/fs/protected_symlinks"


def symlinks_protected() -> bool:
    """Whether fs.protected_symlinks is 1 (the default of Debian and most distributions):
    then a symlink in a sticky world-writable directory is followed only by its owner,
    or when the directory's owner owns it (proc(5), protected_symlinks)."""
    try:
        with open(PROTECTED_SYMLINKS) as sysctl:
            return sysctl.read().strip() == "1"
    except OSError:
        return False


def who_can_write(mode: int) -> str | None:
    if mode & 0o002:
        return "everyone"
    if mode & 0o020:
        return "its group"
    return None


def dns_problems(entry: str) -> list[str]:
    labels = entry.split(".")[1:] if entry.startswith(tree.WILDCARD) else entry.split(".")
    problems = []
    for label in labels:
        if len(label) > DNS_MAX_LABEL:
            problems.append(f"label {label[:20]}... is {len(label)} bytes, over DNS's {DNS_MAX_LABEL}")
        if label.endswith("-"):
            problems.append(f"label {label!r} ends with '-', which a DNS hostname cannot")
    return problems


class Checker:
    def __init__(self, hosts: str, user: User, options: probe.ProbeOptions | None) -> None:
        self.hosts = hosts  # may be /proc/PID/cwd, so it is never resolved for access
        self.root = os.path.realpath(hosts)  # for inside-the-tree tests
        self.user = user
        self.options = options
        self.findings: list[Finding] = []
        self.sockets: list[tuple[str, str]] = []  # (entry, socket path): connected to once, at the end
        self.owner = -1  # of the hosts directory
        self.protected = False  # its symlinks fall under fs.protected_symlinks (see check_tree)

    def add(self, severity: str, entry: str, code: str, message: str) -> None:
        self.findings.append(Finding(severity, entry, code, message))

    def check_tree(self) -> None:
        info = os.stat(self.hosts)
        self.owner = info.st_uid
        sticky_for_all = info.st_mode & stat.S_ISVTX and info.st_mode & stat.S_IWOTH
        self.protected = bool(sticky_for_all) and symlinks_protected()
        writers = who_can_write(info.st_mode)
        if writers and not info.st_mode & stat.S_ISVTX:
            self.add(
                ERROR,
                TREE,
                "hosts-writable",
                f"{self.root} is writable by {writers} without the sticky bit: any of them can rename "
                f"or replace other owners' entries (chmod +t {self.root})",
            )

    def entries(self) -> list[str]:
        return sorted(entry for entry in os.listdir(self.hosts) if not tree.is_private(entry))

    def check_names(self, names: list[str]) -> None:
        present = set(os.listdir(self.hosts))
        for raw in names:
            try:
                entry = tree.entry_name(raw)
            except ValueError as exc:
                self.add(ERROR, raw, "bad-name", f"no client can ask for it: {exc}")
                continue
            if raw != entry and raw in present:
                self.check_entry(raw)
            if entry in present:
                self.check_entry(entry)
                continue
            wildcard = self.covering_wildcard(entry, present)
            if wildcard:
                self.add(INFO, entry, "wildcard-served", f"no entry of its own: {wildcard} serves it")
                self.check_entry(wildcard)
            else:
                self.add(
                    ERROR, entry, "no-entry", f"no entry {entry}: fastsni answers alert 112, fasthttpdir 404"
                )

    @staticmethod
    def covering_wildcard(entry: str, present: set[str]) -> str | None:
        if entry.startswith(tree.WILDCARD) or "." not in entry:
            return None
        wildcard = tree.WILDCARD + entry.split(".", 1)[1]
        return wildcard if wildcard in present else None

    def check_entry(self, entry: str) -> None:
        try:
            self.check_entry_as_is(entry)
        except OSError as exc:
            where = f" {exc.filename}" if exc.filename else ""
            self.add(WARNING, entry, "cannot-inspect", f"cannot inspect{where}: {exc.strerror}; run as root")

    def check_entry_as_is(self, entry: str) -> None:
        if not self.check_name(entry):
            return
        path = os.path.join(self.hosts, entry)
        directory = self.check_link(entry, path)
        if directory is None:
            return
        self.check_owner(entry, path)
        self.check_writable(entry, directory)
        self.check_sockets(entry, directory)
        self.check_proxy_header(entry, directory)
        if entry.startswith(tree.WILDCARD):
            self.describe_wildcard(entry)

    def check_name(self, entry: str) -> bool:
        """Whether the proxies can look ``entry`` up at all; says what it should be called if not."""
        if tree.routable(entry):
            for problem in dns_problems(entry):
                self.add(
                    WARNING,
                    entry,
                    "not-in-dns",
                    f"the proxies accept it, but no client can send it: {problem}",
                )
            return True
        try:
            proper = tree.entry_name(entry)
        except ValueError as exc:
            self.add(ERROR, entry, "bad-name", f"never served, no client name maps to it: {exc}")
            return False
        if len(proper) > MAX_HOSTNAME:
            self.add(ERROR, entry, "bad-name", f"never served: over {MAX_HOSTNAME} bytes")
        else:
            self.add(
                ERROR,
                entry,
                "bad-name",
                f"never served: the proxies ask for {proper!r}; rename it to {proper!r}",
            )
        return False

    def check_link(self, entry: str, path: str) -> str | None:
        """The directory the entry resolves to, or None (with an error) when there is none."""
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            text = os.readlink(path)
            if self.protected and info.st_uid not in (self.user.uid, self.owner):
                self.add(
                    ERROR,
                    entry,
                    "link-protected",
                    f"the proxies ({self.user.name}) may not follow the symlink -> {text}: "
                    f"fs.protected_symlinks is 1 and {self.root} is sticky and writable by everyone, "
                    "where only a symlink owned by its follower or by the directory's owner is followed "
                    f"(they get EACCES: alert 112 / 503); use chmod 1775 {self.root} with a group of "
                    "site owners",
                )
                return None
            try:
                os.stat(path)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    self.add(ERROR, entry, "link-loop", f"the symlink -> {text} loops: the proxies get ELOOP")
                else:
                    self.add(
                        ERROR, entry, "dangling-link", f"the symlink -> {text} leads nowhere ({exc.strerror})"
                    )
                return None
            if os.path.isabs(text):
                self.add(
                    WARNING,
                    entry,
                    "absolute-link",
                    f"the symlink -> {text} is absolute: it breaks when the tree is moved, bind-mounted "
                    f"or chrooted; use {os.path.relpath(os.path.realpath(path), self.root)}",
                )
            resolved = os.path.realpath(path)
            if not tree.inside(resolved, self.root):
                self.add(
                    WARNING,
                    entry,
                    "outside-tree",
                    f"the symlink -> {text} resolves to {resolved}, outside the hosts tree: it breaks "
                    "when the tree is moved, bind-mounted or chrooted",
                )
        if not os.path.isdir(path):
            self.add(ERROR, entry, "not-directory", "not a directory: the proxies get ENOTDIR (112 / 404)")
            return None
        return path

    def check_owner(self, entry: str, path: str) -> None:
        """An entry under another owner's domain: in a sticky directory anyone may claim
        www.alice.example while alice owns alice.example, and get a certificate for it."""
        labels = entry.split(".")
        for depth in range(1, len(labels)):
            parent = ".".join(labels[depth:])
            try:
                parent_uid = os.lstat(os.path.join(self.hosts, parent)).st_uid
            except FileNotFoundError:
                continue
            uid = os.lstat(path).st_uid
            if uid != parent_uid:
                self.add(
                    WARNING,
                    entry,
                    "other-owner",
                    f"owned by {tree.user_name(uid)} but {parent} by {tree.user_name(parent_uid)}: a name "
                    "under someone's domain can get a real certificate (ACME tls-alpn-01) once it is served; "
                    "if that is not intended, remove it",
                )
            return

    def check_writable(self, entry: str, directory: str) -> None:
        """Directories on the way to the sockets that someone other than their owner can change."""
        resolved = os.path.realpath(directory)
        chain = [resolved]
        while tree.inside(os.path.dirname(chain[-1]), self.root) and os.path.dirname(chain[-1]) != self.root:
            chain.append(os.path.dirname(chain[-1]))
        for position, current in enumerate(chain):
            mode = os.stat(current).st_mode
            writers = who_can_write(mode)
            if writers is None:
                continue
            sticky = mode & stat.S_ISVTX
            where = "its socket directory" if position == 0 else "a directory on its way"
            if not sticky:
                severity = ERROR if mode & 0o002 else WARNING
                self.add(
                    severity,
                    entry,
                    "writable",
                    f"{where} {current} is writable by {writers}: they can replace its sockets "
                    f"(chmod go-w {current})",
                )
            elif position == 0:
                self.add(
                    WARNING,
                    entry,
                    "writable",
                    f"{where} {current} is writable by {writers} (sticky): they can add a missing socket "
                    f"or a send-proxy file (chmod go-w {current})",
                )

    def check_sockets(self, entry: str, directory: str) -> None:
        found = False
        for leaf in probe.LEAVES:
            path = os.path.join(directory, leaf)
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                continue
            found = True
            if stat.S_ISLNK(info.st_mode):
                try:
                    info = os.stat(path)
                except OSError as exc:
                    self.add(
                        ERROR,
                        entry,
                        "dangling-link",
                        f"{leaf} is a symlink that leads nowhere ({exc.strerror})",
                    )
                    continue
            if not stat.S_ISSOCK(info.st_mode):
                self.add(
                    ERROR, entry, "not-socket", f"{leaf} is not a socket: connecting fails (ECONNREFUSED)"
                )
                continue
            self.sockets.append((entry, path))
        if not found:
            self.add(
                ERROR,
                entry,
                "no-socket",
                "neither tls-socket nor http-socket: fastsni answers 112, fasthttpdir 404",
            )

    def check_proxy_header(self, entry: str, directory: str) -> None:
        v1 = os.path.lexists(os.path.join(directory, "send-proxy-v1"))
        v2 = os.path.lexists(os.path.join(directory, "send-proxy-v2"))
        if v1 and v2:
            self.add(
                INFO,
                entry,
                "proxy-header",
                "send-proxy-v1 and send-proxy-v2 both exist: v2 wins, a PROXY v2 header",
            )
        elif v2:
            self.add(INFO, entry, "proxy-header", "each backend connection starts with a PROXY v2 header")
        elif v1:
            self.add(INFO, entry, "proxy-header", "each backend connection starts with a PROXY v1 line")

    def describe_wildcard(self, entry: str) -> None:
        base = entry[len(tree.WILDCARD) :]
        exact = [
            name
            for name in self.entries()
            if name.endswith("." + base) and name.count(".") == base.count(".") + 1
        ]
        exact = [name for name in exact if name != entry]
        shadowed = f"; these have their own entry, which wins: {', '.join(exact)}" if exact else ""
        self.add(
            INFO,
            entry,
            "wildcard",
            f"serves every name of one more label in front of {base} (e.g. www.{base}; "
            f"not a.b.{base}, not {base}){shadowed}",
        )

    def check_connections(self) -> None:
        """Connect to every socket found as the proxy's user; probe the ones that answer."""
        if not self.sockets:
            return
        errors = connect_errors([path for _, path in self.sockets], self.user)
        deadline = time.monotonic() + (self.options.timeout if self.options else 0)
        for entry, path in self.sockets:
            leaf = os.path.basename(path)
            code = errors[path]
            if code == errno.ECONNREFUSED:
                self.add(ERROR, entry, "stale-socket", f"nobody listens on {leaf} (connection refused)")
            elif code in (errno.EACCES, errno.EPERM):
                mode = stat.filemode(os.stat(path).st_mode)
                self.add(
                    ERROR,
                    entry,
                    "no-access",
                    f"{self.user.name} cannot connect to {leaf} ({mode}; a connect needs write "
                    "permission on the socket and search on every directory above it): give the proxy's "
                    f"group write access (chgrp GROUP {leaf}; chmod g+w {leaf}, or umask 002 for the "
                    f"backend) or an ACL (setfacl -m u:{self.user.name.split()[0]}:rw {leaf})",
                )
            elif code:
                self.add(ERROR, entry, "connect-failed", f"connecting to {leaf} fails: {os.strerror(code)}")
            elif self.options is not None:
                try:
                    result = probe.probe(path, probe.probe_name(entry), self.options, deadline)
                except probe.ProbeFailed as exc:
                    self.add(ERROR, entry, "probe-failed", str(exc))
                else:
                    self.add(INFO, entry, "probe-ok", f"probe {leaf}: ok, {result}")


def check_process(pid: int, hosts: str | None) -> tuple[str, list[Finding]]:
    """--pid: the tree a running proxy really serves (its working directory is a handle)."""
    cwd = f"/proc/{pid}/cwd"
    findings = []
    try:
        shown = os.readlink(cwd)
    except OSError as exc:
        raise ValueError(f"cannot see process {pid}'s working directory: {exc.strerror}") from None
    if shown.endswith(" (deleted)"):
        findings.append(
            Finding(
                ERROR,
                TREE,
                "deleted-tree",
                f"process {pid} serves the deleted directory {shown[: -len(' (deleted)')]}: every "
                "connection fails; restart it in the hosts directory",
            )
        )
        return hosts or cwd, findings
    if hosts is None:
        return cwd, findings
    mine, theirs = os.stat(hosts), os.stat(cwd)
    if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
        findings.append(
            Finding(
                ERROR,
                TREE,
                "other-tree",
                f"process {pid} serves {shown}, not {os.path.realpath(hosts)}: its working directory is "
                "a handle, so a renamed tree stays served (mv hosts hosts.old && mkdir hosts); restart it",
            )
        )
    return hosts, findings


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fastsni-check",
        usage="fastsni-check [options] [NAME...]",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "names", metavar="NAME", nargs="*", help="check only these names (default: every entry)"
    )
    parser.add_argument(
        "--hosts", metavar="DIR", help="the hosts directory (default: . or, with --pid, the proxy's)"
    )
    parser.add_argument("--json", action="store_true", help="print the findings as one JSON document")
    parser.add_argument(
        "--user", help="the proxy's user, for the connect test (default: with --pid its user, else yours)"
    )
    parser.add_argument(
        "--pid", type=int, help="a running proxy: check the tree it really serves, as its user"
    )
    parser.add_argument("--probe", action="store_true", help="also probe each socket as fastsni-deploy does")
    probe.add_arguments(parser, timeout=5)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    try:
        findings = check(args)
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"fastsni-check: {exc}\n")
        raise SystemExit(2) from None
    if args.json:
        print(json.dumps({"findings": [asdict(finding) for finding in findings]}, indent=1))
    else:
        for finding in findings:
            print(finding.line())
    errors = sum(finding.severity == ERROR for finding in findings)
    warnings = sum(finding.severity == WARNING for finding in findings)
    sys.stderr.write(f"fastsni-check: {errors} error(s), {warnings} warning(s)\n")
    if os.geteuid() == 0 and args.user is None and args.pid is None:
        sys.stderr.write("fastsni-check: connected as root; --user or --pid to test as the proxy's user\n")
    raise SystemExit(1 if errors else 0)


def check(args: argparse.Namespace) -> list[Finding]:
    findings: list[Finding] = []
    hosts = args.hosts
    if args.pid is not None:
        hosts, findings = check_process(args.pid, hosts)
        if any(finding.code == "deleted-tree" for finding in findings) and args.hosts is None:
            return findings
    hosts = hosts or "."
    if not os.path.isdir(hosts):
        raise ValueError(f"{hosts} is not a directory")
    if args.user is not None:
        user = user_named(args.user)
    elif args.pid is not None:
        user = user_of(args.pid)
    else:
        user = invoking_user()
    checker = Checker(hosts, user, probe.options_from(args) if args.probe else None)
    checker.findings = findings
    checker.check_tree()
    if args.names:
        checker.check_names(args.names)
    else:
        for entry in checker.entries():
            checker.check_entry(entry)
    checker.check_connections()
    first = {}
    for index, finding in enumerate(checker.findings):
        first.setdefault(finding.entry, index)
    return sorted(checker.findings, key=lambda finding: first[finding.entry])  # grouped by entry


if __name__ == "__main__":
    main()
