"""``make demo``: the whole method on a laptop-sized task, on CPU, with no downloads.

1. writes the synthetic task (examples/demo/task.py) to runs/demo/data/: train split, held-out
   split (unseen compositions, as runs/demo/data/eval/local_math.jsonl) and the base model's
   related text;
2. trains a SentencePiece tokenizer on it;
3. pre-trains the tiny base model briefly (examples/demo/base.yaml): the weak model M0;
4. runs ``wmss run examples/demo/demo.yaml`` (extra arguments are passed on, e.g.
   ``--ablations``; ``seeds=10`` runs seeds 1..10 instead of the config's 3, reusing the
   seeds already finished), which prints the report's path.

Every step is skipped when its output exists, so a rerun (after a kill, too) resumes.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import task  # noqa: E402

DATA = Path("runs/demo/data")


def _say(text: str) -> None:
    print(f"make demo: {text}", file=sys.stderr, flush=True)


def prepare() -> None:
    from megatron_wmss.cli import main as wmss

    if not (DATA / "task.json").is_file():
        _say("writing the synthetic task")
        tmp = DATA.with_name(DATA.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        info = task.write_task(tmp, num_train=4096, num_heldout=200, starts_per_composition=3)
        (tmp / "eval").mkdir()
        (tmp / "heldout.jsonl").rename(tmp / "eval" / "local_math.jsonl")
        from megatron_wmss.data.train_tokenizer import train_sentencepiece

        train_sentencepiece([str(tmp / "train.jsonl"), str(tmp / "pretrain.jsonl")],
                            str(tmp / "sp"), vocab_size=400)
        tmp.rename(DATA)
        _say(json.dumps(info))
    if not Path("runs/demo/base/DONE").is_file():  # the trainer resumes an interrupted one
        _say("pre-training the base model (the weak model M0)")
        code = wmss(["sft", "--config", str(HERE / "base.yaml")])
        if code:
            raise SystemExit(code)
        Path("runs/demo/base/DONE").write_text("")


def main(argv: list[str]) -> int:
    from megatron_wmss.cli import main as wmss

    start = time.monotonic()
    prepare()
    code = wmss(["run", str(HERE / "demo.yaml"), *argv])
    _say(f"finished in {time.monotonic() - start:.0f} s, exit {code}")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
