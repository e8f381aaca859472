"""The launch files: the Slurm script and the Dockerfile pass their linters, and the image check
compares versions the way pip would, NGC pre-release torch builds included."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_wmss.platform.image_check import requirement_problems

REPO = Path(__file__).resolve().parents[2]


def _tool(name: str) -> str:
    # The venv's bin first: the dev extra installs both linters there.
    local = Path(sys.executable).parent / name
    path = str(local) if local.exists() else shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]' brings it on Linux x86_64)")
    return path


def test_the_slurm_script_passes_shellcheck():
    result = subprocess.run([_tool("shellcheck"), "-s", "bash", str(REPO / "launch" /
                                                                   "wmss.slurm")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dockerfile_passes_hadolint():
    result = subprocess.run([_tool("hadolint"), str(REPO / "Dockerfile")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dockerfile_pins_its_base_image_and_installs_with_make_venv():
    text = (REPO / "Dockerfile").read_text()
    base = next(line for line in text.splitlines() if line.startswith("ARG BASE_IMAGE="))
    assert base.split(":")[-1] not in ("latest", "") and "nvcr.io/nvidia/pytorch:" in base
    assert "RUN make venv" in text and "image_check --require-cuda-torch" in text


MEGATRON = (">=3.10", ["torch>=2.6.0", "numpy", 'tensorstore~=0.1; extra == "dev"',
                       'torch>=99; extra == "dev"'])
OURS = (">=3.10", ["torch>=2.4", "megatron-core<0.17,>=0.16.1"])


def test_image_check_accepts_an_ngc_image_and_names_each_mismatch():
    declared = {"megatron-core": MEGATRON, "megatron_wmss": OURS}
    # NGC 25.12: Python 3.12, torch 2.10.0a0+<commit>: a pre-release that pip accepts here.
    assert requirement_problems("3.12.3", "2.10.0a0+b4e4ee81d3", declared) == []
    problems = requirement_problems("3.9.18", "2.5.1", declared)
    assert problems == ["megatron-core needs Python >=3.10; this is 3.9.18",
                        "megatron-core needs torch>=2.6.0; this is torch 2.5.1",
                        "megatron_wmss needs Python >=3.10; this is 3.9.18"]
    assert requirement_problems("3.11.7", None, {"megatron_wmss": OURS}) == [
        "megatron_wmss needs torch>=2.4; torch is not installed"]


def test_image_check_passes_in_this_environment():
    result = subprocess.run([sys.executable, "-m", "megatron_wmss.platform.image_check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert '"megatron-core": "0.16.' in result.stdout and '"problems": []' in result.stdout
