"""The entropy pass of WD-DS: each sample's mean predictive entropy over its supervised tokens.

    H(M; x_i) = −(1/|T_i|) Σ_{t∈T_i} Σ_v P_M(v | x_≤t) log P_M(v | x_≤t)

where T_i are the positions whose logits predict completion tokens (exactly the positions that
carry the SFT loss: ``labels[t] = tokens[t+1]``), and v runs over the real vocabulary only.
``positions = "authors"`` reproduces the authors' code instead (utils/compute_entropy.py): the
logits *at* every token from the start of the first reply's header (``<|im_start|>assistant``)
to the end of the rendered conversation (nothing appended), i.e. T_i = [answer_start, L) of
the row tokenized with ``loss_on = all``.
Teacher-forced, forward-only through megatron's pipeline schedule (any TP/PP), data sharded
over data-parallel ranks, logits never gathered nor held whole: the supervised positions'
hidden states make them a chunk of tokens at a time (vocab-parallel entropy, fp32).

Resumable: the data is cut into shards of ``shard_size`` samples; rank 0 writes each finished
shard to ``OUT.parts/shard_NNNNNN.jsonl`` atomically, and a rerun skips the shards already
there. When all are done, ``OUT`` (JSONL, or Parquet for ``.parquet``) holds one row per sample
(``idx``, ``entropy``, ``num_tokens``) in data order, and ``OUT.meta.json`` names the model, the
vocabulary and a fingerprint of the tokenized data (``wmss select`` refuses to pair entropies of
different data).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_wmss.data.config import DataConfig, TokenizerConfig
from megatron_wmss.platform.files import write_file_atomic
from megatron_wmss.platform.ranks import on_rank_zero, rank_zero_first

__all__ = ["ENTROPY_POSITIONS", "EntropyJob", "META_SUFFIX", "compute_entropies",
           "data_fingerprint"]

META_SUFFIX = ".meta.json"
_FORMAT = "wmss-entropy-1"
#: next-token: the positions predicting supervised tokens (the paper's definition, default);
#: authors: the logits at the answer tokens, header included (a reproduction mode).
ENTROPY_POSITIONS = ("next-token", "authors")


@dataclass
class EntropyJob:
    """One entropy pass: which model, which data, where to write."""

    model: str
    """Megatron checkpoint (single-model or joint) or Hugging Face directory."""
    data: DataConfig
    """The SFT data (shuffle is ignored: samples are visited in file order)."""
    out: str
    """Output file: .jsonl, or .parquet."""
    tokenizer: Optional[TokenizerConfig] = None
    """Default: the tokenizer stored with the checkpoint."""
    which: Optional[str] = None
    """strong | weak for a joint checkpoint (default strong)."""
    shard_size: int = 1024
    """Samples per resumable shard."""
    positions: str = "next-token"
    """Which logits are averaged: next-token (the paper's) or authors (see the module doc)."""

    def __post_init__(self) -> None:
        if self.positions not in ENTROPY_POSITIONS:
            raise ValueError(f"entropy positions must be one of {list(ENTROPY_POSITIONS)}, got "
                             f"{self.positions!r}")
        if isinstance(self.shard_size, bool) or not isinstance(self.shard_size, int) \
                or self.shard_size < 1:
            raise ValueError(f"shard_size must be an int >= 1, got {self.shard_size!r}")
        if not str(self.out).endswith((".jsonl", ".parquet")):
            raise ValueError(f"--out {self.out} must end in .jsonl or .parquet")


def _rank0() -> bool:
    return dist.get_rank() == 0


def _prepare_checkpoint(job: EntropyJob, parts: Path) -> str:
    """A megatron checkpoint for ``job.model``: itself, or its HF import under OUT.parts/."""
    from megatron_wmss.interop import import_hf

    path = Path(job.model)
    if (path / "config.json").is_file() and not (path / "metadata.json").is_file():
        target = parts / "model"
        if not (target / "metadata.json").is_file():
            import_hf(path, target, overwrite=True)
        return str(target)
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"--model {path} is neither a megatron checkpoint (metadata.json)"
                                " nor a Hugging Face model directory (config.json)")
    return str(path)


def _tokenizer(job: EntropyJob, ckpt: str):
    from megatron_wmss.data import load_tokenizer
    from megatron_wmss.interop import read_model_metadata

    config = job.tokenizer
    if config is None:
        stored = read_model_metadata(ckpt).tokenizer_dir
        if stored is None:
            raise ValueError(f"--model {job.model} carries no tokenizer; pass --tokenizer")
        config = TokenizerConfig(path=str(stored))
    return load_tokenizer(config)


def _model(ckpt: str, which: Optional[str]):
    from megatron_wmss.interop.convert import load_checkpoint_model

    return load_checkpoint_model(ckpt, which)


def _forward_step(data_iterator, model, *, vocab_size: int):
    from megatron_wmss.platform import default_device
    from megatron_wmss.training.step import batch_to_device, causal_attention_mask

    batch = batch_to_device(next(data_iterator), default_device())
    tokens = batch["tokens"]
    length = tokens.shape[1]
    positions = torch.arange(length, device=tokens.device).expand_as(tokens)
    # The stage's output without the output layer: the last stage's final hidden states,
    # turned into logits a chunk of supervised tokens at a time (_entropy_sums).
    output = model.final_hidden_states(tokens, positions, causal_attention_mask(length,
                                                                                tokens.device))
    mask = batch["span"] if "span" in batch else batch["labels"] != -100
    return output, partial(_entropy_sums, mask, batch["row"], vocab_size, model)


#: Logit elements of one chunk of the entropy pass (dtype of the model): 2^24, 32 MiB in bf16.
CHUNK_ELEMENTS = 1 << 24


def chunk_tokens(local_vocab: int) -> int:
    """Tokens whose logits the entropy pass makes at once from a ``local_vocab`` shard."""
    return max(1, CHUNK_ELEMENTS // max(local_vocab, 1))


def _entropy_sums(mask, rows, vocab_size, model, hidden_sbh):
    """Per sample of the micro-batch: (row, Σ entropy over the positions of ``mask``, count).

    Only the supervised positions' hidden states are multiplied by the output weight, a chunk
    of :func:`chunk_tokens` at a time: no ``[b, s, V/t]`` logits tensor exists (at 8B, TP 2,
    8 x 4,096 tokens it would be 4.6 GiB in bf16, twice over with megatron's transposed
    copy)."""
    from megatron.core import parallel_state as ps

    from megatron_wmss.loss import token_entropy

    weight_vh = model.output_weight()
    selected_nh = hidden_sbh.transpose(0, 1)[mask]  # mask is the same on every TP rank
    step = chunk_tokens(weight_vh.shape[0])
    tp_group = ps.get_tensor_model_parallel_group()
    entropy_n = torch.cat([token_entropy(selected_nh[start:start + step] @ weight_vh.t(),
                                         tp_group, vocab_size)
                           for start in range(0, selected_nh.shape[0], step)]
                          or [hidden_sbh.new_zeros(0, dtype=torch.float32)])
    entropy_bs = torch.zeros(mask.shape, dtype=torch.float32, device=hidden_sbh.device)
    entropy_bs[mask] = entropy_n
    sums = entropy_bs.sum(dim=1, dtype=torch.float64)
    report = torch.stack([rows.to(torch.float64), sums, mask.sum(dim=1).to(torch.float64)], 1)
    zero = hidden_sbh.new_zeros((), dtype=torch.float32)
    return zero, mask.sum().to(torch.int), {"entropy": report}


def _micro_batches(data, rows: list[int], micro: int, pad_id: int, pad_to: Optional[int],
                   multiple: int, positions: str = "next-token") -> list[dict]:
    """Collated micro-batches of ``rows``; the last is filled with empty rows (row −1, no
    labels) so that every micro-batch has ``micro`` rows, as pipeline stages need. With the
    authors' positions each carries ``span`` [b, s] bool: t in [answer_start, length)."""
    from megatron_wmss.data.collate import SFTDataset, collate_sft

    dataset = SFTDataset(data)
    starts = data.dataset.data.column("answer_start").to_numpy() if positions == "authors" \
        else None
    out = []
    for start in range(0, len(rows), micro):
        chunk = rows[start:start + micro]
        samples = [dataset[r] for r in chunk]
        fill = micro - len(samples)
        samples += [{"input_ids": [pad_id, pad_id], "assistant_mask": [False, False], "idx": -1}
                    ] * fill
        batch = collate_sft(samples, pad_id=pad_id, pad_to_multiple_of=multiple,
                            pad_to_length=pad_to)
        batch["row"] = torch.tensor(chunk + [-1] * fill, dtype=torch.int64)
        if positions == "authors":
            at = torch.arange(batch["tokens"].shape[1])
            start = torch.tensor([starts[r] for r in chunk] + [0] * fill)[:, None]
            length = torch.tensor([len(s["input_ids"]) for s in samples])[:, None]
            batch["span"] = (at >= start) & (at < length)
            batch["span"][len(chunk):] = False
        out.append(batch)
    return out


def _model_key(job: EntropyJob) -> dict:
    """What makes OUT.parts/'s imported model and shards this job's: the model (path, which
    half, and when it was written) and the tokenizer."""
    path = Path(job.model).resolve()
    stamp = next((f for f in (path / "metadata.json", path / "config.json") if f.is_file()), None)
    return {"model": str(path), "which": job.which,
            "written": stamp.stat().st_mtime_ns if stamp else None,
            "tokenizer": job.tokenizer.path if job.tokenizer else None}


def _claim_parts(parts: Path, level: str, key: dict) -> None:
    """Keep what OUT.parts/ holds only when an earlier pass of the same ``key`` left it
    (``level`` model: the imported model and every shard; pass: the shards, which also depend
    on the positions, the shard size and the tokenized data). A pass killed and rerun with
    another model or options under the same OUT starts again instead of mixing results."""
    parts.mkdir(parents=True, exist_ok=True)
    record = parts / f"{level}.json"
    text = json.dumps(key, sort_keys=True)
    if record.is_file() and record.read_text(encoding="utf-8") == text:
        return
    stale = [p for p in parts.iterdir() if p.name.startswith("shard_")]
    if level == "model":
        stale += [p for p in parts.iterdir() if p.name in ("model", "pass.json", "data-cache")]
    if record.is_file() and stale:
        print(f"entropy: {parts} held a pass of another {level} ({len(stale)} entries); "
              "starting again", file=sys.stderr, flush=True)
    for item in stale:
        shutil.rmtree(item) if item.is_dir() else item.unlink()
    write_file_atomic(record, text)


def _shard_path(parts: Path, shard: int) -> Path:
    return parts / f"shard_{shard:06d}.jsonl"


def _run_shard(model, data, rows: list[int], micro: int, pad_id: int, pad_to, multiple,
               vocab_size: int, seq_length: int, positions: str) -> list[list[float]]:
    """This rank's (row, sum, count) reports for its share of one shard."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = rows[dp_rank::dp]
    if not mine:
        return []
    batches = _micro_batches(data, mine, micro, pad_id, pad_to, multiple, positions)
    with torch.no_grad():
        reports = get_forward_backward_func()(
            forward_step_func=partial(_forward_step, vocab_size=vocab_size),
            data_iterator=iter(batches), model=[model], num_microbatches=len(batches),
            seq_length=seq_length, micro_batch_size=micro, forward_only=True)
    last_stage = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    if not last_stage:
        return []
    return [row for report in reports for row in report["entropy"].tolist() if row[0] >= 0]


def compute_entropies(job: EntropyJob) -> Path:
    """Collectively run the entropy pass of ``job`` (megatron's parallel state set up)."""
    from megatron.core import parallel_state as ps

    from megatron_wmss.data import tokenize_sft

    out = Path(job.out)
    parts = out.with_name(out.name + ".parts")
    on_rank_zero(lambda: _claim_parts(parts, "model", _model_key(job)), "entropy: parts directory",
                 share=False)
    ckpt = _prepare_checkpoint(job, parts)
    tokenizer = _tokenizer(job, ckpt)
    model, cfg = _model(ckpt, job.which)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model "
                         f"{job.model} only {cfg.vocab_size}: they do not belong together")
    # The authors' rows are the rendered conversations as they are (nothing appended).
    data_cfg = dataclasses.replace(
        job.data, shuffle=False, cache_dir=job.data.cache_dir or str(parts / "data-cache"),
        loss_on="all" if job.positions == "authors" else job.data.loss_on)
    # Rank 0 fills the cache, the others read it.
    data = rank_zero_first(lambda: tokenize_sft(data_cfg, tokenizer), "entropy: tokenization")

    n = len(data)
    shards = -(-n // job.shard_size)
    on_rank_zero(lambda: _claim_parts(parts, "pass", {
        "positions": job.positions, "shard_size": job.shard_size,
        "data": data_fingerprint(data, tokenizer)}), "entropy: parts key", share=False)
    done = on_rank_zero(lambda: sorted(s for s in range(shards)
                                       if _shard_path(parts, s).is_file()),
                        "entropy: finished shards")
    pp = ps.get_pipeline_model_parallel_world_size()
    pad_to = data_cfg.padded_length if data_cfg.padded_length else (
        -(-data_cfg.max_length // data_cfg.pad_to_multiple_of) * data_cfg.pad_to_multiple_of
        if pp > 1 else None)
    bar = None
    if _rank0():
        from tqdm import tqdm

        bar = tqdm(total=n, initial=min(len(done) * job.shard_size, n), unit="sample",
                   desc=f"entropy {Path(job.model).name}")
    for shard in range(shards):
        if shard in done:
            continue
        rows = list(range(shard * job.shard_size, min(n, (shard + 1) * job.shard_size)))
        mine = _run_shard(model, data, rows, data_cfg.micro_batch_size, tokenizer.pad_id,
                          pad_to, data_cfg.pad_to_multiple_of, cfg.vocab_size, pad_to or 0,
                          job.positions)
        gathered = [None] * dist.get_world_size() if _rank0() else None
        dist.gather_object(mine, gathered, dst=0)

        def write_shard(shard=shard, rows=rows, gathered=gathered) -> None:
            by_row = {int(r): (s, c) for part in gathered for r, s, c in part}
            if sorted(by_row) != rows:
                raise RuntimeError(f"shard {shard}: got rows {sorted(by_row)[:5]}..., expected "
                                   f"{rows[:5]}...")
            lines = [json.dumps({"idx": int(data.idx[r]), "entropy": by_row[r][0] / by_row[r][1],
                                 "num_tokens": int(by_row[r][1])}) for r in rows]
            write_file_atomic(_shard_path(parts, shard), "".join(f"{line}\n" for line in lines))
            bar.update(len(rows))

        on_rank_zero(write_shard, f"entropy: shard {shard}", share=False)

    def assemble() -> None:
        bar.close()
        _assemble(job, out, parts, shards, cfg, tokenizer, data)

    on_rank_zero(assemble, "entropy: output", share=False)
    return out


def data_fingerprint(data, tokenizer) -> str:
    """A digest of the tokenized data (sample idx, lengths, targets) and the tokenizer: two
    entropy files agree on it exactly when they scored the same samples the same way."""
    import hashlib

    digest = hashlib.sha256(tokenizer.fingerprint.encode())
    digest.update(data.idx.astype("int64").tobytes())
    for column in ("num_tokens", "num_targets"):
        digest.update(data.dataset.data.column(column).to_numpy().astype("int64").tobytes())
    return digest.hexdigest()[:40]


def _assemble(job, out: Path, parts: Path, shards: int, cfg, tokenizer, data) -> None:
    records = []
    for shard in range(shards):
        records += [json.loads(line) for line in
                    _shard_path(parts, shard).read_text(encoding="utf-8").splitlines()]
    if out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({k: [r[k] for r in records] for k in ("idx", "entropy", "num_tokens")})
        write_file_atomic(out, writer=lambda tmp: pq.write_table(table, tmp))
    else:
        write_file_atomic(out, "".join(json.dumps(r) + "\n" for r in records))
    meta = {"format": _FORMAT, "model": str(Path(job.model).resolve()), "which": job.which,
            "vocab_size": cfg.vocab_size, "tokenizer": tokenizer.fingerprint,
            "data_paths": list(job.data.paths), "max_length": job.data.max_length,
            "data_fingerprint": data_fingerprint(data, tokenizer), "num_samples": len(records),
            "positions": job.positions,
            "tokens": int(data.dataset.data.column("num_tokens").to_numpy().sum())}
    write_file_atomic(out.with_name(out.name + META_SUFFIX), json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(parts, ignore_errors=True)
