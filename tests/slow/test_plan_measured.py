"""``wmss plan`` against the measured peak memory of the same CPU runs (issue [M] item 2).

``bench/plan_check.py`` trains a 45M-parameter GPT for three steps per configuration in fresh
gloo ranks and compares each rank's peak RSS growth with the planner's per-rank total. The
three configurations here span SFT and joint, TP 1 and 2, DP 2, the distributed optimizer on
and off, recompute none / selective / full, the chunked and the unfused loss (fp32; the bench
runs seven, bf16 too); every one must be within the issue's 15%.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# Three fp32 configurations cover every axis (the bench runs all seven; CI's 30 minutes).
FP32_CONFIGS = ("sft-tp2-full-unfused", "sft-dp2-distopt-selective-unfused",
                "joint-dp2-distopt-chunked")


def test_planner_is_within_15_percent_of_the_measured_peak():
    # These fp32 configurations cover every axis; the other four are bench/plan_check.py's.
    done = subprocess.run([sys.executable, str(REPO / "bench" / "plan_check.py"), "--json",
                           "--only", ",".join(FP32_CONFIGS)],
                          capture_output=True, text=True, timeout=1800, cwd="/")
    assert done.stdout, done.stderr[-3000:]
    out = json.loads(done.stdout)
    runs = out["runs"]
    covered = {key: {run[key] for run in runs} for key in
               ("command", "tp", "distributed_optimizer", "recompute", "cross_entropy")}
    assert covered == {"command": {"sft", "joint"}, "tp": {1, 2},
                       "distributed_optimizer": {False, True},
                       "recompute": {"none", "selective", "full"},
                       "cross_entropy": {"chunked", "unfused"}}
    for run in runs:
        assert run["measured_bytes"] > 2**28, run  # the model's state dominates, not noise
        assert abs(run["error"]) <= out["tolerance"] == 0.15, run
    assert done.returncode == 0, done.stderr[-3000:]
