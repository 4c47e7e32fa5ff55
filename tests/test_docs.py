"""The docs' commands: every shell command in README.md and docs/ is run by a test (here,
or the one named in RUN_ELSEWHERE, which must exist and contain the command's telling
part) or is marked ``(not run here)``.  The README's tour and the owner's small recipes
run here as written."""

from __future__ import annotations

import ast
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT, TEST_INSTALLED

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = "(not run here)"
TOUR_MARK = "<!-- run by tests/test_docs.py -->"
BLOCK = re.compile(r"(<!-- run by tests/test_docs\.py -->\n)?```(?:sh|bash)\n(.*?)```", re.S)
# command: (file that runs it, test function in it or None for a script, a telling part it contains)
RUN_ELSEWHERE = {
    "python3 -m pip install . && fastsni-demo": ("tests/test_demo.py", "test_demo_once", "fastsni.demo"),
    "python3 -m pip install -e '.[test]' && python3 -m pytest": (
        ".ci/run",
        None,
        "python3 -m pip install -q -e '.[test]' && python3 -m pytest",
    ),
    "python3 -m pytest tests/test_fair_share.py -s": (".ci/run", None, "python3 -m pytest"),
    "python3 -m pytest tests/test_attacks.py tests/test_faults.py tests/test_confinement.py "
    "tests/test_handover.py": (".ci/run", None, "python3 -m pytest"),
    "python3 -m venv /opt/fastsni": (
        "tests/test_systemd_units.py",
        "test_production_install_runs_under_the_units",
        "python3 -m venv /opt/fastsni",
    ),
    "/opt/fastsni/bin/pip install ./fastsni-*-manylinux2014_x86_64.manylinux_2_17_x86_64.whl": (
        "tests/test_systemd_units.py",
        "test_production_install_runs_under_the_units",
        "/opt/fastsni/bin/pip install",
    ),
    "chmod -R a+rX /opt/fastsni": (
        "tests/test_systemd_units.py",
        "test_production_install_runs_under_the_units",
        "chmod -R a+rX /opt/fastsni",
    ),
    "install -d -m 0755 /opt/fastsni/root": (
        "tests/test_systemd_units.py",
        "test_production_install_runs_under_the_units",
        "install -d -m 0755 /opt/fastsni/root",
    ),
    "/opt/fastsni/bin/fastsni --version": (
        "tests/test_smoke_cli.py",
        "test_version_names_the_twin",
        "--version",
    ),
    "cd /srv/hosts && /opt/fastsni/bin/fastsni-listen --user fastsni 443 /opt/fastsni/bin/fastsni": (
        "tests/test_listen.py",
        "test_user_binds_as_root_then_serves_as_that_user_with_its_groups",
        '"--user"',
    ),
    "cd /srv/hosts && /opt/fastsni/bin/fastsni-listen --user fastsni --cpus 0,1 443 "
    "/opt/fastsni/bin/fastsni": (
        "tests/test_listen.py",
        "test_cpus_pins_each_copy_to_its_own_cpu",
        '"--cpus"',
    ),
}
RUN_ELSEWHERE[
    "python3 -c 'import socket,sys;s=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM);s.bind(sys.argv[1]);"
    '[print(s.recv(4096).decode(),end="",flush=True) for _ in iter(int,1)]\' log-socket'
] = ("tests/test_owner_log.py", "test_the_receiver_in_docs_logs_md_prints_each_line", '"logs.md"')
GIT_DEPLOY = "tests/test_git_deploy.py"  # as the owner, with its own paths and name
RUN_ELSEWHERE.update(
    {
        "git init --bare ~/site.git": (GIT_DEPLOY, None, '"--bare", str(self.home / "site.git")'),
        "cp examples/pre-receive ~/site.git/hooks/pre-receive": (
            GIT_DEPLOY,
            None,
            'shutil.copy(ROOT / "examples" / "pre-receive", hook)',
        ),
        "git -C ~/site.git config fastsni.name blog.example.org": (GIT_DEPLOY, None, '"name": NAME'),
        "git -C ~/site.git config fastsni.manager runit": (GIT_DEPLOY, None, '"manager": "runit"'),
    }
)
OWNER_ACL_RECIPE = (
    "install -d -m 0750 DIR && setfacl -m u:fastsni:x DIR && setfacl -d -m u:fastsni:rwx,g::---,o::--- DIR"
)
RUN_HERE = {OWNER_ACL_RECIPE, "fastsni-hostname 'Bücher.Example.'"}


def blocks() -> list[tuple[Path, bool, list[str]]]:
    """(file, whether it is the tour, its commands) for every shell block; a block whose
    lines start with ``$ `` shows output, and only those lines are commands."""
    found = []
    for path in DOCS:
        for tour, body in BLOCK.findall(path.read_text()):
            lines = body.rstrip("\n").split("\n")
            if any(line.startswith("$ ") for line in lines):
                lines = [line[2:] for line in lines if line.startswith("$ ")]
            commands, current = [], ""
            for line in lines:
                current += line.strip() if current else line.strip()
                if current.endswith("\\"):
                    current = current[:-1].rstrip() + " "
                    continue
                if current and not current.startswith("#"):
                    commands.append(current)
                current = ""
            found.append((path, bool(tour), commands))
    return found


def without_comment(command: str) -> str:
    return re.sub(r"\s+#.*$", "", command).strip()


def test_every_command_is_run_by_a_test_or_marked():
    unaccounted = []
    for path, tour, commands in blocks():
        for command in commands:
            if tour or MARK in command or without_comment(command) in RUN_HERE:
                continue
            if without_comment(command) not in RUN_ELSEWHERE:
                unaccounted.append(f"{path.relative_to(ROOT)}: {command}")
    assert unaccounted == [], "run each in a test (RUN_ELSEWHERE) or mark it (not run here):\n" + "\n".join(
        unaccounted
    )
    assert sum(tour for _, tour, _ in blocks()) == 1  # the README's tour


@pytest.mark.parametrize("command", sorted(RUN_ELSEWHERE))
def test_the_tests_named_exist_and_run_the_command(command):
    path, function, telling = RUN_ELSEWHERE[command]
    text = (ROOT / path).read_text()
    assert telling in text, (path, telling)
    if function:
        names = {node.name for node in ast.walk(ast.parse(text)) if isinstance(node, ast.FunctionDef)}
        assert function in names, (path, function)


def tools(directory: Path) -> dict[str, str]:
    """The console scripts as this checkout (or the installed package) runs them, first on PATH."""
    directory.mkdir()
    scripts = {
        "fastsni-listen": "fastsni.listen",
        "fasthttpdir": "fasthttpdir",
        "fastsni-check": "fastsni.check",
        "fastsni-hostname": "fastsni.hostname",
    }
    for name, module in scripts.items():
        (directory / name).write_text(f'#!/bin/sh\nexec {sys.executable} -m {module} "$@"\n')
        (directory / name).chmod(0o755)
    (directory / "python3").symlink_to(sys.executable)
    env = dict(os.environ, PATH=f"{directory}:{os.environ['PATH']}", PYTHONUNBUFFERED="1")
    if not TEST_INSTALLED:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    if os.geteuid() == 0:
        env["FASTSNI_ALLOW_ROOT"] = "1"  # the tour's fasthttpdir runs as whoever runs the tests
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_readme_tour_runs_as_written(tmp_path):
    pytest.importorskip("uvicorn")
    (tour,) = [commands for _, is_tour, commands in blocks() if is_tour]
    script = "\n".join(tour).replace("127.0.0.1:8080", f"127.0.0.1:{free_port()}")
    env = tools(tmp_path / "bin")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    out_path, err_path = tmp_path / "out", tmp_path / "err"
    with open(out_path, "w") as out_file, open(err_path, "w") as err_file:
        process = subprocess.Popen(
            [
                "bash",
                "-c",
                "set -e; trap 'status=$?; kill $(jobs -p) 2>/dev/null; exit $status' EXIT\n" + script,
            ],
            cwd=tmp_path,
            env=env,
            stdout=out_file,
            stderr=err_file,
            start_new_session=True,
        )
    try:
        process.wait(timeout=90)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the tour's servers, whatever the trap left
        except ProcessLookupError:
            pass
        process.wait()
    out, err = out_path.read_text(), err_path.read_text()
    assert process.returncode == 0, out + err
    assert "hello from behind fasthttpdir\n" in out
    assert "fastsni-check: 0 error(s), 0 warning(s)" in err, err


def test_the_owners_hostname_example(tmp_path):
    text = (ROOT / "docs" / "owner.md").read_text()
    shown = re.search(r"\$ fastsni-hostname 'Bücher.Example.'\n(.*)\n", text).group(1)
    result = subprocess.run(
        ["fastsni-hostname", "Bücher.Example."],
        env=tools(tmp_path / "bin"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0 and result.stdout == shown + "\n", result.stderr


def test_the_owners_socket_recipe():
    """The ACL recipe as written, with DIR and the proxy's user (nobody here) filled in: a
    socket bound there with umask 0007 lets in the proxy's user, and nobody else."""
    if (
        os.geteuid() != 0
        or subprocess.run(["sh", "-c", "command -v setfacl"], capture_output=True).returncode
    ):
        pytest.skip("needs root (to connect as another uid) and setfacl (Debian: acl)")
    assert OWNER_ACL_RECIPE in (ROOT / "docs" / "owner.md").read_text()
    base = Path(tempfile.mkdtemp(prefix="fastsni-docs-"))
    try:
        base.chmod(0o755)
        directory = base / "release"
        command = OWNER_ACL_RECIPE.replace("DIR", str(directory)).replace("u:fastsni:", "u:nobody:")
        subprocess.run(["sh", "-c", command], check=True, timeout=30)
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o750
        path = directory / "http-socket"
        old = os.umask(0o007)
        try:
            with socket.socket(socket.AF_UNIX) as listener:
                listener.bind(str(path))
                listener.listen()
                acl = subprocess.run(["getfacl", "-p", str(path)], capture_output=True, text=True, timeout=10)
                assert "user:nobody:rwx" in acl.stdout.split() and "#effective" not in acl.stdout, acl.stdout
                assert "other::---" in acl.stdout.split()
        finally:
            os.umask(old)
    finally:
        subprocess.run(["rm", "-rf", str(base)], timeout=30)
