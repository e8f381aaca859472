"""What a run shows: RUN_DIR/metrics.jsonl, TensorBoard, W&B, a progress bar, FLOPs and MFU.

Only rank 0 writes. One flat record per logged step fans out to every sink: ``step``, ``loss``,
``lr``, ``grad_norm`` (and ``grad_norm/strong``, ``grad_norm/weak`` for joint runs),
``tokens_per_s``, ``mix_lambda``, the saturation diagnostics (``strong/entropy``,
``mixed/margin``, …; ``model/…`` on SFT runs), how far the step moved the strong (or only)
model (``update_norm/strong``, ``param_norm/strong``, ``update_ratio/strong``), and ``mfu`` on
CUDA. On resume the records after the checkpoint's step are dropped (they are about to be
recomputed), so the file always reads as one run.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Optional

from megatron_wmss.config import ModelConfig

__all__ = ["MetricsLogger", "ProgressBar", "model_flops_per_token", "peak_flops_per_device"]

METRICS_FILE = "metrics.jsonl"


def model_flops_per_token(cfg: ModelConfig, seq_length: int, backward: bool = True) -> float:
    """Floating-point operations one token costs one model (Megatron-LM's accounting): 2 per
    multiply-add of every GEMM, causal attention over half the sequence on average, the output
    layer over the (padded) vocabulary; the backward pass costs twice the forward."""
    d, h = cfg.head_dim, cfg.hidden_size
    qkv = h * (cfg.num_attention_heads + 2 * cfg.num_query_groups) * d
    out = cfg.num_attention_heads * d * h
    mlp = 3 * h * cfg.ffn_hidden_size  # SwiGLU: gate, up, down
    attention = seq_length * cfg.num_attention_heads * d  # QK^T and AV, causal: s/2 each
    macs = cfg.num_layers * (qkv + out + mlp + attention) + h * cfg.padded_vocab_size(1)
    return 2.0 * macs * (3.0 if backward else 1.0)


# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of the device name.
_PEAKS = (("H200", 989e12), ("H100", 989e12), ("GH200", 989e12), ("B200", 2250e12),
          ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12))


def peak_flops_per_device() -> Optional[float]:
    """The bf16 peak of this process's GPU, or None (CPU, or a GPU not in the table)."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in _PEAKS:
        if key in name:
            return peak
    return None


class MetricsLogger:
    """Rank 0's sinks. ``resume_step`` drops records of later steps from metrics.jsonl."""

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool, resume_step: int = 0,
                 tensorboard: bool = True, wandb_project: Optional[str] = None,
                 config: Optional[dict] = None) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self._tb = self._wandb = None
        if not enabled:
            return
        self._truncate(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the tensorboard package is missing: say so once, go on
                print("wmss: tensorboard is not installed; metrics go to metrics.jsonl only",
                      file=sys.stderr)
            else:
                # purge_step hides events the resumed run is about to write again.
                self._tb = SummaryWriter(str(Path(run_dir) / "tb"),
                                         purge_step=resume_step + 1 if resume_step else None)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                print("wmss: trainer.wandb_project is set but wandb is not installed",
                      file=sys.stderr)
            else:
                self._wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=config,
                                         resume="allow", name=Path(run_dir).name)

    def _truncate(self, resume_step: int) -> None:
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= resume_step:
                    kept.append(line)
            except ValueError:
                continue  # a line cut by a kill mid-write
        from megatron_wmss.platform.files import write_file_atomic

        write_file_atomic(self.path, "".join(f"{line}\n" for line in kept))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        step = record["step"]
        # Strict JSON: a non-finite value (a skipped step's loss) is written as null.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        self._file.write(json.dumps(clean, allow_nan=False) + "\n")
        self._file.flush()
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                   and not isinstance(v, bool) and v is not None and math.isfinite(v)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class ProgressBar:
    """A tqdm bar on rank 0 (stderr): loss, lr, tokens/s, and tqdm's own ETA."""

    def __init__(self, total: int, initial: int, *, enabled: bool, desc: str) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step",
                             dynamic_ncols=True, file=sys.stderr)

    def update(self, record: dict) -> None:
        if self._bar is None:
            return
        self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                              tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
