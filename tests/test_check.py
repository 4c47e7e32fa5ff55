"""fastsni-check on crafted hosts trees: each finding reported exactly once, nothing on a clean tree."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from backends import http_backend, run_as, tls_http_backend
from conftest import ROOT, TEST_INSTALLED

ENV = dict(os.environ)  # the commands as installed, or from the source tree:
if not TEST_INSTALLED:
    ENV["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
NOBODY, OTHER = 65534, 65533  # the proxy's user for --user, and another owner


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


def stale(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
    path.chmod(0o666)


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
    stale(entry("stale.example", "stale-socket", live=False) / "tls-socket")
    serve(backends, entry("private.example", "no-access", live=False), mode=0o755)  # srwxr-xr-x: root only
    # symlinks
    serve(backends, releases / "abs")
    os.symlink(releases / "abs", hosts / "abs.example")
    expected.append(("abs.example", "absolute-link", "warning"))
    serve(backends, base / "outside" / "out")
    os.symlink("../outside/out", hosts / "out.example")
    expected.append(("out.example", "outside-tree", "warning"))
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
    entry("groupw.example", "writable", "warning").chmod(0o775)
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


def test_another_users_access_from_mode_bits_when_not_root(base, backends):
    """Unprivileged and asked about another user, fastsni-check reads the mode bits."""
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

    def as_nobody() -> int:
        findings = check.check(check.parse(["--hosts", str(hosts), "--user", str(OTHER)]))
        print(json.dumps([[f.entry, f.code, f.severity] for f in findings]))
        return 0

    code, output = run_as(NOBODY, as_nobody)
    assert code == 0, output
    assert sorted(map(tuple, json.loads(output))) == [
        ("closed.example", "no-access", "error"),
        ("nobodys.example", "no-access", "error"),
        ("shut.example", "cannot-inspect", "warning"),
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own symlinks as other users")
def test_protected_symlinks_in_a_world_writable_sticky_tree(base, backends, monkeypatch):
    """With fs.protected_symlinks=1 (stubbed: whatever this machine's setting), a site
    owner's symlink in a 1777 hosts directory is one the proxies may not follow; one owned
    by the directory's owner or by the proxy's user is fine, and 1775 lifts it."""
    from fastsni import check

    hosts = clean_tree(base, backends)
    os.lchown(hosts / "app.example", OTHER, OTHER)  # a site owner's link -> _rel/v1
    os.symlink("good.example", hosts / "mine.example")
    os.lchown(hosts / "mine.example", NOBODY, NOBODY)  # the proxy's own
    hosts.chmod(0o1777)
    monkeypatch.setattr(check, "symlinks_protected", lambda: True)

    def findings() -> list[tuple[str, str, str]]:
        args = check.parse(["--hosts", str(hosts), "--user", str(NOBODY)])
        return codes([check.asdict(finding) for finding in check.check(args)])

    assert findings() == [("app.example", "link-protected", "error")]
    hosts.chmod(0o1775)
    assert findings() == []
    monkeypatch.setattr(check, "symlinks_protected", lambda: False)
    hosts.chmod(0o1777)
    assert findings() == []
