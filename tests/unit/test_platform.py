"""Backend detection: GPU-only libraries are optional and never break import."""

from __future__ import annotations

import subprocess
import sys

from megatron_wmss.platform import backends


def test_importing_the_package_loads_no_gpu_library():
    code = (
        "import sys, megatron_wmss, megatron_wmss.loss, megatron_wmss.platform, "
        "megatron_wmss.testing\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('transformer_engine', 'apex')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_without_cuda_gpu_libraries_are_never_imported(monkeypatch):
    imported = []
    backends._importable.cache_clear()
    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    monkeypatch.setattr(backends.importlib, "import_module", imported.append)
    try:
        assert not backends.te_available() and not backends.apex_available()
        assert backends.default_device().type == "cpu"
        assert imported == []
    finally:
        backends._importable.cache_clear()


def test_broken_transformer_engine_counts_as_absent(monkeypatch):
    # A TE wheel without its CUDA libraries raises RuntimeError at import, not ImportError.
    def broken_import(name):
        raise RuntimeError(f"{name}: libcudart.so not found")

    backends._importable.cache_clear()
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    monkeypatch.setattr(backends.importlib, "import_module", broken_import)
    try:
        assert backends.te_available() is False
        assert backends.apex_available() is False
    finally:
        backends._importable.cache_clear()


def test_working_transformer_engine_is_detected_when_cuda_exists(monkeypatch):
    seen = []
    backends._importable.cache_clear()
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    monkeypatch.setattr(backends.importlib, "import_module", seen.append)
    try:
        assert backends.te_available() is True
        assert seen == ["transformer_engine.pytorch"]
    finally:
        backends._importable.cache_clear()
