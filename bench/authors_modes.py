"""What each of the authors' choices changes, measured through this project's commands.

    python bench/authors_modes.py [--workdir DIR] [--steps 8] [--json]

On the shipped tiny data (examples/data/tiny_sft.jsonl, 256 prompt/completion rows) with a
tiny random Qwen3 (2 layers, width 64) and a byte-level BPE built like Qwen's
(tests/bpe_fixture.py, EOS <|endoftext|> as Qwen3-*-Base sets it), on CPU, one process:
1. loss span: `wmss sft` from the same M0 on the same first batch, data.loss_on = completion
   (the paper) vs all (the authors' code): first-step loss and gradient norm;
2. schedule: optim.lr_schedule cosine + 10% warm-up vs linear without warm-up over the run:
   the learning rates and the loss after --steps steps (loss_on as in 1, each arm its own);
3. entropy positions: `wmss entropy` of M0 and of the paper arm's M1, --positions next-token
   vs authors: relative difference per sample;
4. selection: `wmss select` on the M0/M1 entropies, the paper's defaults (formula paper,
   0.1/0.8/0.1, de-duplicated) vs the authors' script (formula reference 0.1/0.8/0.1, seed 42,
   duplicates kept, their positions): active-set size, unique samples, overlap.
Every number comes from files the commands wrote; rerun it to check them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _wmss(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "megatron_wmss.cli", *args], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"wmss {args[0]} failed:\n{proc.stderr[-3000:]}")


def _base_model(directory: Path) -> None:
    import torch
    import transformers as tf

    from tests.bpe_fixture import build_tokenizer

    build_tokenizer(directory, eos="<|endoftext|>")
    vocab = len(tf.AutoTokenizer.from_pretrained(directory))
    config = tf.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            vocab_size=vocab, max_position_embeddings=256,
                            rope_theta=1000000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = tf.Qwen3ForCausalLM(config).float()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen) if "norm" in name
                    else 0.1 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(directory)


def _sft(work: Path, name: str, base: Path, steps: int, **sections) -> list[dict]:
    data = {"paths": [str(REPO / "examples/data/tiny_sft.jsonl")], "max_length": 256,
            "micro_batch_size": 8, "cache_dir": str(work / "cache"), **sections["data"]}
    recipe = {"run_dir": str(work / name), "data": data, "tokenizer": {"path": str(base)},
              "optim": {"lr": 3e-3, "weight_decay": 0.0, **sections["optim"]},
              "trainer": {"train_steps": steps, "global_batch_size": 32,
                          "save_interval": steps, "keep_last": 1, "log_interval": 1,
                          "tensorboard": False},
              "init": {"model": str(base)}}
    config = work / f"{name}.yaml"
    config.write_text(json.dumps(recipe))
    _wmss("sft", "--config", str(config))
    lines = (work / name / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r and "lr" in r]


def _entropies(work: Path, model: Path, tokenizer: Path, positions: str, name: str) -> dict:
    out = work / f"h_{name}_{positions}.jsonl"
    _wmss("entropy", "--model", str(model), "--data", str(REPO / "examples/data/tiny_sft.jsonl"),
          "--out", str(out), "--tokenizer", str(tokenizer), "--positions", positions,
          "--max-length", "256", "--micro-batch-size", "16")
    return {r["idx"]: r["entropy"] for r in map(json.loads, out.read_text().splitlines())}


def _select(work: Path, weak: str, strong: str, name: str, *options: str) -> dict:
    out = work / f"select_{name}"
    _wmss("select", "--weak-entropy", weak, "--strong-entropy", strong, "--out", str(out),
          "--overwrite", *options)
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "active_set.jsonl").read_text().splitlines()]
    return {"size": sum(r["multiplicity"] for r in rows), "unique": summary["unique_kept"],
            "idx": {r["idx"] for r in rows}}


def _relative(a: dict, b: dict) -> tuple[float, float]:
    diffs = [abs(b[k] - a[k]) / abs(a[k]) for k in a]
    return sum(diffs) / len(diffs), max(diffs)


def measure(work: Path, steps: int) -> dict:
    base = work / "m0"
    _base_model(base)
    paper_span = {"data": {"loss_on": "completion"},
                  "optim": {"lr_schedule": "cosine", "warmup_fraction": 0.1}}
    authors_span = {"data": {"loss_on": "all"},
                    "optim": {"lr_schedule": "linear", "warmup_fraction": 0.0}}
    paper = _sft(work, "sft_paper", base, steps, **paper_span)
    authors = _sft(work, "sft_authors", base, steps, **authors_span)
    # The span alone: the same schedule, first step (same weights, same batch).
    span_only = _sft(work, "sft_all_cosine", base, 1, data={"loss_on": "all"},
                     optim=paper_span["optim"])
    checkpoints = work / "sft_paper" / "checkpoints"
    m1 = checkpoints / json.loads((checkpoints / "latest").read_text())["checkpoint"]
    result = {
        "loss_span": {"completion_loss": paper[0]["loss"], "all_loss": span_only[0]["loss"],
                      "completion_grad_norm": paper[0]["grad_norm"],
                      "all_grad_norm": span_only[0]["grad_norm"],
                      "completion_tokens": paper[0]["supervised_tokens"],
                      "all_tokens": span_only[0]["supervised_tokens"]},
        "schedule": {"paper_lr": [r["lr"] for r in paper], "authors_lr": [r["lr"] for r in authors],
                     "paper_final_loss": paper[-1]["loss"],
                     "authors_final_loss": authors[-1]["loss"]},
    }
    h = {(m, p): _entropies(work, path, base, p, m) for m, path in (("m0", base), ("m1", m1))
         for p in ("next-token", "authors")}
    result["entropy"] = {m: dict(zip(("mean_rel_diff", "max_rel_diff"),
                                     _relative(h[(m, "next-token")], h[(m, "authors")])))
                         for m in ("m0", "m1")}
    coefficients = ["--alpha", "0.1", "--beta", "0.8", "--gamma", "0.1"]
    ours = _select(work, str(work / "h_m0_next-token.jsonl"), str(work / "h_m1_next-token.jsonl"),
                   "paper", "--formula", "paper", *coefficients, "--seed", "42")
    theirs = _select(work, str(work / "h_m0_authors.jsonl"), str(work / "h_m1_authors.jsonl"),
                     "authors", "--formula", "reference", *coefficients, "--seed", "42",
                     "--no-dedupe")
    result["selection"] = {"paper": {k: ours[k] for k in ("size", "unique")},
                           "authors": {k: theirs[k] for k in ("size", "unique")},
                           "overlap_of_unique": len(ours["idx"] & theirs["idx"])}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(Path(args.workdir or tmp), args.steps)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    span, sched, sel = result["loss_span"], result["schedule"], result["selection"]
    print(f"loss span: first-step loss {span['completion_loss']:.4f} (completion, "
          f"{span['completion_tokens']} tokens) vs {span['all_loss']:.4f} (all, "
          f"{span['all_tokens']} tokens), {span['all_loss'] / span['completion_loss'] - 1:+.1%}; "
          f"grad norm {span['completion_grad_norm']:.4f} vs {span['all_grad_norm']:.4f}, "
          f"{span['all_grad_norm'] / span['completion_grad_norm'] - 1:+.1%}")
    print(f"schedule: lr {['%.2e' % x for x in sched['paper_lr']]} (cosine, 10% warm-up) vs "
          f"{['%.2e' % x for x in sched['authors_lr']]} (linear); loss after "
          f"{len(sched['paper_lr'])} steps {sched['paper_final_loss']:.4f} vs "
          f"{sched['authors_final_loss']:.4f} (each arm with its own span)")
    for m, e in result["entropy"].items():
        print(f"entropy {m}: authors' positions vs next-token: mean {e['mean_rel_diff']:.2%}, "
              f"max {e['max_rel_diff']:.2%} relative")
    print(f"selection: paper {sel['paper']['size']} draws, {sel['paper']['unique']} unique; "
          f"authors {sel['authors']['size']} draws, {sel['authors']['unique']} unique; "
          f"{sel['overlap_of_unique']} samples in both")


if __name__ == "__main__":
    main()
