"""WD-DS selection (``wmss select``): weights, seeded draws, outputs and input errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from megatron_wmss.curriculum import (
    SelectionConfig,
    ZeroWeightsError,
    discrepancy_scores,
    discrepancy_weights,
    run_select,
)
from megatron_wmss.curriculum.cli import select_main
from megatron_wmss.data import read_active_set
from tests.unit.data_fixtures import (  # noqa: F401  (fixtures)
    cache_dir,
    rows_for,
    sp_tokenizer,
    write_rows,
)


# ---- literal re-statements of WMSS.md §4, one sample at a time -------------------------------

def literal_paper(h_weak, h_strong, alpha, beta, gamma):
    """p_i ∝ α·[−ΔH_i]₊ + β·H_strong,i + γ·[ΔH_i]₊ with ΔH_i = H_strong,i − H_weak,i."""
    scores = []
    for hw, hs in zip(h_weak, h_strong):
        dh = hs - hw
        scores.append(alpha * max(-dh, 0.0) + beta * hs + gamma * max(dh, 0.0))
    total = sum(scores)
    return [s / total for s in scores]


def literal_reference(h_weak, h_strong, alpha, beta, gamma):
    """p_i = α·H_w,i/ΣH_w + β·[−ΔH_i]₊/Σ[−ΔH]₊ + γ·[ΔH_i]₊/Σ[ΔH]₊ (empty sums add 0), normalised."""
    decrease = [max(-(hs - hw), 0.0) for hw, hs in zip(h_weak, h_strong)]
    increase = [max(hs - hw, 0.0) for hw, hs in zip(h_weak, h_strong)]
    sum_w, sum_dec, sum_inc = sum(h_weak), sum(decrease), sum(increase)
    p = []
    for i in range(len(h_weak)):
        term_w = h_weak[i] / sum_w if sum_w != 0 else 0.0
        term_dec = decrease[i] / sum_dec if sum_dec != 0 else 0.0
        term_inc = increase[i] / sum_inc if sum_inc != 0 else 0.0
        p.append(alpha * term_w + beta * term_dec + gamma * term_inc)
    total = sum(p)
    return [x / total for x in p]


def _entropies(case: str, n: int = 200, seed: int = 0) -> tuple[list[float], list[float]]:
    rng = np.random.default_rng(seed)
    h_weak = rng.uniform(0.0, 4.0, n)
    h_strong = rng.uniform(0.0, 4.0, n)
    if case == "all_increase":      # every ΔH >= 0
        h_strong = h_weak + rng.uniform(0.0, 1.0, n)
    elif case == "all_decrease":    # every ΔH <= 0
        h_strong = h_weak * rng.uniform(0.0, 1.0, n)
    elif case == "zero_entropies":  # the weak model certain everywhere, some strong ones too
        h_weak = np.zeros(n)
        h_strong[: n // 2] = 0.0
    elif case == "exact_ties":      # ΔH exactly 0 for a third of the samples
        h_strong[: n // 3] = h_weak[: n // 3]
    return h_weak.tolist(), h_strong.tolist()


CASES = ["random", "all_increase", "all_decrease", "zero_entropies", "exact_ties"]
COEFFICIENTS = [(0.1, 0.8, 0.1), (0.5, 0.0, 0.5), (0.0, 0.0, 1.0), (0.3, 1.7, 0.0)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("alpha, beta, gamma", COEFFICIENTS)
@pytest.mark.parametrize("formula, literal", [("paper", literal_paper),
                                              ("reference", literal_reference)])
def test_weights_equal_the_formulas_of_wmss_md(case, alpha, beta, gamma, formula, literal):
    h_weak, h_strong = _entropies(case)
    try:
        expected = literal(h_weak, h_strong, alpha, beta, gamma)
    except ZeroDivisionError:  # every term empty: the library must refuse, not divide by 0
        with pytest.raises(ZeroWeightsError, match="all 200 sampling weights are zero"):
            discrepancy_weights(h_weak, h_strong, formula=formula, alpha=alpha, beta=beta,
                                gamma=gamma)
        return
    p = discrepancy_weights(h_weak, h_strong, formula=formula, alpha=alpha, beta=beta,
                            gamma=gamma)
    assert p.dtype == np.float64 and (p >= 0).all()
    # Same operations in another order (numpy's pairwise sums): a few ulp apart at most.
    np.testing.assert_allclose(p, expected, rtol=1e-12, atol=1e-300)
    assert math.isclose(p.sum(), 1.0, rel_tol=1e-12)


def test_paper_terms_are_consolidate_hard_now_and_repair():
    # ΔH < 0: α·|ΔH| + β·H_s;  ΔH > 0: β·H_s + γ·ΔH;  ΔH = 0: β·H_s. Distinct α, β, γ so that
    # a swapped term cannot pass.
    h_weak, h_strong = [2.0, 0.5, 1.0], [0.5, 2.0, 1.0]
    scores = discrepancy_scores(h_weak, h_strong, formula="paper", alpha=0.2, beta=0.5,
                                gamma=0.3)
    np.testing.assert_allclose(scores, [0.2 * 1.5 + 0.5 * 0.5, 0.5 * 2.0 + 0.3 * 1.5,
                                        0.5 * 1.0], rtol=1e-15)
    # Reference: α on H_weak's share, β on the share of [−ΔH]₊, γ on that of [ΔH]₊.
    ref = discrepancy_scores(h_weak, h_strong, formula="reference", alpha=0.2, beta=0.5,
                             gamma=0.3)
    np.testing.assert_allclose(ref, [0.2 * 2.0 / 3.5 + 0.5, 0.2 * 0.5 / 3.5 + 0.3,
                                     0.2 * 1.0 / 3.5], rtol=1e-15)


@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": -0.1}, r"alpha = -0.1 is invalid"),
    ({"gamma": float("nan")}, r"gamma = nan is invalid"),
    ({"alpha": 0, "beta": 0, "gamma": 0}, r"alpha = beta = gamma = 0"),
    ({"formula": "v1"}, r"formula = 'v1' is invalid; allowed: paper, reference"),
])
def test_bad_coefficients_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        discrepancy_scores([1.0], [1.0], **kwargs)


# ---- files -----------------------------------------------------------------------------------

def _write(path: Path, idx, entropy, meta: dict | None = None) -> str:
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"idx": np.asarray(idx, np.int64),
                                 "entropy": np.asarray(entropy, np.float64),
                                 "num_tokens": np.full(len(idx), 7, np.int64)}), str(path))
    else:
        path.write_text("".join(json.dumps({"idx": int(i), "entropy": float(h),
                                            "num_tokens": 7}) + "\n"
                                for i, h in zip(idx, entropy)))
    if meta is not None:
        Path(f"{path}.meta.json").write_text(json.dumps(meta))
    return str(path)


def _pair(tmp_path: Path, n: int = 300, seed: int = 0, suffix: str = ".jsonl"):
    h_weak, h_strong = _entropies("exact_ties", n, seed)
    idx = 1000 + np.arange(n)  # idx differ from positions
    return (_write(tmp_path / f"weak{suffix}", idx, h_weak),
            _write(tmp_path / f"strong{suffix}", idx, h_strong))


def _active(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "active_set.jsonl").read_text().splitlines()]


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_draws_are_reproducible_from_the_seed(tmp_path):
    weak, strong = _pair(tmp_path)
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        run_select(weak, strong, tmp_path / name, SelectionConfig(seed=seed))
    text = {name: (tmp_path / name / "active_set.jsonl").read_text() for name in "abc"}
    assert text["a"] == text["b"] and text["a"] != text["c"]


@pytest.mark.parametrize("dedupe", [True, False])
def test_active_set_and_summary_count_what_was_drawn(tmp_path, dedupe):
    weak, strong = _pair(tmp_path)
    out = tmp_path / "out"
    summary = run_select(weak, strong, out, SelectionConfig(num_samples=500, dedupe=dedupe))
    records, on_disk = _active(out), _summary(out)
    assert summary == on_disk
    idx = [r["idx"] for r in records]
    draws = np.array([r["draws"] for r in records])
    assert idx == sorted(idx) and len(set(idx)) == len(idx) and (draws >= 1).all()
    assert draws.sum() == on_disk["total_draws"] == on_disk["num_samples"] == 500
    assert on_disk["unique_kept"] == len(records)
    assert on_disk["fraction_kept"] == len(records) / 300
    multiplicity = [r["multiplicity"] for r in records]
    assert multiplicity == ([1] * len(records) if dedupe else draws.tolist())
    assert on_disk["active_set_size"] == sum(multiplicity)
    assert on_disk["dedupe"] is dedupe and on_disk["counts"] == {
        "weak": 300, "strong": 300, "common": 300, "dropped_missing": 0, "weak_only": 0,
        "strong_only": 0}
    # The active set, multiplicities expanded, is what the data loader reads.
    assert read_active_set(str(out / "active_set.jsonl")).tolist() == \
        np.repeat(idx, multiplicity).tolist()


def test_summary_ranks_samples_and_counts_the_signs_of_delta_h(tmp_path):
    h_weak, h_strong = _entropies("exact_ties", 300)
    weak, strong = _pair(tmp_path)
    summary = run_select(weak, strong, tmp_path / "out", SelectionConfig(formula="reference"))
    dh = np.array(h_strong) - np.array(h_weak)
    assert summary["delta_h"]["zero"] == 100
    assert (summary["delta_h"]["negative"], summary["delta_h"]["positive"]) == \
        (int((dh < 0).sum()), int((dh > 0).sum()))
    p = literal_reference(h_weak, h_strong, 0.1, 0.8, 0.1)
    top, bottom = summary["top"], summary["bottom"]
    assert len(top) == len(bottom) == 10
    assert [r["weight"] for r in top] == sorted((r["weight"] for r in top), reverse=True)
    assert math.isclose(top[0]["weight"], max(p), rel_tol=1e-12)
    assert math.isclose(bottom[0]["weight"], min(p), rel_tol=1e-12)
    row = top[0]
    k = row["idx"] - 1000
    assert (row["h_weak"], row["h_strong"]) == (h_weak[k], h_strong[k])
    assert row["delta_h"] == h_strong[k] - h_weak[k]


def test_samples_of_weight_zero_are_never_drawn(tmp_path):
    # Paper formula: H_strong = 0 and ΔH = 0 give weight 0.
    h_weak = [0.0] * 50 + [1.0] * 50
    h_strong = [0.0] * 50 + [0.5] * 50
    weak = _write(tmp_path / "w.jsonl", range(100), h_weak)
    strong = _write(tmp_path / "s.jsonl", range(100), h_strong)
    run_select(weak, strong, tmp_path / "out", SelectionConfig(num_samples=1000))
    assert min(r["idx"] for r in _active(tmp_path / "out")) >= 50


def test_parquet_inputs_give_the_jsonl_result(tmp_path):
    (tmp_path / "j").mkdir()
    (tmp_path / "p").mkdir()
    run_select(*_pair(tmp_path / "j"), tmp_path / "j" / "out")
    run_select(*_pair(tmp_path / "p", suffix=".parquet"), tmp_path / "p" / "out")
    assert _active(tmp_path / "j" / "out") == _active(tmp_path / "p" / "out")


def test_weights_png_is_a_readable_image_of_both_histograms(tmp_path):
    from PIL import Image

    run_select(*_pair(tmp_path), tmp_path / "out")
    with Image.open(tmp_path / "out" / "weights.png") as image:
        assert image.format == "PNG" and image.size == (960, 540)  # 8 x 4.5 in at 120 dpi
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # drawn, not a blank image
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []


def test_loader_trains_on_the_selected_samples(tmp_path, cache_dir, sp_tokenizer):
    from megatron_wmss.data import DataConfig, build_sft_loader, tokenize_sft

    path = write_rows(tmp_path / "d.jsonl", rows_for("prompt_completion", 8, with_idx=True))
    idx = list(range(100, 108))
    weak = _write(tmp_path / "w.jsonl", idx, [1.0] * 8)
    strong = _write(tmp_path / "s.jsonl", idx, [0.0, 0.0, 0.0, 0.0, 2.0, 2.0, 3.0, 3.0])
    run_select(weak, strong, tmp_path / "sel", SelectionConfig(num_samples=64, dedupe=False,
                                                               beta=1.0, alpha=0.0, gamma=0.0))
    records = _active(tmp_path / "sel")
    config = DataConfig(paths=[path], cache_dir=cache_dir, micro_batch_size=1,
                        active_set=str(tmp_path / "sel" / "active_set.jsonl"), max_length=128)
    loader = build_sft_loader(tokenize_sft(config, sp_tokenizer), config,
                              pad_id=sp_tokenizer.pad_id, dp_rank=0, dp_size=1)
    seen = sorted(i for batch in loader for i in batch["idx"].tolist())
    assert seen == sorted(np.repeat([r["idx"] for r in records],
                                    [r["multiplicity"] for r in records]).tolist())
    assert len(seen) == 64 and set(seen) <= {104, 105, 106, 107}


# ---- input errors ----------------------------------------------------------------------------

def _select(tmp_path, weak, strong, **config):
    return run_select(weak, strong, tmp_path / "out", SelectionConfig(**config))


def test_different_idx_sets_are_an_error_or_dropped(tmp_path):
    weak = _write(tmp_path / "w.jsonl", range(0, 20), [1.0] * 20)
    strong = _write(tmp_path / "s.jsonl", range(3, 30), [2.0] * 27)
    with pytest.raises(ValueError) as err:
        _select(tmp_path, weak, strong)
    message = str(err.value)
    assert f"{weak} and {strong} cover different samples" in message
    assert f"3 idx only in {weak} (0, 1, 2)" in message
    assert f"10 only in {strong} (20, 21, 22, 23, 24, ...)" in message
    assert "--on-missing drop to use the 17 common ones" in message
    assert not (tmp_path / "out").exists()
    summary = _select(tmp_path, weak, strong, on_missing="drop")
    assert summary["counts"] == {"weak": 20, "strong": 27, "common": 17, "dropped_missing": 13,
                                 "weak_only": 3, "strong_only": 10}
    assert summary["total_draws"] == 17
    assert {r["idx"] for r in _active(tmp_path / "out")} <= set(range(3, 20))


@pytest.mark.parametrize("value, shown", [("NaN", "nan"), ("Infinity", "inf"), ("-0.5", "-0.5")])
def test_bad_entropy_names_file_line_and_idx(tmp_path, value, shown):
    weak = tmp_path / "w.jsonl"
    weak.write_text('{"idx": 0, "entropy": 1.0, "num_tokens": 3}\n'
                    f'{{"idx": 7, "entropy": {value}, "num_tokens": 3}}\n')
    strong = _write(tmp_path / "s.jsonl", [0, 7], [1.0, 1.0])
    with pytest.raises(ValueError, match=rf"w.jsonl:2: idx 7 has entropy {shown} "):
        _select(tmp_path, str(weak), strong)


@pytest.mark.parametrize("line, message", [
    ('{"idx": 1, "entropy": 1.0}\n{"idx": 2, "entropy": 1.0\n', r"w.jsonl:2: malformed JSON"),
    ('{"idx": true, "entropy": 1.0}\n', r"w.jsonl:1: entropy record .* lacks an integer"),
    ('{"idx": 1, "entropy": "high"}\n', r"w.jsonl:1: idx 1 has entropy 'high'"),
    ('{"idx": 1, "entropy": 1.0, "num_tokens": -2}\n', r"w.jsonl:1: idx 1 has num_tokens -2"),
    ('{"idx": 4, "entropy": 1.0}\n{"idx": 5, "entropy": 1.0}\n{"idx": 4, "entropy": 2.0}\n',
     r"w.jsonl: 1 idx occur more than once \(idx 4 at .*w.jsonl:1, .*w.jsonl:3\)"),
    ("", r"lists no samples"),
])
def test_malformed_entropy_file_names_file_and_line(tmp_path, line, message):
    weak = tmp_path / "w.jsonl"
    weak.write_text(line)
    strong = _write(tmp_path / "s.jsonl", [1], [1.0])
    with pytest.raises(ValueError, match=message):
        _select(tmp_path, str(weak), strong)


def test_parquet_errors_name_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"idx": [1, 2], "h": [0.1, 0.2]}), str(tmp_path / "w.parquet"))
    strong = _write(tmp_path / "s.jsonl", [1, 2], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"w.parquet: no column 'entropy' \(columns: idx, h\)"):
        _select(tmp_path, str(tmp_path / "w.parquet"), strong)
    _write(tmp_path / "w.parquet", [1, 2], [0.5, -1.0])
    with pytest.raises(ValueError, match=r"w.parquet row 1: idx 2 has entropy -1.0"):
        _select(tmp_path, str(tmp_path / "w.parquet"), strong)
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"x.parquet: cannot read as Parquet"):
        _select(tmp_path, str(tmp_path / "x.parquet"), strong)


def test_missing_file_is_named(tmp_path):
    strong = _write(tmp_path / "s.jsonl", [1], [1.0])
    with pytest.raises(FileNotFoundError, match=r"entropy file .*nope.jsonl does not exist"):
        _select(tmp_path, str(tmp_path / "nope.jsonl"), strong)


@pytest.mark.parametrize("key, a, b, message", [
    ("data_fingerprint", "abc", "abd", "are entropies of different data: data_fingerprint "
                                       "'abc' vs 'abd'"),
    ("vocab_size", 151936, 32000, "come from models with different vocabularies: vocab_size "
                                  "151936 vs 32000"),
])
def test_sidecars_that_disagree_are_an_error(tmp_path, key, a, b, message):
    meta = {"model": "m", "data_fingerprint": "abc", "vocab_size": 151936}
    weak = _write(tmp_path / "w.jsonl", [1, 2], [1.0, 2.0], {**meta, key: a})
    strong = _write(tmp_path / "s.jsonl", [1, 2], [0.5, 2.5], {**meta, key: b})
    with pytest.raises(ValueError) as err:
        _select(tmp_path, weak, strong)
    assert str(err.value).startswith(f"{weak} and {strong} ") and message in str(err.value)
    # One sidecar alone, or agreeing ones, are fine; they are recorded in the summary.
    Path(f"{strong}.meta.json").unlink()
    assert _select(tmp_path, weak, strong)["inputs"]["weak"]["meta"] == {**meta, key: a}


def test_all_zero_weights_are_an_error_unless_uniform_fallback(tmp_path):
    weak = _write(tmp_path / "w.jsonl", range(10), [0.0] * 10)
    strong = _write(tmp_path / "s.jsonl", range(10), [0.0] * 10)
    with pytest.raises(ZeroWeightsError, match=r"all 10 sampling weights are zero .* "
                                               r"--fallback uniform"):
        _select(tmp_path, weak, strong)
    summary = _select(tmp_path, weak, strong, fallback="uniform", num_samples=50)
    assert summary["fallback_used"] is True and summary["total_draws"] == 50
    assert {r["weight"] for r in _active(tmp_path / "out")} == {0.1}


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    weak, strong = _pair(tmp_path)
    run_select(weak, strong, tmp_path / "out")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        run_select(weak, strong, tmp_path / "out", SelectionConfig(seed=1))
    run_select(weak, strong, tmp_path / "out", SelectionConfig(seed=1), overwrite=True)
    assert _summary(tmp_path / "out")["seed"] == 1


# ---- the command ------------------------------------------------------------------------------

def test_command_end_to_end(tmp_path, capsys):
    weak, strong = _pair(tmp_path)
    out = tmp_path / "out"
    argv = ["--weak-entropy", weak, "--strong-entropy", strong, "--out", str(out),
            "--formula", "reference", "--alpha", "0.2", "--beta", "0.6", "--gamma", "0.2",
            "--num-samples", "400", "--seed", "5", "--no-dedupe"]
    assert select_main(argv) == 0
    stdout = capsys.readouterr().out
    summary = _summary(out)
    assert stdout.startswith(f"wrote {out}/active_set.jsonl: {summary['unique_kept']} unique "
                             f"of 300 samples")
    assert {k: summary[k] for k in ("formula", "alpha", "beta", "gamma", "num_samples", "seed",
                                    "dedupe")} == {
        "formula": "reference", "alpha": 0.2, "beta": 0.6, "gamma": 0.2, "num_samples": 400,
        "seed": 5, "dedupe": False}
    assert sorted(p.name for p in out.iterdir()) == ["active_set.jsonl", "summary.json",
                                                     "weights.png"]
    assert len(read_active_set(str(out / "active_set.jsonl"))) == 400


@pytest.mark.parametrize("extra, message", [
    ([], "output directory {out} exists; pass --overwrite"),
    (["--overwrite", "--gamma", "-1"], "gamma = -1.0 is invalid; allowed: a finite number >= 0"),
    (["--overwrite", "--alpha", "0", "--beta", "0", "--gamma", "0"], "alpha = beta = gamma = 0"),
    (["--overwrite", "--seed", "-3"], "seed = -3 is invalid"),
])
def test_command_user_errors_are_one_line_with_status_2(tmp_path, capsys, extra, message):
    weak, strong = _pair(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    assert select_main(["--weak-entropy", weak, "--strong-entropy", strong, "--out", str(out),
                        *extra]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("wmss select: error: ")
    assert message.format(out=out) in err[0]


def test_command_bad_argument_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        select_main(["--weak-entropy", "a", "--strong-entropy", "b", "--out", "o",
                     "--num-samples", "0"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "wmss select: error: argument --num-samples: must be >= 1, got 0 "
        "(see `wmss select -h`)"]
