"""Entry points of ``wmss import-hf``, ``wmss export-hf`` and ``wmss extract``.

Each parses its own arguments, checks the inputs in this process (so bad input fails in a
second, before any rank starts), then runs the collective conversion on ``tp × pp`` local
ranks (gloo on CPU with the CPU shims, NCCL on GPUs) through the package's process launcher.
Multi-node conversion is not offered here: call :func:`import_hf` from your own launcher.
Each returns a process exit code: 0 on success, 2 on a user error (one line on stderr, also
when a rank raised it; see :mod:`megatron_wmss.platform.errors`); other errors propagate with
their traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

from megatron_wmss.interop.hf_io import SafetensorsCheckpoint, check_output_dir, read_json
from megatron_wmss.platform.errors import ArgumentParser, UserError, positive_int, run_command

__all__ = ["export_main", "extract_main", "import_main"]

_DAY = 24 * 3600.0


def _import_worker(hf_dir: str, out: str, overwrite: bool, dtype: str | None) -> str:
    from megatron_wmss.interop.convert import import_hf

    return str(import_hf(hf_dir, out, overwrite=overwrite, params_dtype=dtype))


def _export_worker(ckpt: str, out: str, which: str | None, overwrite: bool,
                   max_shard_size: str, dtype: str | None, model_from: str | None) -> str:
    from megatron_wmss.interop.convert import export_hf

    return str(export_hf(ckpt, out, which=which, overwrite=overwrite,
                         max_shard_size=max_shard_size, dtype=dtype, model_from=model_from))


def _extract_worker(ckpt: str, out: str, which: str, overwrite: bool,
                    model_from: str | None) -> str:
    from megatron_wmss.interop.convert import extract_megatron

    return str(extract_megatron(ckpt, out, which=which, overwrite=overwrite,
                                model_from=model_from))


def _launch(worker: Callable, args: tuple, tp: int, pp: int, timeout: float) -> None:
    from megatron_wmss.platform.spawn import run_distributed

    run_distributed(worker, world_size=tp * pp, tp=tp, pp=pp, args=args, timeout=timeout)


def _check_layout(model, tp: int, pp: int, source: str) -> None:
    """Refuse a layout that cannot split ``model`` (a ModelConfig read from ``source``) before
    any rank starts."""
    from megatron_wmss.config import ParallelConfig

    try:
        model.check_parallel(ParallelConfig(tensor_model_parallel_size=tp,
                                            pipeline_model_parallel_size=pp))
    except ValueError as err:
        raise UserError(f"--tp {tp} --pp {pp} cannot split the model of {source}: {err}") from err


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output directory")
    parser.add_argument("--timeout", type=float, default=_DAY,
                        help="seconds before the conversion is abandoned (default: a day)")



def import_main(argv: Sequence[str]) -> int:
    """``wmss import-hf --hf-dir D --out CKPT [--tp N --pp M]``."""
    parser = ArgumentParser(
        prog="wmss import-hf",
        description="Convert an HF Llama/Qwen2/Qwen3 causal LM (safetensors) into a "
        "megatron-core distributed checkpoint with its model description and tokenizer.")
    parser.add_argument("--hf-dir", required=True, help="HF model directory (config.json, "
                        "model.safetensors or model.safetensors.index.json + shards)")
    parser.add_argument("--out", required=True, help="megatron checkpoint directory to write")
    parser.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size to "
                        "convert at; the vocabulary is padded for it (use the training TP)")
    parser.add_argument("--pp", type=positive_int, default=1, help="pipeline-parallel size")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="parameter dtype (default: the stored one; float16 -> float32)")
    _common(parser)
    args = parser.parse_args(list(argv))

    def body() -> None:
        from megatron_wmss.interop.hf_config import model_config_from_hf

        check_output_dir(args.out, args.overwrite)
        config = Path(args.hf_dir) / "config.json"
        model = model_config_from_hf(read_json(config, "the HF model's config"), args.dtype,
                                     str(config))
        _check_layout(model, args.tp, args.pp, str(config))
        SafetensorsCheckpoint(args.hf_dir)
        _launch(_import_worker, (args.hf_dir, args.out, args.overwrite, args.dtype),
                args.tp, args.pp, args.timeout)
        print(f"wrote {args.out}")

    return run_command(parser.prog, body)


def export_main(argv: Sequence[str]) -> int:
    """``wmss export-hf --ckpt CKPT --out D [--which strong|weak]``."""
    parser = ArgumentParser(
        prog="wmss export-hf",
        description="Write a megatron checkpoint (single model, or the strong/weak half of a "
        "joint one) as an HF model directory: safetensors, config.json, tokenizer. Runs on "
        "one process (the checkpoint is resharded to TP=1, PP=1 on load).")
    parser.add_argument("--ckpt", required=True, help="megatron checkpoint directory")
    parser.add_argument("--out", required=True, help="HF model directory to write")
    parser.add_argument("--which", choices=("strong", "weak"), default=None,
                        help="model of a joint checkpoint (default: strong)")
    parser.add_argument("--model-from", default=None, help="directory holding the model "
                        "description (wmss_model.json) when CKPT has none, e.g. the imported "
                        "base checkpoint")
    parser.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default=None,
                        help="dtype to write (default: that of the HF model imported)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors file before sharding with an index")
    _common(parser)
    args = parser.parse_args(list(argv))

    def body() -> None:
        from megatron_wmss.interop.hf_io import parse_size
        from megatron_wmss.interop.metadata import read_model_metadata

        check_output_dir(args.out, args.overwrite)
        read_model_metadata(args.model_from or args.ckpt)
        parse_size(args.max_shard_size)
        _launch(_export_worker, (args.ckpt, args.out, args.which, args.overwrite,
                                 args.max_shard_size, args.dtype, args.model_from),
                1, 1, args.timeout)
        print(f"wrote {args.out}")

    return run_command(parser.prog, body)


def extract_main(argv: Sequence[str]) -> int:
    """``wmss extract --ckpt JOINT --out CKPT [--which strong|weak] [--tp N --pp M]``."""
    parser = ArgumentParser(
        prog="wmss extract",
        description="Write the strong (or weak) model of a joint checkpoint as a single-model "
        "megatron checkpoint of the base architecture.")
    parser.add_argument("--ckpt", required=True, help="joint megatron checkpoint directory")
    parser.add_argument("--out", required=True, help="single-model checkpoint to write")
    parser.add_argument("--which", choices=("strong", "weak"), default="strong")
    parser.add_argument("--model-from", default=None,
                        help="directory holding the model description when CKPT has none")
    parser.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size to run at")
    parser.add_argument("--pp", type=positive_int, default=1, help="pipeline-parallel size")
    _common(parser)
    args = parser.parse_args(list(argv))

    def body() -> None:
        from megatron_wmss.interop.metadata import read_model_metadata

        check_output_dir(args.out, args.overwrite)
        source = args.model_from or args.ckpt
        _check_layout(read_model_metadata(source).model, args.tp, args.pp, source)
        _launch(_extract_worker, (args.ckpt, args.out, args.which, args.overwrite,
                                  args.model_from), args.tp, args.pp, args.timeout)
        print(f"wrote {args.out}")

    return run_command(parser.prog, body)
