"""``bench/run.py --json`` runs from the checkout and prints the JSON the README quotes.

At ``--quick`` shapes (seconds, not a measurement): every headline ratio is present and a
positive finite number, each target is evaluated, and the loss implementations agree.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEYS = ("chunked_vs_naive_peak_memory", "chunked_vs_unfused_time", "joint_vs_sft_step_time",
        "frozen_joint_vs_sft_step_time", "packed_vs_padded_tokens_per_s",
        "batched_vs_sequential_generation_tokens_per_s")


def test_bench_run_prints_every_ratio():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--json",
                           "--quick"], capture_output=True, text=True, timeout=600, cwd="/")
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    for key in KEYS:
        assert isinstance(out[key], float) and math.isfinite(out[key]) and out[key] > 0, key
        assert set(out["targets"][key]) == {"target", "met"}
    runs = out["details"]["loss"]["runs"]
    assert set(runs) == {"tp1_t64", "tp1_t256", "tp2_t64", "tp2_t256"}
    assert all(run["max_loss_difference"] < 1e-4 for run in runs.values())
    packing = out["details"]["packing"]
    assert packing["rows"]["packed"] < packing["rows"]["padded"]
    assert out["details"]["generation"]["identical"]
