"""With FASTSNI_TEST_INSTALLED=1 (.ci/run's pass over the built wheel) the suite must be
testing the installed package: this process and every process it starts import fastsni
and fasthttpdir from the virtual environment's site-packages, never from the source tree,
and the compiled twin there is the one that runs."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import ROOT, TEST_INSTALLED

pytestmark = pytest.mark.skipif(
    not TEST_INSTALLED, reason="only for a run against an installed wheel (FASTSNI_TEST_INSTALLED=1)"
)

SITE = {Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")}
EXTENSIONS = ["fastsni._tls", "fastsni._addresses", "fastsni._engine", "fastsni._proxy", "fasthttpdir._http"]

WHERE = """
import importlib, json, sys
from fastsni import twins
names = ["fastsni", "fasthttpdir", *sys.argv[1:]]
files = {name: importlib.import_module(name).__file__ for name in names}
files["running"] = twins.load("fastsni.engine", "fastsni._engine").__name__
print(json.dumps(files))
"""


def installed(path: str) -> bool:
    resolved = Path(path).resolve()
    return any(resolved.is_relative_to(site) for site in SITE) and not resolved.is_relative_to(ROOT)


def test_the_test_process_imports_the_installed_package():
    import fasthttpdir
    import fastsni

    assert installed(fastsni.__file__), (fastsni.__file__, SITE)
    assert installed(fasthttpdir.__file__), (fasthttpdir.__file__, SITE)


def test_started_processes_import_the_installed_twin(twin):
    result = subprocess.run(
        [sys.executable, "-c", WHERE, *EXTENSIONS],
        env=twin.env,
        cwd=ROOT.parent,  # no source tree in the current directory either
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    files = json.loads(result.stdout)
    running = files.pop("running")
    for name, path in files.items():
        assert installed(path), (name, path, SITE)
    for name in EXTENSIONS:  # built into the wheel, not compiled at install time
        assert files[name].endswith(".so"), (name, files[name])
    assert running == ("fastsni._engine" if twin.name == "compiled" else "fastsni.engine")


def test_console_scripts_run_the_installed_twin(twin):
    bin_dir = Path(sys.executable).parent
    for program in ("fastsni", "fasthttpdir"):
        result = subprocess.run(
            [str(bin_dir / program), "--version"], env=twin.env, capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"{program} ") and f"({twin.name})" in result.stdout, result.stdout
