"""Long run of the authenticated peer fuzzer (tests/test_fuzz_peer.py).

Run: python benchmarks/fuzz_peer.py [--messages N] [--minutes M] [--secure] [--random]

Same harness as the test: honest nodes over real TCP + mutual TLS on 127.0.0.1 and a
hostile peer with its own valid identity sending Hypothesis-generated messages of every
type to one of them. Messages go in batches (one Hypothesis run per batch) until N
messages or M minutes, whichever comes first; after the last batch the honest nodes
must still complete two rounds. Prints messages sent per type, the victim's rejection
counters (`status()["counters"]["frames_rejected"]`), contained errors (the supervision
guard) and rounds completed, and writes benchmarks/results/fuzz_peer.json.
Exit status 1 if the victim went down, the rounds stopped, or any hostile message caused
an error the supervision guard had to contain (a bug behind the codec).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_fuzz_peer import LiveFederation, fuzz, report  # noqa: E402


class _Capture(logging.Handler):
    """Keeps the supervision guard's 'contained an error' lines, drops the rest."""

    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text.startswith("contained") and len(self.into) < 20:
            self.into.append(text)


RESULTS = ROOT / "benchmarks" / "results" / "fuzz_peer.json"
BATCH = 2000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--secure", action="store_true", help="secure aggregation, 4 nodes")
    parser.add_argument("--random", action="store_true", help="fresh seeds (default: 0, 1, ...)")
    parser.add_argument("--verbose", action="store_true", help="the nodes' warning lines")
    args = parser.parse_args()
    contained_lines: list[str] = []
    if not args.verbose:  # one warning per rejected message would drown the table
        logger = logging.getLogger("p2pfl")
        logger.setLevel(logging.WARNING)
        logger.addHandler(_Capture(contained_lines))

    started = time.monotonic()
    deadline = started + 60 * args.minutes
    failure = None
    with (
        tempfile.TemporaryDirectory() as tmp,
        LiveFederation(Path(tmp), honest=4 if args.secure else 2, secure=args.secure) as fed,
    ):
        warmup = fed.call(fed.wait_rounds, 1, 60.0)
        rounds_before = fed.call(fed.rounds_completed)
        sent = 0
        batch_no = 0
        try:
            while sent < args.messages and time.monotonic() < deadline:
                n = min(BATCH, args.messages - sent)
                # One seed per batch (reproducible), or fresh randomness with --random.
                fuzz(fed, n, seed=None if args.random else batch_no)
                batch_no += 1
                sent = sum(fed.stats.sent.values())
                print(f"  {sent} messages, {time.monotonic() - started:.0f} s", flush=True)
        except AssertionError as exc:
            failure = str(exc)
        fuzz_seconds = time.monotonic() - started
        after = fed.call(fed.wait_rounds, 2, 60.0)
        rounds_total = fed.call(fed.rounds_completed)
        status = fed.call(fed.victim_status)
        alive = fed.victim_alive() and not fed.crashed
        if not alive:
            failure = failure or report(fed)
        rows = dict(sorted(fed.stats.sent.items()))
        rejected = dict(sorted(status["counters"]["frames_rejected"].items()))
        contained = dict(sorted(status["counters"]["contained_errors"].items()))
        result = {
            "benchmark": "fuzz_peer",
            "secure_aggregation": args.secure,
            "random": args.random,
            "python": platform.python_version(),
            "messages_sent": sum(rows.values()),
            "fuzz_seconds": round(fuzz_seconds, 1),
            "messages_per_second": round(sum(rows.values()) / max(fuzz_seconds, 1e-9), 1),
            "sent_by_type": rows,
            "frames_rejected": rejected,
            "contained_errors": contained,
            "secure": status["secure"],
            "hostile_reconnects": fed.stats.reconnects,
            "send_failures": fed.stats.send_failures,
            "warmup_rounds": warmup,
            "rounds_completed_total": rounds_total,
            "rounds_completed_before_fuzz": rounds_before,
            "rounds_after_fuzz": after,
            "contained_log_lines": contained_lines,
            "victim_alive": alive,
            "failure": failure,
        }
    print()
    print(f"{'message type':<16}{'sent':>10}")
    for kind, count in rows.items():
        print(f"{kind:<16}{count:>10}")
    print(f"{'total':<16}{result['messages_sent']:>10}  ({result['messages_per_second']}/s)")
    print()
    print(f"{'rejected by the victim':<40}{'count':>10}")
    for reason, count in rejected.items():
        print(f"{reason:<40}{count:>10}")
    print(f"contained errors (supervision guard): {contained or 'none'}")
    for line in contained_lines[:5]:
        print(f"  {line}")
    if status["secure"] is not None:
        sec = status["secure"]
        print(f"secure protocol refusals: {sec['refused'] or 'none'}")
        print(f"groups the victim led: {sec['groups_led']}")
        print(
            f"victim's rounds in a group / out: {sec['rounds_grouped']}/{sec['rounds_out']}"
            f" {sec['out_reasons'] or ''}"
        )
    print(f"hostile reconnects (victim hung up): {fed.stats.reconnects}")
    print(
        f"rounds completed per honest node: before fuzz {rounds_before}, "
        f"total {rounds_total}, after fuzz +{after}"
    )
    # As in the test: a hostile message must be refused cleanly, never reach a component
    # that fails and has to be contained by the guard.
    ok = alive and all(n >= 2 for n in after) and failure is None and not contained
    why = failure or (f"contained errors {contained}" if contained else "rounds stopped")
    print("PASS" if ok else f"FAIL: {why}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
