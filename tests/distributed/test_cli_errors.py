"""What a user sees when a ``wmss`` command fails: one line to act on, exit status 2.

Every case runs the real command line in a subprocess, on CPU (GPUs hidden, so the expected
TE/Apex fallback is in use and its warnings must not show): a bad argument on each command, a
truncated ``model.safetensors``, a layout that cannot split the model, and an error raised in a
spawned rank. ``--debug`` / ``WMSS_DEBUG=1`` bring the traceback back; so does any error that is
not the user's (exit status 1). One tiny Qwen2 model (4 heads), imported once, serves them all.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.test_interop import TOKENIZER_FILES, _hf_model

# Noise that must never reach a user on CPU, in the parent's or a rank's output.
NOISE = ("Traceback", "Transformer Engine", "Apex", "Warning")


def _wmss(*args: str, debug_env: bool = False, cwd: Path | None = None
          ) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WMSS_DEBUG", "PYTHONWARNINGS")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    if debug_env:
        env["WMSS_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-m", "megatron_wmss.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _assert_one_line_error(proc: subprocess.CompletedProcess, command: str, *names: str) -> str:
    """Exit status 2 and one stderr line ``wmss COMMAND: error: ...`` naming ``names``."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"wmss {command}: error: "), lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    for noise in NOISE:
        assert noise not in proc.stdout + proc.stderr, noise
    return lines[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(HF dir, single-model megatron checkpoint imported from it by ``wmss import-hf``, the
    import's process)."""
    root = tmp_path_factory.mktemp("cli-errors")
    hf_dir = root / "qwen2"
    _hf_model("qwen2", 1).save_pretrained(hf_dir)
    for fname, text in TOKENIZER_FILES.items():
        (hf_dir / fname).write_text(text)
    ckpt = root / "ckpt"
    proc = _wmss("import-hf", "--hf-dir", str(hf_dir), "--out", str(ckpt))
    return hf_dir, ckpt, proc


@pytest.fixture(scope="module")
def truncated(model, tmp_path_factory):
    """A copy of the HF model whose ``model.safetensors`` lost its second half."""
    hf_dir, _, _ = model
    out = tmp_path_factory.mktemp("truncated") / "qwen2"
    out.mkdir()
    for path in hf_dir.iterdir():
        data = path.read_bytes()
        (out / path.name).write_bytes(data[: len(data) // 2] if path.suffix == ".safetensors"
                                      else data)
    return out


def test_a_successful_import_prints_only_its_result(model):
    _, ckpt, proc = model
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"wrote {ckpt}\n"
    assert proc.stderr == ""  # no fallback warnings from the parent or the rank


def test_error_raised_in_a_spawned_rank(model, tmp_path):
    _, ckpt, _ = model
    out = tmp_path / "hf"
    proc = _wmss("export-hf", "--ckpt", str(ckpt), "--out", str(out), "--which", "weak")
    _assert_one_line_error(proc, "export-hf", str(ckpt), "which='weak'", "single-model")
    assert not out.exists()


def test_truncated_safetensors_file(truncated, tmp_path):
    proc = _wmss("import-hf", "--hf-dir", str(truncated), "--out", str(tmp_path / "ckpt"))
    _assert_one_line_error(proc, "import-hf", str(truncated / "model.safetensors"),
                           "not a valid safetensors file")


def test_layout_that_cannot_split_the_model(model, tmp_path):
    hf_dir, _, _ = model
    proc = _wmss("import-hf", "--hf-dir", str(hf_dir), "--out", str(tmp_path / "ckpt"),
                 "--tp", "3")
    _assert_one_line_error(proc, "import-hf", "--tp 3", str(hf_dir / "config.json"),
                           "num_attention_heads=4")


@pytest.mark.parametrize("command,args,names", [
    ("env", ["--bogus"], ["--bogus"]),
    ("train-tokenizer", ["--input", "x.txt", "--output-prefix", "sp", "--vocab-size", "ten"],
     ["--vocab-size", "'ten'"]),
    ("import-hf", ["--hf-dir", "d", "--out", "o", "--tp", "0"], ["--tp", "got 0"]),
    ("export-hf", ["--ckpt", "c", "--out", "o", "--which", "medium"], ["--which", "'medium'"]),
    ("extract", ["--ckpt", "c"], ["--out"]),
])
def test_bad_argument_on_every_command(command, args, names, tmp_path):
    proc = _wmss(command, *args, cwd=tmp_path)
    _assert_one_line_error(proc, command, *names)


def test_missing_input_file_is_named(tmp_path):
    missing = tmp_path / "no-corpus.txt"
    proc = _wmss("train-tokenizer", "--input", str(missing), "--output-prefix",
                 str(tmp_path / "sp"))
    _assert_one_line_error(proc, "train-tokenizer", str(missing))


@pytest.mark.parametrize("how", ["--debug", "WMSS_DEBUG=1"])
def test_debug_shows_the_traceback(truncated, tmp_path, how):
    args = ["import-hf", "--hf-dir", str(truncated), "--out", str(tmp_path / "ckpt")]
    proc = (_wmss("--debug", *args) if how == "--debug" else _wmss(*args, debug_env=True))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr
    assert "SafetensorError" in proc.stderr  # the root cause, chained
    assert proc.stderr.splitlines()[-1].startswith("wmss import-hf: error: ")


def test_unexpected_error_keeps_its_traceback(model, tmp_path):
    """A bug (here: a RuntimeError where the HF config is read) is not dressed up as the
    user's error: full traceback, exit status 1."""
    hf_dir, _, _ = model
    script = (
        "import sys\n"
        "import megatron_wmss.interop.hf_config as hc\n"
        "def boom(*a, **k):\n"
        "    raise RuntimeError('internal-bug-1234')\n"
        "hc.model_config_from_hf = boom\n"
        "from megatron_wmss.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "WMSS_DEBUG"}
    proc = subprocess.run([sys.executable, "-c", script, "import-hf", "--hf-dir", str(hf_dir),
                           "--out", str(tmp_path / "ckpt")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.rstrip().endswith("RuntimeError: internal-bug-1234")
    assert "wmss import-hf: error:" not in proc.stderr


def _fail_on_both_ranks():
    import time

    import torch.distributed as dist

    # Rank 0 reports first, as a peer of a failed rank often does; the user's error comes after.
    if dist.get_rank() == 0:
        raise RuntimeError("rank 0 lost its peer")
    time.sleep(0.5)
    raise ValueError("user-problem on rank 1\nmore")


def test_rank_failure_carries_type_and_message(capsys):
    """The parent gets each failing rank's exception type and message, not only its traceback,
    and reports the user's error in one line even when a peer's failure arrived first."""
    from megatron_wmss.platform.errors import run_command
    from megatron_wmss.testing import DistributedRunError, run_distributed

    with pytest.raises(DistributedRunError) as info:
        run_distributed(_fail_on_both_ranks, world_size=2, timeout=120)
    err = info.value
    assert "failed on rank 0" in str(err) and "then on rank 1" in str(err)  # the full report
    assert (err.rank, err.exc_type, err.exc_message) == (0, "RuntimeError", "rank 0 lost its peer")
    assert [(f.rank, f.exc_type, f.user_error) for f in err.failures] == [
        (0, "RuntimeError", False), (1, "ValueError", True)]

    def body():
        raise err

    assert run_command("wmss test", body) == 2
    assert capsys.readouterr().err == "wmss test: error: user-problem on rank 1 more\n"
