"""CPU shims for megatron-core 0.16.x: the few CUDA assumptions that stop it running on gloo.

megatron-core's math is device-agnostic, but some call sites hard-code CUDA: RNG state through
``torch.cuda``, ``torch.cuda.current_device()`` used as a device, ``device="cuda"`` factories,
``tensor.type() == 'torch.cuda.FloatTensor'`` checks, ``.cuda()`` copies and
``torch.cuda.synchronize()``. Each shim below targets named call sites of megatron-core 0.16.x
and nothing else: wherever possible it swaps the ``torch`` global of only the affected megatron
module for a :class:`_TorchView` (real torch with a few attributes overridden), so user code and
the rest of megatron keep the real ``torch``. The three shims that must touch a
``torch.Tensor`` method (``type``, ``cuda``) do so only for the duration of the megatron call
they target.

:func:`apply_cpu_shims` is a no-op when CUDA is available. Not shimmed on purpose: the
distributed optimizer's state resume (broken without TE/Apex on any device, see
``shared/notes/megatron-core-on-cpu.md``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types
from typing import Any, Callable, Iterable, Iterator

import torch

__all__ = ["SHIMS", "applied_shims", "apply_cpu_shims"]

logger = logging.getLogger(__name__)

_MCORE = "megatron.core."


class _TorchView(types.ModuleType):
    """``torch`` (or ``torch.cuda``) as seen by one megatron module: every attribute falls
    through to the real module, except those a shim set on this view."""

    def __init__(self, real: types.ModuleType) -> None:
        super().__init__(real.__name__, real.__doc__)
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _torch_view(module: str) -> _TorchView:
    """The ``torch`` view installed as ``megatron.core.<module>.torch`` (created once)."""
    mod = importlib.import_module(_MCORE + module)
    view = mod.torch
    if not isinstance(view, _TorchView):
        view = _TorchView(torch)
        mod.torch = view
    return view


def _cuda_view(module: str) -> _TorchView:
    """The ``torch.cuda`` view seen by ``megatron.core.<module>`` (created once)."""
    view = _torch_view(module)
    if "cuda" not in vars(view):
        view.cuda = _TorchView(torch.cuda)
    return view.cuda


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


def _on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``factory`` with a CUDA ``device=`` argument replaced by the CPU."""

    @functools.wraps(factory)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def _patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    """Set ``owner.name = value`` for the duration of the block."""
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def _during(owner: Any, name: str, make_context: Callable[[], Any]) -> None:
    """Run ``owner.name`` (a function or method) inside ``make_context()`` on every call."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with make_context():
            return original(*args, **kwargs)

    setattr(owner, name, wrapper)


_REAL_TENSOR_TYPE = torch.Tensor.type


def _cuda_type_name(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """``Tensor.type`` that names a CPU tensor by its CUDA type when called without arguments."""
    name = _REAL_TENSOR_TYPE(tensor, *args, **kwargs)
    if not args and not kwargs and tensor.device.type == "cpu":
        return name.replace("torch.", "torch.cuda.", 1)
    return name


def _cuda_type_names() -> contextlib.AbstractContextManager:
    """For the block, ``tensor.type()`` of a CPU tensor reads like that of a CUDA tensor."""
    return _patched(torch.Tensor, "type", _cuda_type_name)


# --------------------------------------------------------------------------------------------
# The shims. Each names the megatron-core 0.16.x call sites it targets.
# --------------------------------------------------------------------------------------------


def cuda_rng_on_cpu() -> None:
    """Map megatron's "CUDA" RNG state onto the CPU generator.

    Targets ``tensor_parallel/random.py`` (0.16.x): ``_get_cuda_rng_state`` /
    ``_set_cuda_rng_state`` (used by ``CudaRNGStatesTracker.fork``, entered around weight init
    and dropout, and by activation recompute) and ``torch.cuda.get_rng_state`` /
    ``torch.cuda.manual_seed`` in ``CudaRNGStatesTracker.add`` and
    ``model_parallel_cuda_manual_seed``. Without CUDA the first raises "Torch not compiled with
    CUDA enabled" and ``_set_cuda_rng_state`` silently queues a lazy call that never runs, so
    forks would not switch streams. On CPU the one generator plays both roles, so the tracker's
    "CPU RNG state changed within GPU RNG context" warning is always true and is filtered.
    """
    random = importlib.import_module(_MCORE + "tensor_parallel.random")

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    random._get_cuda_rng_state = get_state
    random._set_cuda_rng_state = set_state
    cuda = _cuda_view("tensor_parallel.random")
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.manual_seed = torch.manual_seed
    logging.getLogger(random.__name__).addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage()
    )


# Modules that pass ``torch.cuda.current_device()`` as ``device=`` on the paths the tests run;
# each one verified to fail without it (megatron-core 0.16.1).
_CURRENT_DEVICE_USERS = (
    "tensor_parallel.layers",
    "tensor_parallel.mappings",
    "models.common.embeddings.rotary_pos_embedding",
    "utils",
    "distributed.param_and_grad_buffer",
    "pipeline_parallel.p2p_communication",
    "dist_checkpointing.strategies.state_dict_saver",
    "transformer.attention",
)


def current_device_is_cpu() -> None:
    """Make ``torch.cuda.current_device()`` return ``"cpu"`` where megatron uses it as a device.

    Targets (0.16.x) weight allocation in ``tensor_parallel/layers.py``
    (``VocabParallelEmbedding``, ``ColumnParallelLinear``, ``RowParallelLinear`` ``__init__``),
    ``tensor_parallel/mappings.py::_gather_along_last_dim`` (``GPTModel(parallel_output=False)``),
    ``RotaryEmbedding.__init__`` (models/common/embeddings/rotary_pos_embedding.py),
    ``utils.GlobalMemoryBuffer.get_tensor`` (the score buffer of ``DotProductAttention``),
    ``_ParamAndGradBuffer.__init__`` (distributed/param_and_grad_buffer.py, megatron DDP),
    ``P2PCommunicator._communicate`` receive buffers (pipeline_parallel/p2p_communication.py)
    ``save_state_dict_async_finalize`` (dist_checkpointing/strategies/state_dict_saver.py)
    and ``Attention._allocate_memory`` (transformer/attention.py: the KV cache of a
    ``StaticInferenceContext``, evaluation's incremental decoding).
    Without CUDA each raises "Torch not compiled with CUDA enabled". Only as a device: megatron
    code that indexes devices with it is not on CPU paths.
    """
    for module in _CURRENT_DEVICE_USERS:
        _cuda_view(module).current_device = lambda: "cpu"


_FACTORIES = ("empty", "empty_like", "full", "ones", "tensor", "zeros", "zeros_like")
# Modules that call tensor factories with a literal ``device="cuda"`` on the paths the tests
# run; each one verified to fail without it (megatron-core 0.16.1).
_CUDA_FACTORY_USERS = (
    "pipeline_parallel.schedules",
    "optimizer.optimizer",
    "optimizer.clip_grads",
    "utils",
)


def cuda_factories_on_cpu() -> None:
    """Give the modules that build tensors with ``device="cuda"`` a torch that builds on CPU.

    Targets (0.16.x) ``total_num_tokens`` in every schedule of
    ``pipeline_parallel/schedules.py`` (``forward_backward_no_pipelining`` too, so even PP=1),
    the ``MixedPrecisionOptimizer`` / ``FP32Optimizer`` ``__init__`` buffers (``found_inf``,
    ``_scale``) in ``optimizer/optimizer.py``, ``get_grad_norm_fp32`` /
    ``clip_grad_by_total_norm_fp32`` / ``count_zeros_fp32`` in ``optimizer/clip_grads.py`` and
    ``utils.local_multi_tensor_l2_norm`` (the no-Apex grad norm). Without CUDA each raises
    "Torch not compiled with CUDA enabled". Only keyword ``device=`` arguments are rewritten:
    that is how every one of these call sites passes it.
    """
    for module in _CUDA_FACTORY_USERS:
        view = _torch_view(module)
        for name in _FACTORIES:
            setattr(view, name, _on_cpu(getattr(torch, name)))


def clip_grads_cpu_type_check() -> None:
    """Let ``clip_grad_by_total_norm_fp32`` accept fp32 CPU grads.

    Targets ``optimizer/clip_grads.py::clip_grad_by_total_norm_fp32`` (0.16.x), which asserts
    ``param.grad.type() == 'torch.cuda.FloatTensor'`` before scaling once clipping triggers
    (total norm above ``clip_grad``). For the length of that call ``Tensor.type()`` reports a
    CPU tensor under its CUDA name; the scaling itself is device-agnostic.
    """
    clip_grads = importlib.import_module(_MCORE + "optimizer.clip_grads")
    _during(clip_grads, "clip_grad_by_total_norm_fp32", _cuda_type_names)
    # optimizer.py imported the function by name before we wrapped it.
    optimizer = importlib.import_module(_MCORE + "optimizer.optimizer")
    optimizer.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32


def optimizer_param_type_strings() -> None:
    """Let the mixed-precision and distributed optimizers classify CPU params.

    Targets (0.16.x) ``Float16OptimizerWithFloat16Params.__init__`` (optimizer/optimizer.py)
    and ``DistributedOptimizer.__init__`` (via ``_build_model_and_main_param_groups``,
    optimizer/distrib_optimizer.py), which sort params by ``param.type()`` against
    ``'torch.cuda.{Float,Half,BFloat16}Tensor'`` and raise "Wrapped parameters must be one of
    ..." for anything else, e.g. fp32 CPU params in the distributed optimizer. The constructors
    run with CUDA type names for CPU tensors.
    """
    optimizer = importlib.import_module(_MCORE + "optimizer.optimizer")
    distrib = importlib.import_module(_MCORE + "optimizer.distrib_optimizer")
    _during(optimizer.Float16OptimizerWithFloat16Params, "__init__", _cuda_type_names)
    _during(distrib.DistributedOptimizer, "__init__", _cuda_type_names)


def tied_embedding_cuda_copy() -> None:
    """Make ``weight.data.cuda()`` an identity while tied embeddings are synchronized.

    Targets ``models/common/language_module/language_module.py::
    LanguageModule.setup_embeddings_and_output_layer`` (0.16.x): with
    ``share_embeddings_and_output_weights`` and PP>1 the first and last stages move the shared
    weight to CUDA before all-reducing it, which raises "Torch not compiled with CUDA enabled".
    """
    language_module = importlib.import_module(
        _MCORE + "models.common.language_module.language_module"
    )
    _during(
        language_module.LanguageModule,
        "setup_embeddings_and_output_layer",
        lambda: _patched(torch.Tensor, "cuda", lambda self, *args, **kwargs: self),
    )


# Modules that call ``torch.cuda.synchronize()`` on the paths the tests run.
_SYNCHRONIZE_USERS = (
    "pipeline_parallel.p2p_communication",
    "dist_checkpointing.strategies.filesystem_async",
)


def cuda_synchronize_noop() -> None:
    """Make ``torch.cuda.synchronize()`` a no-op where megatron waits for kernels.

    Targets (0.16.x) ``P2PCommunicator._communicate`` (``batch_p2p_sync``, on by default, PP>1)
    in ``pipeline_parallel/p2p_communication.py`` and ``FileSystemWriterAsync.preload_tensors``
    in ``dist_checkpointing/strategies/filesystem_async.py`` (every ``dist_checkpointing.save``).
    CPU kernels and waited-on gloo ops are complete on return, so there is nothing to wait for;
    without CUDA it raises "Torch not compiled with CUDA enabled".
    """
    for module in _SYNCHRONIZE_USERS:
        _cuda_view(module).synchronize = lambda device=None: None


SHIMS: dict[str, Callable[[], None]] = {
    shim.__name__: shim
    for shim in (
        cuda_rng_on_cpu,
        current_device_is_cpu,
        cuda_factories_on_cpu,
        clip_grads_cpu_type_check,
        optimizer_param_type_strings,
        tied_embedding_cuda_copy,
        cuda_synchronize_noop,
    )
}
_APPLIED: set[str] = set()


def apply_cpu_shims(skip: Iterable[str] = ()) -> list[str]:
    """Apply every shim in :data:`SHIMS` except those named in ``skip``; return their names in
    registry order. Idempotent: a shim already applied is not applied twice. A no-op returning
    ``[]`` when CUDA is available."""
    skip = set(skip)
    unknown = skip - SHIMS.keys()
    if unknown:
        raise ValueError(f"skip names unknown shims {sorted(unknown)}; known: {sorted(SHIMS)}")
    if torch.cuda.is_available():
        return []
    new = [name for name in SHIMS if name not in skip and name not in _APPLIED]
    for name in new:
        SHIMS[name]()
        _APPLIED.add(name)
    if new:
        logger.info("applied megatron-core CPU shims: %s", ", ".join(new))
    return [name for name in SHIMS if name not in skip and name in _APPLIED]


def applied_shims() -> list[str]:
    """Names of the shims applied in this process, sorted."""
    return sorted(_APPLIED)
