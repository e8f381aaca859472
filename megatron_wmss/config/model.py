"""Model and parallel-layout configuration for decoder LMs of the Llama / Qwen2 / Qwen3 family.

Every default lives here; the model builder maps these onto megatron-core's
``TransformerConfig``. Strong and weak models use the same architecture (the weak model is an
earlier checkpoint of the strong one), so one ``ModelConfig`` usually describes both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_wmss.config.vocab import padded_vocab_size

__all__ = ["ARCHITECTURE_FIELDS", "ModelConfig", "ParallelConfig", "check_same_architecture"]

_DTYPES = ("float32", "bfloat16")
_FP8_FORMATS = (None, "hybrid", "e4m3")
_FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
_IMPLS = ("auto", "transformer_engine", "local")


def _positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive int, got {value!r}")


def _choice(obj, name: str, allowed) -> None:
    value = getattr(obj, name)
    if value not in allowed:
        raise ValueError(f"{type(obj).__name__}.{name} must be one of {list(allowed)}, "
                         f"got {value!r}")


@dataclass
class ModelConfig:
    """Architecture and numerics of one decoder LM (RMSNorm, SwiGLU, RoPE, GQA)."""

    num_layers: int
    """Transformer layers."""
    hidden_size: int
    """Model width."""
    ffn_hidden_size: int
    """Width of each SwiGLU branch (gate and up projections each have this many outputs)."""
    num_attention_heads: int
    """Query heads."""
    vocab_size: int
    """Tokenizer vocabulary (unpadded); see ``padded_vocab_size``."""
    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention; None means one per query head."""
    head_dim: Optional[int] = None
    """Channels per head; None means hidden_size // num_attention_heads (Qwen3 sets 128)."""
    max_position_embeddings: int = 4096
    """Longest sequence the RoPE tables are built for (paper: 4096)."""
    rotary_base: float = 10000.0
    """RoPE base (Llama 3: 500000, Qwen2.5/Qwen3: 1000000)."""
    norm_epsilon: float = 1e-6
    """RMSNorm epsilon."""
    qk_layernorm: bool = False
    """RMSNorm on queries and keys per head (Qwen3)."""
    add_qkv_bias: bool = False
    """Bias on the query/key/value projection only (Qwen2/2.5)."""
    tie_word_embeddings: bool = False
    """Share the input embedding and the output layer (Qwen3-4B and smaller)."""
    init_method_std: float = 0.02
    """Std of the normal init of fresh weights."""
    hidden_dropout: float = 0.0
    """Dropout probability after the attention and MLP blocks while training, in [0, 1).
    Off by default (SFT-style fine-tuning); checkpoints' model descriptions store 0 (they
    describe the model for inference)."""
    attention_dropout: float = 0.0
    """Dropout probability on the attention weights while training, in [0, 1)."""
    make_vocab_size_divisible_by: int = 128
    """The vocab is padded to a multiple of this times the tensor-parallel size."""
    params_dtype: str = "bfloat16"
    """Parameter and activation dtype: float32 or bfloat16. Logits and losses are fp32 always."""
    fp8: Optional[str] = None
    """FP8 GEMMs in the transformer layers (Transformer Engine on CUDA only): null|hybrid|e4m3."""
    fp8_recipe: str = "delayed"
    """FP8 scaling recipe: delayed, tensorwise, mxfp8 (Blackwell) or blockwise."""
    fp8_amax_history_len: int = 1024
    """Delayed scaling: length of the amax history window."""
    fp8_amax_compute_algo: str = "max"
    """Delayed scaling: how the scale is computed from the history: max or most_recent."""
    fp8_margin: int = 0
    """Delayed scaling: power-of-two margin on the FP8 scale."""
    transformer_impl: str = "auto"
    """Layer implementation: auto (Transformer Engine where CUDA and TE exist), or forced."""

    def __post_init__(self) -> None:
        _positive(self, "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                  "vocab_size", "max_position_embeddings", "make_vocab_size_divisible_by",
                  "fp8_amax_history_len")
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"ModelConfig.hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}; set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        _positive(self, "num_query_groups", "head_dim")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"ModelConfig.num_attention_heads={self.num_attention_heads} must be a multiple "
                f"of num_query_groups={self.num_query_groups}")
        if self.rotary_base <= 0 or self.norm_epsilon <= 0 or self.init_method_std <= 0:
            raise ValueError("ModelConfig.rotary_base, norm_epsilon and init_method_std must be "
                             f"> 0, got {self.rotary_base}, {self.norm_epsilon}, "
                             f"{self.init_method_std}")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0.0 <= value < 1.0:
                raise ValueError(f"ModelConfig.{name} must be a probability in [0, 1), "
                                 f"got {value!r}")
        _choice(self, "params_dtype", _DTYPES)
        _choice(self, "fp8", _FP8_FORMATS)
        _choice(self, "fp8_recipe", _FP8_RECIPES)
        _choice(self, "fp8_amax_compute_algo", ("max", "most_recent"))
        _choice(self, "transformer_impl", _IMPLS)
        if self.fp8 is not None and self.transformer_impl == "local":
            raise ValueError("ModelConfig.fp8 needs transformer_impl 'auto' or "
                             "'transformer_engine' (FP8 GEMMs come from Transformer Engine)")

    def padded_vocab_size(self, tensor_parallel_size: int) -> int:
        """Vocabulary rows of the embedding and output layer at this tensor-parallel size."""
        return padded_vocab_size(self.vocab_size, tensor_parallel_size,
                                 self.make_vocab_size_divisible_by)

    def check_parallel(self, parallel: "ParallelConfig") -> None:
        """Raise ValueError when the layout cannot split this model evenly."""
        tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
        for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
            value = getattr(self, name)
            if value % tp:
                raise ValueError(f"tensor_model_parallel_size={tp} must divide "
                                 f"ModelConfig.{name}={value}")
        if self.num_layers % pp:
            raise ValueError(f"pipeline_model_parallel_size={pp} must divide "
                             f"ModelConfig.num_layers={self.num_layers}")


# Fields that must agree between the strong and the weak model: the mixed loss needs the same
# vocabulary shards, and pipeline stages hold the same layer ranges of both.
ARCHITECTURE_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "head_dim", "vocab_size", "make_vocab_size_divisible_by", "max_position_embeddings",
    "rotary_base", "norm_epsilon", "qk_layernorm", "add_qkv_bias", "tie_word_embeddings",
)


def check_same_architecture(strong: ModelConfig, weak: ModelConfig) -> None:
    """Raise ValueError naming the first architecture field on which the two models differ."""
    for name in ARCHITECTURE_FIELDS:
        a, b = getattr(strong, name), getattr(weak, name)
        if a != b:
            raise ValueError(f"strong and weak models differ in {name}: strong={a!r}, weak={b!r} "
                             "(WMSS mixes two checkpoints of one architecture)")


@dataclass
class ParallelConfig:
    """How the model is split over ranks; data parallel is what the world size leaves."""

    tensor_model_parallel_size: int = 1
    """Ranks that split each layer (and the vocabulary)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline stages; each holds the same layer range of the strong and the weak model."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tensor_model_parallel_size > 1)."""

    def __post_init__(self) -> None:
        _positive(self, "tensor_model_parallel_size", "pipeline_model_parallel_size")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("ParallelConfig.sequence_parallel needs "
                             "tensor_model_parallel_size > 1")
