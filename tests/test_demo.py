"""The README's first command: the demo routes real requests through fastsni and fasthttpdir."""

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
    assert "fetched through fasthttpdir: Hello from the demo.localhost HTTP backend" in result.stdout
    assert "X-Forwarded-For: 127.0.0.1" in result.stdout
    assert "curl --cacert" in result.stdout
    assert f"fastsni 0.1.0 ({twin.name}," in result.stderr
    assert f"fasthttpdir 0.1.0 ({twin.name}," in result.stderr
