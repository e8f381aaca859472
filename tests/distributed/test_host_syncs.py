"""No host synchronisation in the loss path on an accelerator.

Every loss runs here with ``host_sync_costs`` answering True, as it does for CUDA tensors,
while a dispatch mode records each op that reads a device value on the host
(``aten._local_scalar_dense``: ``.item()``, ``bool()``, ``int()``; ``nonzero``, whose size is
data-dependent; ``equal``). Forward and backward must issue none, at TP 1 and TP 2 (gloo),
once the first call has checked the shard sizes of its process group.
"""

from __future__ import annotations

import pytest
import torch

from megatron_wmss.testing import run_distributed

SYNC_OPS = ("_local_scalar_dense", "is_nonzero", "nonzero", "equal", "allclose", "item")
T, V, H, REAL = 12, 64, 8, 50  # global padded vocabulary V, REAL real columns


def _sync_counts():
    import torch.distributed as dist
    from torch.utils._python_dispatch import TorchDispatchMode

    from megatron.core import parallel_state as ps

    from megatron_wmss.loss import (
        cross_entropy,
        linear_cross_entropy,
        linear_mixed_cross_entropy,
        mixed_cross_entropy,
        vocab_parallel,
    )

    class Syncs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(name in str(func) for name in SYNC_OPS):
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    vocab_parallel.host_sync_costs = lambda tensor: True  # behave as on CUDA
    group = ps.get_tensor_model_parallel_group() if dist.get_world_size() > 1 else None
    rank, size = vocab_parallel.shard_rank_and_size(group)
    v = V // size
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, REAL, (T,), generator=gen)
    target[::5] = -100
    z = [torch.randn(T, V, generator=gen)[:, rank * v:(rank + 1) * v].requires_grad_()
         for _ in range(2)]
    h = [torch.randn(T, H, generator=gen).requires_grad_() for _ in range(2)]
    w = [torch.randn(V, H, generator=gen)[rank * v:(rank + 1) * v].requires_grad_()
         for _ in range(2)]
    common = dict(tp_group=group, vocab_size=REAL)
    losses = {
        "mixed": lambda: mixed_cross_entropy(z[0], z[1], target, 0.5, **common),
        "sft": lambda: cross_entropy(z[0], target, **common),
        "linear_mixed": lambda: linear_mixed_cross_entropy(h[0], h[1], w[0], w[1], target, 0.5,
                                                           chunk_size=5, **common),
        "linear_sft": lambda: linear_cross_entropy(h[0], w[0], target, chunk_size=5, **common),
    }
    counts = {}
    for name, loss in losses.items():
        loss().sum().backward()  # the first call per group checks the shard sizes
        with Syncs() as syncs:
            loss().sum().backward()
        counts[name] = syncs.ops
    bad = target.clone()
    bad[1] = REAL + 3  # a padded column: outside the real vocabulary
    try:
        cross_entropy(z[0], bad, **common)
        asserted = None
    except RuntimeError as err:  # the asynchronous device assert (immediate on the CPU)
        asserted = str(err)
    return counts, asserted


@pytest.mark.parametrize("tp", [1, 2])
def test_loss_forward_and_backward_read_nothing_on_the_host(tp):
    for counts, asserted in run_distributed(_sync_counts, world_size=tp, tp=tp, timeout=120):
        assert counts == {"mixed": [], "sft": [], "linear_mixed": [], "linear_sft": []}
        assert asserted is not None and "outside [0, 50)" in asserted


def test_the_counter_sees_the_cpu_checks():
    """Without the accelerator path the same losses do read the target check on the host,
    so the counter above is not blind."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from megatron_wmss.loss import cross_entropy

    seen = []

    class Syncs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(name in str(func) for name in SYNC_OPS):
                seen.append(str(func))
            return func(*args, **(kwargs or {}))

    logits = torch.randn(4, 8)
    with Syncs():
        cross_entropy(logits, torch.tensor([0, 1, -100, 7]))
    assert seen
    with pytest.raises(ValueError, match="token id 9 outside"):
        cross_entropy(logits, torch.tensor([0, 9, -100, 7]))


def test_the_step_checks_labels_on_the_host_side():
    from megatron_wmss.training.step import _check_labels_on_host

    model = torch.nn.Linear(1, 1)
    model.real_vocab_size = 50
    _check_labels_on_host(model, torch.tensor([[1, -100, 49]]))
    with pytest.raises(ValueError, match=r"labels\[1, 0\] = 50 lies outside the model's "
                                         r"vocabulary \[0, 50\)"):
        _check_labels_on_host(model, torch.tensor([[1, 2], [50, -100]]))
