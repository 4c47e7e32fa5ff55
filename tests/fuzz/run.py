"""Run the fuzz harnesses, each for a number of executions (or seconds), and sum them up.

    python3 tests/fuzz/run.py                      # 1,000,000 executions of each harness
    python3 tests/fuzz/run.py --runs 5000000 hello # one harness, longer
    python3 tests/fuzz/run.py --seconds 3600       # an hour each
    python3 tests/fuzz/run.py --runs 0 --coverage  # what the corpora reach (coverage.py)
    python3 tests/fuzz/run.py --merge              # then keep what is new in the seeds

Each harness grows its corpus in WORK/<harness>/ (default .fuzz/, kept between runs, so
a long run goes on from where the last one stopped), starting from the committed seeds
in tests/fuzz/corpus/<harness>/; a crash or disagreement is written to
WORK/<harness>-crash-* (libFuzzer's artifact) and the run of that harness stops there.
Replay one with ``python3 tests/fuzz/fuzz_<harness>.py FILE``; once understood, copy it
to tests/fuzz/regressions/<harness>/ so tests/test_fuzz.py replays it on every run.
Needs atheris and the compiled twins (``python3 setup.py build_ext --inplace``).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
HARNESSES = ("hello", "request", "response")
DICTIONARIES = {"request": "http.dict", "response": "http.dict"}
ROOT = HERE.parent.parent
# The pure twin's code each harness drives (coverage.py's report, with --coverage).
COVERS = {
    "hello": ["fastsni/tls.py"],
    "request": ["fasthttpdir/proxy.py"],
    "response": ["fasthttpdir/proxy.py", "fastsni/engine.py"],
}


@dataclass
class Result:
    harness: str
    returncode: int
    executions: int
    per_second: int
    cov: int  # libFuzzer's covered edges (of the instrumented pure twin's bytecode)
    ft: int  # libFuzzer's features (edges with hit counts and the like)
    corpus: int  # inputs in the corpus at the end
    crash: str  # the artifact written for a crash or disagreement, if any
    output: str

    def summary(self) -> str:
        verdict = f"FAILED ({self.crash or f'exit {self.returncode}'})" if self.returncode else "ok"
        return (
            f"{self.harness}: {self.executions} executions ({self.per_second}/s), "
            f"cov {self.cov}, ft {self.ft}, corpus {self.corpus}: {verdict}"
        )


def run(
    harness: str, work: Path, runs: int | None = None, seconds: int | None = None, seed: int = 0
) -> Result:
    """One harness, as a child process; returns what libFuzzer reported."""
    corpus = work / harness
    corpus.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(HERE / f"fuzz_{harness}.py"),
        "-print_final_stats=1",
        f"-artifact_prefix={work}/{harness}-",
        f"-seed={seed}",
    ]
    if runs is not None:
        command.append(f"-runs={runs}")
    if seconds is not None:
        command.append(f"-max_total_time={seconds}")
    if harness in DICTIONARIES:
        command.append(f"-dict={HERE / DICTIONARIES[harness]}")
    command += [str(corpus), str(HERE / "corpus" / harness)]
    done = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=None)
    output = done.stderr + done.stdout

    def last(pattern: str) -> int:
        found = re.findall(pattern, output)
        return int(found[-1]) if found else 0

    crash = re.findall(r"Test unit written to (\S+)", output)
    return Result(
        harness=harness,
        returncode=done.returncode,
        executions=last(r"stat::number_of_executed_units:\s+(\d+)") or last(r"#(\d+)\s"),
        per_second=last(r"stat::average_exec_per_sec:\s+(\d+)"),
        cov=last(r"\scov: (\d+)"),
        ft=last(r"\sft: (\d+)"),
        corpus=last(r"\scorp: (\d+)/"),
        crash=crash[-1] if crash else "",
        output=output,
    )


def merge(harness: str, work: Path) -> str:
    """Add to the committed seeds the inputs of WORK/<harness> that reach something new."""
    command = [
        str(HERE / f"fuzz_{harness}.py"),
        "-merge=1",
        str(HERE / "corpus" / harness),
        str(work / harness),
    ]
    if harness in DICTIONARIES:
        command.insert(1, f"-dict={HERE / DICTIONARIES[harness]}")
    done = subprocess.run(command, capture_output=True, text=True, errors="replace", check=True)
    return re.findall(r"MERGE-OUTER: \d+ new files.*", done.stderr)[-1]


def coverage(harness: str, work: Path) -> str:
    """coverage.py's line and branch report of the pure twin, over the corpus and the seeds."""
    data = work / f".coverage-{harness}"
    include = ",".join(str(ROOT / path) for path in COVERS[harness])
    replay = [sys.executable, "-m", "coverage", "run", f"--data-file={data}", "--branch"]
    replay += [f"--include={include}", str(HERE / "replay.py"), harness]
    replay += [str(work / harness), str(HERE / "corpus" / harness)]
    subprocess.run(replay, check=True, capture_output=True, cwd=HERE)
    report = [sys.executable, "-m", "coverage", "report", f"--data-file={data}", "--show-missing"]
    return subprocess.run(report, check=True, capture_output=True, text=True).stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("harnesses", nargs="*", help=f"some of {', '.join(HARNESSES)} (default: all)")
    parser.add_argument("--runs", type=int, help="executions of each harness (default 1000000)")
    parser.add_argument("--seconds", type=int, help="seconds of each harness, instead of a count")
    parser.add_argument("--work", type=Path, default=Path(".fuzz"), help="corpus and crash directory")
    parser.add_argument("--seed", type=int, default=0, help="libFuzzer's seed (0: a new one each run)")
    parser.add_argument("--coverage", action="store_true", help="then the pure twin's coverage (coverage.py)")
    parser.add_argument("--merge", action="store_true", help="then merge what is new into tests/fuzz/corpus")
    options = parser.parse_args(argv)
    unknown = set(options.harnesses) - set(HARNESSES)
    if unknown:
        parser.error(f"no harness {', '.join(sorted(unknown))}: choose from {', '.join(HARNESSES)}")
    runs = options.runs if options.runs is not None or options.seconds else 1_000_000
    failed = 0
    for harness in options.harnesses or HARNESSES:
        result = run(harness, options.work.resolve(), runs, options.seconds, options.seed)
        if result.returncode:
            failed += 1
            sys.stdout.write(result.output[-4000:])
        print(result.summary(), flush=True)
        if options.merge and not result.returncode:
            print(merge(harness, options.work.resolve()), flush=True)
        if options.coverage:
            print(coverage(harness, options.work.resolve()), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
