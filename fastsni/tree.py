"""The hosts tree as the proxies see it, for fastsni-deploy and fastsni-check (not hot).

Entry names (exact and one-label wildcard), which paths are private to owners, whether a
path lies inside the tree, and how many connections the kernel holds on a socket file.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import stat
import struct

from fastsni.hostname import directory_name
from fastsni.tls import check_hostname

WILDCARD = "*."


def entry_name(text: str) -> str:
    """The hosts-directory entry for a name or a wildcard ``*.NAME``; ValueError says why there is none."""
    if text.startswith(WILDCARD):
        return WILDCARD + directory_name(text[len(WILDCARD) :])
    return directory_name(text)


def is_private(entry: str) -> bool:
    """Entries the proxies can never route to and owners use for releases: ``_name``, ``.name``."""
    return entry.startswith(("_", "."))


def routable(entry: str) -> bool:
    """Whether the proxies look ``entry`` up as it is spelled: an exact name or a wildcard."""
    rest = entry[len(WILDCARD) :] if entry.startswith(WILDCARD) else entry
    try:
        return check_hostname(rest.encode("ascii")) == rest
    except UnicodeEncodeError:
        return False


def user_name(uid: int) -> str:
    """A uid as people know it: its login name, or ``uid N`` when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def inside(path: str, root: str) -> bool:
    """Whether the resolved ``path`` is ``root`` or lies below it (both absolute, resolved)."""
    return os.path.commonpath([path, root]) == root


# A directory's access ACL as Linux stores it (linux/posix_acl_xattr.h): a version, then
# (tag, permissions, id) entries.  Replacing what a directory holds takes write and search.
ACL_ACCESS = "system.posix_acl_access"
_ACL_HEADER = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")
ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 0x02, 0x04, 0x08, 0x10, 0x20
WRITE_SEARCH = 0o3
EVERYONE = -1


def acl_entries(path: str) -> list[tuple[int, int, int]] | None:
    """The (tag, permissions, id) entries of ``path``'s access ACL; None if it has none
    (or the filesystem keeps none): then its mode bits say it all."""
    try:
        data = os.getxattr(path, ACL_ACCESS)
    except OSError:
        return None
    last = len(data) - _ACL_ENTRY.size
    return [_ACL_ENTRY.unpack_from(data, pos) for pos in range(_ACL_HEADER.size, last + 1, _ACL_ENTRY.size)]


def writers(path: str, info: os.stat_result) -> list[tuple[str, int]]:
    """Who besides its owner may add, remove or replace what directory ``path`` holds:
    ("group", gid), ("user", uid) or ("everyone", EVERYONE), from its ACL if it has one,
    else from its mode bits."""
    entries = acl_entries(path)
    if not entries:
        entries = [(ACL_GROUP_OBJ, info.st_mode >> 3 & 0o7, 0), (ACL_OTHER, info.st_mode & 0o7, 0)]
    mask = next((perm for tag, perm, _ in entries if tag == ACL_MASK), 0o7)
    found = []
    for tag, perm, ident in entries:
        if tag == ACL_OTHER and perm & WRITE_SEARCH == WRITE_SEARCH:
            found.append(("everyone", EVERYONE))
        elif tag in (ACL_USER, ACL_GROUP, ACL_GROUP_OBJ) and perm & mask & WRITE_SEARCH == WRITE_SEARCH:
            kind = "user" if tag == ACL_USER else "group"
            found.append((kind, info.st_gid if tag == ACL_GROUP_OBJ else ident))
    return found


def who(uid: int) -> str:
    """``alice (uid 1001)``, or ``uid 1001`` for a uid without a name."""
    name = user_name(uid)
    return name if name.startswith("uid ") else f"{name} (uid {uid})"


def login(uid: int) -> str:
    """A uid as setfacl and systemd's SocketUser= take it: its name, else the number."""
    name = user_name(uid)
    return str(uid) if name.startswith("uid ") else name


def group_members(gid: int) -> set[int] | None:
    """The uids in group ``gid`` (listed in it, or with it as their primary group); None
    for a group the system does not know, whose members cannot be told."""
    try:
        names = grp.getgrgid(gid).gr_mem
    except KeyError:
        return None
    members = {record.pw_uid for record in pwd.getpwall() if record.pw_gid == gid}
    for name in names:
        try:
            members.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            pass
    return members


def group_name(gid: int) -> str:
    try:
        return f"{grp.getgrgid(gid).gr_name} (gid {gid})"
    except KeyError:
        return f"gid {gid}"


def other_writers(path: str, info: os.stat_result, trusted: set[int]) -> list[str]:
    """Who may change directory ``path`` other than the uids ``trusted`` (a group counts
    unless every member is trusted), as people name them."""
    found = []
    for kind, ident in writers(path, info):
        if kind == "everyone":
            found.append("everyone")
        elif kind == "user" and ident not in trusted:
            found.append(who(ident))
        elif kind == "group":
            members = group_members(ident)
            if members is None or not members <= trusted:
                found.append(f"group {group_name(ident)}")
    return found


# Connections on a socket file, from the kernel's sock_diag (linux/unix_diag.h): every
# socket bound to a path reports that file's inode, and so does each connection it accepted.
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_DONE, NLMSG_ERROR = 3, 2
UDIAG_SHOW_VFS, UDIAG_SHOW_RQLEN = 0x2, 0x10
UNIX_DIAG_VFS, UNIX_DIAG_RQLEN = 1, 4
TCP_ESTABLISHED, TCP_LISTEN = 1, 10
_NLMSG = struct.Struct("=IHHII")
_UNIX_DIAG_MSG = struct.Struct("=BBBBIII")
_RTATTR = struct.Struct("=HH")


def _kernel_dev(st_dev: int) -> int:
    """A stat st_dev as the kernel's internal dev_t (major << 20 | minor), as unix_diag reports it."""
    return os.major(st_dev) << 20 | os.minor(st_dev)


def _diag_dump() -> list[bytes]:
    """Every message of one AF_UNIX sock_diag dump (all states, with file inode and queue length)."""
    request = struct.pack(
        "=BBHIIII", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0, UDIAG_SHOW_VFS | UDIAG_SHOW_RQLEN, 0
    ) + struct.pack("=I", 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as sock:
        flags = NLM_F_REQUEST | NLM_F_DUMP
        header = _NLMSG.pack(_NLMSG.size + len(request), SOCK_DIAG_BY_FAMILY, flags, 1, 0)
        sock.send(header + request)
        messages: list[bytes] = []
        while True:
            data = sock.recv(1 << 16)
            pos = 0
            while pos + _NLMSG.size <= len(data):
                length, kind, _, _, _ = _NLMSG.unpack_from(data, pos)
                if kind == NLMSG_DONE:
                    return messages
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, pos + _NLMSG.size)
                    raise OSError(-code, os.strerror(-code))
                messages.append(data[pos + _NLMSG.size : pos + length])
                pos += (length + 3) & ~3


def connections(paths: list[str]) -> int:
    """How many connections the kernel holds on the socket files ``paths``: accepted ones
    still open, plus those queued on a listener and not yet accepted.  OSError if the
    kernel offers no unix sock_diag."""
    files = set()
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            continue
        if stat.S_ISSOCK(info.st_mode):
            files.add((_kernel_dev(info.st_dev), info.st_ino))
    count = 0
    for message in _diag_dump():
        _, _, state, _, _, _, _ = _UNIX_DIAG_MSG.unpack_from(message)
        vfs = queued = None
        pos = _UNIX_DIAG_MSG.size
        while pos + _RTATTR.size <= len(message):
            length, kind = _RTATTR.unpack_from(message, pos)
            if length < _RTATTR.size:
                break
            if kind == UNIX_DIAG_VFS:
                ino, dev = struct.unpack_from("=II", message, pos + _RTATTR.size)
                vfs = (dev, ino)
            elif kind == UNIX_DIAG_RQLEN:
                (queued,) = struct.unpack_from("=I", message, pos + _RTATTR.size)
            pos += (length + 3) & ~3
        if vfs not in files:
            continue
        if state == TCP_ESTABLISHED:
            count += 1
        elif state == TCP_LISTEN and queued:
            count += queued
    return count
