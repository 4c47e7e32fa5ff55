"""The README's first command: the demo routes a real HTTPS request through fastsni."""

from __future__ import annotations

import subprocess
import sys


def test_demo_once(twin):
    result = subprocess.run(
        [sys.executable, "-m", "fastsni.demo", "--once"],
        capture_output=True,
        text=True,
        env=twin.env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "fetched through fastsni: Hello from the demo.localhost backend" in result.stdout
    assert "curl --cacert" in result.stdout
    assert f"({twin.name}," in result.stderr
