"""``fastsni-deploy [options] NAME TARGET``: probe a new version, switch NAME to it atomically, drain the old.

Run by the owner of NAME's entry.  TARGET is a directory holding the new version's
tls-socket and/or http-socket, typically a release directory such as
_alice/blog-v43 in the owner's own release area (a name the proxies never route to).  Steps:

1. NAME is normalised like fastsni-hostname; its entry, if any, must be yours; TARGET must
   resolve inside the hosts tree, in directories that are yours alone (your release area
   _<you>/).  All of this is checked before any probe.
2. Every socket in TARGET, and each one the current target serves, is probed
   (fastsni.probe), retrying until --timeout while the new version starts.  A failure
   changes nothing.
3. A relative symlink is made under a private random name in the hosts directory and
   renamed over NAME (rename(2) is atomic: every lookup finds the old or the new link).
4. The previous target is printed and recorded in TARGET (for --rollback); with
   --drain, wait until the kernel holds no connection on the previous target's sockets
   (or the time is up), then run --then.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import secrets
import stat
import subprocess
import sys
import time

from fastsni import probe, tree

EXIT_OK = 0
EXIT_PROBE_FAILED = 1  # nothing changed
EXIT_USAGE = 2  # nothing changed
EXIT_REFUSED = 3  # nothing changed: not yours, or the entry or TARGET cannot be switched
EXIT_DRAIN_TIMEOUT = 4  # switched; connections were still open on the previous target when --drain ran out
EXIT_THEN_FAILED = 5  # switched (and drained); the --then command failed

PREVIOUS_RECORD = ".fastsni-previous"  # in each target: the link text it replaced, for --rollback
TEMP_PREFIX = ".fastsni-deploy-"
DRAIN_POLL = 0.1  # seconds between looks at the kernel's socket table

DESCRIPTION = __doc__.split("\n\n", 1)[1].split("Steps:")[0].strip()
EPILOG = """exit codes: 0 switched (and drained, and --then succeeded); 1 a probe failed;
2 bad usage or name; 3 refused (the entry is not yours, or TARGET is not yours alone,
or either cannot be switched; said before any probe);
nothing changed for 1-3. 4 switched, but --drain ran out with connections open on the
previous target (--then still ran); 5 switched, but the --then command failed.

roll back: fastsni-deploy --rollback NAME (back to the target recorded at the last switch)"""


class Refused(Exception):
    """The switch cannot be made; nothing was changed.  The message says what to do."""


def say(message: str) -> None:
    print(message, flush=True)


def fail(name: str, message: str, code: int) -> int:
    sys.stderr.write(f"fastsni-deploy: {name}: {message}\n")
    return code


def current_target(hosts: str, entry: str) -> tuple[str | None, str | None]:
    """(link text, resolved directory or None if it dangles) of ``hosts/entry``; (None, None) if absent."""
    path = os.path.join(hosts, entry)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None, None
    if stat.S_ISDIR(info.st_mode):
        area = f"{hosts}/_{tree.login(os.geteuid())}"
        raise Refused(
            f"{path} is a real directory, not a symlink, so it cannot be switched atomically. Convert it "
            f"once: start the next version in a release directory (e.g. {area}/{entry}-v2), then "
            f"`fastsni-deploy --convert {entry} {area}/{entry}-v1` moves the current one there "
            "and leaves a link in its place in one atomic step (its backend keeps serving)"
        )
    if not stat.S_ISLNK(info.st_mode):
        raise Refused(f"{path} is neither a symlink nor a directory; remove it or deploy another name")
    resolved = os.path.realpath(path)
    return os.readlink(path), resolved if os.path.isdir(resolved) else None


def check_entry_owner(hosts: str, entry: str) -> None:
    """Only the entry's owner (or root) may switch it: said at once, before any probe."""
    uid = os.geteuid()
    path = os.path.join(hosts, entry)
    try:
        owner = os.lstat(path).st_uid  # a symlink's own owner, as the proxies take it
    except FileNotFoundError:
        return
    if uid not in (0, owner):
        raise Refused(
            f"{path} is owned by {_owner(path)}, not by you ({tree.who(uid)}): only its "
            "owner (or root) can switch it; deploy a name of your own"
        )


def check_own_tree(hosts: str, path: str, what: str) -> None:
    """Every directory from the hosts directory down to ``path`` (resolved, inside the tree)
    must be yours and writable by nobody else: otherwise another owner could pre-create or
    replace the release (a shared ``_releases/``, someone else's ``_<owner>/``).  Root may
    deploy anything."""
    uid = os.geteuid()
    if uid == 0:
        return
    you = tree.who(uid)
    area = f"{hosts}/_{tree.login(uid)}"
    current = hosts
    for part in os.path.relpath(path, hosts).split(os.sep):
        current = os.path.join(current, part)
        info = os.stat(current)
        if info.st_uid != uid:
            raise Refused(
                f"{what} lies in {current}, owned by {_owner(current)}, not by you ({you}): keep your "
                f"releases in your own area, {area} (install -d -m 0750 {area}, or ask "
                "the administrator to make it for you)"
            )
        others = tree.other_writers(current, info, {0, uid})
        if others:
            raise Refused(
                f"{what} lies in {current}, which {', '.join(others)} can write as well: they could "
                f"pre-create or replace your releases; chmod go-w {current} (and setfacl -x any other writer)"
            )


def resolve_target(hosts: str, entry: str, target: str) -> str:
    resolved = os.path.realpath(target)
    if not os.path.isdir(resolved):
        raise Refused(f"TARGET {target} is not a directory")
    if not tree.inside(resolved, hosts):
        raise Refused(
            f"TARGET {target} resolves to {resolved}, outside the hosts tree {hosts}: the proxies follow no "
            "link out of the tree; put the release inside it (e.g. _<owner>/<name>-v2) and deploy that"
        )
    if resolved == hosts:
        raise Refused("TARGET is the hosts directory itself")
    if resolved == os.path.join(hosts, entry):
        raise Refused(f"TARGET is {entry}'s own entry")
    return resolved


def wanted_sockets(target: str, previous: str | None, deadline: float) -> list[str]:
    """The sockets to probe: each one the current target serves, and whatever TARGET has.
    While that is nothing, wait (until ``deadline``) for the new version to create one."""
    served = probe.sockets_in(previous) if previous else []
    while True:
        present = probe.sockets_in(target)
        leaves = [leaf for leaf in probe.LEAVES if leaf in present or leaf in served]
        if leaves:
            return leaves
        if time.monotonic() >= deadline:
            raise Refused(f"TARGET {target} has neither tls-socket nor http-socket")
        time.sleep(probe.RETRY_INTERVAL)


def missing_socket(target: str, previous: str | None, leaf: str) -> Refused:
    return Refused(
        f"the current target {previous} serves {leaf} but TARGET {target} has none: is the new version "
        f"running, and binding {leaf} there? Without it that protocol would break after the switch"
    )


def proxy_header_notes(target: str, previous: str | None) -> list[str]:
    """Warnings when the PROXY header files differ between the previous and the new target."""
    if previous is None:
        return []
    notes = []
    for leaf in ("send-proxy-v1", "send-proxy-v2"):
        before = os.path.lexists(os.path.join(previous, leaf))
        after = os.path.lexists(os.path.join(target, leaf))
        if before != after:
            change = "drops" if before else "adds"
            notes.append(f"note: the new target {change} {leaf}, so the PROXY header changes")
    return notes


def make_link(hosts: str, entry: str, text: str) -> None:
    """Point ``hosts/entry`` at ``text`` atomically: symlink under a private unique name, rename over."""
    hosts_fd = os.open(hosts, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        while True:
            temp = TEMP_PREFIX + secrets.token_hex(8)  # in a sticky directory a fixed name could be taken
            try:
                os.symlink(text, temp, dir_fd=hosts_fd)
                break
            except FileExistsError:
                continue
            except PermissionError:
                raise Refused(f"no permission to create entries in {hosts}") from None
        try:
            os.rename(temp, entry, src_dir_fd=hosts_fd, dst_dir_fd=hosts_fd)
        except OSError as exc:
            os.unlink(temp, dir_fd=hosts_fd)
            if isinstance(exc, IsADirectoryError):
                raise Refused(f"{hosts}/{entry} became a real directory meanwhile; nothing changed") from None
            if isinstance(exc, PermissionError):
                owner = _owner(os.path.join(hosts, entry))
                raise Refused(
                    f"not allowed to replace {hosts}/{entry} (owned by {owner}); in a sticky hosts "
                    "directory only an entry's owner (or root) can switch it"
                ) from None
            raise Refused(f"cannot switch {hosts}/{entry}: {exc.strerror}") from None
    finally:
        os.close(hosts_fd)


def _owner(path: str) -> str:
    try:
        return tree.who(os.lstat(path).st_uid)
    except OSError:
        return "someone else"


RENAME_EXCHANGE = 2  # linux/fs.h: renameat2() swaps the two paths atomically
AT_FDCWD = -100


def convert(hosts: str, entry: str, destination: str) -> str:
    """Move the real directory ``hosts/entry`` to ``destination`` and leave a relative link to it
    in its place, atomically: a link is made at ``destination`` whose text is right once it sits
    in the hosts directory, then renameat2(RENAME_EXCHANGE) swaps the two.  Returns the link text."""
    path = os.path.join(hosts, entry)
    if not os.path.isdir(path) or os.path.islink(path):
        raise Refused(f"{path} is not a real directory: nothing to convert")
    destination = os.path.abspath(destination)
    parent = os.path.realpath(os.path.dirname(destination))
    if not tree.inside(parent, hosts) or parent == hosts:
        raise Refused(
            f"{destination} must lie in a directory under {hosts}, such as your release area "
            f"{hosts}/_{tree.login(os.geteuid())}"
        )
    if os.path.lexists(destination):
        raise Refused(f"{destination} already exists")
    check_own_tree(hosts, parent, f"the new place of {entry}")
    destination = os.path.join(parent, os.path.basename(destination))
    text = os.path.relpath(destination, hosts)
    try:
        os.symlink(text, destination)
    except OSError as exc:
        raise Refused(f"cannot create {destination}: {exc.strerror}") from None
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.renameat2(AT_FDCWD, os.fsencode(path), AT_FDCWD, os.fsencode(destination), RENAME_EXCHANGE)
    if result != 0:
        error = ctypes.get_errno()
        os.unlink(destination)
        raise Refused(f"cannot swap {path} and {destination} atomically: {os.strerror(error)}")
    return text


def record_previous(target: str, text: str) -> bool:
    """Write the replaced link text into ``target`` for --rollback; False if it cannot be written."""
    temp = os.path.join(target, f"{PREVIOUS_RECORD}.{secrets.token_hex(4)}")
    try:
        with open(temp, "x", encoding="utf-8") as out:
            out.write(text + "\n")
        os.rename(temp, os.path.join(target, PREVIOUS_RECORD))
        return True
    except OSError:
        try:
            os.unlink(temp)
        except OSError:
            pass
        return False


def recorded_previous(hosts: str, current: str | None, entry: str) -> str:
    """--rollback: the target the current one replaced, as a path."""
    if current is None:
        raise Refused(f"{hosts}/{entry} does not point at an existing directory: nothing to roll back from")
    try:
        with open(os.path.join(current, PREVIOUS_RECORD), encoding="utf-8") as record:
            text = record.read().strip()
    except OSError:
        raise Refused(
            f"{current} has no record of what it replaced; roll back with fastsni-deploy {entry} PREVIOUS"
        ) from None
    return os.path.join(hosts, text)


def drain(paths: list[str], seconds: float) -> bool:
    """Wait (at most ``seconds``) until the kernel holds no connection on ``paths``; True if it ended."""
    deadline = time.monotonic() + seconds
    start = time.monotonic()
    shown = None
    while True:
        try:
            count = tree.connections(paths)
        except OSError as exc:
            sys.stderr.write(f"fastsni-deploy: cannot count connections (sock_diag: {exc.strerror})\n")
            return False
        if count == 0:
            say(f"drained: no connection left after {time.monotonic() - start:.1f} s")
            return True
        if count != shown:
            say(f"draining: {count} connection{'s' if count != 1 else ''} open on the previous target")
            shown = count
        if time.monotonic() >= deadline:
            say(f"drain timed out after {seconds:g} s with {count} open")
            return False
        time.sleep(DRAIN_POLL)


def run_then(command: str, name: str, target: str, previous: str) -> int:
    env = dict(os.environ, FASTSNI_NAME=name, FASTSNI_TARGET=target, FASTSNI_PREVIOUS=previous)
    result = subprocess.run(command, shell=True, env=env)
    if result.returncode != 0:
        sys.stderr.write(f"fastsni-deploy: {name}: --then command exited {result.returncode}: {command}\n")
        return EXIT_THEN_FAILED
    return EXIT_OK


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fastsni-deploy",
        usage="fastsni-deploy [options] NAME TARGET\n       fastsni-deploy [options] --rollback NAME",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", metavar="NAME", help="the hostname (or *.wildcard) to switch")
    parser.add_argument("target", metavar="TARGET", nargs="?", help="the new version's directory")
    parser.add_argument("--hosts", default=".", metavar="DIR", help="the hosts directory (default: .)")
    parser.add_argument("--rollback", action="store_true", help="switch back to what the target replaced")
    parser.add_argument(
        "--convert",
        action="store_true",
        help="NAME is a real directory: move it to TARGET and leave a link to it, in one atomic step",
    )
    parser.add_argument("--dry-run", action="store_true", help="probe and check, but switch nothing")
    parser.add_argument(
        "--drain",
        type=float,
        metavar="SECONDS",
        help="after the switch, wait at most SECONDS until no connection to the previous target remains",
    )
    parser.add_argument(
        "--then",
        metavar="COMMAND",
        help="shell command to run after the switch (and drain), e.g. stopping the old version; "
        "it gets FASTSNI_NAME, FASTSNI_TARGET and FASTSNI_PREVIOUS (directories) in its environment",
    )
    probe.add_arguments(parser, timeout=30)
    args = parser.parse_args(argv)
    if (args.target is None) != args.rollback:
        parser.error("give NAME TARGET, or --rollback NAME")
    if args.convert and (args.rollback or args.dry_run):
        parser.error("--convert takes NAME TARGET only")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    try:
        code = deploy(args)
    except KeyboardInterrupt:
        sys.stderr.write(f"fastsni-deploy: {args.name}: interrupted; see the lines above for what was done\n")
        code = 130
    raise SystemExit(code)


def deploy(args: argparse.Namespace) -> int:
    try:
        entry = tree.entry_name(args.name)
    except ValueError as exc:
        return fail(args.name, str(exc), EXIT_USAGE)
    hosts = os.path.realpath(args.hosts)
    if not os.path.isdir(hosts):
        return fail(entry, f"the hosts directory {args.hosts} does not exist", EXIT_USAGE)
    try:
        check_entry_owner(hosts, entry)
    except Refused as exc:
        return fail(entry, str(exc), EXIT_REFUSED)
    if args.convert:
        try:
            text = convert(hosts, entry, args.target)
        except Refused as exc:
            return fail(entry, str(exc), EXIT_REFUSED)
        say(f"converted: {entry} -> {text}; deploy the next version with fastsni-deploy {entry} TARGET")
        return EXIT_OK
    try:
        previous_text, previous = current_target(hosts, entry)
        target_path = recorded_previous(hosts, previous, entry) if args.rollback else args.target
        target = resolve_target(hosts, entry, target_path)
        check_own_tree(hosts, target, "TARGET")
        options = probe.options_from(args)
        deadline = time.monotonic() + options.timeout
        leaves = wanted_sockets(target, previous, deadline)
    except Refused as exc:
        return fail(entry, str(exc), EXIT_REFUSED)
    for leaf in leaves:
        path = os.path.join(target, leaf)
        try:
            result = probe.probe(path, probe.probe_name(entry), options, deadline)
        except probe.ProbeFailed as exc:
            if not os.path.lexists(path):  # only the current target has it
                return fail(entry, str(missing_socket(target, previous, leaf)), EXIT_REFUSED)
            return fail(entry, f"probe failed, nothing changed: {exc}", EXIT_PROBE_FAILED)
        say(f"probe {leaf}: ok, {result}")
    for note in proxy_header_notes(target, previous):
        say(note)
    text = os.path.relpath(target, hosts)  # relative: the tree may be moved, bind-mounted, chrooted
    top = text.split(os.sep, 1)[0]
    if os.sep in text and tree.routable(top):
        say(f"note: {top} is a hostname the proxies route; keep releases under a name starting with _ or .")
    if args.dry_run:
        say(f"dry run: would switch {entry} -> {text} (previous: {previous_text or 'none'})")
        return EXIT_OK
    try:
        if current_target(hosts, entry)[0] != previous_text:  # switched by someone else while probing
            previous_text, previous = current_target(hosts, entry)
            for leaf in probe.sockets_in(previous) if previous else []:
                if leaf not in leaves:
                    raise missing_socket(target, previous, leaf)
        make_link(hosts, entry, text)
    except Refused as exc:
        return fail(entry, str(exc), EXIT_REFUSED)
    say(f"switched {entry} -> {text}")
    say(f"previous {previous_text or 'none'}")
    if previous is None or previous == target:
        if previous == target:
            say("the previous target is the same directory: nothing to drain, --then not run")
        return EXIT_OK
    if not record_previous(target, previous_text):
        say(f"note: cannot write {target}/{PREVIOUS_RECORD}; to roll back: fastsni-deploy {entry} {previous}")
    code = EXIT_OK
    if args.drain is not None:
        if not drain([os.path.join(previous, leaf) for leaf in probe.LEAVES], args.drain):
            code = EXIT_DRAIN_TIMEOUT
    if args.then:
        code = run_then(args.then, entry, target, previous) or code
    return code


if __name__ == "__main__":
    main()
