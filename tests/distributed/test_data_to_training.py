"""The data pipeline feeds the joint train step: tokenizer -> tokenization -> DP loader -> step.

Two data-parallel ranks each read their shard of a tiny prompt/completion file through the real
SentencePiece tokenizer and loader; the token count the step reports for the global batch must
be the sum of the supervised tokens both ranks actually fed, and the loss must go down when the
same batch is seen again.
"""

from __future__ import annotations

import json

import pytest

from megatron_wmss.testing import run_distributed

MAX_LEN, MICRO, N_MICRO = 48, 2, 2


def _train_on_files(data_path, tokenizer_path, cache_dir):
    from megatron.core import parallel_state as ps

    from megatron_wmss.config import MixConfig, ModelConfig, OptimConfig, ParallelConfig
    from megatron_wmss.data import DataConfig, build_sft_loader, load_tokenizer, tokenize_sft
    from megatron_wmss.training import setup_training, train_step

    tok = load_tokenizer(tokenizer_path)
    data_cfg = DataConfig(paths=[data_path], max_length=MAX_LEN, micro_batch_size=MICRO,
                          pad_to_max_length=True, cache_dir=cache_dir, shuffle=False)
    data = tokenize_sft(data_cfg, tok)
    loader = build_sft_loader(data, data_cfg, pad_id=tok.pad_id,
                              dp_rank=ps.get_data_parallel_rank(),
                              dp_size=ps.get_data_parallel_world_size())
    batches = list(loader)[:N_MICRO]
    model_cfg = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64,
                            num_attention_heads=4, vocab_size=tok.vocab_size,
                            max_position_embeddings=MAX_LEN, params_dtype="float32")
    setup = setup_training(model_cfg, ParallelConfig(), OptimConfig(lr=3e-3, warmup_fraction=0),
                           total_steps=3, mix=MixConfig())
    losses, counts = [], []
    for _ in range(3):  # the same global batch three times: the loss must fall
        metrics = train_step(setup, iter(batches), num_microbatches=N_MICRO,
                             micro_batch_size=MICRO, seq_length=data_cfg.padded_length)
        losses.append(metrics.loss)
        counts.append(metrics.num_tokens)
    fed = int(sum((b["labels"] != -100).sum() for b in batches))
    return dict(losses=losses, counts=counts, fed=fed, kept=data.summary.kept,
                idx=[int(i) for b in batches for i in b["idx"]])


@pytest.fixture(scope="module")
def sft_files(tmp_path_factory):
    from megatron_wmss.data.train_tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("sft")
    rows = [{"prompt": f"What is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."}
            for a in range(4) for b in range(3)]
    data = root / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(f"{r['prompt']} {r['completion']}" for r in rows * 5))
    model = train_sentencepiece([str(corpus)], str(root / "sp"), vocab_size=300)
    return str(data), model, str(root / "cache"), len(rows)


def test_loader_batches_train_the_joint_model_with_global_token_counts(sft_files):
    data, model, cache, n_rows = sft_files
    per_rank = run_distributed(_train_on_files, world_size=2, args=(data, model, cache),
                               timeout=180)
    assert all(r["kept"] == n_rows for r in per_rank)
    # Disjoint DP shards, and the reported count is the global (both ranks') one.
    assert not set(per_rank[0]["idx"]) & set(per_rank[1]["idx"])
    fed = sum(r["fed"] for r in per_rank)
    for r in per_rank:
        assert r["counts"] == [fed] * 3
        assert r["losses"][0] > r["losses"][1] > r["losses"][2]
