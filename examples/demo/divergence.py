"""Two machines on one: where the demo's SFT and WMSS trajectories part, and how fast.

    python examples/demo/divergence.py [--seed 1] [--run-dir runs/demo/machines]

On one machine the demo repeats itself bit for bit (fixed seeds, fixed data order, the same
kernels); another machine's CPU kernels round differently in the last bit. That machine is
emulated here by ``ATEN_CPU_CAPABILITY=avx2``: ATen's vectorised kernels (softmax, norms,
reductions, element-wise ops) at AVX2 instead of this CPU's AVX-512, with the same threads and
BLAS. Needs runs/demo/data and runs/demo/base (``python examples/demo/run_demo.py``). Runs,
each skipped when done:

- A: ``wmss run examples/demo/demo.yaml seeds=[S]`` on this machine's kernels, logging every
  step and keeping every 16th step's checkpoint (logging and checkpoints change no number);
- B: the same under ``ATEN_CPU_CAPABILITY=avx2``, from the same base M0;
- phase 3 from one machine's start on either kernels: B_from_A (AVX2 kernels, A's M1 and
  A's active set), A_from_B (this machine's kernels, B's M1 and active set), A_from_B_M1
  (B's M1 with A's active set); and the SFT baseline's epoch 2 on the AVX2 kernels, resumed
  from A's step-256 checkpoint: each arm from a common start.

Then, for each pair of runs of a stage: the first step whose training loss differs, the
difference in loss and in weights (‖θ_A − θ_B‖/‖θ_A‖, strong model) at every kept checkpoint,
the growth rate of the weight difference, and each final model's held-out exact match.
Writes RUN_DIR/divergence.md and divergence.json. Runtime on 2 CPU cores, measured: about 11
minutes (the two demo runs 2 minutes each, the four restarted stages with their evaluations
1.5 minutes each); the comparison alone, seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = Path("runs/demo/data")
SAVE_EVERY = 16
OTHER_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2"}


def _say(text: str) -> None:
    print(f"divergence: {text}", file=sys.stderr, flush=True)


def _wmss(args: list[str], env: dict, log: Path) -> None:
    command = [sys.executable, "-m", "megatron_wmss.cli", *args]
    _say(" ".join(f"{k}={v}" for k, v in env.items()) + " wmss " + " ".join(args))
    start = time.monotonic()
    with open(log, "w") as out:
        subprocess.run(command, check=True, env={**os.environ, **env}, stdout=out,
                       stderr=subprocess.STDOUT)
    _say(f"  {time.monotonic() - start:.0f} s (log {log})")


def _recipe(stage: Path, out: Path, **replace) -> Path:
    """The stage's resolved recipe (RUN_DIR/config.yaml) as a file ``wmss sft|joint`` reads,
    with ``replace``: section -> {field: value}."""
    import yaml

    recipe = yaml.safe_load((stage / "config.yaml").read_text())
    recipe.pop("command")
    for section, fields in replace.items():
        recipe[section].update(fields)
    out.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return out


def _evaluate(stage: Path, env: dict, log: Path, joint: bool) -> None:
    out = stage / "eval"
    if not (out / "summary.json").is_file():
        _wmss(["eval", "--model", str(stage / "checkpoints"), "--tasks", "local_math",
               "--data-dir", str(DATA / "eval"), "--max-new-tokens", "40",
               "--generate-batch-size", "100", "--tokenizer", str(DATA / "sp.model"),
               "--out", str(out), "--overwrite", *(["--which", "strong"] if joint else [])],
              env, log)


#: Phase 3 started from one machine's M1 and active set, run on some kernels:
#: run name -> (kernels, the run whose M1 is the strong model, the run whose active set).
PHASE3_RUNS = {
    "B_from_A": (OTHER_KERNELS, "A", "A"),  # AVX2 kernels from a common start: A's
    "A_from_B": ({}, "B", "B"),  # this machine's kernels from B's start
    "A_from_B_M1": ({}, "B", "A"),  # B's M1 with A's active set
}


def run_all(root: Path, seed: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, env in (("A", {}), ("B", OTHER_KERNELS)):
        if not (root / name / "report" / "report.md").is_file():
            _wmss(["run", str(HERE / "demo.yaml"), f"seeds=[{seed}]", f"run_dir={root / name}",
                   "controls=[]", "training.trainer.log_interval=1",
                   f"training.trainer.save_interval={SAVE_EVERY}",
                   "training.trainer.keep_last=1000"], env, root / f"{name}.log")
    s = f"seed{seed}"
    a = root / "A" / s
    for name, (env, m1_run, set_run) in PHASE3_RUNS.items():
        out = root / name / "joint1"
        if not (out / "DONE").is_file():
            out.mkdir(parents=True, exist_ok=True)
            m1 = root / m1_run / s / "sft" / "checkpoints" / "iter_0000256"
            active = root / set_run / s / "select1" / "active_set.jsonl"
            recipe = _recipe(a / "joint1", root / name / "joint1.yaml",
                             init={"strong": str(m1)}, data={"active_set": str(active)})
            _wmss(["joint", "--config", str(recipe), "--run-dir", str(out),
                   "trainer.progress_bar=false"], env, root / f"{name}-joint1.log")
            (out / "DONE").write_text("")
        _evaluate(out, env, root / f"{name}-eval-joint1.log", joint=True)
    b = root / "B_from_A"
    if not (b / "baseline" / "DONE").is_file():  # the baseline's epoch 2 from A's step 256
        start = b / "baseline" / "checkpoints"
        shutil.rmtree(b / "baseline", ignore_errors=True)
        start.mkdir(parents=True)
        shutil.copytree(a / "baseline" / "checkpoints" / "iter_0000256", start / "iter_0000256")
        (start / "latest").write_text(json.dumps({"checkpoint": "iter_0000256", "step": 256}))
        _wmss(["sft", "--config", str(_recipe(a / "baseline", b / "baseline.yaml")),
               "--run-dir", str(b / "baseline"), "trainer.progress_bar=false"], OTHER_KERNELS,
              root / "B_from_A-baseline.log")
        (b / "baseline" / "DONE").write_text("")
    _evaluate(b / "baseline", OTHER_KERNELS, root / "B_from_A-eval-baseline.log", joint=False)


# --- comparison ------------------------------------------------------------------------------

def _losses(stage: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads,
                                              (stage / "metrics.jsonl").read_text().splitlines())}


def _weights(checkpoint: Path, scratch: Path):
    """The strong (or only) model's weights in a checkpoint, flattened (fp64)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint, scratch)
    state = torch.load(scratch, weights_only=False)
    joint = any(k.startswith("strong.") for k in state)
    keys = sorted(k for k, v in state.items() if isinstance(v, torch.Tensor)
                  and not k.startswith(("optimizer.", "weak.")) and "_extra_state" not in k
                  and (k.startswith("strong.") or not joint))
    return torch.cat([state[k].double().reshape(-1) for k in keys])


def compare(a: Path, b: Path, scratch: Path) -> dict:
    """Loss and weight differences of two runs of one stage (same steps, same batches)."""
    la, lb = _losses(a), _losses(b)
    steps = sorted(set(la) & set(lb))
    first = next((s for s in steps if la[s] != lb[s]), None)
    rows = []
    for step in steps:
        if step % SAVE_EVERY and step != steps[-1]:
            continue
        name = f"iter_{step:07d}"
        if not ((a / "checkpoints" / name).is_dir() and (b / "checkpoints" / name).is_dir()):
            continue
        wa, wb = _weights(a / "checkpoints" / name, scratch), _weights(b / "checkpoints" / name,
                                                                     scratch)
        window = [abs(la[s] - lb[s]) for s in steps if step - SAVE_EVERY < s <= step]
        rows.append({"step": step, "loss_a": la[step], "loss_b": lb[step],
                     "mean_abs_loss_diff": sum(window) / len(window),
                     "weight_diff": float((wa - wb).norm() / wa.norm())})
    return {"first_differing_step": first, "steps": [steps[0], steps[-1]], "rows": rows}


def _eval_score(path: Path):
    summary = path / "summary.json"
    if not summary.is_file():
        return None
    return 100.0 * json.loads(summary.read_text())["tasks"]["local_math"]["score"]


def _active_set(path: Path) -> list[int]:
    text = path.read_text().strip()
    if text.startswith("["):
        return json.loads(text)
    return [json.loads(line) if not line.startswith("{") else json.loads(line)["idx"]
            for line in text.splitlines()]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--run-dir", default="runs/demo/machines")
    args = parser.parse_args(argv)
    if not (DATA / "task.json").is_file() or not Path("runs/demo/base/DONE").is_file():
        raise SystemExit("divergence: run `python examples/demo/run_demo.py` (or make demo) "
                         "first: it writes the task and the base model")
    begin = time.monotonic()
    root = Path(args.run_dir)
    run_all(root, args.seed)
    s = f"seed{args.seed}"
    a, b, c = root / "A" / s, root / "B" / s, root / "B_from_A"
    pairs = {
        "phase 1 SFT from M0": (a / "sft", b / "sft"),
        "SFT baseline, 2 epochs from M0": (a / "baseline", b / "baseline"),
        "SFT baseline epoch 2, common start": (a / "baseline", c / "baseline"),
        "WMSS phase 3, common start (A's M1 and active set)": (a / "joint1", c / "joint1"),
        "WMSS phase 3 after each machine's own phase 1 and selection": (a / "joint1",
                                                                       b / "joint1"),
        "WMSS phase 3 from B's M1 and active set: A's kernels against B's": (
            root / "A_from_B" / "joint1", b / "joint1"),
    }
    scratch = root / "scratch.pt"
    report = {name: compare(x, y, scratch) for name, (x, y) in pairs.items()}
    scratch.unlink(missing_ok=True)
    set_a, set_b = _active_set(a / "select1" / "active_set.jsonl"), \
        _active_set(b / "select1" / "active_set.jsonl")
    report["active_sets"] = {"A": len(set_a), "B": len(set_b), "common": len(set(set_a) &
                                                                             set(set_b)),
                             "identical": set_a == set_b}
    report["exact_match"] = {
        "A": {k: _eval_score(a / f"eval_{k}" / "eval") for k in ("sft", "baseline", "wmss")},
        "B": {k: _eval_score(b / f"eval_{k}" / "eval") for k in ("sft", "baseline", "wmss")},
        "B from A": {"baseline": _eval_score(c / "baseline" / "eval"),
                     "wmss": _eval_score(c / "joint1" / "eval")},
        **{f"{name}: wmss": _eval_score(root / name / "joint1" / "eval")
           for name in PHASE3_RUNS if name != "B_from_A"}}
    (root / "divergence.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"# Seed {args.seed}: this machine's kernels (A) against AVX2 kernels (B)", "",
             f"Exact match (held-out, greedy): {json.dumps(report['exact_match'])}", "",
             f"Active sets: {json.dumps(report['active_sets'])}", ""]
    for name, r in report.items():
        if not isinstance(r, dict) or "rows" not in r:
            continue
        lines += [f"## {name}", "", f"steps {r['steps'][0]}-{r['steps'][1]}, first step whose "
                  f"loss differs: {r['first_differing_step']}", "",
                  "| step | loss A | loss B | mean abs loss diff (last 16 steps) | "
                  "‖θ_A − θ_B‖/‖θ_A‖ | growth per step |", "|---|---|---|---|---|---|"]
        previous = None
        for row in r["rows"]:
            growth = "—"
            if previous and previous["weight_diff"] > 0 and row["weight_diff"] > 0:
                rate = math.log(row["weight_diff"] / previous["weight_diff"]) / (
                    row["step"] - previous["step"])
                growth = f"×{math.exp(rate):.3f}"
            lines.append(f"| {row['step']} | {row['loss_a']:.5f} | {row['loss_b']:.5f} | "
                         f"{row['mean_abs_loss_diff']:.2e} | {row['weight_diff']:.2e} | "
                         f"{growth} |")
            previous = row
        lines.append("")
    (root / "divergence.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _say(f"wrote {root / 'divergence.md'} in {time.monotonic() - begin:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
