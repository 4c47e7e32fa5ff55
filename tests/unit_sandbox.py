"""Run a command under the restrictions a systemd unit file in systemd/ asks for, without
systemd (this machine has no systemd as PID 1): ``python unit_sandbox.py UNIT HOSTS
[--python DIR]... -- COMMAND [ARG...]``, as root, with the listening socket already on
fd 0 (or fd 3) as systemd would pass it.

Each directive in ``IMPLEMENTED`` is reproduced from the unit's own value, the way
systemd 252 applies it; the unit's other [Service] directives are not, and
tests/test_systemd_units.py names them. Two substitutions, because the tests' Python is
not a venv in /opt/fastsni: every ``/opt/fastsni/...`` path in BindReadOnlyPaths= becomes
each ``--python DIR`` (the test interpreter's prefixes and the source tree) bound
read-only at its own path; ``BindPaths=/srv/hosts`` binds HOSTS there. ``User=fastsni``
is that user if it exists, else nobody.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import pwd
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

IMPLEMENTED = {
    "WorkingDirectory",
    "User",
    "Group",
    "LimitNOFILE",
    "UMask",
    "RootDirectory",
    "BindReadOnlyPaths",
    "BindPaths",
    "MountAPIVFS",
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "ProtectProc",
    "ProcSubset",
    "ProtectKernelTunables",
    "PrivateNetwork",
    "RestrictAddressFamilies",
    "NoNewPrivileges",
    "CapabilityBoundingSet",
    "AmbientCapabilities",
    "MemoryDenyWriteExecute",
    "SystemCallArchitectures",
    "SystemCallFilter",
    "SystemCallErrorNumber",
    "StandardInput",
    "Sockets",
    "CPUAffinity",
}

libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 24, 38, 65, 1
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
DEVICES = ["null", "zero", "full", "random", "urandom", "tty"]  # PrivateDevices=yes keeps these


def check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def mount(source: str, target: str | Path, fstype: str | None, flags: int, data: str | None = None) -> None:
    check(
        libc.mount(
            source.encode(),
            str(target).encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {source} on {target}",
    )


def service_section(unit: Path) -> dict[str, list[str]]:
    """[Service] directives; a directive given several times keeps every value in order."""
    values: dict[str, list[str]] = {}
    section = None
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def yes(values: dict[str, list[str]], key: str) -> bool:
    return values.get(key, ["no"])[-1] in ("yes", "true", "1", "on")


def bind(source: str, target: Path, read_only: bool) -> None:
    if os.path.isdir(source):
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
    mount(source, target, None, MS_BIND | MS_REC)
    if read_only:
        mount("none", target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def bind_paths(value: str, python: list[str]) -> list[tuple[str, str]]:
    """BindReadOnlyPaths=/BindPaths= words as (source, target); '-' marks optional ones."""
    pairs = []
    for word in value.split():
        optional = word.startswith("-")
        source, _, target = word.lstrip("-").partition(":")
        if source.startswith("/opt/fastsni/"):  # the production venv: the tests' Python instead
            pairs += [(path, path) for path in python]
            continue
        if optional and not os.path.exists(source):
            continue
        pairs.append((source, target or source))
    return list(dict.fromkeys(pairs))


def build_root(values: dict[str, list[str]], hosts: str, python: list[str]) -> Path:
    """RootDirectory= as systemd sets it up: an empty directory, the binds, API file systems."""
    root = Path(tempfile.mkdtemp(prefix="unit-root-", dir=Path(hosts).parent))
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    if yes(values, "PrivateTmp"):  # first: the tests' Python may itself live under /tmp
        for tmp in ("tmp", "var/tmp"):
            (root / tmp).mkdir(parents=True)
            mount("tmpfs", root / tmp, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for value in values.get("BindReadOnlyPaths", []):
        for source, target in bind_paths(value, python):
            bind(source, root / target.lstrip("/"), read_only=True)
    for value in values.get("BindPaths", []):
        for word in value.split():
            assert word == "/srv/hosts", f"unexpected BindPaths= word {word!r}"
            bind(hosts, root / "srv/hosts", read_only=False)
    if yes(values, "MountAPIVFS"):
        options = []
        if values.get("ProtectProc", ["default"])[-1] != "default":
            options.append(f"hidepid={values['ProtectProc'][-1]}")
        if values.get("ProcSubset", ["all"])[-1] == "pid":
            options.append("subset=pid")
        (root / "proc").mkdir()
        mount("proc", root / "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ",".join(options) or None)
        (root / "sys").mkdir()
        sys_flags = MS_RDONLY if yes(values, "ProtectKernelTunables") else 0
        mount("sysfs", root / "sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | sys_flags)
        (root / "dev").mkdir()
        if yes(values, "PrivateDevices"):
            mount("tmpfs", root / "dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755")
            for device in DEVICES:
                bind(f"/dev/{device}", root / "dev" / device, read_only=False)
        else:
            bind("/dev", root / "dev", read_only=False)
    if values.get("ProtectSystem", ["no"])[-1] in ("strict", "full", "yes"):
        mount("none", root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    # ProtectHome=yes: /home, /root and /run/user do not exist in this root at all.
    return root


def syscall_group(name: str) -> set[str]:
    """A SystemCallFilter= word as the set of system call names systemd expands it to."""
    if not name.startswith("@"):
        return {name}
    listing = subprocess.run(
        ["systemd-analyze", "syscall-filter", name], capture_output=True, text=True, check=True
    ).stdout
    names: set[str] = set()
    for line in listing.splitlines()[1:]:
        word = line.strip()
        if word and not word.startswith("#"):
            names |= syscall_group(word)
    return names


class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]


SCMP_ACT_ALLOW, SCMP_CMP_EQ, SCMP_CMP_MASKED_EQ = 0x7FFF0000, 4, 7


def scmp_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class Filter:
    """One seccomp filter through libseccomp (native architecture only, like
    SystemCallArchitectures=native: a call from another ABI is killed)."""

    seccomp = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2", use_errno=True)
    seccomp.seccomp_init.restype = ctypes.c_void_p
    seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
    seccomp.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(ArgCmp),
    ]
    seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
    seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]

    def __init__(self, default: int) -> None:
        self.ctx = self.seccomp.seccomp_init(default)

    def rule(self, action: int, name: str, *conditions: tuple[int, int, int, int]) -> None:
        number = self.seccomp.seccomp_syscall_resolve_name(name.encode())
        if number < 0:  # a name this architecture does not have
            return
        array = (ArgCmp * max(1, len(conditions)))(*[ArgCmp(*c) for c in conditions])
        result = self.seccomp.seccomp_rule_add_array(self.ctx, action, number, len(conditions), array)
        if result not in (0, -errno.EEXIST):
            raise OSError(-result, f"seccomp rule for {name}: {os.strerror(-result)}")

    def load(self) -> None:
        result = self.seccomp.seccomp_load(self.ctx)
        if result:
            raise OSError(-result, f"seccomp_load: {os.strerror(-result)}")


def system_call_filters(values: dict[str, list[str]]) -> list[Filter]:
    """systemd installs one seccomp filter per concern; the kernel applies them all."""
    filters = []
    allow: set[str] = set()
    deny: set[str] = set()
    for value in values.get("SystemCallFilter", []):
        if value.startswith("~"):
            for word in value[1:].split():
                deny |= syscall_group(word)
        else:
            for word in value.split():
                allow |= syscall_group(word)
    if allow or deny:
        code = getattr(errno, values.get("SystemCallErrorNumber", ["EPERM"])[-1])
        allow_list = Filter(scmp_errno(code))
        for name in sorted(allow - deny):
            allow_list.rule(SCMP_ACT_ALLOW, name)
    if "RestrictAddressFamilies" in values:
        allowed = {int(getattr(socket, family)) for family in values["RestrictAddressFamilies"][-1].split()}
        families = Filter(SCMP_ACT_ALLOW)
        for family in range(64):
            if family not in allowed:
                families.rule(scmp_errno(errno.EAFNOSUPPORT), "socket", (0, SCMP_CMP_EQ, family, 0))
        filters.append(families)
    if yes(values, "MemoryDenyWriteExecute"):  # systemd's rules: no W+X mapping, no exec gain
        prot_write, prot_exec, shm_exec = 2, 4, 0o100000
        wx = Filter(SCMP_ACT_ALLOW)
        both = prot_write | prot_exec
        wx.rule(scmp_errno(errno.EPERM), "mmap", (2, SCMP_CMP_MASKED_EQ, both, both))
        wx.rule(scmp_errno(errno.EPERM), "mprotect", (2, SCMP_CMP_MASKED_EQ, prot_exec, prot_exec))
        wx.rule(scmp_errno(errno.EPERM), "pkey_mprotect", (2, SCMP_CMP_MASKED_EQ, prot_exec, prot_exec))
        wx.rule(scmp_errno(errno.EPERM), "shmat", (2, SCMP_CMP_MASKED_EQ, shm_exec, shm_exec))
        filters.append(wx)
    if allow or deny:
        filters.append(allow_list)
    return filters


def service_user(values: dict[str, list[str]]) -> pwd.struct_passwd:
    name = values.get("User", ["root"])[-1]
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return pwd.getpwnam("nobody")


def option(options: list[str], name: str) -> list[str]:
    return [options[i + 1] for i, word in enumerate(options) if word == name]


def main(argv: list[str]) -> None:
    split = argv.index("--")
    unit, hosts, options, command = Path(argv[0]), argv[1], argv[2:split], argv[split + 1 :]
    python = option(options, "--python")
    instance = (option(options, "--instance") or [""])[-1]
    values = service_section(unit)
    values = {key: [value.replace("%i", instance) for value in vals] for key, vals in values.items()}
    if "Sockets" in values:  # passed natively: fd 3, LISTEN_FDS=1, LISTEN_PID (kept across exec)
        os.dup2(0, 3)
        null = os.open("/dev/null", os.O_RDWR)
        os.dup2(null, 0)
        os.close(null)
        os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="connection")
    else:
        assert values.get("StandardInput") == ["socket"], "the listening socket is on fd 0"
    if "CPUAffinity" in values:
        os.sched_setaffinity(0, {int(cpu) for cpu in values["CPUAffinity"][-1].split()})
    last_capability = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    user = service_user(values)
    filters = system_call_filters(values)  # before the root: systemd-analyze is not inside
    check(libc.unshare(CLONE_NEWNS | (CLONE_NEWNET if yes(values, "PrivateNetwork") else 0)), "unshare")
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    if yes(values, "PrivateNetwork"):  # systemd brings the namespace's loopback device up
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    if "RootDirectory" in values:
        root = build_root(values, hosts, python)
        os.chroot(root)
    os.chdir(values.get("WorkingDirectory", ["/"])[-1])
    if "LimitNOFILE" in values:  # one value sets both limits; capped at what this machine allows
        limit = min(int(values["LimitNOFILE"][-1]), resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    if "UMask" in values:
        os.umask(int(values["UMask"][-1], 8))
    if values.get("CapabilityBoundingSet", ["x"])[-1] == "":
        for capability in range(last_capability + 1):
            check(libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0), f"drop capability {capability}")
    if values.get("AmbientCapabilities", ["x"])[-1] == "":
        check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient capabilities")
    os.setgroups([])
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)
    if yes(values, "NoNewPrivileges"):
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    for seccomp_filter in filters:  # the allow list last, as systemd does: it forbids seccomp(2)
        seccomp_filter.load()
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
