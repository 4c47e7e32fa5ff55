"""fastsni-release's parts that need no supervisor: settings, the hook's input, the systemd
path (systemctl stands in: a user manager cannot run in this container), the templates.
The whole path under a real runit: tests/test_git_deploy.py."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from test_deploy import ENV

from fastsni import release, tree

EXAMPLES = ROOT / "examples"
ANALYZE = shutil.which("systemd-analyze")


def git(*args: str, cwd: Path) -> str:
    env = dict(
        ENV, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t"
    )
    return subprocess.run(
        ["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True, timeout=30
    ).stdout


@pytest.fixture
def repo(tmp_path) -> Path:
    """A repository with one commit: an app whose bin/serve starts and serves nothing."""
    path = tmp_path / "repo"
    git("init", "-q", "-b", "main", str(path), cwd=tmp_path)
    (path / "bin").mkdir()
    (path / "bin" / "serve").write_text("#!/bin/sh\nexec sleep 600\n")
    (path / "bin" / "serve").chmod(0o755)
    git("add", "-A", cwd=path)
    git("commit", "-q", "-m", "app", cwd=path)
    return path


def test_settings_come_from_the_command_line_then_the_environment_then_git_config(repo, monkeypatch):
    git("config", "fastsni.name", "config.example", cwd=repo)
    git("config", "fastsni.keep", "7", cwd=repo)
    git("config", "fastsni.insecure", "true", cwd=repo)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("FASTSNI_KEEP", "5")
    monkeypatch.setenv("FASTSNI_PROBE_PATH", "/health")
    config = release.settings(release.parse(["--keep", "4"]))
    assert config["keep"] == "4" and config["probe-path"] == "/health" and config["name"] == "config.example"
    assert config["insecure"] == "true" and config["hosts"] == "/srv/hosts" and config["manager"] == "systemd"
    assert config["area"] == f"/srv/hosts/_{tree.login(os.geteuid())}"
    monkeypatch.delenv("FASTSNI_KEEP")
    assert release.settings(release.parse([]))["keep"] == "7"


def test_the_hooks_input():
    lines = f"{'1' * 40} {'2' * 40} refs/heads/other\n{'3' * 40} {'4' * 40} refs/heads/main\n"
    assert release.pushed(io.StringIO(lines), "main") == "4" * 40
    assert release.pushed(io.StringIO(lines), "dev") is None
    assert release.pushed(io.StringIO(f"{'4' * 40} {release.ZERO} refs/heads/main\n"), "main") is None


def fake_systemctl(tmp_path: Path, code: int) -> tuple[dict[str, str], Path]:
    """A systemctl that logs its arguments and exits ``code``, first on PATH."""
    tools = tmp_path / "tools"
    tools.mkdir()
    log = tmp_path / "systemctl.log"
    message = "echo 'Failed to connect to bus: No such file or directory' >&2; " if code else ""
    (tools / "systemctl").write_text(f'#!/bin/sh\necho "$@" >> {log}\n{message}exit {code}\n')
    (tools / "systemctl").chmod(0o755)
    return dict(ENV, PATH=f"{tools}:{os.environ['PATH']}"), log


def run_release(
    repo: Path, hosts: Path, env: dict[str, str], name: str = "app.example"
) -> subprocess.CompletedProcess:
    argv = ["--hosts", str(hosts), "--name", name, "--proxy-user", "none", "--timeout", "1", "HEAD"]
    return subprocess.run(
        [sys.executable, "-m", "fastsni.release", *argv],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("case", ["no user manager", "probe fails"])
def test_systemd_failures_leave_nothing_behind(case, repo, hosts, tmp_path):
    """Without a user manager (systemctl --user: Failed to connect to bus), or with a release
    that serves nothing: one NOT deployed line, exit 1, the release stopped and removed."""
    area = hosts / f"_{tree.login(os.geteuid())}"
    area.mkdir(mode=0o750)
    env, log = fake_systemctl(tmp_path, 1 if case == "no user manager" else 0)
    result = run_release(repo, hosts, env)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("NOT deployed: ")]
    assert len(lines) == 1, result.stderr
    commit = git("rev-parse", "HEAD", cwd=repo).strip()
    path = area / f"app.example-{commit[:12]}"
    unit = subprocess.run(
        ["systemd-escape", "--path", str(path)], capture_output=True, text=True, timeout=10
    ).stdout
    unit = f"fastsni-release@{unit.strip()}.service"
    if case == "no user manager":
        assert "systemctl --user start (is your user manager running? loginctl enable-linger" in lines[0]
        assert "Failed to connect to bus" in result.stderr
    else:
        assert "has neither tls-socket nor http-socket" in lines[0], lines
    assert log.read_text().splitlines() == [f"--user start {unit}", f"--user stop {unit}"]
    assert os.listdir(area) == [".fastsni-release.lock"]  # no release left
    assert not os.path.lexists(hosts / "app.example")


def test_refusals_come_before_anything_is_built(repo, hosts, tmp_path):
    env, log = fake_systemctl(tmp_path, 0)
    result = run_release(repo, hosts, env)  # no area
    assert result.returncode == 1
    assert result.stderr.startswith("NOT deployed: your release area ") and "does not exist" in result.stderr
    assert "install -d -m 0750" in result.stderr and not log.exists()
    result = run_release(repo, hosts, env, name="Bad_Name")
    assert result.returncode == 1 and result.stderr.startswith("NOT deployed: Bad_Name: "), result.stderr


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (Debian: systemd)")
def test_the_templates_verify_clean(tmp_path):
    """The user unit template, instantiated for a release path (%f must become it), and the
    system unit that starts an owner's runsvdir at boot."""
    path = tmp_path / "hosts" / "_alice" / "blog.example.org-0123456789ab"
    (path / "bin").mkdir(parents=True)
    (path / "bin" / "serve").write_text("#!/bin/sh\n")
    (path / "bin" / "serve").chmod(0o755)
    escaped = subprocess.run(
        ["systemd-escape", "--path", str(path)], capture_output=True, text=True, timeout=10
    ).stdout
    units = tmp_path / "units"
    units.mkdir()
    user_unit = units / f"fastsni-release@{escaped.strip()}.service"
    shutil.copy(EXAMPLES / "systemd" / "fastsni-release@.service", user_unit)
    system_unit = units / "runsvdir-user@root.service"
    shutil.copy(EXAMPLES / "runit" / "runsvdir-user@.service", system_unit)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime))
    for args in (["--user", str(user_unit)], [str(system_unit)]):
        result = subprocess.run(
            [ANALYZE, "verify", *args], capture_output=True, text=True, env=env, timeout=60
        )
        assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr
    (path / "bin" / "serve").unlink()  # proof that %f is the release: now it complains
    result = subprocess.run(
        [ANALYZE, "verify", "--user", str(user_unit)], capture_output=True, text=True, env=env
    )


def test_the_scripts_are_valid_shell(tmp_path):
    scripts = [EXAMPLES / "pre-receive", EXAMPLES / "runit" / "runsvdir-user.run"]
    for name, text in (
        ("run", release.Runit.RUN.format(release="/r", quoted="'/r'")),
        ("t", release.Runit.SIGNAL.format(signal="TERM")),
    ):
        (tmp_path / name).write_text(text)
        scripts.append(tmp_path / name)
    for script in scripts:
        assert subprocess.run(["sh", "-n", str(script)], timeout=10).returncode == 0, script
    assert os.access(EXAMPLES / "pre-receive", os.X_OK) and os.access(
        EXAMPLES / "runit" / "runsvdir-user.run", os.X_OK
    )
