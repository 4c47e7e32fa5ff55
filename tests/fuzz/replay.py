"""Replay inputs through a harness without atheris: ``replay.py HARNESS PATH...``.

Each PATH is an input file or a directory of them (a corpus).  The twins' disagreements
fail as they do under the fuzzer (an AssertionError naming the input).  ``run.py
--coverage`` runs this under coverage.py to show what a corpus reaches of the pure twin.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        sys.exit("usage: replay.py HARNESS PATH...")
    harness = importlib.import_module(f"fuzz_{argv[0]}")
    count = 0
    for given in map(Path, argv[1:]):
        for path in sorted(given.iterdir()) if given.is_dir() else [given]:
            try:
                harness.test_one_input(path.read_bytes())
            except Exception as exc:
                raise AssertionError(f"{path}: {exc!r}"[:4000]) from exc
            count += 1
    print(f"{argv[0]}: {count} inputs replayed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
