"""``fastsni-release [REV]``: build a commit into a new release, start it, deploy it, stop the old one.

Run by a site owner, typically from a git pre-receive hook (examples/pre-receive) in her
bare repository: without REV it reads the hook's ``OLD NEW REF`` lines and releases the
configured branch's NEW commit.  Steps:

1. The release directory ``AREA/NAME-COMMIT`` is made in the owner's release area
   (default ``HOSTS/_<you>``, which must be yours alone), owner-only plus a default ACL
   entry for the proxy's user; the commit is unpacked there (git archive) and ``./build``
   runs in it when it has one; it must leave an executable ``bin/serve``.
2. The release is started under the owner's service manager: a systemd user unit
   (template fastsni-release@.service, instance = the release's path) or a runit
   service directory in the directory her runsvdir watches.
3. fastsni-deploy probes it and switches NAME to it (ownership and the tree first), drains
   the previous release and stops it; the newest KEEP releases stay, older ones go.

Any failure prints one ``NOT deployed: WHY`` line, stops and removes the new release,
leaves NAME on what it served, and exits 1: in a pre-receive hook, git push then reports
the push as rejected and the branch does not move.  Settings come from the command line,
else the environment (FASTSNI_NAME, FASTSNI_HOSTS, ...), else git config (fastsni.name,
fastsni.hosts, ...), else the defaults below; the hook itself is never edited.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

from fastsni import deploy, tree

ZERO = "0" * 40  # a ref's old or new value when it is created or deleted (githooks(5))
# name: (default, help); each one is also FASTSNI_<NAME> and git config fastsni.<name>
SETTINGS = {
    "name": (None, "the hostname to deploy (required)"),
    "hosts": ("/srv/hosts", "the proxies' hosts directory"),
    "area": (None, "your release area (default: HOSTS/_<you>)"),
    "branch": ("main", "the branch whose pushes are released"),
    "keep": ("3", "how many releases to keep, the serving one included"),
    "manager": ("systemd", "the service manager: systemd (user units) or runit"),
    "unit": ("fastsni-release", "systemd: the template unit UNIT@.service"),
    "service-dir": ("~/service", "runit: the directory your runsvdir watches"),
    "proxy-user": ("fastsni", "the proxies' user, given search and connect by ACL; 'none': no ACL"),
    "build-timeout": ("600", "seconds ./build may take"),
    "timeout": ("60", "seconds the new release has to pass its probes"),
    "drain": ("60", "seconds to wait for the previous release's connections to end"),
    "probe-path": ("/", "the path fastsni-deploy's HTTP probe asks for"),
    "cafile": (None, "CA certificates the TLS probe verifies against (default: the system's)"),
    "insecure": ("false", "true: the TLS probe checks the name but not the chain (staging)"),
}
SERVICE_PREFIX = "fastsni-"  # runit service directories: fastsni-<release>
SUPERVISE_WAIT = 15.0  # runsvdir looks for new service directories at least every 5 s
STOP_WAIT = 30  # seconds a release has to stop before it is killed


class NotDeployed(Exception):
    """The release failed; the message says why and what to do."""


def say(message: str) -> None:
    print(f"fastsni-release: {message}", flush=True)


@dataclass
class Settings:
    values: dict[str, str | None]

    def __getitem__(self, key: str) -> str | None:
        return self.values[key]

    def number(self, key: str) -> float:
        text = self.values[key]
        try:
            return float(text or "")
        except ValueError:
            raise NotDeployed(f"{key} is {text!r}, not a number") from None


def git_config(key: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", "config", "--get", f"fastsni.{key}"], capture_output=True, text=True, timeout=10
        )
    except OSError:
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def settings(args: argparse.Namespace) -> Settings:
    values: dict[str, str | None] = {}
    for key, (default, _) in SETTINGS.items():
        given = getattr(args, key.replace("-", "_"))
        env = os.environ.get("FASTSNI_" + key.upper().replace("-", "_"))
        values[key] = next((v for v in (given, env) if v is not None), None) or git_config(key) or default
    you = tree.login(os.geteuid())
    values["area"] = values["area"] or os.path.join(values["hosts"] or ".", f"_{you}")
    values["service-dir"] = os.path.expanduser(values["service-dir"] or "")
    return Settings(values)


def run(argv: list[str], what: str, timeout: float, **options) -> subprocess.CompletedProcess:
    """Run a command whose output the pusher sees; NotDeployed if it fails or takes too long."""
    try:
        result = subprocess.run(argv, timeout=timeout, stdout=sys.stdout, stderr=sys.stderr, **options)
    except FileNotFoundError:
        raise NotDeployed(f"{what}: {argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise NotDeployed(f"{what} took longer than {timeout:g} s") from None
    if result.returncode != 0:
        raise NotDeployed(f"{what} failed (exit {result.returncode}); see its output above")
    return result


class Systemd:
    """A user unit per release: UNIT@<escaped release path>.service (examples/systemd)."""

    def __init__(self, config: Settings) -> None:
        self.template = config["unit"]
        # systemctl --user needs the user's manager, also from an ssh session without a login
        os.environ.setdefault("XDG_RUNTIME_DIR", f"/run/user/{os.geteuid()}")

    def unit(self, release: str) -> str:
        escaped = subprocess.run(
            ["systemd-escape", "--path", release], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        return f"{self.template}@{escaped}.service"

    def start(self, release: str) -> None:
        what = "systemctl --user start (is your user manager running? loginctl enable-linger, as root)"
        run(["systemctl", "--user", "start", self.unit(release)], what, 60)

    def stop(self, release: str) -> None:
        with contextlib.suppress(NotDeployed, subprocess.SubprocessError, OSError):
            run(["systemctl", "--user", "stop", self.unit(release)], "systemctl --user stop", 120)


class Runit:
    """A service directory per release in the directory the owner's runsvdir watches:
    ``run`` starts bin/serve with umask 0007 in its own process group, which ``control/t``
    (down, exit) and ``control/k`` (kill) signal as a whole (runsv(8), customize control)."""

    RUN = """#!/bin/sh
# made by fastsni-release: serves {release}; its sockets are bound there
umask 0007
cd {quoted} || exit 111
exec chpst -P ./bin/serve 2>&1
"""
    SIGNAL = """#!/bin/sh
# the whole process group of ./bin/serve (chpst -P made it its leader)
exec kill -{signal} -- "-$(cat supervise/pid)"
"""

    def __init__(self, config: Settings) -> None:
        self.services = config["service-dir"] or ""
        if not os.path.isdir(self.services):
            raise NotDeployed(
                f"{self.services} does not exist: make it and have runsvdir watch it (see docs/owner.md)"
            )

    def service(self, release: str) -> str:
        return os.path.join(self.services, SERVICE_PREFIX + os.path.basename(release))

    def start(self, release: str) -> None:
        service = self.service(release)
        temp = os.path.join(self.services, f".{os.path.basename(service)}.new")  # runsvdir skips dot names
        shutil.rmtree(temp, ignore_errors=True)
        os.makedirs(os.path.join(temp, "control"), mode=0o700)
        quoted = "'" + release.replace("'", "'\\''") + "'"
        scripts = {
            "run": self.RUN.format(release=release, quoted=quoted),
            "control/t": self.SIGNAL.format(signal="TERM"),
            "control/k": self.SIGNAL.format(signal="KILL"),
        }
        for name, text in scripts.items():
            with open(os.path.join(temp, name), "w", encoding="utf-8") as out:
                out.write(text)
            os.chmod(os.path.join(temp, name), 0o700)
        os.rename(temp, service)  # whole, at once: runsvdir never sees half a service
        deadline = time.monotonic() + SUPERVISE_WAIT
        while not os.path.exists(os.path.join(service, "supervise", "ok")):
            if time.monotonic() >= deadline:
                raise NotDeployed(
                    f"nothing supervises {self.services}: no runsv started {service} within "
                    f"{SUPERVISE_WAIT:g} s; start your runsvdir on it (see docs/owner.md)"
                )
            time.sleep(0.1)

    def stop(self, release: str) -> None:
        service = self.service(release)
        if not os.path.isdir(service):
            return
        gone = os.path.join(self.services, f".{os.path.basename(service)}.gone")
        shutil.rmtree(gone, ignore_errors=True)
        os.rename(service, gone)  # runsvdir no longer restarts its runsv
        if os.path.exists(os.path.join(gone, "supervise", "ok")):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run(
                    ["sv", "-w", str(STOP_WAIT), "force-stop", gone], capture_output=True, timeout=60
                )
                subprocess.run(["sv", "exit", gone], capture_output=True, timeout=10)
            wait_unlocked(os.path.join(gone, "supervise", "lock"), 10)
        shutil.rmtree(gone, ignore_errors=True)


def wait_unlocked(path: str, seconds: float) -> None:
    """Wait until no runsv holds ``path`` (its supervise/lock) any more."""
    deadline = time.monotonic() + seconds
    with contextlib.suppress(OSError), open(path, "a") as lock:
        while time.monotonic() < deadline:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                time.sleep(0.05)


MANAGERS = {"systemd": Systemd, "runit": Runit}


def pushed(lines: Iterable[str], branch: str) -> str | None:
    """The commit a pre-receive (or post-receive) hook's input moves ``branch`` to; None if it
    does not (another branch, or a deletion)."""
    found = None
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and parts[2] == f"refs/heads/{branch}" and parts[1] != ZERO:
            found = parts[1]
    return found


def make_release(config: Settings, release: str, commit: str) -> None:
    os.mkdir(release, 0o750)
    os.chmod(release, 0o750)  # whatever the umask
    proxy = config["proxy-user"]
    if proxy and proxy != "none":  # the proxy's user may search it and connect to what is bound there
        what = "setfacl (Debian: apt-get install acl; or set fastsni.proxy-user none)"
        run(["setfacl", "-m", f"u:{proxy}:x", release], what, 30)
        run(["setfacl", "-d", "-m", f"u:{proxy}:rwx,g::---,o::---", release], what, 30)
    archive = subprocess.Popen(["git", "archive", commit], stdout=subprocess.PIPE)
    try:
        run(["tar", "-x", "-C", release], f"unpacking {commit[:12]}", 300, stdin=archive.stdout)
    finally:
        assert archive.stdout is not None
        archive.stdout.close()
        if archive.wait(timeout=60) != 0:
            raise NotDeployed(f"git archive {commit[:12]} failed (exit {archive.returncode})")
    if os.path.exists(os.path.join(release, "build")):
        say(f"building {os.path.basename(release)}")
        run(["./build"], "./build", config.number("build-timeout"), cwd=release)
    if not os.access(os.path.join(release, "bin", "serve"), os.X_OK):
        raise NotDeployed("the release has no executable bin/serve (./build must leave one)")


def check_area(area: str, hosts: str) -> None:
    if not os.path.isdir(area):
        raise NotDeployed(
            f"your release area {area} does not exist; make it (or ask the administrator): "
            f"install -d -m 0750 {area} && setfacl -m u:fastsni:x {area}"
        )
    real = os.path.realpath(area)
    if not tree.inside(real, os.path.realpath(hosts)):
        raise NotDeployed(f"your release area {area} is not inside the hosts directory {hosts}")
    try:
        deploy.check_own_tree(os.path.realpath(hosts), real, "your release area")
    except deploy.Refused as exc:
        raise NotDeployed(str(exc)) from None


def deploy_release(config: Settings, entry: str, release: str) -> tuple[int, str]:
    """fastsni-deploy, in this process: (its exit code, what it printed to stderr)."""
    argv = ["--hosts", config["hosts"] or ".", "--timeout", str(config.number("timeout"))]
    argv += ["--drain", str(config.number("drain")), "--path", config["probe-path"] or "/"]
    if config["cafile"]:
        argv += ["--cafile", config["cafile"]]
    if (config["insecure"] or "").lower() in ("1", "true", "yes", "on"):
        argv.append("--insecure")
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        code = deploy.deploy(deploy.parse([*argv, entry, release]))
    if code in (deploy.EXIT_OK, deploy.EXIT_DRAIN_TIMEOUT):
        sys.stderr.write(errors.getvalue())
    return code, errors.getvalue().strip()  # else it becomes the NOT deployed line


def prune(area: str, entry: str, keep: int, serving: str, manager) -> None:
    """Remove all but the newest ``keep`` releases of ``entry`` (the serving one always stays)."""
    pattern = re.compile(re.escape(entry) + r"-[0-9a-f]{12}$")
    releases = [os.path.join(area, name) for name in os.listdir(area) if pattern.match(name)]
    releases.sort(key=lambda path: os.stat(path).st_mtime, reverse=True)
    kept = [serving]
    for path in releases:
        if os.path.realpath(path) == serving:
            continue
        if len(kept) < keep:
            kept.append(path)
            continue
        manager.stop(path)
        shutil.rmtree(path, ignore_errors=True)
        say(f"removed the old release {os.path.basename(path)}")


def preflight(config: Settings) -> str:
    """The entry to deploy, once it is known to be yours (or new) and your area fit: before
    anything is built or started."""
    name = config["name"]
    if not name:
        raise NotDeployed("no name to deploy: git config fastsni.name NAME (in this repository)")
    try:
        entry = tree.entry_name(name)
    except ValueError as exc:
        raise NotDeployed(f"{name}: {exc}") from None
    hosts = config["hosts"] or "."
    try:
        deploy.check_entry_owner(os.path.realpath(hosts), entry)
    except deploy.Refused as exc:
        raise NotDeployed(str(exc)) from None
    check_area(config["area"] or "", hosts)
    return entry


def release(config: Settings, entry: str, commit: str) -> int:
    hosts, area = config["hosts"] or ".", config["area"] or ""
    manager_name = config["manager"] or ""
    if manager_name not in MANAGERS:
        raise NotDeployed(f"unknown manager {manager_name!r}: fastsni.manager is systemd or runit")
    keep = max(1, int(config.number("keep")))
    with open(os.path.join(area, ".fastsni-release.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one release of this area at a time
        manager = MANAGERS[manager_name](config)
        release = os.path.join(os.path.realpath(area), f"{entry}-{commit[:12]}")
        previous = (
            os.path.realpath(os.path.join(hosts, entry)) if os.path.lexists(f"{hosts}/{entry}") else None
        )
        if previous == release:
            say(f"{entry} already serves {os.path.basename(release)}: nothing to do")
            return 0
        if os.path.lexists(release):  # a failed or old release of the same commit: build it afresh
            manager.stop(release)
            shutil.rmtree(release)
        say(f"releasing {commit[:12]} into {release}")
        try:
            make_release(config, release, commit)
            say(f"starting it ({manager_name})")
            manager.start(release)
            code, why = deploy_release(config, entry, release)
            if code not in (deploy.EXIT_OK, deploy.EXIT_DRAIN_TIMEOUT):
                raise NotDeployed(why.removeprefix("fastsni-deploy: ") or f"fastsni-deploy exited {code}")
        except BaseException:
            manager.stop(release)
            shutil.rmtree(release, ignore_errors=True)
            raise
        if code == deploy.EXIT_DRAIN_TIMEOUT:
            say("the previous release still had connections when the drain ran out; stopping it anyway")
        if previous and os.path.dirname(previous) == os.path.realpath(area):
            manager.stop(previous)
            say(f"stopped the previous release {os.path.basename(previous)}")
        elif previous:
            say(f"note: the previous target {previous} is not in your release area: stop it yourself")
        prune(os.path.realpath(area), entry, keep, release, manager)
        say(f"deployed {commit[:12]}: {entry} -> {os.path.relpath(release, os.path.realpath(hosts))}")
        return 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fastsni-release",
        usage="fastsni-release [options] [REV]",
        description=__doc__.split("\n\n", 1)[1].split("Steps:")[0].strip(),
        epilog="every option is also FASTSNI_<OPTION> in the environment and fastsni.<option> in git\n"
        "config (e.g. FASTSNI_PROBE_PATH, git config fastsni.probe-path); the command line wins,\n"
        "then the environment, then git config.\n\n"
        "exit codes: 0 deployed (or nothing to do); 1 NOT deployed (nothing changed); 2 bad usage",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "rev", metavar="REV", nargs="?", help="the commit to release (default: read a hook's input)"
    )
    for key, (default, text) in SETTINGS.items():
        shown = f" (default: {default})" if default else ""
        parser.add_argument(f"--{key}", metavar=key.split("-")[-1].upper(), help=text + shown)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    try:
        config = settings(args)
        entry = preflight(config)
        if args.rev:
            commit = subprocess.run(
                ["git", "rev-parse", "--verify", f"{args.rev}^{{commit}}"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            if not commit:
                raise NotDeployed(f"{args.rev} is not a commit of this repository")
        else:
            commit = pushed(sys.stdin, config["branch"] or "main")
            if commit is None:
                say(f"nothing pushed to {config['branch']}: nothing to deploy")
                raise SystemExit(0)
        code = release(config, entry, commit)
    except NotDeployed as exc:
        sys.stdout.flush()
        sys.stderr.write(f"NOT deployed: {exc}\n")
        code = 1
    except KeyboardInterrupt:
        sys.stderr.write("NOT deployed: interrupted\n")
        code = 1
    except (OSError, subprocess.SubprocessError) as exc:
        sys.stderr.write(f"NOT deployed: {exc}\n")
        code = 1
    raise SystemExit(code)


if __name__ == "__main__":
    main()
