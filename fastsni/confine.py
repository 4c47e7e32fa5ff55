"""Self-confinement: once a proxy holds its listening socket and the hosts directory, it
gives up every power it never uses, without privileges and without libseccomp.

Three layers, each best effort by what the kernel offers, in this order:

- ``PR_SET_NO_NEW_PRIVS`` (Linux 3.5): no execve() can ever gain privileges again; it is
  also what lets an unprivileged process install the two filters below.
- Landlock (Linux 5.13+, ABI 1..9): no file may be written, created, removed or executed
  anywhere; only the interpreter's own files may be read; no TCP bind or connect (ABI 4,
  Linux 6.7); no abstract Unix socket or signal outside the proxy (ABI 6, Linux 6.12);
  pathname Unix sockets only beneath the hosts tree (ABI 9, ``RESOLVE_UNIX``).  The hosts
  tree itself is never opened for reading: the proxy looks at it only through O_PATH
  descriptors (which Landlock does not restrict) and connects to its sockets.
- A seccomp filter (Linux 3.5): the system calls the proxies and the interpreter make after
  start, and nothing else (no execve, fork, ptrace, bind, listen, kill of others, socket
  other than AF_UNIX, open for writing, executable memory); any other call fails with
  EPERM: never a kill, so a call missing here shows as an error, not a dead proxy.

``FASTSNI_NO_CONFINE=1`` turns all three off (for debugging under valgrind, say); the start
line says so.  Not hot: pure Python through ctypes, shared by both twins.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys

PR_SET_NO_NEW_PRIVS = 38  # linux/prctl.h
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2  # linux/seccomp.h
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_SPEC_ALLOW = 1 << 2  # Linux 4.17
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
X32_SYSCALL_BIT = 0x40000000  # x86_64's x32 ABI: refused whole

# Classic BPF (linux/filter.h, linux/bpf_common.h), the seccomp filter's language.
BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_JGE_K = 0x35
BPF_JSET_K = 0x45
BPF_RET_K = 0x06
# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]
DATA_NR, DATA_ARCH = 0, 4


def arg_low(index: int) -> int:
    """Offset of the low 32 bits of argument ``index`` (both supported arches are little endian)."""
    return 16 + 8 * index


def arg_high(index: int) -> int:
    return 20 + 8 * index


# Per architecture: AUDIT_ARCH_* (linux/audit.h) and the system call numbers of every call
# the filter names (x86_64: arch/x86/entry/syscalls/syscall_64.tbl; aarch64:
# include/uapi/asm-generic/unistd.h).  tests/test_sandbox.py checks them against the headers.
ARCHES = {
    "x86_64": (
        0xC000003E,
        {
            "read": 0,
            "write": 1,
            "close": 3,
            "fstat": 5,
            "lseek": 8,
            "mmap": 9,
            "mprotect": 10,
            "munmap": 11,
            "brk": 12,
            "rt_sigaction": 13,
            "rt_sigprocmask": 14,
            "rt_sigreturn": 15,
            "ioctl": 16,
            "readv": 19,
            "writev": 20,
            "sched_yield": 24,
            "mremap": 25,
            "madvise": 28,
            "nanosleep": 35,
            "getpid": 39,
            "socket": 41,
            "connect": 42,
            "accept": 43,
            "sendto": 44,
            "recvfrom": 45,
            "sendmsg": 46,
            "recvmsg": 47,
            "shutdown": 48,
            "getsockname": 51,
            "getpeername": 52,
            "setsockopt": 54,
            "getsockopt": 55,
            "exit": 60,
            "kill": 62,
            "fcntl": 72,
            "getcwd": 79,
            "gettimeofday": 96,
            "getuid": 102,
            "getgid": 104,
            "geteuid": 107,
            "getegid": 108,
            "sigaltstack": 131,
            "gettid": 186,
            "futex": 202,
            "restart_syscall": 219,
            "clock_gettime": 228,
            "clock_getres": 229,
            "clock_nanosleep": 230,
            "exit_group": 231,
            "epoll_wait": 232,
            "epoll_ctl": 233,
            "tgkill": 234,
            "openat": 257,
            "newfstatat": 262,
            "ppoll": 271,
            "splice": 275,
            "epoll_pwait": 281,
            "accept4": 288,
            "pipe2": 293,
            "prlimit64": 302,
            "seccomp": 317,  # not allowed: the one call that installs the filter itself
            "getrandom": 318,
            "statx": 332,
            "rseq": 334,
            "openat2": 437,
            "epoll_pwait2": 441,
        },
    ),  # fmt: skip
    "aarch64": (
        0xC00000B7,
        {
            "read": 63,
            "write": 64,
            "close": 57,
            "fstat": 80,
            "lseek": 62,
            "mmap": 222,
            "mprotect": 226,
            "munmap": 215,
            "brk": 214,
            "rt_sigaction": 134,
            "rt_sigprocmask": 135,
            "rt_sigreturn": 139,
            "ioctl": 29,
            "readv": 65,
            "writev": 66,
            "sched_yield": 124,
            "mremap": 216,
            "madvise": 233,
            "nanosleep": 101,
            "getpid": 172,
            "socket": 198,
            "connect": 203,
            "accept": 202,
            "sendto": 206,
            "recvfrom": 207,
            "sendmsg": 211,
            "recvmsg": 212,
            "shutdown": 210,
            "getsockname": 204,
            "getpeername": 205,
            "setsockopt": 208,
            "getsockopt": 209,
            "exit": 93,
            "kill": 129,
            "fcntl": 25,
            "getcwd": 17,
            "gettimeofday": 169,
            "getuid": 174,
            "getgid": 176,
            "geteuid": 175,
            "getegid": 177,
            "sigaltstack": 132,
            "gettid": 178,
            "futex": 98,
            "restart_syscall": 128,
            "clock_gettime": 113,
            "clock_getres": 114,
            "clock_nanosleep": 115,
            "exit_group": 94,
            "epoll_ctl": 21,
            "tgkill": 131,
            "openat": 56,
            "newfstatat": 79,
            "ppoll": 73,
            "splice": 76,
            "epoll_pwait": 22,
            "accept4": 242,
            "pipe2": 59,
            "prlimit64": 261,
            "seccomp": 277,  # not allowed: the one call that installs the filter itself
            "getrandom": 278,
            "statx": 291,
            "rseq": 293,
            "openat2": 437,
            "epoll_pwait2": 441,
        },
    ),  # fmt: skip
}

# Allowed whatever their arguments, the hottest first (the kernel caches these anyway).
ALLOWED = (
    "epoll_wait", "epoll_pwait", "epoll_pwait2", "read", "write", "accept4", "accept", "close",
    "splice", "epoll_ctl", "connect", "shutdown", "openat2", "newfstatat", "fstat", "statx",
    "getpeername", "getsockname", "getsockopt", "setsockopt", "fcntl", "pipe2", "readv",
    "writev", "recvfrom", "sendto", "recvmsg", "sendmsg", "lseek", "brk", "munmap", "mremap",
    "madvise", "futex", "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack",
    "restart_syscall", "clock_gettime", "clock_getres", "gettimeofday", "clock_nanosleep",
    "nanosleep", "ppoll", "sched_yield", "getpid", "gettid", "getuid", "geteuid", "getgid",
    "getegid", "getcwd", "getrandom", "rseq", "exit", "exit_group",
)  # fmt: skip
AF_UNIX = 1
PROT_EXEC = 0x4
# open(2) flags that write or create (asm-generic/fcntl.h, the same on both arches).
OPEN_WRITES = 0o1 | 0o2 | 0o100 | 0o1000 | 0o2000 | 0o20000000  # WRONLY RDWR CREAT TRUNC APPEND __O_TMPFILE
# ioctl(2) requests the interpreter makes on its own descriptors (asm-generic/ioctls.h).
IOCTLS = (0x5401, 0x541B, 0x5421, 0x5451)  # TCGETS (isatty) FIONREAD FIONBIO FIOCLEX

# Landlock (linux/landlock.h): access rights by the ABI that brought them.
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
FS_READ_FILE, FS_READ_DIR = 1 << 2, 1 << 3
FS_ABI1 = (1 << 13) - 1  # execute .. make_sym
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV, FS_RESOLVE_UNIX = 1 << 13, 1 << 14, 1 << 15, 1 << 16
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int


def _word(value: int | bytes | ctypes.Array | None) -> object:
    """A variadic argument as a full machine word (ints would otherwise pass as C ints)."""
    return ctypes.c_ulong(value) if isinstance(value, int) else value


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), what)
    return result


def landlock_call(number: int, *args: int | bytes | None) -> int:
    """One of the three Landlock system calls (glibc has no wrappers)."""
    return _check(_libc.syscall(ctypes.c_long(number), *map(_word, args)), "landlock")


def prctl(option: int, *args: int | ctypes.Array, what: str) -> int:
    args = (*args, 0, 0, 0, 0)[:4]
    return _check(_libc.prctl(ctypes.c_int(option), *map(_word, args)), what)


# --- seccomp -------------------------------------------------------------------------------


class Program:
    """A classic BPF program with forward jumps to labels, resolved by ``assemble()``."""

    def __init__(self) -> None:
        self.code: list[tuple[int, object, object, int]] = []
        self.labels: dict[str, int] = {}

    def load(self, offset: int) -> None:
        self.code.append((BPF_LD_W_ABS, 0, 0, offset))

    def jump(self, op: int, k: int, true: object = 0, false: object = 0) -> None:
        self.code.append((op, true, false, k))

    def ret(self, k: int) -> None:
        self.code.append((BPF_RET_K, 0, 0, k))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def assemble(self) -> bytes:
        """struct sock_filter[]: {__u16 code; __u8 jt; __u8 jf; __u32 k}."""
        out = bytearray()
        for here, (code, true, false, k) in enumerate(self.code):
            jt, jf = (self.labels[j] - here - 1 if isinstance(j, str) else j for j in (true, false))
            assert 0 <= jt < 256 and 0 <= jf < 256, "a jump too far for classic BPF"
            out += struct.pack("<HBBI", code, jt, jf, k)
        return bytes(out)


def seccomp_program(machine: str, pid: int) -> tuple[bytes, int]:
    """The filter for ``machine`` and this process: (struct sock_filter[], calls allowed)."""
    arch, numbers = ARCHES[machine]
    deny = SECCOMP_RET_ERRNO | errno.EPERM
    p = Program()
    p.load(DATA_ARCH)
    p.jump(BPF_JEQ_K, arch, 0, "deny")  # SECCOMP_RET_ERRNO, never a kill, for another ABI
    p.load(DATA_NR)
    if machine == "x86_64":
        p.jump(BPF_JGE_K, X32_SYSCALL_BIT, "deny", 0)
    allowed = [name for name in ALLOWED if name in numbers]  # aarch64 has no epoll_wait
    for name in allowed:
        p.jump(BPF_JEQ_K, numbers[name], "allow", 0)
    # With their arguments checked: (call, argument, how, values).
    checked = (
        ("socket", 0, "one of", (AF_UNIX,)),  # no TCP or UDP socket, so no connect out
        ("mmap", 2, "none of", PROT_EXEC),  # no new executable memory
        ("mprotect", 2, "none of", PROT_EXEC),
        ("openat", 2, "none of", OPEN_WRITES),  # read-only opens (imports, tracebacks)
        ("ioctl", 1, "one of", IOCTLS),
        ("kill", 0, "one of", (pid,)),  # only to itself
        ("tgkill", 0, "one of", (pid,)),  # abort() and raise() in this process
        ("prlimit64", 2, "null", 0),  # getrlimit(2) only
    )
    for name, _arg, _how, _values in checked:
        p.jump(BPF_JEQ_K, numbers[name], f"check {name}", 0)
    p.ret(deny)  # any other call
    for name, arg, how, values in checked:  # classic BPF jumps only forward: checks, then the ends
        p.label(f"check {name}")
        if how == "none of":
            p.load(arg_low(arg))
            p.jump(BPF_JSET_K, values, "deny", "allow")
        elif how == "one of":
            p.load(arg_low(arg))
            for value in values:
                p.jump(BPF_JEQ_K, value, "allow", 0)
            p.jump(BPF_JEQ_K, 0, "deny", "deny")  # unconditional: a classic BPF "ja" within reach
        else:  # a NULL pointer
            p.load(arg_low(arg))
            p.jump(BPF_JEQ_K, 0, 0, "deny")
            p.load(arg_high(arg))
            p.jump(BPF_JEQ_K, 0, "allow", "deny")
    p.label("deny")
    p.ret(deny)
    p.label("allow")
    p.ret(SECCOMP_RET_ALLOW)
    return p.assemble(), len(allowed) + len(checked)


def install_seccomp(program: bytes, machine: str) -> str:
    """Install the filter; returns "" or ", prctl", for the start line.

    seccomp(2) with SECCOMP_FILTER_FLAG_SPEC_ALLOW first: without that flag a kernel
    before 5.16, whose spec_store_bypass_disable= and spectre_v2_user= default to
    "seccomp", forces its costly speculation mitigations (SSBD, STIBP) on any process
    that installs a filter.  Where seccomp(2) is refused (systemd 252's @system-service
    allows prctl but not seccomp) or the flag is unknown (before 4.17: EINVAL),
    prctl(PR_SET_SECCOMP), which cannot pass it.  The proxies run one thread, so no
    TSYNC is needed."""
    count = len(program) // 8
    buf = ctypes.create_string_buffer(program)
    fprog = struct.pack("<H6xQ", count, ctypes.addressof(buf))  # struct sock_fprog
    fbuf = ctypes.create_string_buffer(fprog)
    number = ARCHES[machine][1]["seccomp"]
    flags = SECCOMP_FILTER_FLAG_SPEC_ALLOW
    try:
        _check(
            _libc.syscall(ctypes.c_long(number), *map(_word, (SECCOMP_SET_MODE_FILTER, flags)), fbuf),
            "seccomp",
        )
        return ""
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EPERM, errno.EACCES, errno.EINVAL):
            raise
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, fbuf, what="seccomp")
    return ", prctl"


# --- Landlock ------------------------------------------------------------------------------


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; OSError (ENOSYS, EOPNOTSUPP: disabled at boot,
    EPERM: an outer seccomp filter) when there is none to use."""
    return landlock_call(SYS_LANDLOCK_CREATE_RULESET, None, 0, LANDLOCK_CREATE_RULESET_VERSION)


def landlock_rights(abi: int) -> tuple[int, int, int]:
    """(handled_access_fs, handled_access_net, scoped): everything the ABI can restrict."""
    fs = FS_ABI1
    if abi >= 2:
        fs |= FS_REFER
    if abi >= 3:
        fs |= FS_TRUNCATE
    if abi >= 5:
        fs |= FS_IOCTL_DEV
    if abi >= 9:
        fs |= FS_RESOLVE_UNIX
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    return fs, net, scoped


def readable_paths(hosts: int) -> list[str]:
    """The interpreter's own files: its prefixes and every directory on sys.path (where
    the proxy's modules are, a wheel's or a source tree's): read-only, for a module or a
    traceback's source line read after start."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths.update(p for p in sys.path if p and os.path.isdir(p))
    for module in ("fastsni", "fasthttpdir"):
        package = sys.modules.get(module)
        if package is not None and getattr(package, "__file__", None):
            paths.add(os.path.dirname(os.path.abspath(package.__file__)))
    # `python -m fastsni` puts the start directory, the hosts tree (held as ``hosts``),
    # first on sys.path: it stays unreadable.
    tree = os.path.realpath(f"/proc/self/fd/{hosts}")
    return sorted(p for p in paths if os.path.commonpath([os.path.realpath(p), tree]) != tree)


def install_landlock(abi: int, hosts: int) -> tuple[int, int, int]:
    """Restrict this process to reading the interpreter's files, and (ABI 9+) connecting
    to Unix sockets only beneath ``hosts``; returns what is handled."""
    fs, net, scoped = landlock_rights(abi)
    attr = struct.pack("<QQQ", fs, net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = landlock_call(SYS_LANDLOCK_CREATE_RULESET, attr, len(attr), 0)
    try:
        rules = [(path, FS_READ_FILE | FS_READ_DIR) for path in readable_paths(hosts)]
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                _add_rule(ruleset, fd, access & fs)
            finally:
                os.close(fd)
        if fs & FS_RESOLVE_UNIX:
            _add_rule(ruleset, hosts, FS_RESOLVE_UNIX)
        landlock_call(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0)
    finally:
        os.close(ruleset)
    return fs, net, scoped


def _add_rule(ruleset: int, fd: int, access: int) -> None:
    """struct landlock_path_beneath_attr {__u64 allowed_access; __s32 parent_fd;} (packed)."""
    beneath = struct.pack("<Qi", access, fd)
    landlock_call(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, beneath, 0)


# --- all three -----------------------------------------------------------------------------


def _why(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def confine(hosts: int) -> str:
    """Confine this process for good; returns what is in force, for the start line."""
    if os.environ.get("FASTSNI_NO_CONFINE", "") not in ("", "0"):
        return "not confined (FASTSNI_NO_CONFINE is set)"
    said = []
    try:
        prctl(PR_SET_NO_NEW_PRIVS, 1, what="no_new_privs")
        said.append("no_new_privs")
    except OSError as exc:  # without it neither filter may be installed unprivileged
        return f"not confined (no_new_privs: {_why(exc)})"
    try:
        abi = landlock_abi()
        fs, net, scoped = install_landlock(abi, hosts)
        parts = ["fs read-only"]
        parts.append("unix beneath the tree" if fs & FS_RESOLVE_UNIX else "unix anywhere (needs abi 9)")
        parts.append("no tcp" if net else "tcp (needs abi 4)")
        parts.append("scoped" if scoped else "not scoped (needs abi 6)")
        said.append(f"landlock(abi {abi}: {', '.join(parts)})")
    except OSError as exc:
        said.append(f"no landlock ({_why(exc)}: {_landlock_hint(exc)})")
    machine = platform.machine()
    if machine not in ARCHES:
        said.append(f"no seccomp (no allow-list for {machine})")
    else:
        program, calls = seccomp_program(machine, os.getpid())
        try:
            how = install_seccomp(program, machine)
            said.append(f"seccomp({calls} calls{how})")
        except OSError as exc:
            said.append(f"no seccomp ({_why(exc)})")
    return "confined: " + " ".join(said)


def _landlock_hint(exc: OSError) -> str:
    if exc.errno == errno.ENOSYS:
        return "needs Linux 5.13"
    if exc.errno == errno.EOPNOTSUPP:
        return "not enabled: add landlock to the lsm= boot parameter"
    if exc.errno == errno.EPERM:
        return (
            "refused by a seccomp filter (systemd: add landlock_create_ruleset landlock_add_rule "
            "landlock_restrict_self to SystemCallFilter=)"
        )
    return os.strerror(exc.errno or 0)
