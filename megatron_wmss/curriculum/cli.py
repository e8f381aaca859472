"""Entry point of ``wmss select``: WD-DS selection of the phase-3 active set.

Returns a process exit code: 0 on success, 2 on a user error (one line on stderr; see
:mod:`megatron_wmss.platform.errors`); other errors propagate with their traceback.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_wmss.platform.errors import ArgumentParser, positive_int, run_command

__all__ = ["select_main"]



def select_main(argv: Sequence[str]) -> int:
    """``wmss select --weak-entropy F0 --strong-entropy F1 --out DIR [options]``."""
    from megatron_wmss.curriculum.select import (
        ACTIVE_SET_FILE,
        FALLBACKS,
        ON_MISSING,
        SelectionConfig,
    )
    from megatron_wmss.curriculum.weights import FORMULAS

    defaults = SelectionConfig()
    parser = ArgumentParser(
        prog="wmss select",
        description="WD-DS (phase 2): weigh each sample by the weak and strong model's "
        "entropies, draw an active set for phase 3 and write DIR/active_set.jsonl (use it as "
        "data.active_set), DIR/summary.json and DIR/weights.png.")
    parser.add_argument("--weak-entropy", required=True, metavar="F0",
                        help="entropy file of the weak model (JSONL or Parquet of idx, "
                        "entropy, num_tokens)")
    parser.add_argument("--strong-entropy", required=True, metavar="F1",
                        help="entropy file of the strong model, same samples")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--formula", choices=FORMULAS, default=defaults.formula,
                        help="paper: p ∝ a[-dH]+ + b*H_strong + g[dH]+ (paper v2 Eq. 9); "
                        "reference: sum of separately normalised a*H_weak, b[-dH]+, g[dH]+ "
                        f"(default: {defaults.formula})")
    for name in ("alpha", "beta", "gamma"):
        parser.add_argument(f"--{name}", type=float, default=getattr(defaults, name),
                            help=f"coefficient >= 0 (default: {getattr(defaults, name)})")
    parser.add_argument("--num-samples", type=positive_int, default=None, metavar="N",
                        help="draws with replacement (default: one per sample, |D|)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help=f"seed of the draws (default: {defaults.seed})")
    parser.add_argument("--no-dedupe", dest="dedupe", action="store_false",
                        help="keep a sample as often as it was drawn (the reference code) "
                        "instead of once (paper v2)")
    parser.add_argument("--on-missing", choices=ON_MISSING, default=defaults.on_missing,
                        help="idx in only one file: error, or drop them (default: error)")
    parser.add_argument("--fallback", choices=FALLBACKS, default=defaults.fallback,
                        help="all weights zero: error, or sample uniformly (default: error)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output directory")
    args = parser.parse_args(list(argv))

    def body() -> None:
        from megatron_wmss.curriculum.select import run_select

        config = SelectionConfig(
            formula=args.formula, alpha=args.alpha, beta=args.beta, gamma=args.gamma,
            num_samples=args.num_samples, seed=args.seed, dedupe=args.dedupe,
            on_missing=args.on_missing, fallback=args.fallback)
        summary = run_select(args.weak_entropy, args.strong_entropy, args.out, config,
                             args.overwrite)
        counts = summary["counts"]
        notes = []
        if counts["dropped_missing"]:
            notes.append(f"{counts['dropped_missing']} idx in only one file dropped")
        if summary["fallback_used"]:
            notes.append("all weights were zero: sampled uniformly")
        print(f"wrote {args.out}/{ACTIVE_SET_FILE}: {summary['unique_kept']} unique of "
              f"{counts['common']} samples ({summary['fraction_kept']:.1%}) from "
              f"{summary['total_draws']} draws, {summary['active_set_size']} in the active set "
              f"(formula {config.formula}){'; ' + '; '.join(notes) if notes else ''}")

    return run_command(parser.prog, body)
