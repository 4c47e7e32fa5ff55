"""Run tries from inside a process confined exactly as the proxies confine themselves:
``python confined_probe.py HOSTS TRY...`` (HOSTS becomes the current directory, held the
way the twin chosen by FASTSNI_NO_EXTENSIONS holds it; then fastsni.confine.confine).

With ``--landlock-only`` first, only no_new_privs and Landlock are applied (each layer
must hold on its own).  Each TRY is ``kind:argument``; the output is one JSON object: the start line's
confinement text and, per try, "ok" or the errno name it failed with.  Used by
tests/test_sandbox.py, which holds the other ends (listeners, files, processes).
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import socket
import sys

from fastsni import confine as confine_module
from fastsni import twins
from fastsni.confine import confine

libc = ctypes.CDLL(None, use_errno=True)
PTRACE_ATTACH = 16


def _errno_of(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def attempt(kind: str, argument: str) -> None:
    """Do one thing that confinement must (or, for the controls, must not) stop."""
    if kind == "write":  # create and write a file
        fd = os.open(argument, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b"escaped\n")
        os.close(fd)
    elif kind == "read":
        with open(argument, "rb") as file:
            file.read(1)
    elif kind == "unlink":
        os.unlink(argument)
    elif kind == "mkdir":
        os.mkdir(argument)
    elif kind == "tcp-connect":  # no getaddrinfo: nothing but socket() and connect()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(("127.0.0.1", int(argument)))
    elif kind == "tcp-bind":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", int(argument)))
            sock.listen()
    elif kind == "udp":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"escaped", ("127.0.0.1", int(argument)))
    elif kind == "unix-connect":  # a path, or @name for the abstract namespace
        address = "\0" + argument[1:] if argument.startswith("@") else argument
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(address)
    elif kind == "exec":
        os.execv(argument, [argument])
    elif kind == "fork":
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    elif kind == "kill":
        os.kill(int(argument), 0)
    elif kind == "ptrace":
        if libc.ptrace(PTRACE_ATTACH, int(argument), None, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    elif kind == "exec-memory":
        mapping = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        mapping.close()
    elif kind == "signal-self":  # a control: the proxies' own signal handling
        os.kill(os.getpid(), 0)
    else:
        raise SystemExit(f"unknown try {kind!r}")


def main(hosts: str, tries: list[str]) -> None:
    os.chdir(hosts)
    sys.path.insert(0, os.getcwd())  # as `python -m fastsni` started in the tree has it
    engine = twins.load("fastsni.engine", "fastsni._engine")
    if tries and tries[0] == "--landlock-only":  # one layer alone holds too
        tries = tries[1:]
        confine_module.prctl(confine_module.PR_SET_NO_NEW_PRIVS, 1, what="no_new_privs")
        abi = confine_module.landlock_abi()
        confine_module.install_landlock(abi, engine.open_hosts())
        said = f"landlock only (abi {abi})"
    else:
        said = confine(engine.open_hosts())
    results = {}
    for one in tries:
        kind, _, argument = one.partition(":")
        try:
            attempt(kind, argument)
            results[one] = "ok"
        except OSError as exc:
            results[one] = _errno_of(exc)
    print(json.dumps({"confined": said, "twin": engine.__name__, "results": results}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
