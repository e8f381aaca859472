"""Why WMSS scores below SFT-2-epochs on the demo: epoch 2 of each arm, measured.

    python examples/demo/explain.py [--seed 1] [--run-dir runs/demo/explain]

Needs runs/demo/data and runs/demo/base (``python examples/demo/run_demo.py`` or ``make demo``
make them). Each step is skipped when its output exists, so a rerun only redoes what is new:

1. ``wmss run examples/demo/demo.yaml`` for one seed into RUN_DIR, with the controls that tell
   the causes apart (temperature, sft_fresh_optimizer, wdds_only) and every 32nd step's
   checkpoint kept. Nothing else changes: the trajectories are the demo's, bit for bit, on the
   same machine (checkpoints and logging do not touch the numbers).
2. Every kept checkpoint of "epoch 2" (the SFT baseline's steps 256-512; phase 3 and the
   controls, which all start from M1) is scored on the held-out split: greedy exact match
   (``wmss eval``'s local_math, as the report does) and, teacher-forced on the worked
   solutions, the mean per-token cross-entropy, target-logit margin and argmax accuracy of the
   strong model alone and, for joint checkpoints, of the mixed logits the run trained; and
   how far the weights are from where the arm started (‖θ − θ_start‖ over ‖θ_start‖).
3. RUN_DIR/explain_seed<S>.md (the raw scores: RUN_DIR/explain/seed<S>/scores.json): per arm
   and checkpoint, those numbers beside what the run logged at that step (lr, training loss,
   ‖Δθ‖/‖θ‖ of the step, training margin).

Runtime on 2 shared CPU cores, measured: 10-11 minutes per seed (step 1 about 6, step 2 about
4-5: 37 checkpoints, 6-10 s each); a rerun with everything in place, seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import task  # noqa: E402

SAVE_EVERY = 32
CONTROLS = ("temperature", "sft_fresh_optimizer", "wdds_only")
#: arm -> (stage directory, its step of M1: epoch 2 starts there, joint checkpoint?)
ARMS = {
    "sft_baseline": ("baseline", 256, False),
    "wmss": ("joint1", 0, True),
    "sft_fresh_optimizer": ("sft_fresh_optimizer", 0, False),
    "wdds_only": ("wdds_only", 0, False),
    "temperature": ("temperature", 0, False),
}


def _say(text: str) -> None:
    print(f"explain: {text}", file=sys.stderr, flush=True)


def run_pipeline(run_dir: Path, seed: int) -> None:
    """Step 1: the demo's stages for ``seed`` with the controls and the kept checkpoints."""
    command = [sys.executable, "-m", "megatron_wmss.cli", "run", str(HERE / "demo.yaml"),
               f"seeds=[{seed}]", f"run_dir={run_dir}", f"controls=[{','.join(CONTROLS)}]",
               f"training.trainer.save_interval={SAVE_EVERY}", "training.trainer.keep_last=1000"]
    _say(" ".join(command[2:]))
    subprocess.run(command, check=True)


def heldout_solutions(data: Path, out: Path) -> Path:
    """The held-out problems with their worked solutions, in the training rows' format."""
    rows = []
    for line in (data / "eval" / "local_math.jsonl").read_text().splitlines():
        row = json.loads(line)
        match = re.fullmatch(r"Start with (\d)\. Apply (.+)\.", row["question"])
        start, chain = int(match.group(1)), tuple(match.group(2).split(", then "))
        rows.append({"idx": row["idx"], "question": row["question"] + task.SUFFIX,
                     "answer": task.solution(start, chain)[0]})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def checkpoints(stage: Path, first: int) -> list[tuple[int, Path]]:
    """(step, directory) of the stage's kept checkpoints from step ``first`` on."""
    found = []
    for path in sorted((stage / "checkpoints").glob("iter_*")):
        step = int(path.name.removeprefix("iter_"))
        if path.is_dir() and not path.name.endswith("nonfinite") and step >= first:
            found.append((step, path))
    return found


# --- step 2, on one gloo rank ----------------------------------------------------------------

def _batches(solutions: Path, tokenizer_path: str, cache: Path, max_length: int):
    from megatron_wmss.data import load_tokenizer, tokenize_sft
    from megatron_wmss.data.collate import SFTDataset, collate_sft
    from megatron_wmss.data.config import DataConfig

    tokenizer = load_tokenizer(tokenizer_path)
    data = tokenize_sft(DataConfig(paths=[str(solutions)], max_length=max_length,
                                   cache_dir=str(cache), shuffle=False), tokenizer)
    rows = SFTDataset(data)
    return [collate_sft([rows[i] for i in range(start, min(start + 50, len(rows)))],
                        pad_id=tokenizer.pad_id) for start in range(0, len(rows), 50)]


def _logits(model, batch, vocab: int):
    import torch

    from megatron_wmss.training.step import causal_attention_mask

    tokens = batch["tokens"]
    with torch.no_grad():
        out = model(tokens, batch["position_ids"], causal_attention_mask(tokens.shape[1], "cpu"))
    return out[..., :vocab].float()


def _token_stats(logits_list, batches) -> dict:
    """Mean per supervised token: CE (nats), margin z_y − mean_{k≠y} z_k, argmax accuracy."""
    import torch

    ce = margin = correct = count = 0.0
    for logits, batch in zip(logits_list, batches):
        mask = batch["labels"] != -100
        z, y = logits[mask], batch["labels"][mask]
        ce += float(torch.nn.functional.cross_entropy(z, y, reduction="sum"))
        target = z.gather(1, y[:, None])[:, 0]
        margin += float((target - (z.sum(1) - target) / (z.shape[1] - 1)).sum())
        correct += float((z.argmax(1) == y).sum())
        count += float(mask.sum())
    return {"ce": ce / count, "margin": margin / count, "token_acc": correct / count}


def _flat(model):
    import torch

    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def _score_checkpoint(path: Path, joint: bool, mix_lambda: float, batches, eval_job) -> tuple:
    from megatron_wmss.evaluation.runner import check_job, evaluate_rank
    from megatron_wmss.interop.convert import load_checkpoint_model

    strong, cfg = load_checkpoint_model(path, "strong" if joint else None)
    vocab = cfg.vocab_size
    z_strong = [_logits(strong, b, vocab) for b in batches]
    out = {"strong": _token_stats(z_strong, batches)}
    if joint:
        weak, _ = load_checkpoint_model(path, "weak")
        z_weak = [_logits(weak, b, vocab) for b in batches]
        out["weak"] = _token_stats(z_weak, batches)
        out["mixed"] = _token_stats([mix_lambda * s + (1 - mix_lambda) * w
                                     for s, w in zip(z_strong, z_weak)], batches)
    summary = evaluate_rank(check_job(eval_job(path, "strong" if joint else None)))
    out["exact_match"] = 100.0 * summary["tasks"]["local_math"]["score"]
    return out, _flat(strong)


def score_all(jobs: list[dict], solutions: str, tokenizer: str, data_dir: str, cache: str,
              mix_lambda: float) -> list[dict]:
    """Step 2 for every checkpoint of ``jobs`` (dicts: arm, step, path, joint, start, out)."""
    from megatron_wmss.evaluation.runner import EvalJob

    batches = _batches(Path(solutions), tokenizer, Path(cache), max_length=128)
    starts = {}
    results = []
    for job in jobs:
        def eval_job(path, which, job=job):
            return EvalJob(model=str(path), tasks=["local_math"], out=job["out"],
                           backend="megatron", data_dir=data_dir, max_new_tokens=40,
                           tokenizer=tokenizer, which=which, generate_batch_size=100,
                           label=f"{job['arm']}@{job['step']}", overwrite=True)

        t0 = time.monotonic()
        scores, flat = _score_checkpoint(Path(job["path"]), job["joint"], mix_lambda, batches,
                                         eval_job)
        if job["start"]:
            starts[job["arm"]] = flat
        start = starts[job["arm"]]
        scores["moved"] = float((flat - start).norm() / start.norm())
        results.append({**job, **scores, "seconds": time.monotonic() - t0})
        _say(f"{job['arm']} step {job['step']}: exact match {scores['exact_match']:.1f}, "
             f"held-out CE {scores['strong']['ce']:.4f} ({time.monotonic() - t0:.0f} s)")
    return results


# --- step 3 ----------------------------------------------------------------------------------

def _logged(stage: Path) -> dict[int, dict]:
    records = {}
    for line in (stage / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return records


def _fmt(value, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else format(value, spec)


def write_tables(run_dir: Path, seed: int, results: list[dict]) -> str:
    lines = [f"# Epoch 2 of each arm, seed {seed} (examples/demo/explain.py)", "",
             "step: within epoch 2 (the baseline's step − 256). lr, loss, ‖Δθ‖/‖θ‖ and margin: "
             "what the run logged at that step (training batch; for WMSS the strong model's "
             "update and the strong/mixed margins). held-out: teacher-forced on the worked "
             "solutions of the 200 held-out problems, strong model alone (mixed logits in "
             "brackets for WMSS); EM: greedy exact match; moved: ‖θ − θ_start‖/‖θ_start‖. "
             "First the end of each arm (peaks over its logged steps), then its checkpoints.",
             ""]
    lines += ["| arm | steps | peak lr | peak ‖Δθ‖/‖θ‖ ×1e3 | moved | held-out CE | "
              "held-out token acc | EM |", "|---|---|---|---|---|---|---|---|"]
    for arm, (stage_name, offset, joint) in ARMS.items():
        rows = [r for r in results if r["arm"] == arm]
        if not rows:
            continue
        logged = [r for step, r in sorted(_logged(run_dir / f"seed{seed}" / stage_name).items())
                  if step > offset]
        key = f"update_ratio/{'strong' if joint else 'model'}"
        end = rows[-1]
        lines.append(f"| {arm} | {logged[-1]['step'] - offset} | "
                     f"{max(r['lr'] for r in logged):.2e} | "
                     f"{1e3 * max(r.get(key, 0.0) for r in logged):.2f} | {end['moved']:.3f} | "
                     f"{end['strong']['ce']:.4f} | {100 * end['strong']['token_acc']:.2f} | "
                     f"{end['exact_match']:.1f} |")
    lines.append("")
    for arm, (stage_name, offset, joint) in ARMS.items():
        rows = [r for r in results if r["arm"] == arm]
        if not rows:
            continue
        logged = _logged(run_dir / f"seed{seed}" / stage_name)
        key = "strong" if joint else "model"
        lines += [f"## {arm}", "",
                  "| step | lr | train loss | ‖Δθ‖/‖θ‖ ×1e3 | train margin | held-out CE | "
                  "held-out token acc | held-out margin | EM | moved |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            log = logged.get(r["step"], {})
            ratio = log.get(f"update_ratio/{key}")
            margin = _fmt(log.get(f"{key}/margin"), ".2f")
            ce = _fmt(r["strong"]["ce"], ".4f")
            acc = _fmt(100 * r["strong"]["token_acc"], ".2f")
            hmargin = _fmt(r["strong"]["margin"], ".2f")
            if joint and "mixed" in r:
                margin += f" ({_fmt(log.get('mixed/margin'), '.2f')})"
                ce += f" ({r['mixed']['ce']:.4f})"
                acc += f" ({100 * r['mixed']['token_acc']:.2f})"
                hmargin += f" ({r['mixed']['margin']:.2f})"
            lines.append(
                f"| {r['step'] - offset} | {_fmt(log.get('lr'), '.2e')} | "
                f"{_fmt(log.get('loss'), '.4f')} | "
                f"{_fmt(None if ratio is None else 1e3 * ratio, '.2f')} | {margin} | {ce} | "
                f"{acc} | {hmargin} | {r['exact_match']:.1f} | {r['moved']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--run-dir", default="runs/demo/explain")
    args = parser.parse_args(argv)
    begin = time.monotonic()
    run_dir = Path(args.run_dir)
    data = Path("runs/demo/data")
    if not (data / "task.json").is_file() or not Path("runs/demo/base/DONE").is_file():
        raise SystemExit("explain: run `python examples/demo/run_demo.py` (or make demo) first: "
                         "it writes the task and the base model")
    run_pipeline(run_dir, args.seed)
    seed_dir = run_dir / f"seed{args.seed}"
    m1 = checkpoints(seed_dir / "sft", 256)[-1][1]
    jobs = []
    for arm, (stage_name, offset, joint) in ARMS.items():
        found = checkpoints(seed_dir / stage_name, offset)
        if offset == 0:  # the arms that start from M1: their step 0 is M1
            found = [(0, m1)] + found
        for i, (step, path) in enumerate(found):
            jobs.append({"arm": arm, "step": step, "path": str(path), "start": i == 0,
                         "joint": joint and step > 0,
                         "out": str(run_dir / "explain" / f"seed{args.seed}" / arm /
                                    f"step{step}")})
    cache = run_dir / "explain" / f"seed{args.seed}" / "scores.json"
    results = json.loads(cache.read_text()) if cache.is_file() else []
    done = {(r["arm"], r["step"]) for r in results}
    if any((j["arm"], j["step"]) not in done for j in jobs):
        import yaml

        from megatron_wmss.platform.spawn import run_distributed

        config = yaml.safe_load((seed_dir / "joint1" / "config.yaml").read_text())
        solutions = heldout_solutions(data, run_dir / "explain" / "heldout_solutions.jsonl")
        results = run_distributed(
            score_all, world_size=1, tp=1, pp=1, timeout=3 * 3600,
            args=(jobs, str(solutions), str(data / "sp.model"), str(data / "eval"),
                  str(run_dir / "explain" / "cache"), float(config["mix"]["mix_lambda"])))[0]
        cache.write_text(json.dumps(results, indent=1) + "\n")
    text = write_tables(run_dir, args.seed, results)
    out = run_dir / f"explain_seed{args.seed}.md"
    out.write_text(text + "\n")
    print(text)
    _say(f"wrote {out} in {time.monotonic() - begin:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
