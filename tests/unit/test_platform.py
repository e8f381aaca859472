"""Backend detection: GPU-only libraries are optional and never break import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_wmss.platform import backends


def test_importing_the_package_loads_no_gpu_library():
    code = (
        "import sys, megatron_wmss, megatron_wmss.loss, megatron_wmss.platform, "
        "megatron_wmss.testing\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('transformer_engine', 'apex')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.fixture
def fake_host(monkeypatch):
    """Pretend CUDA is (or is not) present and record module imports instead of doing them."""
    imported: list[str] = []

    def configure(cuda: bool, import_module=imported.append):
        monkeypatch.setattr(backends, "cuda_available", lambda: cuda)
        monkeypatch.setattr(backends.importlib, "import_module", import_module)
        return imported

    backends._importable.cache_clear()
    yield configure
    backends._importable.cache_clear()


def test_without_cuda_gpu_libraries_are_never_imported(fake_host):
    imported = fake_host(cuda=False)
    assert not backends.te_available() and not backends.apex_available()
    assert backends.default_device().type == "cpu"
    assert imported == []


def test_broken_transformer_engine_counts_as_absent(fake_host):
    # A TE wheel without its CUDA libraries raises RuntimeError at import, not ImportError.
    def broken_import(name):
        raise RuntimeError(f"{name}: libcudart.so not found")

    fake_host(cuda=True, import_module=broken_import)
    assert backends.te_available() is False
    assert backends.apex_available() is False


def test_working_transformer_engine_is_detected_when_cuda_exists(fake_host):
    imported = fake_host(cuda=True)
    assert backends.te_available() is True
    assert imported == ["transformer_engine.pytorch"]


def test_micro_batches_move_to_the_model_device():
    import torch

    from megatron_wmss.training import batch_to_device

    batch = {"tokens": torch.zeros(2, 8, dtype=torch.long), "idx": [3, 4]}
    moved = batch_to_device(batch, torch.device("meta"))
    assert moved["tokens"].device.type == "meta" and moved["idx"] == [3, 4]
