"""The twins: same public API, and the choice between them at import."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from conftest import REQUIRE_COMPILED

PAIRS = [
    ("fastsni.tls", "fastsni._tls"),
    ("fastsni.addresses", "fastsni._addresses"),
    ("fastsni.engine", "fastsni._engine"),
    ("fasthttpdir.proxy", "fasthttpdir._http"),
    ("fastsni.proxy", "fastsni._proxy"),
]


def defined(module) -> set[str]:
    """The public functions and classes a module defines itself (not those it imports)."""
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and callable(value)
        and getattr(value, "__module__", None) == module.__name__
    }


@pytest.mark.parametrize("pure, compiled", PAIRS)
def test_compiled_twin_mirrors_the_pure_api(pure, compiled):
    try:
        compiled_module = importlib.import_module(compiled)
    except ImportError:
        if REQUIRE_COMPILED:
            raise
        pytest.skip(f"{compiled} is not built")
    pure_module = importlib.import_module(pure)
    # Everything the specification defines is reachable in the compiled twin.
    missing = {n for n in defined(pure_module) if not hasattr(compiled_module, n)}
    assert not missing, f"{compiled} lacks {sorted(missing)}"
    assert compiled_module.__file__.endswith(".so")


@pytest.mark.parametrize(
    "setting, expected", [("1", "fastsni.proxy"), ("", "fastsni._proxy"), ("0", "fastsni._proxy")]
)
def test_environment_chooses_the_twin(setting, expected):
    code = "from fastsni import twins; print(twins.load('fastsni.proxy', 'fastsni._proxy').__name__)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"FASTSNI_NO_EXTENSIONS": setting, "PATH": "/usr/bin:/bin"},
        timeout=30,
    )
    if expected.startswith("fastsni._") and not REQUIRE_COMPILED and result.stdout.strip() != expected:
        pytest.skip("compiled twin not built")
    assert result.stdout.strip() == expected, result.stderr


def test_missing_extension_falls_back_to_pure():
    code = (
        "import sys; sys.modules['fastsni._proxy'] = None\n"
        "from fastsni import twins; print(twins.load('fastsni.proxy', 'fastsni._proxy').__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == "fastsni.proxy", result.stderr
