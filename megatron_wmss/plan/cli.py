"""``wmss plan``: memory per rank and steps of a recipe or a ``wmss run`` config, before a job.

    wmss plan CONFIG [section.field=value ...] [--gpu-memory 80GiB] [--json]
              [--world-size N | --nodes N [--gpus-per-node 8]] [--model HF_CONFIG_OR_CKPT]
              [--samples N] [--active-fraction F] [--target gpu|cpu]

Runs in seconds on any machine (no GPU, no model weights, no process group): the parameter
counts are exact formulas of the model config, the rest the formulas of
:mod:`megatron_wmss.plan.memory`. Exit status 0 whatever the verdict; 2 on a bad config or
option (one line naming it).
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Sequence

from megatron_wmss.platform.errors import ArgumentParser, positive_int

__all__ = ["parse_size", "plan_main"]

_UNITS = {"": 2**30, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes of ``80GiB``, ``80GB``, ``141 GB``, ``80`` (GiB); argparse ``type=``."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive size such as 80GiB, 80GB or 80 "
                                         f"(GiB), got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="wmss plan", description="memory per rank (parameters, gradients, optimizer "
        "state, activations, loss, KV cache) and steps of each stage, against the GPU's "
        "memory, for a wmss sft|joint recipe or a wmss run config")
    parser.add_argument("config", metavar="CONFIG.yaml", help="recipe or wmss run config")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="config overrides, values parsed as YAML")
    parser.add_argument("--gpu-memory", type=parse_size, default=80 * 2**30, metavar="SIZE",
                        help="memory per GPU the verdict compares with (default 80GiB)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--world-size", type=positive_int, default=None, metavar="N",
                       help="ranks of the job (default: TP x PP of the largest layout, DP 1)")
    where.add_argument("--nodes", type=positive_int, default=None, metavar="N",
                       help="nodes of --gpus-per-node ranks each")
    parser.add_argument("--gpus-per-node", type=positive_int, default=8, metavar="G",
                        help="with --nodes (default 8)")
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="architecture: an HF config.json (or its directory) or a megatron "
                        "checkpoint; default: the config's base / init checkpoint, else its "
                        "model section")
    parser.add_argument("--samples", type=positive_int, default=None, metavar="N",
                        help="data rows (default: counted in the data files)")
    parser.add_argument("--active-fraction", type=_fraction, default=None, metavar="F",
                        help="share of the data in phase 3's active set (default 0.56, the "
                        "paper's, with de-duplication; 1 without)")
    parser.add_argument("--target", choices=("gpu", "cpu"), default="gpu",
                        help="gpu: Transformer Engine layers, fused Adam, CUDA defaults; cpu: "
                        "what a run on this CPU holds (default gpu)")
    parser.add_argument("--as", dest="kind", choices=("sft", "joint", "run"), default=None,
                        help="what CONFIG is (default: detected from its sections)")
    parser.add_argument("--eval-prompt-tokens", type=positive_int, default=1024, metavar="N",
                        help="longest evaluation prompt the KV cache holds (default 1024)")
    return parser


def plan_main(argv: Sequence[str]) -> int:
    from megatron_wmss.plan.pipeline import make_plan
    from megatron_wmss.plan.planner import PlanOptions
    from megatron_wmss.plan.report import format_plan, plan_to_dict

    args = _parser().parse_intermixed_args(list(argv))
    world = args.world_size or (args.nodes * args.gpus_per_node if args.nodes else None)
    options = PlanOptions(world_size=world, gpu_memory=args.gpu_memory, target=args.target,
                          model=args.model, samples=args.samples,
                          active_fraction=args.active_fraction,
                          eval_prompt_tokens=args.eval_prompt_tokens)
    plan = make_plan(args.config, args.overrides, options, kind=args.kind)
    print(json.dumps(plan_to_dict(plan), indent=2) if args.json else format_plan(plan))
    return 0
