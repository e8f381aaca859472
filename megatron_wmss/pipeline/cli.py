"""``wmss run``: the whole method in one command.

    wmss run CONFIG.yaml [section.field=value ...] [--iterations K] [--ablations]
             [--run-dir DIR] [--nproc-per-node N] [--print-config]

Under torchrun or srun (``WMSS_COMMAND=run sbatch launch/wmss.slurm``) each process is one
rank; ``--nproc-per-node N`` starts N local ranks; neither: one process. Every stage runs on
all ranks (each at its own tensor/pipeline layout; the rest is data parallel). A rerun of the
same command skips finished stages and resumes the interrupted one. Exit status: 0 done (the
report's path printed), 75 preempted (rerun to resume; the Slurm script requeues), 3 a
training stage stopped on non-finite steps, 2 a bad config, 1 anything unexpected.
"""

from __future__ import annotations

import signal
import sys
from typing import Sequence

from megatron_wmss.platform.errors import ArgumentParser, positive_int

__all__ = ["run_main"]

_A_MONTH = 30 * 24 * 3600.0


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="wmss run", description="the whole method: SFT, entropies, "
                            "selection, joint training, extraction, evaluation, the SFT "
                            "baseline and the controls, then a report")
    parser.add_argument("config_file", nargs="?", metavar="CONFIG.yaml",
                        help="pipeline config (examples/demo/demo.yaml, examples/recipes/"
                        "paper-qwen3-4b.yaml)")
    parser.add_argument("--config", dest="config_option", default=None,
                        help="the same, as an option (the Slurm script passes --config)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="config overrides, values parsed as YAML (e.g. seeds=[1])")
    parser.add_argument("--iterations", type=positive_int, default=None, metavar="K",
                        help="rounds of selection + joint training (weak M_{t-1}, strong M_t)")
    parser.add_argument("--ablations", action="store_true",
                        help="also run every control (WD-DS only, WD-JT only, fresh "
                        "optimizer, temperature, label smoothing, frozen weak model)")
    parser.add_argument("--run-dir", default=None, help="where the run writes (default: the "
                        "config's run_dir); a rerun on the same directory resumes")
    parser.add_argument("--nproc-per-node", type=positive_int, default=None, metavar="N",
                        help="start N local ranks (default: one process, or the ranks of "
                        "torchrun / srun)")
    parser.add_argument("--print-config", action="store_true",
                        help="check the config, print it and the stages, start nothing")
    return parser


def _pipeline_rank(config) -> int:
    from megatron_wmss.pipeline.report import write_report
    from megatron_wmss.pipeline.stages import plan_stages, run_stages
    from megatron_wmss.platform.ranks import on_rank_zero

    def report() -> None:
        print(f"wmss run: report {write_report(config)}", flush=True)

    code = run_stages(config, plan_stages(config))
    if code == 0:
        on_rank_zero(report, "report", share=False)
    return code


def run_main(argv: Sequence[str]) -> int:
    import yaml

    from megatron_wmss.pipeline.config import load_pipeline
    from megatron_wmss.pipeline.stages import plan_stages
    from megatron_wmss.platform.launch import distributed_from_env, rank_info_from_env

    args = _parser().parse_intermixed_args(list(argv))
    path = args.config_option or args.config_file
    if args.config_option and args.config_file:
        # `--config A B=1`: the positional slot took the first override.
        args.overrides.insert(0, args.config_file)
    if path is None:
        raise ValueError("wmss run needs a config: wmss run CONFIG.yaml (or --config FILE)")
    config = load_pipeline(path, args.overrides, run_dir=args.run_dir,
                           iterations=args.iterations, ablations=args.ablations)
    stages = plan_stages(config)
    if args.print_config:
        print(yaml.safe_dump({"config": config.to_dict(),
                              "stages": [f"{s.id} ({s.kind})" for s in stages]},
                             sort_keys=False), end="")
        return 0
    if args.nproc_per_node is not None:
        if rank_info_from_env().launcher != "single":
            raise ValueError("--nproc-per-node starts ranks itself; under torchrun or srun "
                             "leave it out (each launched process is one rank)")
        from megatron_wmss.platform.spawn import run_distributed

        codes = run_distributed(_pipeline_rank, world_size=args.nproc_per_node, tp=1, pp=1,
                                args=(config,), timeout=_A_MONTH, device="auto",
                                forward_signals=(signal.SIGTERM, signal.SIGUSR1))
        code = max(codes)
    else:
        with distributed_from_env(1, 1):
            code = _pipeline_rank(config)
    if code and rank_info_from_env().rank == 0:
        what = {75: "preempted: rerun the same command to resume"}.get(
            code, "a training stage stopped (see its log above)")
        print(f"wmss run: stopped, exit {code}: {what}", file=sys.stderr)
    return code
