"""The WD-DS entropy pass at TP 1/2 and PP 1/2 against a naive full-vocabulary computation.

A tiny untied model (vocabulary 320 from the shipped SentencePiece tokenizer, padded to 384
rows) is saved with its padded output rows set to large values: a pass that let them into
the softmax would be off by nats. The naive reference runs each sample alone (no padding),
takes log_softmax over the 320 real columns in fp64 and averages the entropy over the
positions t whose next token t+1 is a completion token, the shift written out by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_wmss.testing import run_distributed

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data" / "tiny_sft.jsonl"
TOKENIZER = REPO / "examples" / "data" / "tiny_sp.model"
SAMPLES, MAX_LEN = 40, 96
# fp32 entropies of O(5) nats over 320 columns vs an fp64 reference: summation order only.
ENTROPY_ATOL = 1e-5


def _model_config():
    from megatron_wmss.config import ModelConfig

    return ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                       num_query_groups=2, vocab_size=320, max_position_embeddings=MAX_LEN,
                       tie_word_embeddings=False, params_dtype="float32", init_method_std=0.2)


def _data_config(data_path, micro=4):
    from megatron_wmss.data import DataConfig

    return DataConfig(paths=[data_path], max_length=MAX_LEN, micro_batch_size=micro,
                      shuffle=False)


def _make_checkpoint(workdir, data_path):
    """Save the model (padded output rows = large values) and the naive per-sample entropies."""
    from megatron_wmss.config import ParallelConfig
    from megatron_wmss.data import load_tokenizer, tokenize_sft
    from megatron_wmss.interop.metadata import write_model_metadata
    from megatron_wmss.models import build_gpt_model
    from megatron_wmss.platform.files import publishing_directory
    from megatron_wmss.models.checkpoint import write_model_checkpoint
    from megatron_wmss.training.step import causal_attention_mask

    from megatron.core import tensor_parallel

    cfg = _model_config()
    tensor_parallel.model_parallel_cuda_manual_seed(11)
    model = build_gpt_model(cfg, ParallelConfig())
    with torch.no_grad():
        weight = model.output_layer.weight
        weight[cfg.vocab_size:] = 50.0 * torch.rand_like(weight[cfg.vocab_size:]) + 50.0
    with publishing_directory(f"{workdir}/ckpt", collective=True) as tmp:
        write_model_checkpoint(model, tmp)
        write_model_metadata(tmp, cfg)
    tokenizer = load_tokenizer(str(TOKENIZER))
    data = tokenize_sft(_data_config(data_path), tokenizer)
    naive = {}
    model.eval()
    with torch.no_grad():
        for row in range(len(data)):
            sample = data.dataset[row]
            ids = torch.tensor(sample["input_ids"]).unsqueeze(0)
            target = torch.tensor(sample["assistant_mask"], dtype=torch.bool)
            n = ids.shape[1]
            logits = model(ids, torch.arange(n).unsqueeze(0), causal_attention_mask(n, "cpu"))
            logp = torch.log_softmax(logits[0, :, :cfg.vocab_size].double(), dim=-1)
            entropy = -(logp.exp() * logp).sum(-1)  # [n]: position t predicts token t+1
            predicts_completion = target[1:]
            naive[int(sample["idx"])] = (float(entropy[:-1][predicts_completion].mean()),
                                         int(predicts_completion.sum()))
    return naive


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("entropy")
    data_path = root / "data.jsonl"
    data_path.write_text("".join(DATA.read_text().splitlines(keepends=True)[:SAMPLES]))
    (naive,) = run_distributed(_make_checkpoint, world_size=1, args=(str(root), str(data_path)),
                               timeout=300)
    lengths = {v[1] for v in naive.values()}
    assert len(lengths) > 3  # samples of many lengths: micro-batches are really padded
    return root, str(data_path), naive


def _pass(root, data_path, out, shard_size=16, crash_after=None, chunk_tokens=None):
    from megatron_wmss.curriculum import entropy as module
    from megatron_wmss.data import TokenizerConfig

    if chunk_tokens is not None:  # logits of this many tokens at a time (the vocab shard: 192)
        module.CHUNK_ELEMENTS = chunk_tokens * 192
    calls = []
    real = module._run_shard

    def counting(*args, **kwargs):
        if crash_after is not None and len(calls) == crash_after:
            raise KeyboardInterrupt("injected kill between shards")
        calls.append(args[2][0])
        return real(*args, **kwargs)

    module._run_shard = counting
    try:
        job = module.EntropyJob(model=f"{root}/ckpt", data=_data_config(data_path), out=out,
                                tokenizer=TokenizerConfig(path=str(TOKENIZER)),
                                shard_size=shard_size)
        module.compute_entropies(job)
    finally:
        module._run_shard = real
    return calls


def _read(out):
    return [json.loads(line) for line in Path(out).read_text().splitlines()]


@pytest.mark.parametrize("tp,pp,chunk", [(1, 1, None), (2, 1, None), (1, 2, None), (2, 1, 7)],
                         ids=["tp1", "tp2", "pp2", "tp2-chunks-of-7-tokens"])
def test_entropies_match_the_naive_full_vocabulary_computation(case, tp, pp, chunk, tmp_path):
    root, data_path, naive = case
    out = str(tmp_path / "h.jsonl")
    run_distributed(_pass, world_size=tp * pp, tp=tp, pp=pp, args=(root, data_path, out),
                    kwargs={"chunk_tokens": chunk}, timeout=300)
    rows = _read(out)
    assert [r["idx"] for r in rows] == sorted(naive)  # every sample once, in data order
    for r in rows:
        want, count = naive[r["idx"]]
        assert r["num_tokens"] == count
        assert abs(r["entropy"] - want) <= ENTROPY_ATOL, (r, want)
    meta = json.loads((tmp_path / "h.jsonl.meta.json").read_text())
    assert meta["vocab_size"] == 320 and meta["num_samples"] == SAMPLES
    assert not (tmp_path / "h.jsonl.parts").exists()


def test_a_killed_pass_recomputes_only_unfinished_shards_and_gives_the_same_file(case,
                                                                                tmp_path):
    root, data_path, _ = case
    whole, resumed = str(tmp_path / "whole.jsonl"), str(tmp_path / "resumed.jsonl")
    run_distributed(_pass, world_size=2, args=(root, data_path, whole), timeout=300)
    with pytest.raises(Exception, match="injected kill"):
        run_distributed(_pass, world_size=2, args=(root, data_path, resumed),
                        kwargs={"crash_after": 2}, timeout=300)
    parts = sorted(p.name for p in (tmp_path / "resumed.jsonl.parts").glob("shard_*.jsonl"))
    assert parts == ["shard_000000.jsonl", "shard_000001.jsonl"]
    calls = run_distributed(_pass, world_size=2, args=(root, data_path, resumed), timeout=300)
    assert calls[0] == [32]  # 40 samples in shards of 16: only the third shard ran again
    assert Path(resumed).read_bytes() == Path(whole).read_bytes()


def test_a_killed_pass_rerun_with_other_options_starts_again(case, tmp_path):
    # Shards of another pass under the same OUT (here 16 samples each, read back as if they
    # held 8) must not be mixed in: the rerun recomputes every shard.
    root, data_path, naive = case
    out = str(tmp_path / "h.jsonl")
    with pytest.raises(Exception, match="injected kill"):
        run_distributed(_pass, world_size=1, args=(root, data_path, out),
                        kwargs={"crash_after": 1}, timeout=300)
    assert (tmp_path / "h.jsonl.parts" / "shard_000000.jsonl").is_file()
    calls = run_distributed(_pass, world_size=1, args=(root, data_path, out),
                            kwargs={"shard_size": 8}, timeout=300)
    assert calls[0] == [0, 8, 16, 24, 32]  # nothing reused
    rows = _read(out)
    assert [r["idx"] for r in rows] == sorted(naive)
    assert all(abs(r["entropy"] - naive[r["idx"]][0]) <= ENTROPY_ATOL for r in rows)


def test_hf_model_through_the_cli_matches_transformers(tmp_path):
    """`wmss entropy --model HF_DIR` imports on the fly (here at TP=2, padding 320 -> 512
    rows) and must agree with entropies computed from transformers' own logits."""
    import subprocess
    import sys

    from megatron_wmss.data import load_tokenizer, tokenize_sft
    from tests.distributed.test_interop import _hf_model

    hf_dir = tmp_path / "hf"
    import transformers as tf

    model = _hf_model("qwen3", seed=5)

    cfg = model.config.to_dict()
    cfg.update(vocab_size=320, tie_word_embeddings=True)
    torch.manual_seed(5)
    model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**{k: v for k, v in cfg.items()
                                                  if k in tf.Qwen3Config().to_dict()}))
    model = model.float().eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # peaked, varied distributions (HF's init is nearly uniform here)
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.15 * noise)
    model.save_pretrained(hf_dir)
    data_path = tmp_path / "data.jsonl"
    data_path.write_text("".join(DATA.read_text().splitlines(keepends=True)[:12]))
    out = tmp_path / "h.parquet"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_wmss.cli", "entropy", "--model", str(hf_dir),
         "--data", str(data_path), "--out", str(out), "--tokenizer", str(TOKENIZER),
         "--tp", "2", "--nproc-per-node", "2", "--micro-batch-size", "3",
         "--max-length", str(MAX_LEN), "--shard-size", "5"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    import pyarrow.parquet as pq

    rows = pq.read_table(out).to_pylist()
    data = tokenize_sft(_data_config(str(data_path)), load_tokenizer(str(TOKENIZER)))
    assert [r["idx"] for r in rows] == [int(i) for i in data.idx]
    with torch.no_grad():
        for r, row in zip(rows, range(len(data))):
            sample = data.dataset[row]
            ids = torch.tensor(sample["input_ids"]).unsqueeze(0)
            target = torch.tensor(sample["assistant_mask"], dtype=torch.bool)
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            entropy = -(logp.exp() * logp).sum(-1)[:-1][target[1:]]
            # fp32 on both sides, two implementations (fused QKV, TP partial sums): logits
            # agree to ~1e-6 (test_interop), entropies of ~5.7 nats to well under 1e-4.
            assert abs(r["entropy"] - float(entropy.mean())) <= 1e-4, r
            assert r["num_tokens"] == int(target[1:].sum())
    spread = [r["entropy"] for r in rows]
    assert max(spread) - min(spread) > 0.05 and max(spread) < 5.7  # not ~log(320) = 5.77


def _small_vocab_checkpoint(workdir):
    import dataclasses

    from megatron.core import tensor_parallel

    from megatron_wmss.config import ParallelConfig
    from megatron_wmss.interop.metadata import write_model_metadata
    from megatron_wmss.models import build_gpt_model
    from megatron_wmss.platform.files import publishing_directory
    from megatron_wmss.models.checkpoint import write_model_checkpoint

    cfg = dataclasses.replace(_model_config(), vocab_size=256)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model = build_gpt_model(cfg, ParallelConfig())
    with publishing_directory(f"{workdir}/small", collective=True) as tmp:
        write_model_checkpoint(model, tmp)
        write_model_metadata(tmp, cfg)


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(case, tmp_path):
    from megatron_wmss.testing import DistributedRunError

    _, data_path, _ = case
    run_distributed(_small_vocab_checkpoint, world_size=1, args=(str(tmp_path),), timeout=300)
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_pass_model, world_size=1, args=(f"{tmp_path}/small", data_path,
                                                         str(tmp_path / "h.jsonl")), timeout=300)
    assert info.value.exc_message.startswith("the tokenizer has 320 tokens but the model")
    assert "only 256" in info.value.exc_message


def _pass_model(model, data_path, out):
    from megatron_wmss.curriculum.entropy import EntropyJob, compute_entropies
    from megatron_wmss.data import TokenizerConfig

    compute_entropies(EntropyJob(model=model, data=_data_config(data_path), out=out,
                                 tokenizer=TokenizerConfig(path=str(TOKENIZER))))
