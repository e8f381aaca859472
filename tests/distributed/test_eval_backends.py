"""The in-process megatron lm-eval backend against lm-eval's own ``hf`` backend.

One tiny random Qwen3 (tests/eval_fixtures.py) is imported into a megatron checkpoint and
exported back to Hugging Face; lm-eval's ``HFLM`` evaluates the exported directory (fp32,
transformers' ``generate``) and ``MegatronLM`` the checkpoint at TP=1 and TP=2 (gloo ranks).
Both receive the same lm-eval ``Instance`` requests. Greedy generations must be identical
strings; loglikelihoods within 1e-4 (fp32 on both sides; the implementations differ only in
summation order — fused QKV, row-parallel partial sums — measured ~1e-5 on sums of ~-60).
Batched generation (one KV cache, prompts of mixed lengths, stop points of their own) must give
each row the tokens of one-by-one cached decoding, which must equal recomputing the whole
sequence at every step.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from megatron_wmss.testing import run_distributed
from tests.eval_fixtures import make_hf_model, write_benchmark_files

pytest.importorskip("lm_eval")

LL_ATOL = 1e-4
NEW_TOKENS = 24
PROMPTS = ["<|user|>\nQuestion 3: what is 3 + 3?\n<|assistant|>\n", "The answer is",
           "def add(a, b):"]
PAIRS = [("Question 3: what is 3 + 3? Answer:", " 6"), ("The answer is", " \\boxed{42}."),
         ("def", " add(a, b):\n    return a + b"), ("", "Question 7")]
HISTORY = [{"role": "user", "content": "what is 2 + 2?"}]


def _import(hf_dir: str, out: str) -> None:
    from megatron_wmss.interop import import_hf

    import_hf(hf_dir, out)


def _export(ckpt: str, out: str) -> None:
    from megatron_wmss.interop import export_hf

    export_hf(ckpt, out)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_models")
    hf = make_hf_model(root / "hf")
    ckpt, exported = root / "megatron", root / "exported"
    run_distributed(_import, 1, tp=1, args=(str(hf), str(ckpt)))
    run_distributed(_export, 1, tp=1, args=(str(ckpt), str(exported)))
    return ckpt, exported


def _requests(stops: dict[str, list[str]] | None = None):
    from lm_eval.api.instance import Instance

    stops = stops or {}
    gen = [Instance("generate_until", {}, (p, {"until": stops.get(p, []),
                                               "max_gen_toks": NEW_TOKENS, "do_sample": False}),
                    i) for i, p in enumerate(PROMPTS)]
    ll = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    return gen, ll


def _megatron(ckpt: str, stops):
    from megatron_wmss.evaluation.backend import MegatronLM, load_eval_tokenizer
    from megatron_wmss.interop import read_model_metadata
    from megatron_wmss.interop.convert import load_checkpoint_model

    model, cfg = load_checkpoint_model(ckpt)
    tokenizer = load_eval_tokenizer(str(read_model_metadata(ckpt).tokenizer_dir))
    lm = MegatronLM(model, tokenizer, cfg.vocab_size, max_length=cfg.max_position_embeddings,
                    batch_size=3)
    gen, ll = _requests(stops)
    texts = lm.generate_until(gen, disable_tqdm=True)
    lm.generate_batch_size = 2  # a batch of two prompts, then one alone
    batched = lm.generate_until(gen, disable_tqdm=True)
    # Incremental decoding against re-running the whole sequence at every step.
    cached, full = [], []
    for prompt in PROMPTS:
        ids = lm.tok_encode(prompt)
        cached.append(lm.generate_tokens(ids, NEW_TOKENS))
        out: list[int] = []
        while len(out) < NEW_TOKENS:
            token = int(lm._logits(torch.tensor([ids + out]))[0, -1].argmax())
            if token == lm.eot_token_id:
                break
            out.append(token)
        full.append(out)
    # One KV cache for many rows: prompts of 1-29 tokens, stop points of their own.
    gen_ids = torch.Generator().manual_seed(7)
    mixed = [torch.randint(0, 300, (int(n),), generator=gen_ids).tolist()
             for n in torch.randint(1, 30, (8,), generator=gen_ids)]
    one_by_one = [lm.generate_tokens(p, NEW_TOKENS, until=["\n"]) for p in mixed]
    together = lm.generate_batch(mixed, NEW_TOKENS, until=["\n"])
    lm.generator.manual_seed(3)
    sampled = lm.generate_batch(mixed, NEW_TOKENS, do_sample=True, temperature=1.0, top_p=0.9)
    lm.generator.manual_seed(3)
    resampled = lm.generate_batch(mixed, NEW_TOKENS, do_sample=True, temperature=1.0, top_p=0.9)
    return {"texts": texts, "batched": batched,
            "ll": lm.loglikelihood(ll, disable_tqdm=True), "cached": cached,
            "full": full, "chat": lm.apply_chat_template(HISTORY),
            "mixed": (one_by_one, together), "sampled": (sampled, resampled)}


def _hf(exported, stops):
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(exported), device="cpu", dtype="float32", batch_size=1)
    gen, ll = _requests(stops)
    return {"texts": lm.generate_until(gen, disable_tqdm=True),
            "ll": lm.loglikelihood(ll, disable_tqdm=True), "chat": lm.apply_chat_template(HISTORY)}


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_backend_matches_the_hf_backend(models, tp):
    ckpt, exported = models
    reference = _hf(exported, None)
    # Stop strings taken from the middle of each greedy text: both must cut there.
    stops = {p: [t[len(t) // 2: len(t) // 2 + 2]] for p, t in zip(PROMPTS, reference["texts"])
             if len(t) >= 4}
    assert len(stops) >= 2, f"the random model's texts are too short: {reference['texts']}"
    stopped = _hf(exported, stops)
    ranks = run_distributed(_megatron, tp, tp=tp, args=(str(ckpt), None))
    ranks_stopped = run_distributed(_megatron, tp, tp=tp, args=(str(ckpt), stops))
    for run in (ranks, ranks_stopped):  # every TP rank returns the same answers
        assert all(rank["texts"] == run[0]["texts"] and rank["ll"] == run[0]["ll"]
                   for rank in run)
    mine = ranks[0]
    assert mine["cached"] == mine["full"]
    one_by_one, together = mine["mixed"]
    assert together == one_by_one and len({len(t) for t in together}) > 1  # stops differ
    sampled, resampled = mine["sampled"]
    assert sampled == resampled and sampled != together  # seeded draws, not the greedy path
    assert all(len(ids) > 0 for ids in mine["cached"])
    assert mine["texts"] == reference["texts"]
    assert mine["batched"] == reference["texts"]
    assert ranks_stopped[0]["texts"] == stopped["texts"]
    assert ranks_stopped[0]["batched"] == stopped["texts"]
    for p, text in zip(PROMPTS, stopped["texts"]):
        if p in stops:
            full = reference["texts"][PROMPTS.index(p)]
            assert text == full.split(stops[p][0])[0] and len(text) < len(full)
    for (lp, greedy), (ref_lp, ref_greedy) in zip(mine["ll"], reference["ll"]):
        assert abs(lp - ref_lp) <= LL_ATOL, (lp, ref_lp)
        assert greedy == ref_greedy
    assert mine["chat"] == reference["chat"]


def _first_argmax_of_shards():
    import torch.distributed as dist

    from megatron_wmss.evaluation.backend import _first_argmax

    vocab, padded = 250, 256  # two shards of 128 columns; 6 padded columns on the second
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, padded, generator=gen)
    logits[0, 5] = logits[0, 200] = 9.0      # a tie across shards: the first index wins
    logits[1, 140] = logits[1, 170] = 9.0    # a tie inside the second shard
    logits[2, 252] = 99.0                    # a padded column is not a token
    logits[3, 127] = 9.0                     # the last column of the first shard
    logits[4, 128] = 9.0                     # the first of the second
    logits[5, :] = 1.0                       # every column tied: index 0
    rank, size = dist.get_rank(), dist.get_world_size()
    local = padded // size
    from megatron_wmss.platform import default_device

    mine = logits[:, rank * local:(rank + 1) * local].to(torch.bfloat16).float()
    mine = mine.to(default_device())  # NCCL reduces device tensors
    return _first_argmax(mine, None if size == 1 else dist.group.WORLD, vocab).cpu().tolist(), \
        torch.argmax(logits.to(torch.bfloat16).float()[:, :vocab], dim=-1).tolist()


@pytest.mark.parametrize("tp", [1, 2])
def test_the_greedy_check_is_the_first_argmax_of_the_gathered_logits(tp):
    # Loglikelihood requests never gather the logits: each rank's shard gives its first
    # maximum, and the ranks agree on the global first one, as argmax of the whole row does.
    for got, want in run_distributed(_first_argmax_of_shards, tp, tp=tp):
        assert got == want == [5, 140, want[2], 127, 128, 0]
        assert want[2] < 250


def _wmss(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_wmss.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_wmss_eval_runs_a_math_and_a_code_task_with_both_backends(models, tmp_path):
    ckpt, exported = models
    data = write_benchmark_files(tmp_path / "data")
    common = ["--tasks", "gsm8k,mbpp", "--data-dir", data, "--limit", 2, "--max-new-tokens",
              12, "--allow-code-execution"]
    runs = {"hf": ("--model", exported, "--backend", "hf"),
            "megatron": ("--model", ckpt, "--backend", "megatron", "--tp", 2)}
    predictions = {}
    for name, args in runs.items():
        out = tmp_path / name
        done = _wmss("eval", *args, *common, "--label", name, "--out", out)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"wrote {out}" in done.stdout
        summary = json.loads((out / "summary.json").read_text())
        assert summary["backend"] == name
        assert {t: (v["metric"], v["n"]) for t, v in summary["tasks"].items()} == {
            "gsm8k": ("exact_match", 2), "mbpp": ("pass@1", 2)}
        results = json.loads((out / "results.json").read_text())
        assert {"gsm8k", "mbpp"} <= set(results["results"])
        for task in ("gsm8k", "mbpp"):
            rows = [json.loads(line) for line in
                    (out / "predictions" / f"{task}.jsonl").read_text().splitlines()]
            assert [r["doc_id"] for r in rows] == [0, 1]
            assert all(set(r) >= {"doc_id", "prediction", "extracted", "correct"} for r in rows)
            assert (out / "samples" / f"{task}.jsonl").is_file()
            predictions[name, task] = [r["prediction"] for r in rows]
        assert (out / "summary.md").read_text().startswith("# Evaluation of")
    # The same model, prompts and greedy decoding through either backend: the same text.
    for task in ("gsm8k", "mbpp"):
        assert predictions["hf", task] == predictions["megatron", task]
        assert any(predictions["hf", task])
    done = _wmss("eval", "report", tmp_path / "hf", tmp_path / "megatron", "--out",
                 tmp_path / "report")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    for task in ("gsm8k", "mbpp"):  # each run's own score, side by side
        by_run = report["scores"][task]
        assert by_run["hf"] == json.loads((tmp_path / "hf" / "summary.json").read_text()
                                          )["tasks"][task]
        assert by_run["megatron"]["score"] == by_run["hf"]["score"]
    assert (tmp_path / "report" / "report.png").read_bytes()[:4] == b"\x89PNG"
