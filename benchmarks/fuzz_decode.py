"""Long fuzzing run of the full decode path (frame -> msgpack -> message -> tensor ->
decompression -> round-machine checks).

Run: python benchmarks/fuzz_decode.py [--examples N] [--random] [--atheris SECONDS]

The properties are those of tests/test_fuzz_decode_path.py, which CI runs with a small
fixed, derandomized budget; this script runs them with a budget of N examples per
property (default 20000) and, with --random, fresh random seeds each time. A failure
prints hypothesis's minimal reproducing example. With --atheris (if the optional
`atheris` package is installed) it also runs coverage-guided fuzzing of raw byte
streams through the same DecodePath for the given number of seconds.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests" / "test_fuzz_decode_path.py"


def run_hypothesis(examples: int, random: bool) -> int:
    env = {**os.environ, "P2PFL_FUZZ_EXAMPLES": str(examples)}
    if random:
        env["P2PFL_FUZZ_RANDOM"] = "1"
    started = time.monotonic()
    code = subprocess.call(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS)],
        cwd=ROOT,
        env=env,
    )
    wall = time.monotonic() - started
    props = TESTS.read_text().count("\n@FUZZ\n")
    total = examples * props
    print(
        f"hypothesis: {props} properties x {examples} examples = {total} in {wall:.1f} s "
        f"({total / wall:.0f} examples/s); {'PASS' if code == 0 else 'FAIL'}"
    )
    return code


def run_atheris(seconds: int) -> int:
    try:
        atheris = importlib.import_module("atheris")
    except ImportError:
        print("atheris is not installed (pip install atheris): skipping coverage-guided run")
        return 0
    sys.path.insert(0, str(TESTS.parent))
    with atheris.instrument_imports():
        from test_fuzz_decode_path import DecodePath

    def one(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        path = DecodePath()
        while fdp.remaining_bytes():
            path.feed(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 4096)))

    atheris.Setup([sys.argv[0], f"-max_total_time={seconds}"], one)
    atheris.Fuzz()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=20000, help="examples per property")
    parser.add_argument("--random", action="store_true", help="fresh random seeds")
    parser.add_argument("--atheris", type=int, default=0, metavar="SECONDS")
    args = parser.parse_args()
    code = run_hypothesis(args.examples, args.random)
    if args.atheris:
        code |= run_atheris(args.atheris)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
