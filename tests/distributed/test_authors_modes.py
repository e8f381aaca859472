"""The authors' pipeline, option by option, against plain transformers (issue [P]).

A tiny random Qwen3 with a byte-level BPE built like Qwen's (tests/bpe_fixture.py) and ChatML:
- ``data.loss_on = all`` + ``optim.lr_schedule = linear`` (no warm-up), through ``wmss sft``:
  the first step's loss is ``F.cross_entropy`` over every shifted position of the rendered
  conversations (token mean over the global batch), and every step's learning rate is
  transformers' ``get_linear_schedule_with_warmup``;
- ``wmss entropy --positions authors``: the mean entropy of the logits *at* the tokens from the
  user turn's end (the assistant header included) to the end of the row, the prompt length
  measured as the authors' utils/compute_entropy.py measures it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.bpe_fixture import TRICKY, build_tokenizer, write_chat_jsonl

REPO = Path(__file__).resolve().parents[2]
PAIRS = [(u, a) for u, a in TRICKY if a.strip()][:6]
STEPS = 5
# fp32 on both sides, two implementations (fused QKV, summation order): logits agree to ~1e-6
# (test_interop), so a mean CE or entropy of a few nats to well under 1e-4.
TOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """HF directory: the tokenizer and a tiny Qwen3 with peaked, varied distributions."""
    import transformers as tf

    root = tmp_path_factory.mktemp("authors")
    directory = build_tokenizer(root / "hf", eos="<|endoftext|>")  # as Qwen3-*-Base sets it
    tokenizer = tf.AutoTokenizer.from_pretrained(directory)
    config = tf.Qwen3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            vocab_size=len(tokenizer), max_position_embeddings=128,
                            rope_theta=1000000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = tf.Qwen3ForCausalLM(config).float().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # HF's init is nearly uniform here: every entropy would be ~log V
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.15 * noise)
    model.save_pretrained(directory)
    data = write_chat_jsonl(root / "chat.jsonl", PAIRS)
    return directory, data, model, tokenizer


def _messages(user, reply):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def _ids(tokenizer, messages, **kw):
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _wmss(*args, cwd=REPO):
    proc = subprocess.run([sys.executable, "-m", "megatron_wmss.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_every_token_loss_and_linear_schedule_match_transformers(model_dir, tmp_path):
    from transformers import get_linear_schedule_with_warmup

    directory, data, model, tokenizer = model_dir
    recipe = {
        "run_dir": str(tmp_path / "run"),
        "data": {"paths": [str(data)], "max_length": 128, "micro_batch_size": 2,
                 "loss_on": "all", "shuffle": False, "cache_dir": str(tmp_path / "cache")},
        "tokenizer": {"path": str(directory)},
        "optim": {"lr": 1e-3, "lr_schedule": "linear", "warmup_fraction": 0.0,
                  "weight_decay": 0.0},
        "trainer": {"epochs": STEPS, "global_batch_size": len(PAIRS), "save_interval": 100,
                    "log_interval": 1, "tensorboard": False},
        "init": {"model": str(directory)},
    }
    config = tmp_path / "recipe.yaml"
    config.write_text(json.dumps(recipe))  # JSON is YAML
    _wmss("sft", "--config", str(config))
    records = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "lr" in r]
    assert len(steps) == STEPS

    # Every shifted position of each rendered conversation, one token mean over the batch.
    total, count = 0.0, 0
    with torch.no_grad():
        for user, reply in PAIRS:
            ids = torch.tensor(_ids(tokenizer, _messages(user, reply)))[None]
            logits = model(ids).logits[0].float()
            total += float(F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    assert steps[0]["loss"] == pytest.approx(total / count, abs=TOL)
    assert steps[0]["supervised_tokens"] == count

    reference = get_linear_schedule_with_warmup(
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3), 0, STEPS)
    for step in steps:
        assert step["lr"] == pytest.approx(reference.get_last_lr()[0], rel=1e-9, abs=1e-15)
        reference.optimizer.step()
        reference.step()


def test_authors_entropy_positions_match_transformers_at_the_answer_tokens(model_dir, tmp_path):
    directory, data, model, tokenizer = model_dir
    out = tmp_path / "h.jsonl"
    _wmss("entropy", "--model", str(directory), "--data", str(data), "--out", str(out),
          "--tokenizer", str(directory), "--positions", "authors", "--max-length", "128",
          "--micro-batch-size", "4")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["idx"] for r in rows] == list(range(len(PAIRS)))
    assert json.loads(Path(f"{out}.meta.json").read_text())["positions"] == "authors"
    with torch.no_grad():
        for row, (user, reply) in zip(rows, PAIRS):
            messages = _messages(user, reply)
            ids = torch.tensor(_ids(tokenizer, messages))[None]
            # The authors' prompt: the user turn alone, no generation prompt.
            start = len(_ids(tokenizer, messages[:1], add_generation_prompt=False))
            logp = torch.log_softmax(model(ids).logits[0, start:].double(), dim=-1)
            entropy = -(logp.exp() * logp).sum(-1)
            assert row["num_tokens"] == ids.shape[1] - start
            assert row["entropy"] == pytest.approx(float(entropy.mean()), abs=TOL)
