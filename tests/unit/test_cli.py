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
