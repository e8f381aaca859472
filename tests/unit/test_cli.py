"""The ``wmss`` entry point."""

from __future__ import annotations

import json

import pytest

from megatron_wmss import cli


def test_env_reports_versions_and_gpu_libraries(capsys):
    assert cli.main(["env"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["megatron_core"].startswith("0.16.")
    assert info["layer_spec"] == ("transformer_engine" if info["transformer_engine"] else "local")


def test_unknown_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["no-such-command"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_train_tokenizer_command_writes_a_usable_model(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i}: the weak model helps the strong one" for i in range(300)))
    assert cli.main(["train-tokenizer", "--input", str(corpus), "--output-prefix",
                     str(tmp_path / "sp"), "--vocab-size", "300"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["model"].endswith("sp.model") and (tmp_path / "sp.model").is_file()
    assert out["padded_vocab_size"] % 128 == 0 and out["padded_vocab_size"] >= out["vocab_size"]


def test_bad_argument_is_one_line_with_exit_status_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["import-hf", "--hf-dir", "d", "--out", "o", "--pp", "0"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "wmss import-hf: error: argument --pp: must be >= 1, got 0 (see `wmss import-hf -h`)"]


def test_user_errors_and_bugs_are_told_apart():
    from megatron_wmss.platform.errors import UserError, is_user_error

    for exc in (UserError("x"), ValueError("x"), FileNotFoundError("x"), FileExistsError("x"),
                KeyError("tensor 'w' is not in the HF checkpoint d")):
        assert is_user_error(exc), exc
    # A bare missing key is a bug, as are these.
    for exc in (KeyError("w"), RuntimeError("x"), AssertionError("x"), TypeError("x")):
        assert not is_user_error(exc), exc


def _rank_error(*failures):
    from megatron_wmss.platform.errors import DistributedRunError, RankFailure

    return DistributedRunError("report", [RankFailure(r, t, m, "tb", u)
                                          for r, t, m, u in failures])


def test_run_command_prints_the_first_rank_user_error_in_one_line(capsys, monkeypatch):
    import pickle

    from megatron_wmss.platform.errors import run_command

    monkeypatch.delenv("WMSS_DEBUG", raising=False)
    err = _rank_error((1, "RuntimeError", "peer gone", False),
                      (0, "KeyError", "tensor 'w' is\nnot in d", True))
    again = pickle.loads(pickle.dumps(err))  # the failures survive pickling
    assert str(again) == "report" and again.failures == err.failures and again.rank == 1

    def fail(exc):
        def body():
            raise exc
        return body

    assert run_command("wmss x", fail(err)) == 2
    assert capsys.readouterr().err == "wmss x: error: tensor 'w' is not in d\n"
    assert run_command("wmss x", fail(KeyError("tensor 'w' is not in d"))) == 2
    assert capsys.readouterr().err == "wmss x: error: tensor 'w' is not in d\n"  # no quotes
    bug = _rank_error((0, "AssertionError", "shapes differ", False))
    with pytest.raises(type(bug)):  # no user error among the failures: a bug, traceback
        run_command("wmss x", fail(bug))
    with pytest.raises(RuntimeError):
        run_command("wmss x", fail(RuntimeError("internal")))
    monkeypatch.setenv("WMSS_DEBUG", "1")
    assert run_command("wmss x", fail(ValueError("bad --tp"))) == 2
    err_text = capsys.readouterr().err
    assert "Traceback" in err_text and err_text.endswith("wmss x: error: bad --tp\n")


def test_a_rank_stopped_by_a_failed_peer_prints_that_error_in_one_line(capsys, monkeypatch):
    """Its own traceback would bury the failing rank's; it exits like that rank (never 0, never
    the preemption code 75, which the Slurm script requeues)."""
    import pickle

    from megatron_wmss.platform.errors import PeerFailure, run_command

    monkeypatch.delenv("WMSS_DEBUG", raising=False)
    bug = PeerFailure(0, "seed1/select1: selection", "TypeError", "bad\noperand", False)
    assert str(pickle.loads(pickle.dumps(bug))) == str(bug)

    def fail(exc):
        def body():
            raise exc
        return body

    assert run_command("wmss run", fail(bug)) == 1
    assert capsys.readouterr().err == (
        "wmss run: error: rank 0 failed (seed1/select1: selection): TypeError: bad operand\n")
    assert run_command("wmss run", fail(PeerFailure(3, None, "ValueError", "no file x", True))) == 2
    assert capsys.readouterr().err == "wmss run: error: rank 3 failed: no file x\n"


def test_debug_flag_is_scoped_to_the_command(capsys, monkeypatch):
    import os

    monkeypatch.delenv("WMSS_DEBUG", raising=False)
    assert cli.main(["--debug", "env"]) == 0
    assert "WMSS_DEBUG" not in os.environ
    json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("cuda", [False, True])
def test_fallback_warnings_are_hidden_only_without_cuda(monkeypatch, cuda):
    import warnings

    from megatron_wmss.platform import backends

    monkeypatch.setattr(backends, "cuda_available", lambda: cuda)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backends.quiet_expected_megatron_warnings()
        warnings.warn("Apex is not installed. Falling back to Torch Norm")
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch "
                      "optimizers.")
        warnings.warn("full scope is deprecated. Use empty cuda_graph_scope to capture the "
                      "whole layer.")
        warnings.warn("an unrelated warning")
    shown = [str(w.message) for w in caught]
    assert shown[-1] == "an unrelated warning"
    assert len(shown) == (3 if cuda else 1), shown  # the deprecation is hidden on any device
