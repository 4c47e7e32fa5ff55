"""Choose between the compiled (Cython) and the pure-Python twin of a hot-path module.

Each hot-path module ``fastsni.X`` (pure, the specification) has a compiled twin
``fastsni._X`` built from ``pyx/_X.pyx`` with the same API and behaviour.  The compiled
one is used when it was built, unless ``FASTSNI_NO_EXTENSIONS`` is set to a non-empty
value other than ``0``; a missing extension (installed without a compiler) silently
falls back to the pure twin.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

NO_EXTENSIONS = os.environ.get("FASTSNI_NO_EXTENSIONS", "") not in ("", "0")


def load(pure: str, compiled: str) -> ModuleType:
    """Import the twin that should run: ``compiled`` if allowed and built, else ``pure``."""
    if not NO_EXTENSIONS:
        try:
            return importlib.import_module(compiled)
        except ImportError:
            pass
    return importlib.import_module(pure)


def is_compiled(module: ModuleType) -> bool:
    return module.__name__.rsplit(".", 1)[-1].startswith("_")
