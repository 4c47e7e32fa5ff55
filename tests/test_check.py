"""fastsni-check on crafted hosts trees: each finding reported exactly once, nothing on a clean tree.

Hostile trees (issue 16): paths that leave the tree, sockets and directories of other
owners, directories others can write; their owners are made with chown as root, so
those tests need root.  One test holds check's verdicts against a running fasthttpdir
(both twins).  Owners' log sockets (issue 19) are checked as the backend sockets are,
and as datagram sockets.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from attack_kit import http_get
from backends import http_backend, run_as, tls_http_backend
from conftest import ROOT, TEST_INSTALLED

ENV = dict(os.environ)  # the commands as installed, or from the source tree:
if not TEST_INSTALLED:
    ENV["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
NOBODY, OTHER = 65534, 65533  # the proxy's user for --user, and another owner
ALICE, BOB = 51001, 51002  # owners (no passwd or group entries: their groups are unknown)
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root to own files as other users")


@pytest.fixture
def base():
    """A directory under /tmp that every uid can search (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="fastsni-check-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def run(*args: str) -> tuple[int, list[dict], str]:
    """fastsni-check --json as a process: (exit code, findings, stderr)."""
    result = subprocess.run(
        [sys.executable, "-m", "fastsni.check", "--json", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    findings = json.loads(result.stdout)["findings"] if result.stdout else []
    return result.returncode, findings, result.stderr


def codes(findings: list[dict]) -> list[tuple[str, str, str]]:
    return sorted((finding["entry"], finding["code"], finding["severity"]) for finding in findings)


def serve(backends, directory: Path, handle=None, mode: int = 0o666) -> None:
    """A live http-socket in ``directory`` that the proxy's user may connect to."""
    backends(directory / "http-socket", handle or http_backend(directory.name))
    (directory / "http-socket").chmod(mode)


def stale(path: Path, owner: int | None = None) -> None:
    """A socket file nobody listens on (owned by ``owner``): check must never connect to
    one the proxies refuse, or it would say stale-socket."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
    path.chmod(0o666)
    if owner is not None:
        os.chown(path, owner, owner)


def directory(path: Path, owner: int | None = None, mode: int = 0o755) -> Path:
    path.mkdir()
    path.chmod(mode)  # whatever the umask
    if owner is not None:
        os.chown(path, owner, owner)
    return path


def link(path: Path, target: str | Path, owner: int | None = None) -> Path:
    path.symlink_to(target)
    if owner is not None:
        os.lchown(path, owner, owner)
    return path


def live(backends, path: Path, owner: int | None = None) -> None:
    """A listening http-socket (or tls-socket: any backend will do for a connect) at
    ``path``, owned by ``owner``, that every uid may connect to."""
    backends(path, http_backend(path.parent.name))
    path.chmod(0o666)
    if owner is not None:
        os.chown(path, owner, owner)


def test_each_finding_exactly_once(base, backends):
    hosts = base / "hosts"
    hosts.mkdir(mode=0o755)
    hosts.chmod(0o755)
    releases = hosts / "_rel"
    expected = []

    def entry(name: str, code: str | None = None, severity: str = "error", live: bool = True) -> Path:
        path = hosts / name
        path.mkdir()
        path.chmod(0o755)
        if live:
            serve(backends, path)
        if code:
            expected.append((name, code, severity))
        return path

    # names the proxies never look up, or that DNS cannot carry
    entry("Upper.example", "bad-name")
    entry("dot.example.", "bad-name")
    entry("bücher.example", "bad-name")
    entry("under_score.example", "bad-name")
    entry("a..example", "bad-name")
    entry(("x" * 60 + ".") * 4 + "xx.example", "bad-name")  # 255 bytes
    entry("y" * 64 + ".example", "not-in-dns", "warning")
    entry("dash-.example", "not-in-dns", "warning")
    # sockets
    entry("empty.example", "no-socket", live=False)
    (entry("file.example", "not-socket", live=False) / "tls-socket").write_text("not a socket")
    expected.append(("file.example", "https-redirect", "info"))  # fasthttpdir finds a tls-socket
    stale(entry("stale.example", "stale-socket", live=False) / "tls-socket")
    expected.append(("stale.example", "https-redirect", "info"))
    serve(backends, entry("private.example", "no-access", live=False), mode=0o755)  # srwxr-xr-x: root only
    # symlinks
    serve(backends, releases / "abs")
    os.symlink(releases / "abs", hosts / "abs.example")  # inside, but absolute: not followed
    expected.append(("abs.example", "leads-outside", "error"))
    serve(backends, base / "outside" / "out")
    os.symlink("../outside/out", hosts / "out.example")
    expected.append(("out.example", "leads-outside", "error"))
    os.symlink("_rel/missing", hosts / "dangle.example")
    expected.append(("dangle.example", "dangling-link", "error"))
    os.symlink("loop.example", hosts / "loop.example")
    expected.append(("loop.example", "link-loop", "error"))
    (hosts / "regular.example").write_text("")
    expected.append(("regular.example", "not-directory", "error"))
    # a wildcard, and an exact name under it that wins
    entry("*.wild.example", "wildcard", "info")
    entry("a.wild.example")
    # permissions
    entry("worldw.example", "writable").chmod(0o777)
    os.chown(entry("groupw.example", "writable"), -1, OTHER)  # a group that may hold anyone
    (hosts / "groupw.example").chmod(0o775)
    entry("rootgroup.example").chmod(0o775)  # root's group holds only root: no finding
    entry("owner.example")
    os.chown(entry("www.owner.example", "other-owner", "warning"), OTHER, OTHER)
    # PROXY headers
    (entry("v1.example", "proxy-header", "info") / "send-proxy-v1").touch()
    (entry("v2.example", "proxy-header", "info") / "send-proxy-v2").touch()
    both = entry("both.example", "proxy-header", "info")
    (both / "send-proxy-v1").touch()
    (both / "send-proxy-v2").touch()
    (hosts / ".hidden").mkdir()  # private entries are not hosts

    code, findings, err = run("--hosts", str(hosts), "--user", str(NOBODY))
    assert codes(findings) == sorted(expected), err
    assert code == 1
    messages = {
        finding["entry"]: finding["message"] for finding in findings if finding["code"] != "proxy-header"
    }
    assert "rename it to 'upper.example'" in messages["Upper.example"]
    assert "rename it to 'dot.example'" in messages["dot.example."]
    assert "rename it to 'xn--bcher-kva.example'" in messages["bücher.example"]
    assert "cannot connect to http-socket (srwxr-xr-x" in messages["private.example"]
    assert "a.wild.example" in messages["*.wild.example"]
    assert "(an absolute link)" in messages["abs.example"]
    assert messages["abs.example"].endswith("link relatively, inside the tree: -> _rel/abs")
    assert "climbs above the hosts directory" in messages["out.example"]
    assert "move what it should serve into the tree" in messages["out.example"]
    assert "-> ../" not in messages["out.example"].split("; ", 1)[1]  # no fix that leaves the tree
    assert "writable by group gid 65533:" in messages["groupw.example"]
    headers = {
        finding["entry"]: finding["message"] for finding in findings if finding["code"] == "proxy-header"
    }
    assert "v1 line" in headers["v1.example"] and "v2 header" in headers["v2.example"]
    assert "v2 wins" in headers["both.example"]

    human = subprocess.run(
        [sys.executable, "-m", "fastsni.check", "--hosts", str(hosts), "--user", str(NOBODY)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert human.returncode == 1
    assert len(human.stdout.splitlines()) == len(expected)
    assert "error: stale.example: nobody listens on tls-socket" in human.stdout


def clean_tree(base: Path, backends, ca=None) -> Path:
    hosts = base / "hosts"
    (hosts / "_rel" / "v1").mkdir(parents=True)
    for path in (hosts, hosts / "_rel", hosts / "_rel" / "v1"):
        path.chmod(0o755)
    (hosts / "good.example").mkdir(mode=0o755)
    serve(backends, hosts / "good.example")
    if ca is not None:
        backends(hosts / "good.example" / "tls-socket", tls_http_backend(ca, "good.example"))
        (hosts / "good.example" / "tls-socket").chmod(0o666)
    os.symlink("good.example", hosts / "www.good.example")
    serve(backends, hosts / "_rel" / "v1")
    os.symlink("_rel/v1", hosts / "app.example")
    return hosts


def test_clean_tree_reports_nothing(base, backends):
    hosts = clean_tree(base, backends)
    assert run("--hosts", str(hosts), "--user", str(NOBODY))[:2] == (0, [])
    assert run("--hosts", str(hosts))[:2] == (0, [])  # as the invoking user (root)
    human = subprocess.run(
        [sys.executable, "-m", "fastsni.check"],
        cwd=hosts,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert (human.returncode, human.stdout) == (0, "")


def test_hosts_directory_permissions(base, backends):
    hosts = clean_tree(base, backends)
    hosts.chmod(0o777)
    code, findings, _ = run("--hosts", str(hosts))
    assert (code, codes(findings)) == (1, [(".", "hosts-writable", "error")])
    hosts.chmod(0o1777)  # sticky: only an entry's owner may rename it
    assert run("--hosts", str(hosts))[:2] == (0, [])


def test_names_given(base, backends):
    hosts = clean_tree(base, backends)
    (hosts / "*.wild.example").mkdir()
    serve(backends, hosts / "*.wild.example")
    (hosts / "xn--bcher-kva.example").mkdir()
    serve(backends, hosts / "xn--bcher-kva.example")
    code, findings, _ = run(
        "--hosts", str(hosts), "Bücher.Example.", "good.example", "a.wild.example", "no.example"
    )
    assert code == 1
    assert codes(findings) == [
        ("*.wild.example", "wildcard", "info"),
        ("a.wild.example", "wildcard-served", "info"),
        ("no.example", "no-entry", "error"),
    ]


def test_probe(base, backends, ca):
    hosts = clean_tree(base, backends, ca)
    cafile = base / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    options = ("--hosts", str(hosts), "--probe", "--cafile", str(cafile), "--timeout", "2")
    code, findings, err = run(*options, "good.example", "app.example")
    assert code == 0, err
    probed = sorted((f["entry"], f["message"].split(":")[0]) for f in findings if f["code"] == "probe-ok")
    assert probed == [
        ("app.example", "probe http-socket"),
        ("good.example", "probe http-socket"),
        ("good.example", "probe tls-socket"),
    ]
    assert "TLSv1.3, ALPN h2" in next(f["message"] for f in findings if f["message"].startswith("probe tls"))
    # www.good.example's certificate is for good.example only
    code, findings, _ = run(
        "--hosts", str(hosts), "--probe", "--cafile", str(cafile), "--timeout", "2", "www.good.example"
    )
    assert code == 1
    failed = [f for f in findings if f["code"] == "probe-failed"]
    assert len(failed) == 1 and "certificate not valid for www.good.example" in failed[0]["message"]


def test_running_proxy_tree(base, backends, twin, proxies, monkeypatch):
    monkeypatch.setenv("FASTSNI_ALLOW_ROOT", "1")  # the proxy runs as root here
    hosts = clean_tree(base, backends)
    proxy = proxies("fastsni", hosts, twin)
    pid = str(proxy.process.pid)
    assert run("--pid", pid)[:2] == (0, [])
    hosts.rename(base / "hosts.old")  # the proxy keeps serving the old tree
    hosts.mkdir()
    code, findings, _ = run("--pid", pid, "--hosts", str(hosts))
    assert (code, codes(findings)) == (1, [(".", "other-tree", "error")])
    assert f"serves {base}/hosts.old, not {hosts}" in findings[0]["message"]
    shutil.rmtree(base / "hosts.old")
    code, findings, _ = run("--pid", pid)
    assert (code, codes(findings)) == (1, [(".", "deleted-tree", "error")])


def test_usage_errors(base):
    assert run("--hosts", str(base / "missing"))[0] == 2
    assert run("--user", "no-such-user-here", "--hosts", str(base))[0] == 2


@needs_root
def test_not_as_the_user_when_unprivileged(base, backends):
    """Unprivileged and asked about another user, fastsni-check says it could not connect
    as that user and reports only what holds for every user (nobody listens); as itself
    it connects and reports what it may not."""
    from fastsni import check

    hosts = base / "hosts"
    for name, mode in (("open.example", 0o666), ("closed.example", 0o755)):
        (hosts / name).mkdir(parents=True)
        serve(backends, hosts / name, mode=mode)
    hosts.chmod(0o755)
    (hosts / "shut.example").mkdir(mode=0o700)  # nobody may search it
    serve(backends, hosts / "shut.example")
    (hosts / "shut.example").chmod(0o700)
    (hosts / "nobodys.example").mkdir()
    serve(backends, hosts / "nobodys.example", mode=0o600)
    os.chown(hosts / "nobodys.example" / "http-socket", NOBODY, NOBODY)  # only its owner may connect
    stale(hosts / "stale.example" / "http-socket")

    def as_nobody(user: int) -> int:
        findings = check.check(check.parse(["--hosts", str(hosts), "--user", str(user)]))
        print(json.dumps([[f.entry, f.code, f.severity, f.message] for f in findings]))
        return 0

    code, output = run_as(NOBODY, lambda: as_nobody(OTHER))
    assert code == 0, output
    findings = json.loads(output)
    assert sorted((entry, code, severity) for entry, code, severity, _ in findings) == [
        (".", "not-as-user", "warning"),
        ("shut.example", "cannot-inspect", "warning"),
        ("stale.example", "stale-socket", "error"),
    ]
    said = next(message for _, code, _, message in findings if code == "not-as-user")
    assert said.startswith(f"the connect test ran as nobody, not as uid {OTHER}: only root can take")

    code, output = run_as(NOBODY, lambda: as_nobody(NOBODY))  # as itself: its own connects decide
    assert code == 0, output
    assert sorted((entry, code, severity) for entry, code, severity, _ in json.loads(output)) == [
        ("closed.example", "no-access", "error"),
        ("shut.example", "cannot-inspect", "warning"),
        ("stale.example", "stale-socket", "error"),
    ]


@needs_root
def test_protected_symlinks_apply_to_socket_links_only(base, backends, monkeypatch):
    """fs.protected_symlinks (stubbed to 1: whatever this machine's setting) applies to a
    symlink only as the last component of a path (fs/namei.c, WALK_TRAILING).  The
    proxies open ``<entry>/<leaf>``: an entry link in a 1777 hosts directory is never
    last, so they follow a site owner's; a socket link in a sticky world-writable entry
    directory is, so one owned by neither the proxy's user nor the directory's owner is
    refused (EACCES)."""
    from fastsni import check

    hosts = clean_tree(base, backends)
    os.lchown(hosts / "app.example", OTHER, OTHER)  # a site owner's link -> _rel/v1
    hosts.chmod(0o1777)
    shared = directory(hosts / "shared.example", mode=0o1777)
    link(shared / "http-socket", "../good.example/http-socket", OTHER)
    own = directory(hosts / "own.example", mode=0o1777)
    link(own / "http-socket", "../good.example/http-socket", NOBODY)  # the proxy's own link
    monkeypatch.setattr(check, "symlinks_protected", lambda: True)

    def findings() -> list[tuple[str, str, str]]:
        args = check.parse(["--hosts", str(hosts), "--user", str(NOBODY)])
        return codes([check.asdict(finding) for finding in check.check(args)])

    sticky = [("own.example", "writable", "warning"), ("shared.example", "writable", "warning")]
    assert findings() == sorted([("shared.example", "link-protected", "error"), *sticky])
    monkeypatch.setattr(check, "symlinks_protected", lambda: False)
    assert findings() == sticky


# A hostile tree (issue 16) and what check and the proxies make of each entry: the
# findings expected, and the name to ask fasthttpdir with its answer (status; for a
# routed name, the backend that answers).
HOSTILE = {
    # paths out of the tree
    "abs.test": ([("leads-outside", "error")], "abs.test", 404),
    "rel.test": ([("leads-outside", "error")], "rel.test", 404),
    "back.test": ([("leads-outside", "error")], "back.test", 404),
    "out.test": ([("leads-outside", "error")], "out.test", 404),
    "absin.test": ([("leads-outside", "error")], "absin.test", 404),
    "absname.test": ([("leads-outside", "error")], "absname.test", 404),
    "via.test": ([("leads-outside", "error")], "via.test", 404),
    "*.wild.test": ([("leads-outside", "error")], "x.wild.test", 404),
    # other owners' sockets and directories
    "bound.test": ([("foreign-socket", "error")], "bound.test", 404),
    "mirror.test": ([("foreign-socket", "error"), ("foreign-target", "error")], "mirror.test", 404),
    "bob.test": ([("foreign-socket", "error")], "bob.test", 404),
    # only fastsni's socket
    "tlsonly.test": ([("https-redirect", "info")], "tlsonly.test", 308),
    # clean: the owner's deploy layout, a link to her sibling, root's entry with another
    # uid's socket, one owner's wildcard
    "alice.test": ([], "alice.test", "alice-v3"),
    "site.test": ([], "site.test", "site.test"),
    "www.site.test": ([], "www.site.test", "site.test"),
    "inner.test": ([], "inner.test", "inner.test"),
    "team.test": ([], "team.test", "bob-v1"),
    "*.alice.test": ([("wildcard", "info")], "x.alice.test", "*.alice.test"),
}


def hostile_tree(base: Path, backends) -> Path:
    hosts = directory(base / "hosts")
    outside = directory(base / "outside")
    stale(outside / "http-socket")  # the test's user's, as the entries below: only leaving is wrong
    releases = directory(hosts / "_releases")
    # escapes: socket links, entry links, a wildcard link; absolute, relative, out and back in
    link(directory(hosts / "abs.test") / "http-socket", outside / "http-socket")
    link(directory(hosts / "rel.test") / "http-socket", "../../outside/http-socket")
    live(backends, directory(hosts / "inner.test") / "http-socket")
    link(directory(hosts / "back.test") / "http-socket", "../../hosts/inner.test/http-socket")
    link(hosts / "out.test", "../outside")
    link(hosts / "absin.test", hosts / "inner.test")
    link(directory(hosts / "via.test") / "http-socket", "../out.test/http-socket")  # out.test leads out
    link(hosts / "*.wild.test", outside)
    # alice's deploy layout, bob's entry to it, bob's socket link to her sibling, bob's
    # socket bound in her entry
    live(backends, directory(releases / "alice-v3", ALICE) / "http-socket", ALICE)
    link(hosts / "alice.test", "_releases/alice-v3", ALICE)
    link(hosts / "mirror.test", "_releases/alice-v3", BOB)
    link(hosts / "absname.test", hosts / "alice.test")  # the fix keeps the name, not alice's release
    live(backends, directory(hosts / "site.test", ALICE) / "http-socket", ALICE)
    link(directory(hosts / "www.site.test", ALICE) / "http-socket", "../site.test/http-socket", ALICE)
    link(directory(hosts / "bob.test", BOB) / "http-socket", "../site.test/http-socket", BOB)
    stale(directory(hosts / "bound.test", ALICE) / "http-socket", BOB)
    # root's entry for bob's backend; alice's wildcard; a TLS-only host
    live(backends, directory(releases / "bob-v1", BOB) / "http-socket", BOB)
    link(hosts / "team.test", "_releases/bob-v1")
    live(backends, directory(hosts / "*.alice.test", ALICE) / "http-socket", ALICE)
    live(backends, directory(hosts / "tlsonly.test") / "tls-socket")
    return hosts


@needs_root
def test_hostile_tree(base, backends):
    hosts = hostile_tree(base, backends)
    code, findings, err = run("--hosts", str(hosts), "--user", str(NOBODY))
    expected = [(entry, *finding) for entry, (found, _, _) in HOSTILE.items() for finding in found]
    assert codes(findings) == sorted(expected), err  # no stale-socket: refused sockets are not connected
    assert code == 1
    said = {(f["entry"], f["code"]): f["message"] for f in findings}
    assert (
        "the symlink http-socket -> ../../hosts/inner.test/http-socket leads out"
        in said["back.test", "leads-outside"]
    )
    assert said["back.test", "leads-outside"].endswith("inside the tree: -> ../inner.test/http-socket")
    assert said["absin.test", "leads-outside"].endswith("inside the tree: -> inner.test")
    assert said["absname.test", "leads-outside"].endswith("inside the tree: -> alice.test")
    assert "(a symlink on its way leads out)" in said["via.test", "leads-outside"]
    for entry in ("abs.test", "rel.test", "out.test", "*.wild.test", "via.test"):  # no fix leaves the tree
        message = said[entry, "leads-outside"]
        assert (
            "move what it should serve into the tree" in message and "outside" not in message.split("; ")[1]
        )
    assert said["bound.test", "foreign-socket"].startswith(
        f"http-socket is owned by uid {BOB}, not by the entry's owner uid {ALICE}: the proxies refuse it"
    )
    assert f"SocketUser={ALICE}" in said["bound.test", "foreign-socket"]
    assert "(through the symlink -> ../site.test/http-socket)" in said["bob.test", "foreign-socket"]
    assert said["mirror.test", "foreign-target"].startswith(
        f"it leads into _releases/alice-v3, owned by uid {ALICE}, not by the entry's owner uid {BOB}"
    )
    assert "308 redirect to https" in said["tlsonly.test", "https-redirect"]


@needs_root
def test_verdicts_are_the_proxys(base, backends, twin, proxies):
    """What check says of each hostile entry is what fasthttpdir does with it: an error
    from the isolation rules is a 404, the TLS-only host a 308, a clean entry its backend."""
    hosts = hostile_tree(base, backends)
    _, findings, _ = run("--hosts", str(hosts), "--user", str(NOBODY))
    refused = {f["entry"] for f in findings if f["severity"] == "error"}
    proxy = proxies("fasthttpdir", hosts, twin)
    for entry, (_, name, answer) in HOSTILE.items():
        status, body = http_get(proxy.port, name)
        if isinstance(answer, int):
            assert status == answer, (name, status, body)
            assert (status == 404) == (entry in refused), (entry, findings)
        else:
            assert (status, body) == (200, f"backend {answer}\n".encode()), name
            assert entry not in refused


# POSIX ACLs as Linux stores them (linux/posix_acl_xattr.h), to set one without setfacl
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20


def set_acl(path: Path, users: dict[int, int]) -> None:
    """``path``'s access ACL: its mode's owner, group and other, plus ``users`` {uid: perm}."""
    mode = path.stat().st_mode
    entries = [(ACL_USER_OBJ, mode >> 6 & 7, 0xFFFFFFFF)]
    entries += [(ACL_USER, perm, uid) for uid, perm in sorted(users.items())]
    mask = mode >> 3 & 7
    for perm in users.values():
        mask |= perm
    entries += [(ACL_GROUP_OBJ, mode >> 3 & 7, 0xFFFFFFFF), (ACL_MASK, mask, 0xFFFFFFFF)]
    entries += [(ACL_OTHER, mode & 7, 0xFFFFFFFF)]
    data = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)
    try:
        os.setxattr(path, "system.posix_acl_access", data)
    except OSError as exc:
        pytest.skip(f"no POSIX ACLs here: {exc.strerror}")


@needs_root
def test_writable_socket_directories(base, backends):
    """A directory the proxies take a socket (or a link, or a marker) from, or one on the
    way to it, that someone other than its owner, root and the proxy's user can change."""
    hosts = directory(base / "hosts")
    releases = directory(hosts / "_releases")

    def release(name: str, mode: int = 0o755, group: int | None = None) -> Path:
        path = directory(releases / name, ALICE, mode)
        if group is not None:
            os.chown(path, ALICE, group)
        live(backends, path / "http-socket", ALICE)
        link(hosts / f"{name}.test", f"_releases/{name}", ALICE)
        return path

    release("group", 0o771, BOB)  # bob's group: unknown members
    release("sticky", 0o1777)
    set_acl(release("acl", 0o750), {BOB: 7, NOBODY: 1})
    set_acl(release("proxy", 0o750), {NOBODY: 1})  # the README's recipe: the proxy's user may search
    set_acl(release("proxyw", 0o750), {NOBODY: 7})  # the proxy's user may write: trusted too
    release("rootgroup", 0o775, 0)  # root's group holds only root
    way = directory(hosts / "_way", mode=0o777)  # a directory on the way, not sticky
    live(backends, directory(way / "v1", ALICE) / "http-socket", ALICE)
    link(hosts / "way.test", "_way/v1", ALICE)
    code, findings, err = run("--hosts", str(hosts), "--user", str(NOBODY))
    assert codes(findings) == [
        ("acl.test", "writable", "error"),
        ("group.test", "writable", "error"),
        ("sticky.test", "writable", "warning"),
        ("way.test", "writable", "error"),
    ], err
    said = {f["entry"]: f["message"] for f in findings}
    assert said["acl.test"].startswith(f"{releases}/acl is writable by uid {BOB}: they can remove or replace")
    assert f"writable by group gid {BOB}:" in said["group.test"]
    assert "take the name down" in said["group.test"]
    assert "chmod 0750" in said["group.test"] and "setfacl -m u:nobody:x" in said["group.test"]
    assert said["way.test"].startswith(f"{way} is writable by everyone: they can remove or replace the dir")
    assert "(sticky): they can add a missing socket or a send-proxy marker" in said["sticky.test"]
    # root's entry: a writer's own socket would be served
    link(hosts / "root.test", "_releases/group")
    _, findings, _ = run("--hosts", str(hosts), "--user", str(NOBODY), "root.test")
    assert "serve a socket of their own under this name, since root owns the entry" in findings[0]["message"]


@needs_root
def test_release_areas(base, backends):
    """Each owner's releases belong in an area only she can write (_<owner>/): a shared one
    (sticky or not) lets others pre-create her next release, another owner's lets him
    replace it.  Both are errors, whether an entry uses the area yet or not."""
    hosts = directory(base / "hosts")
    own = directory(hosts / "_alice", ALICE, 0o755)  # the proxy's user (here: everyone) may search it
    live(backends, directory(own / "alice-v1", ALICE) / "http-socket", ALICE)
    link(hosts / "alice.test", "_alice/alice-v1", ALICE)
    shared = directory(hosts / "_releases", mode=0o1777)
    live(backends, directory(shared / "shop-v1", ALICE) / "http-socket", ALICE)
    link(hosts / "shop.test", "_releases/shop-v1", ALICE)
    bobs = directory(hosts / "_bob", BOB)
    live(backends, directory(bobs / "blog-v1", ALICE) / "http-socket", ALICE)
    link(hosts / "blog.test", "_bob/blog-v1", ALICE)
    directory(hosts / "_open", mode=0o777)  # nobody's entry uses it yet
    code, findings, err = run("--hosts", str(hosts), "--user", str(NOBODY))
    assert codes(findings) == [
        ("_open", "shared-area", "error"),
        ("_releases", "shared-area", "error"),
        ("blog.test", "foreign-area", "error"),
    ], err
    assert code == 1
    said = {(f["entry"], f["code"]): f["message"] for f in findings}
    assert said["_releases", "shared-area"].startswith(f"{shared} is writable by everyone: any of them can")
    assert f"install -d -o OWNER -m 0750 {hosts}/_OWNER" in said["_releases", "shared-area"]
    assert said["blog.test", "foreign-area"].startswith(f"it leads through _bob, owned by uid {BOB}, who can")
    assert f"install -d -o {ALICE} -m 0750 {hosts}/_{ALICE}" in said["blog.test", "foreign-area"]


@pytest.fixture
def datagrams():
    """Factory: datagrams(path, owner, mode) -> a bound Unix datagram socket at ``path``
    (an owner's log receiver, never read); all closed at teardown."""
    bound: list[socket.socket] = []

    def bind(path: Path, owner: int | None = None, mode: int = 0o666) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bound.append(sock)
        sock.bind(str(path))
        path.chmod(mode)
        if owner is not None:
            os.chown(path, owner, owner)
        return sock

    yield bind
    for sock in bound:
        sock.close()


# An owner's log socket (docs/logs.md) in each entry, and what check says of it; each
# entry also serves an http-socket, so every finding is the log socket's.
LOG_SOCKETS = {
    "out.test": ("log-leads-outside", "error"),  # an absolute link out of the tree
    "dangle.test": ("log-dangling-link", "error"),
    "file.test": ("log-not-socket", "error"),
    "foreign.test": ("log-foreign-socket", "error"),  # alice's entry, bob's socket
    "private.test": ("log-no-access", "error"),  # srwxr-xr-x, root's: nobody may not send
    "unbound.test": ("log-unbound", "warning"),  # the file stays, its receiver is gone
    "stream.test": ("log-not-datagram", "error"),  # a listening stream socket
    "logged.test": ("owner-log", "info"),
    "team.test": ("owner-log", "info"),  # root's entry: bob's receiver is vouched for
    "rooted.test": ("owner-log", "info"),  # alice's entry, root's socket
}
ALICES = {"foreign.test", "rooted.test"}  # the other entries are root's


def log_socket_tree(base: Path, backends, datagrams) -> Path:
    hosts = directory(base / "hosts")
    entries = {name: directory(hosts / name, ALICE if name in ALICES else None) for name in LOG_SOCKETS}
    for name, path in entries.items():
        live(backends, path / "http-socket", ALICE if name in ALICES else None)
    datagrams(directory(base / "outside") / "log-socket")
    link(entries["out.test"] / "log-socket", base / "outside" / "log-socket")
    link(entries["dangle.test"] / "log-socket", "missing-socket")
    (entries["file.test"] / "log-socket").write_text("not a socket")
    datagrams(entries["foreign.test"] / "log-socket", BOB)
    datagrams(entries["private.test"] / "log-socket", mode=0o755)
    datagrams(entries["unbound.test"] / "log-socket").close()
    live(backends, entries["stream.test"] / "log-socket")
    datagrams(entries["logged.test"] / "log-socket")
    datagrams(entries["team.test"] / "log-socket", BOB)
    datagrams(entries["rooted.test"] / "log-socket")
    return hosts


@needs_root
def test_log_socket_findings(base, backends, datagrams, monkeypatch):
    """Each entry's log-socket is checked as its backend sockets are (resolved beneath the
    tree, a socket, its owner's or root's, the proxy's user may send to it) and as the
    datagram socket it must be; its findings have codes of their own.  Where check says
    the socket is found, the proxies' own lookup (fastsni.ownerlog) finds it too."""
    hosts = log_socket_tree(base, backends, datagrams)
    code, findings, err = run("--hosts", str(hosts), "--user", str(NOBODY))
    assert codes(findings) == sorted((entry, *found) for entry, found in LOG_SOCKETS.items()), err
    assert code == 1
    said = {f["entry"]: f["message"] for f in findings}
    assert "log-socket -> " in said["out.test"] and "(EXDEV: no line is sent to it); move" in said["out.test"]
    assert said["file.test"].startswith(
        "log-socket is not a socket: no line is sent to it; remove it and let"
    )
    assert said["foreign.test"].startswith(
        f"log-socket is owned by uid {BOB}, not by the entry's owner uid {ALICE}: the proxies refuse it "
        "(no line is sent to it)"
    )
    assert said["private.test"].startswith("nobody cannot connect to log-socket (srwxr-xr-x")
    assert "setfacl -m u:nobody:rw log-socket" in said["private.test"]
    assert said["unbound.test"].startswith("nobody has bound log-socket (sendto gets ECONNREFUSED)")
    assert said["unbound.test"].endswith("bind it with socket.SOCK_DGRAM")
    assert "EPROTOTYPE" in said["stream.test"] and "bind it with socket.SOCK_DGRAM" in said["stream.test"]
    assert said["logged.test"] == "each connection (fastsni) or request (fasthttpdir) is logged to log-socket"

    from fastsni import engine, ownerlog

    refused = {"out.test", "dangle.test", "file.test", "foreign.test"}  # found, the proxies send nothing
    held = os.open(hosts, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    monkeypatch.setattr(engine, "HOSTS", held)
    try:
        for name in LOG_SOCKETS:
            fd = ownerlog.lookup(name)
            if fd >= 0:
                os.close(fd)
            assert (fd < 0) == (name in refused), name
    finally:
        os.close(held)


def test_a_working_log_socket_is_info_only(base, backends, datagrams):
    """A datagram socket bound in an entry: one info finding, no error, as the invoking
    user and as the proxy's (for whom its mode lets it send)."""
    hosts = clean_tree(base, backends)
    datagrams(hosts / "good.example" / "log-socket")
    expected = [("good.example", "owner-log", "info"), ("www.good.example", "owner-log", "info")]  # its link
    for options in ((), ("--user", str(NOBODY))):
        code, findings, err = run("--hosts", str(hosts), *options)
        assert (code, codes(findings)) == (0, expected), err
