"""The demo's synthetic reasoning task: chains of digit functions, solved step by step.

    Start with 4. Apply double, then add3, then flip.
    ->  double 4 = 8. add3 8 = 1. flip 1 = 8. So the answer is \\boxed{8}.

Six functions on the digits (mod 10), chains of 2 or 3 of them. Every function, and every
function at every step position, is seen in training; a fixed fifth of the *compositions* (the
ordered function sequences) never is: the held-out split asks only for those. A model that
memorises its training problems reaches a near-zero training loss while it still fails part of
the unseen compositions: the generalisation gap of the paper's regime (WMSS.md §1), which a
task where held-out accuracy tracks training accuracy would not show.

The "related text" the base model is pre-trained on states single function values
("double 4 = 8.") and a few chains without the question format, so the base knows the
vocabulary and some arithmetic but has never seen a worked problem: it plays the weak model.

Deterministic: the same arguments always write the same files.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Callable

FUNCTIONS: dict[str, Callable[[int], int]] = {
    "add3": lambda x: (x + 3) % 10,
    "double": lambda x: (2 * x) % 10,
    "sub1": lambda x: (x - 1) % 10,
    "triple": lambda x: (3 * x) % 10,
    "flip": lambda x: 9 - x,
    "square": lambda x: (x * x) % 10,
}
#: The prompt suffix of the math tasks of ``wmss eval`` (evaluation/benchmarks.py): training
#: questions carry it, so the held-out split is scored with the exact prompt the model learnt.
SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def question(start: int, chain: tuple[str, ...]) -> str:
    return f"Start with {start}. Apply {', then '.join(chain)}."


def solution(start: int, chain: tuple[str, ...]) -> tuple[str, int]:
    steps, x = [], start
    for name in chain:
        y = FUNCTIONS[name](x)
        steps.append(f"{name} {x} = {y}.")
        x = y
    return " ".join(steps) + f" So the answer is \\boxed{{{x}}}.", x


def compositions() -> list[tuple[str, ...]]:
    names = sorted(FUNCTIONS)
    return [c for n in (2, 3) for c in itertools.product(names, repeat=n)]


def split_compositions(seed: int, held_out_fraction: float = 0.2
                       ) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """(train, held-out) compositions: a seeded fifth held out, redrawn until every function
    occurs at every step position of the training chains (unseen *combinations* only)."""
    rng = random.Random(seed)
    every = compositions()
    while True:
        shuffled = every[:]
        rng.shuffle(shuffled)
        cut = int(len(shuffled) * held_out_fraction)
        held, train = shuffled[:cut], shuffled[cut:]
        seen = {(len(c), i, name) for c in train for i, name in enumerate(c)}
        if all((len(c), i, name) in seen for c in held for i, name in enumerate(c)):
            return sorted(train), sorted(held)


def write_task(out_dir: str | Path, *, seed: int = 0, num_train: int = 2048,
               num_heldout: int = 200, starts_per_composition: int = 10) -> dict:
    """Write ``train.jsonl`` (question/answer rows with worked solutions, the SFT data:
    ``starts_per_composition`` start digits of each training composition, repeated in a
    shuffled order up to ``num_train`` rows),
    ``heldout.jsonl`` (question/answer rows, the evaluation split), ``pretrain.jsonl`` (the
    base model's related text) and ``task.json`` (what was generated); returns the latter."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 1)
    train_chains, held_chains = split_compositions(seed)
    # A few start digits per composition, repeated to num_train samples: few distinct problems
    # seen many times, so phase 1 can memorise them (train loss near zero) before it has
    # learnt the rule the held-out compositions need.
    train_problems = [(s, c) for c in train_chains
                      for s in rng.sample(range(10), starts_per_composition)]
    rng.shuffle(train_problems)
    train_problems = (train_problems * (1 + num_train // len(train_problems)))[:num_train]
    train_rows = []
    for idx, (start, chain) in enumerate(train_problems):
        text, _ = solution(start, chain)
        train_rows.append({"idx": idx, "question": question(start, chain) + SUFFIX,
                           "answer": text})
    held_problems = [(s, c) for c in held_chains for s in range(10)]
    rng.shuffle(held_problems)
    held_rows = []
    for idx, (start, chain) in enumerate(held_problems[:num_heldout]):
        held_rows.append({"idx": idx, "question": question(start, chain),
                          "answer": str(solution(start, chain)[1])})
    pretrain_rows = []
    for name, fn in sorted(FUNCTIONS.items()):
        for x in range(10):
            pretrain_rows.append({"prompt": "Fact.", "completion": f"{name} {x} = {fn(x)}."})
    for _ in range(256):
        chain = rng.choice(train_chains)  # held-out compositions stay unseen
        pretrain_rows.append({"prompt": "Chain.", "completion": solution(rng.randrange(10),
                                                                          chain)[0]})
    rng.shuffle(pretrain_rows)
    for i, row in enumerate(pretrain_rows):
        row["idx"] = i
    for name, rows in (("train", train_rows), ("heldout", held_rows), ("pretrain", pretrain_rows)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = {"seed": seed, "functions": sorted(FUNCTIONS), "train_compositions": len(train_chains),
            "heldout_compositions": len(held_chains), "train_samples": len(train_rows),
            "distinct_train_problems": len(set(train_problems)),
            "heldout_samples": len(held_rows), "pretrain_samples": len(pretrain_rows)}
    (out / "task.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
