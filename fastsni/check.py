"""``fastsni-check [options] [NAME...]``: say what the proxies will do with each hosts entry, and why.

One line per finding, with a severity: ``error`` (the proxies cannot serve the entry,
another owner can take it over, or its owner's log socket gets no line), ``warning``
(it works today but something is fragile or unreachable), ``info`` (what the proxies
will do: PROXY headers, wildcards, redirects to https, the owner's log, probe
results).  A clean tree prints nothing.  Exit status 1 when any error was found, 2 for
bad usage, else 0.

Paths are resolved as the proxies resolve them (fastsni.engine): beneath the hosts
directory with openat2(2), so a link that leads out of the tree is not followed, and a
socket counts only if the entry's owner or root owns it (or root owns the entry).  An
entry's ``log-socket`` (fastsni.ownerlog) is checked as its backend sockets are, with
codes of its own (``log-...``), and connected to as the datagram socket it must be.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import pwd
import socket
import stat
import sys
import time
from dataclasses import asdict, dataclass

from fastsni import engine, ownerlog, probe, tree
from fastsni.tls import MAX_HOSTNAME

DNS_MAX_LABEL = 63  # RFC 1035 §2.3.4: labels are 63 octets or less
CONNECT_TIMEOUT = 2.0
ERROR, WARNING, INFO = "error", "warning", "info"
TREE = "."  # the entry name of findings about the hosts directory itself
PATH_ONLY = os.O_PATH | os.O_CLOEXEC  # how the proxies open what they resolve
ABSENT = frozenset((errno.ENOENT, errno.ENOTDIR))  # no http-socket: fasthttpdir's 308 if a tls-socket is
LOG = ownerlog.LEAF  # the owner's log socket: a fault costs its lines, not the entry
LOGGED = f"each connection (fastsni) or request (fasthttpdir) is logged to {LOG}"
# A log socket the proxies find but cannot send to (the errno of a datagram connect):
# (severity, code, message).  EACCES is no-access's, as for the backend sockets.
LOG_FAULTS = {
    errno.ECONNREFUSED: (
        WARNING,
        "log-unbound",
        f"nobody has bound {LOG} (sendto gets ECONNREFUSED): the proxies drop this entry's lines "
        "(counted as owner_log_dropped); start its receiver: remove the file and bind it with "
        "socket.SOCK_DGRAM",
    ),
    errno.EPROTOTYPE: (
        ERROR,
        "log-not-datagram",
        f"{LOG} is not a datagram socket (a stream or seqpacket one: sendto gets EPROTOTYPE), so the "
        "proxies drop every line; bind it with socket.SOCK_DGRAM (socat: UNIX-RECV)",
    ),
}


def code_of(leaf: str | None, code: str) -> str:
    """A finding's code: ``log-`` in front for the log socket, whose faults leave the entry served."""
    return f"log-{code}" if leaf == LOG else code


def lost(leaf: str | None, answer: str) -> str:
    """What the proxies do when they cannot use ``leaf``: the client gets ``answer``, or
    for the log socket, a line is lost."""
    return "no line is sent to it" if leaf == LOG else answer


def binder(leaf: str | None) -> str:
    """What binds ``leaf``, in the fixes."""
    return "receiver (with socket.SOCK_DGRAM)" if leaf == LOG else "backend"


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


def connect_errors(hosts: int, targets: list[str], user: User) -> dict[str, int]:
    """errno of connecting to each ``<entry>/<leaf>`` of ``targets`` as ``user`` (0:
    connected), the proxies' way: resolved beneath the hosts directory ``hosts`` (an
    O_PATH descriptor), connected through /proc/self/fd/N.

    As that user itself: just connect.  As root for someone else: connect in a forked
    child that took the user's uid and groups, so the kernel's own checks (modes, ACLs,
    every directory on the way, fs.protected_symlinks) decide.  Nobody else can take
    another user's identity: see Checker.check_connections.
    """
    if user.uid == os.geteuid():
        return {target: _connect_errno(hosts, target) for target in targets}
    if os.geteuid() != 0:
        raise PermissionError(errno.EPERM, f"only root can connect as {user.name}")
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become the user, connect, report, exit
        code = 1
        try:
            os.close(reader)
            os.setgroups(list(user.gids))
            os.setgid(user.gids[0])
            os.setuid(user.uid)
            results = {target: _connect_errno(hosts, target) for target in targets}
            os.write(writer, json.dumps(results).encode())
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


def _connect_errno(hosts: int, target: str) -> int:
    try:
        path = engine.openat2(hosts, target, PATH_ONLY, engine.BENEATH)
    except OSError as exc:
        return exc.errno or errno.EIO
    try:
        _connect(f"/proc/self/fd/{path}", os.path.basename(target))
    except OSError as exc:
        return exc.errno or errno.EIO
    finally:
        os.close(path)
    return 0


def _connect(path: str, leaf: str) -> None:
    """Connect to ``path`` as the proxies use ``leaf``: a stream to a backend; for the log
    socket a datagram socket, which a connect checks as each sendto(2) would (its
    permission, a receiver bound, of its type) without sending the owner a line."""
    if leaf != LOG:
        probe.connect_unix(path, CONNECT_TIMEOUT).close()
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(path)


PROTECTED_SYMLINKS = "/proc/sys/fs/protected_symlinks"


def symlinks_protected() -> bool:
    """Whether fs.protected_symlinks is 1 (the default of Debian and most distributions):
    then a symlink in a sticky world-writable directory, when it is the last component of
    a path, is followed only by its owner or when the directory's owner owns it (proc(5),
    protected_symlinks; fs/namei.c applies it to trailing links only)."""
    try:
        with open(PROTECTED_SYMLINKS) as sysctl:
            return sysctl.read().strip() == "1"
    except OSError:
        return False


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
        self.fd = os.open(hosts, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)  # as the proxies hold it
        self.root = self.where(self.fd)  # for messages and inside-the-tree tests
        self.user = user
        self.proxy = tree.login(user.uid) if user.uid else "fastsni"  # in the commands suggested
        self.options = options
        self.findings: list[Finding] = []
        self.sockets: list[tuple[str, str, int]] = []  # (entry, leaf, mode): connected to once, at the end
        self.protected = symlinks_protected()
        self.areas: set[str] = set()  # release areas already looked at

    def close(self) -> None:
        os.close(self.fd)

    def add(self, severity: str, entry: str, code: str, message: str) -> None:
        self.findings.append(Finding(severity, entry, code, message))

    def beneath(self, path: str, flags: int = 0) -> int:
        """An O_PATH descriptor of ``path`` resolved as the proxies resolve it, beneath the
        hosts directory (OSError EXDEV: it leads out of the tree)."""
        return engine.openat2(self.fd, path, PATH_ONLY | flags, engine.BENEATH)

    def present(self, path: str) -> bool:
        """Whether ``path`` exists beneath the tree, itself (a dangling symlink too), as the
        proxies look the send-proxy markers up."""
        try:
            os.close(self.beneath(path, os.O_NOFOLLOW))
        except OSError:
            return False
        return True

    @staticmethod
    def where(fd: int) -> str:
        """The absolute path the kernel resolved descriptor ``fd`` to."""
        return os.readlink(f"/proc/self/fd/{fd}")

    def shown(self, path: str) -> str:
        """``path`` (absolute, inside the tree) as the tree names it, for messages."""
        return os.path.relpath(path, self.root)

    def untrusted_writers(self, path: str, info: os.stat_result) -> list[str]:
        """Who may change directory ``path`` other than its owner, root and the proxy's
        user (a group counts unless every member is one of those)."""
        return tree.other_writers(path, info, {0, info.st_uid, self.user.uid})

    def check_tree(self) -> None:
        info = os.fstat(self.fd)
        others = self.untrusted_writers(self.root, info)
        if others and not info.st_mode & stat.S_ISVTX:
            self.add(
                ERROR,
                TREE,
                "hosts-writable",
                f"{self.root} is writable by {', '.join(others)} without the sticky bit: any of them can "
                f"rename or replace other owners' entries (chmod +t {self.root})",
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
            wildcard = None if entry.startswith(tree.WILDCARD) else engine.wildcard_of(entry)
            if wildcard in present:
                self.add(INFO, entry, "wildcard-served", f"no entry of its own: {wildcard} serves it")
                self.check_entry(wildcard)
            else:
                self.add(
                    ERROR, entry, "no-entry", f"no entry {entry}: fastsni answers alert 112, fasthttpdir 404"
                )

    def check_entry(self, entry: str) -> None:
        try:
            self.check_entry_as_is(entry)
        except OSError as exc:
            where = f" {exc.filename}" if exc.filename else ""
            self.add(WARNING, entry, "cannot-inspect", f"cannot inspect{where}: {exc.strerror}; run as root")

    def check_entry_as_is(self, entry: str) -> None:
        if not self.check_name(entry):
            return
        owner = os.stat(entry, dir_fd=self.fd, follow_symlinks=False).st_uid  # a symlink's own
        directory = self.resolve_entry(entry)
        if directory is None:
            return
        try:
            self.check_owner(entry, owner)
            self.check_target(entry, owner, directory)
            self.check_area(entry, owner, directory)
            socket_directories = self.check_sockets(entry, owner, directory)
            self.check_writable(entry, owner, [self.where(directory), *socket_directories])
            self.check_proxy_header(entry)
        finally:
            os.close(directory)
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

    def resolve_entry(self, entry: str) -> int | None:
        """An O_PATH descriptor of the directory ``entry`` leads to, reached as the proxies
        reach it (``<entry>/<leaf>``: never as the last component, so fs.protected_symlinks
        does not apply to it); None, with an error, when there is none."""
        try:
            return self.beneath(f"{entry}/.", os.O_DIRECTORY)
        except OSError as exc:
            failed = exc
        if failed.errno == errno.ENOTDIR:
            self.add(ERROR, entry, "not-directory", "not a directory: the proxies get ENOTDIR (112 / 404)")
            return None
        info = os.stat(entry, dir_fd=self.fd, follow_symlinks=False)
        text = os.readlink(entry, dir_fd=self.fd) if stat.S_ISLNK(info.st_mode) else None
        if not self.not_followed(entry, "the symlink", text, self.root, failed):
            raise failed
        return None

    def not_followed(
        self, entry: str, link: str, text: str | None, directory: str, exc: OSError, leaf: str | None = None
    ) -> bool:
        """Report why the proxies follow no path through ``link`` (its target ``text``, in
        the resolved ``directory``; on the way to ``leaf``, if not to the entry itself): out
        of the tree, a loop, or nothing there.  False for any other error."""
        described = f"{link} -> {text}" if text is not None else link
        if exc.errno == errno.EXDEV:
            self.leads_outside(entry, described, text, directory, leaf)
        elif exc.errno == errno.ELOOP:
            self.add(
                ERROR,
                entry,
                code_of(leaf, "link-loop"),
                f"{described} loops, or passes too many links: "
                f"the proxies get ELOOP ({lost(leaf, '112 / 404')})",
            )
        elif exc.errno in ABSENT:
            self.add(
                ERROR, entry, code_of(leaf, "dangling-link"), f"{described} leads nowhere ({exc.strerror})"
            )
        else:
            return False
        return True

    def leads_outside(
        self, entry: str, described: str, text: str | None, directory: str, leaf: str | None
    ) -> None:
        """A path the proxies will not follow (EXDEV), and the fix: a relative link to the
        same place if it lies inside the tree, else a move into the tree; never a path out."""
        why, target = "a symlink on its way leads out", None
        if text is not None:
            real = os.path.realpath(os.path.join(directory, text))
            written = os.path.normpath(os.path.join(directory, text))  # keeps links such as NAME
            climbed = os.path.normpath(os.path.join(self.shown(directory), text))
            if os.path.isabs(text):
                why = "an absolute link"
            elif climbed == os.pardir or climbed.startswith(os.pardir + os.sep):
                why = "its .. climbs above the hosts directory"
            if tree.inside(real, self.root) and os.path.exists(real):
                same = tree.inside(written, self.root) and os.path.realpath(written) == real
                target = written if same else real
        if target is not None:
            fix = f"link relatively, inside the tree: -> {os.path.relpath(target, directory)}"
        else:
            fix = (
                "move what it should serve into the tree (e.g. a release directory _OWNER/NAME-v1) "
                "and link to it by a relative path that stays inside"
            )
        self.add(
            ERROR,
            entry,
            code_of(leaf, "leads-outside"),
            f"{described} leads out of the hosts tree ({why}): the proxies resolve every path beneath "
            f"{self.root} and do not follow it (EXDEV: {lost(leaf, 'alert 112 / 404')}); {fix}",
        )

    def check_owner(self, entry: str, owner: int) -> None:
        """An entry under another owner's domain: in a sticky directory anyone may claim
        www.alice.example while alice owns alice.example, and get a certificate for it."""
        labels = entry.split(".")
        for depth in range(1, len(labels)):
            parent = ".".join(labels[depth:])
            try:
                parent_uid = os.stat(parent, dir_fd=self.fd, follow_symlinks=False).st_uid
            except FileNotFoundError:
                continue
            if owner != parent_uid:
                self.add(
                    WARNING,
                    entry,
                    "other-owner",
                    f"owned by {tree.user_name(owner)} but {parent} by {tree.user_name(parent_uid)}: a "
                    "name under someone's domain can get a real certificate (ACME tls-alpn-01) once it is "
                    "served; if that is not intended, remove it",
                )
            return

    def check_target(self, entry: str, owner: int, directory: int) -> None:
        """An entry that leads into a directory of another owner's (bob's
        ``mirror.test -> _releases/alice-v3``): she decides what it holds."""
        target = os.fstat(directory).st_uid
        if target == owner or 0 in (owner, target):
            return
        mine, theirs = tree.user_name(owner), tree.user_name(target)
        self.add(
            ERROR,
            entry,
            "foreign-target",
            f"it leads into {self.shown(self.where(directory))}, owned by {tree.who(target)}, not by the "
            f"entry's owner {tree.who(owner)}: that directory is {theirs}'s to change, and the proxies serve "
            f"none of {theirs}'s sockets under this name (alert 112 / 404); link only into {mine}'s own "
            f"directories, or let {theirs} own the entry (or root, "
            "who then vouches for it)",
        )

    def check_area(self, entry: str, owner: int, directory: int) -> None:
        """The directories an entry leads through to its target (its owner's release area
        ``_<owner>/``): whoever owns one can rename or replace what it holds."""
        relative = self.shown(self.where(directory))
        if relative == "." or relative.startswith(".."):
            return
        parts = relative.split(os.sep)
        current = self.root
        for part in parts[:-1]:  # the target itself: check_target
            current = os.path.join(current, part)
            uid = os.stat(current).st_uid
            if uid not in (0, owner):
                mine = tree.login(owner)
                self.add(
                    ERROR,
                    entry,
                    "foreign-area",
                    f"it leads through {self.shown(current)}, owned by {tree.who(uid)}, who can rename or "
                    f"replace what it holds, this entry's target included; keep {mine}'s releases in "
                    f"{mine}'s own area: install -d -o {mine} -m 0750 {self.root}/_{mine}",
                )
                break
        if len(parts) > 1:
            self.check_shared_area(os.path.join(self.root, parts[0]), used=True)

    def check_shared_area(self, path: str, used: bool) -> None:
        """A release area others may write (a shared ``_releases/``, sticky or not): they can
        pre-create or take its owner's next release name, and that deploy fails."""
        if path in self.areas:
            return
        self.areas.add(path)
        info = os.stat(path)
        others = self.untrusted_writers(path, info)
        if others and (info.st_mode & stat.S_ISVTX or not used):  # else `writable` says it for each entry
            self.add(
                ERROR,
                self.shown(path),
                "shared-area",
                f"{path} is writable by {', '.join(others)}: any of them can pre-create or replace a "
                "release there before its owner deploys it; give each owner an area only they can write "
                f"(install -d -o OWNER -m 0750 {self.root}/_OWNER, setfacl -m u:{self.proxy}:x on it)",
            )

    def check_areas(self) -> None:
        """Every release area (a private top-level directory) that others may write."""
        for name in sorted(os.listdir(self.hosts)):
            path = os.path.join(self.root, name)
            if tree.is_private(name) and os.path.isdir(path) and not os.path.islink(path):
                self.check_shared_area(path, used=False)

    def check_sockets(self, entry: str, owner: int, directory: int) -> list[str]:
        """Each leaf, and the log socket, as the proxies reach them; the sockets they would
        use go to self.sockets.  Returns the directories those sockets are in (resolved)."""
        reached = {}  # leaf: None if there is no such file, 0 if the proxies reach one, else their errno
        socket_directories = []
        for leaf in (*probe.LEAVES, LOG):
            reached[leaf], used = self.check_socket(entry, leaf, owner, directory)
            if used is not None:
                socket_directories.append(used)
        if all(reached[leaf] is None for leaf in probe.LEAVES):
            self.add(
                ERROR,
                entry,
                "no-socket",
                "neither tls-socket nor http-socket: fastsni answers 112, fasthttpdir 404",
            )
        elif reached["tls-socket"] == 0 and reached["http-socket"] in (None, *ABSENT):  # engine.exists_beside
            self.add(
                INFO,
                entry,
                "https-redirect",
                "a tls-socket and no http-socket: fastsni serves it; fasthttpdir answers plain HTTP "
                "with a 308 redirect to https (same host, path and query)",
            )
        return socket_directories

    def check_socket(
        self, entry: str, leaf: str, owner: int, directory: int
    ) -> tuple[int | None, str | None]:
        """``leaf`` in the entry's ``directory`` as the proxies reach it: (None if there is
        no such file, 0 if they reach one, else their errno; the directory, resolved, of the
        socket they would use, or None)."""
        try:
            info = os.stat(leaf, dir_fd=directory, follow_symlinks=False)
        except FileNotFoundError:
            return None, None
        here = self.where(directory)
        text = os.readlink(leaf, dir_fd=directory) if stat.S_ISLNK(info.st_mode) else None
        if text is not None and self.protected_link(entry, leaf, text, info, os.fstat(directory), here):
            return errno.EACCES, None
        try:
            path = self.beneath(f"{entry}/{leaf}")
        except OSError as exc:
            if not self.not_followed(entry, f"the symlink {leaf}", text, here, exc, leaf):
                raise
            return exc.errno, None
        try:
            used = self.serves(entry, leaf, text, owner, path)
            return 0, os.path.dirname(self.where(path)) if used else None
        finally:
            os.close(path)

    def protected_link(
        self, entry: str, leaf: str, text: str, info: os.stat_result, parent: os.stat_result, here: str
    ) -> bool:
        """A socket link the proxies may not follow under fs.protected_symlinks (it is the
        last component of their path): reported, True."""
        sticky_for_all = parent.st_mode & stat.S_ISVTX and parent.st_mode & stat.S_IWOTH
        if not (self.protected and sticky_for_all) or info.st_uid in (self.user.uid, parent.st_uid):
            return False
        self.add(
            ERROR,
            entry,
            code_of(leaf, "link-protected"),
            f"the proxies ({self.user.name}) may not follow the symlink {leaf} -> {text}: "
            f"fs.protected_symlinks is 1 and {here} is sticky and writable by everyone, where a symlink "
            "is followed as the last component of a path only by its owner or when the directory's "
            f"owner owns it (they get EACCES: {lost(leaf, 'alert 112 / 503')}); chmod 0750 {here}",
        )
        return True

    def serves(self, entry: str, leaf: str, text: str | None, owner: int, path: int) -> bool:
        """Whether the proxies would connect (or send) to the file at descriptor ``path``: a
        socket that passes their owner rule (engine._check_owner).  Reports why not."""
        info = os.fstat(path)
        if not stat.S_ISSOCK(info.st_mode):
            self.add(
                ERROR,
                entry,
                code_of(leaf, "not-socket"),
                f"{leaf} is not a socket: {lost(leaf, 'connecting fails (ECONNREFUSED)')}; remove it and "
                f"let the entry's {binder(leaf)} bind it",
            )
            return False
        try:
            engine._check_owner(path, owner, f"{entry}/{leaf}")
        except engine.ForeignSocket:
            self.foreign_socket(entry, leaf, text, owner, info.st_uid)
            return False
        self.sockets.append((entry, leaf, info.st_mode))
        return True

    def foreign_socket(self, entry: str, leaf: str, text: str | None, owner: int, socket_owner: int) -> None:
        via = f" (through the symlink -> {text})" if text is not None else ""
        name = tree.user_name(owner)
        self.add(
            ERROR,
            entry,
            code_of(leaf, "foreign-socket"),
            f"{leaf}{via} is owned by {tree.who(socket_owner)}, not by the entry's owner "
            f"{tree.who(owner)}: the proxies refuse it "
            f"({lost(leaf, 'alert 112 / 404, and a log line naming both uids')}); the socket must be "
            f"{name}'s: bound by {name}'s {binder(leaf)} or, for one under another uid, made by a systemd "
            f"socket unit with SocketUser={tree.login(owner)} that passes it on; or root must own the entry "
            "(vouching for it), or one account own both",
        )

    def check_writable(self, entry: str, owner: int, directories: list[str]) -> None:
        """The entry's directory and its sockets' (resolved), and the directories on their
        way up to the hosts directory, that someone other than their owner, root and the
        proxy's user can change: they could remove or replace what the proxies use."""
        seen: set[str] = set()
        for start in directories:
            current = start
            while current != self.root and tree.inside(current, self.root) and current not in seen:
                seen.add(current)
                self.check_directory(entry, owner, current, current == start)
                current = os.path.dirname(current)

    def check_directory(self, entry: str, owner: int, path: str, holds: bool) -> None:
        info = os.stat(path)
        others = self.untrusted_writers(path, info)
        if not others:
            return
        by = ", ".join(others)
        if info.st_mode & stat.S_ISVTX:
            if holds:
                self.add(
                    WARNING,
                    entry,
                    "writable",
                    f"{path} is writable by {by} (sticky): they can add a missing socket or a "
                    f"send-proxy marker (chmod 0750 {path})",
                )
            return
        what = "its sockets, links and send-proxy markers" if holds else "the directories below it"
        harm = (
            "serve a socket of their own under this name, since root owns the entry"
            if owner == 0
            else "take the name down (the proxies serve no socket of theirs for it)"
        )
        self.add(
            ERROR,
            entry,
            "writable",
            f"{path} is writable by {by}: they can remove or replace {what} and {harm}; chmod 0750 "
            f"{path} (or 2750 with a group that holds only the proxy's user), setfacl -x any other "
            f"user or group, and let the proxy's user alone search it: setfacl -m u:{self.proxy}:x {path}",
        )

    def check_proxy_header(self, entry: str) -> None:
        present = {version for version, marker in engine.PROXY_MARKERS if self.present(f"{entry}/{marker}")}
        if present == {1, 2}:
            self.add(
                INFO,
                entry,
                "proxy-header",
                "send-proxy-v1 and send-proxy-v2 both exist: v2 wins, a PROXY v2 header",
            )
        elif present == {2}:
            self.add(INFO, entry, "proxy-header", "each backend connection starts with a PROXY v2 header")
        elif present == {1}:
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
        """Connect to every socket the proxies would use, as the proxy's user; probe the
        backends that answer.  Unprivileged and asked about another user, connect as oneself:
        whether anyone listens is the same for every user, access is not."""
        if not self.sockets:
            return
        user = self.connecting_user()
        targets = [f"{entry}/{leaf}" for entry, leaf, _ in self.sockets]
        errors = connect_errors(self.fd, targets, user)
        deadline = time.monotonic() + (self.options.timeout if self.options else 0)
        for entry, leaf, mode in self.sockets:
            code = errors[f"{entry}/{leaf}"]
            if code in (errno.EACCES, errno.EPERM):
                if user is self.user:
                    self.no_access(entry, leaf, mode)
            elif leaf == LOG:
                self.log_connected(entry, code)
            else:
                self.connected(entry, leaf, code, deadline)

    def connecting_user(self) -> User:
        """The proxy's user, or, unprivileged and asked about another one, oneself (said)."""
        if self.user.uid == os.geteuid() or os.geteuid() == 0:
            return self.user
        user = invoking_user()
        self.add(
            WARNING,
            TREE,
            "not-as-user",
            f"the connect test ran as {user.name}, not as {self.user.name}: only root can take "
            f"another user's identity, so whether {self.user.name} may connect was not tested "
            f"(run fastsni-check as root, or as {tree.login(self.user.uid)})",
        )
        return user

    def connected(self, entry: str, leaf: str, code: int, deadline: float) -> None:
        """A backend socket connected to (``code`` 0) or not (its errno); probed if asked."""
        if code == errno.ECONNREFUSED:
            self.add(ERROR, entry, "stale-socket", f"nobody listens on {leaf} (connection refused)")
        elif code:
            self.add(ERROR, entry, "connect-failed", f"connecting to {leaf} fails: {os.strerror(code)}")
        elif self.options is not None:
            path = os.path.join(self.hosts, entry, leaf)
            try:
                result = probe.probe(path, probe.probe_name(entry), self.options, deadline)
            except probe.ProbeFailed as exc:
                self.add(ERROR, entry, "probe-failed", str(exc))
            else:
                self.add(INFO, entry, "probe-ok", f"probe {leaf}: ok, {result}")

    def log_connected(self, entry: str, code: int) -> None:
        """The log socket connected to as a datagram socket (``code`` 0) or not (its errno)."""
        if not code:
            self.add(INFO, entry, "owner-log", LOGGED)
            return
        failed = (ERROR, "log-connect-failed", f"sending to {LOG} fails: {os.strerror(code)}")
        severity, name, message = LOG_FAULTS.get(code, failed)
        self.add(severity, entry, name, message)

    def no_access(self, entry: str, leaf: str, mode: int) -> None:
        self.add(
            ERROR,
            entry,
            code_of(leaf, "no-access"),
            f"{self.user.name} cannot connect to {leaf} ({stat.filemode(mode)}; a connect needs write "
            "permission on the socket and search on every directory on its way): let the proxy's user "
            f"alone in, by an ACL (setfacl -m u:{self.proxy}:rw {leaf}, and u:{self.proxy}:x on each "
            f"directory it cannot search) or by a group that holds only {self.proxy} (the socket's "
            "directory 2750 in that group, bound under umask 0007)",
        )


def tree_handle(pid: int) -> str:
    """/proc/PID/cwd, or /proc/PID/fd/N of its hosts descriptor (the one O_PATH directory it
    holds) once the proxy has made /proc/self/fd its working directory (engine.enter_proc_fd):
    either way a handle on the tree it serves, whatever has been renamed since."""
    cwd = f"/proc/{pid}/cwd"
    if os.readlink(cwd) != f"/proc/{pid}/fd":
        return cwd
    for fd in sorted(os.listdir(f"/proc/{pid}/fdinfo"), key=int):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii") as info:
                flags = next(int(line.split()[1], 8) for line in info if line.startswith("flags:"))
        except FileNotFoundError:
            continue  # a connection's descriptor, closed since the listing
        if flags & os.O_PATH and flags & os.O_DIRECTORY:
            return f"/proc/{pid}/fd/{fd}"
    raise OSError(errno.ENOENT, "no hosts directory descriptor", f"/proc/{pid}/fd")


def check_process(pid: int, hosts: str | None) -> tuple[str, list[Finding]]:
    """--pid: the tree a running proxy really serves (its hosts descriptor or working
    directory is a handle)."""
    findings = []
    try:
        cwd = tree_handle(pid)
        shown = os.readlink(cwd)
    except OSError as exc:
        raise ValueError(f"cannot see process {pid}'s hosts directory: {exc.strerror}") from None
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
                f"process {pid} serves {shown}, not {os.path.realpath(hosts)}: it holds its tree by a "
                "handle, so a renamed tree stays served (mv hosts hosts.old && mkdir hosts); restart it",
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
    try:
        checker.findings = findings
        checker.check_tree()
        if args.names:
            checker.check_names(args.names)
        else:
            for entry in checker.entries():
                checker.check_entry(entry)
            checker.check_areas()
        checker.check_connections()
    finally:
        checker.close()
    first = {}
    for index, finding in enumerate(checker.findings):
        first.setdefault(finding.entry, index)
    return sorted(checker.findings, key=lambda finding: first[finding.entry])  # grouped by entry


if __name__ == "__main__":
    main()
