"""The README's first command: the demo routes real requests through fastsni and fasthttpdir."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from pathlib import Path


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


def test_demo_sigterm_stops_the_proxies_and_removes_its_files(twin):
    demo = subprocess.Popen(
        [sys.executable, "-m", "fastsni.demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={k: v for k, v in twin.env.items() if k != "FASTSNI_ALLOW_ROOT"},
    )
    try:
        out = ""
        for line in demo.stdout:  # bounded: the demo prints a dozen lines, then waits
            out += line
            if "Ctrl-C stops the demo" in line:
                break
        hosts = Path(re.search(r"hosts directory: (\S+)", out).group(1))
        ports = [int(port) for port in re.findall(r":(\d+):127\.0\.0\.1", out)]
        assert hosts.is_dir() and len(ports) == 2, out
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=30) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert not hosts.parent.exists()
    for port in ports:  # both proxies are gone: nobody listens on their ports
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0
