"""Imports run one way: command-line tools -> proxies -> the shared core, and neither proxy
imports the other.  Checked on the sources (both twins), so a new module needs a layer."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CORE = 0  # what both proxies share: fd 0 contract, engine, hostname rules, PROXY headers, logs
PROXY = 1
TOOL = 2
LAYERS = {
    "fastsni": CORE,
    "fastsni.engine": CORE,
    "fastsni._engine": CORE,
    "fastsni.tls": CORE,
    "fastsni._tls": CORE,
    "fastsni.addresses": CORE,
    "fastsni._addresses": CORE,
    "fastsni.logs": CORE,
    "fastsni.ownerlog": CORE,
    "fastsni.metrics": CORE,
    "fastsni.twins": CORE,
    "fastsni.server": CORE,
    "fastsni.confine": CORE,
    "fastsni.proxy": PROXY,
    "fastsni._proxy": PROXY,
    "fastsni.__main__": PROXY,
    "fasthttpdir": PROXY,
    "fasthttpdir.proxy": PROXY,
    "fasthttpdir._http": PROXY,
    "fasthttpdir.__main__": PROXY,
    "fastsni.listen": TOOL,
    "fastsni.deploy": TOOL,
    "fastsni.check": TOOL,
    "fastsni.release": TOOL,
    "fastsni.probe": TOOL,
    "fastsni.tree": TOOL,
    "fastsni.demo": TOOL,
    "fastsni.hostname": TOOL,
}
PROXIES = {
    "fastsni": {"fastsni.proxy", "fastsni._proxy"},
    "fasthttpdir": {"fasthttpdir.proxy", "fasthttpdir._http"},
}
PYX_IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+c?import\b|c?import\s+([\w.]+))", re.M)


def sources() -> dict[str, Path]:
    """Every module of both packages, pure (.py) and compiled (pyx/_X.pyx), by its name."""
    found = {}
    for package in ("fastsni", "fasthttpdir"):
        for path in sorted((ROOT / package).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    setup = (ROOT / "setup.py").read_text()
    for name, source in re.findall(r'"((?:fastsni|fasthttpdir)\._\w+)": "(pyx/_\w+\.pyx)"', setup):
        found[name] = ROOT / source
    return found


def imported(path: Path, known: set[str]) -> set[str]:
    """The project's modules ``path`` imports (``from fastsni import x`` counts as fastsni.x)."""
    if path.suffix == ".pyx":
        names = {a or b for a, b in PYX_IMPORT.findall(path.read_text())}
    else:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name in known}


def test_every_module_has_a_layer():
    assert sorted(set(sources()) - set(LAYERS)) == []
    assert sorted(set(LAYERS) - set(sources())) == []


def test_imports_run_from_tools_to_proxies_to_core():
    modules = sources()
    wrong = []
    for name, path in modules.items():
        for target in imported(path, set(modules)):
            if LAYERS[target] > LAYERS[name]:
                wrong.append(f"{name} imports {target}")
            for package, proxy in PROXIES.items():
                if target in proxy and not name.startswith(package):
                    wrong.append(f"{name} imports the other proxy's {target}")
    assert wrong == []
