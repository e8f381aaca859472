"""Kill soak: SIGKILL `wmss run` (or `wmss sft`) at many seeded random moments, rerun after each
kill, and count the kills the run survived.

    python bench/kill_soak.py --kills 50 --seed 0 [--command run|sft] [--per-round 5]

The setups are the slow tests' (tests/slow/test_pipeline.py: the tiny `wmss run` config and
its base model; tests/distributed/test_trainer_resume.py: `wmss sft` with packing, the
distributed optimizer and dropout at DP=2), built in a temporary directory. One uninterrupted
run is the reference and its wall clock D the span of the kill moments: each attempt is killed
at a moment uniform over D after its start (tests/kills.py). The kills come in rounds on a fresh
run directory; a round ends when an attempt finishes on its own, or after ``--per-round``
kills and one more attempt run to the end. A round survives when no attempt printed a
traceback, no rerun exited nonzero, and its final result equals the reference (`run`:
report.json less its config, and report.md; `sft`: every step's loss in metrics.jsonl,
exactly). Its kills count as survived.

Prints one line per kill, one per round, then ``kills: K, survived: N, time: X s``.
It lives in bench/ with the other scripts one runs by hand for a figure, not in tests/: 50
kills of `wmss run` take about a quarter of an hour on 2 cores; the slow tests run the same
thing with 3 kills each.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.kills import failures, kill_rounds  # noqa: E402


def _setup(command: str, root: Path):
    """-> (command line for a run directory, uninterrupted run's result, its wall clock)."""
    if command == "run":
        from tests.slow.test_pipeline import _finish, _report, _wmss, build_tiny_run

        config = build_tiny_run(root)
        start = time.monotonic()
        _finish(_wmss("run", config), timeout=1200)
        duration = time.monotonic() - start

        def line(run_dir: Path) -> list[str]:
            return [sys.executable, "-m", "megatron_wmss.cli", "run", str(config),
                    "--run-dir", str(run_dir)]
        return line, _report, _report(root / "run"), duration

    from tests.distributed.test_trainer_resume import PACKED_SFT, _command, _losses, _run

    start = time.monotonic()
    proc = _run("sft", root / "reference", PACKED_SFT)
    duration = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    return (lambda run_dir: _command("sft", run_dir, PACKED_SFT)), _losses, \
        _losses(root / "reference"), duration


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--command", choices=["run", "sft"], default="run")
    parser.add_argument("--per-round", type=int, default=5,
                        help="kills on one run directory before it runs to the end")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    start = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix=f"kill_soak_{args.command}_"))
    line, result, want, duration = _setup(args.command, root)
    print(f"uninterrupted `wmss {args.command}`: {duration:.1f} s; work dir {root}", flush=True)
    done = survived = 0

    def report(round_, i, attempt):
        nonlocal done
        if attempt.killed:
            done += 1
            print(f"kill {done}/{args.kills}: round {round_} attempt {i}, "
                  f"{attempt.delay:5.1f} s in; last output: {attempt.last_line}", flush=True)
        else:
            print(f"  round {round_} attempt {i}: ended (exit {attempt.returncode})"
                  + (f" {attempt.delay:.1f} s before its kill" if attempt.delay else ""),
                  flush=True)

    for round_, attempts in kill_rounds(
            lambda r: line(root / f"round{r}"), duration=duration, kills=args.kills,
            seed=args.seed, log_dir=root / "logs", per_round=args.per_round,
            timeout=max(600, 5 * duration), on_attempt=report):
        run_dir = root / f"round{round_}"
        kills = sum(a.killed for a in attempts)
        problems = failures(attempts)
        if not problems:
            try:
                got = result(run_dir)
            except (AssertionError, OSError, ValueError) as e:
                problems.append(f"no final result: {e!r}")
            else:
                if got != want:
                    problems.append("final result differs from the uninterrupted run's")
        ok = not problems
        survived += kills if ok else 0
        print(f"round {round_}: {'survived' if ok else 'FAILED'} ({kills} kills, "
              f"{time.monotonic() - start:.0f} s so far)", flush=True)
        for problem in problems:
            print("  " + problem.replace("\n", "\n  "), flush=True)
        if ok and not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    print(f"kills: {done}, survived: {survived}, time: {time.monotonic() - start:.0f} s",
          flush=True)
    if not args.keep and survived == done:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if survived == done else 1


if __name__ == "__main__":
    sys.exit(main())
