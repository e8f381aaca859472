"""CUDA-only checks: marked ``gpu`` and skipped, with the reason, where CUDA is absent.

Run on a GPU machine with ``pytest tests/gpu`` (``bench/gpu_check.sh`` does it with an offline
install). Everything else in the suite runs on CPU with gloo on every machine.
"""

from __future__ import annotations

import pytest
import torch

_REASON = "needs CUDA: torch.cuda.is_available() is False on this machine"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                # First, so that this reason is the one reported.
                item.add_marker(pytest.mark.skip(reason=_REASON), append=False)
