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
