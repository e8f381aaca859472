"""Activation memory of one micro-batch, term by term, for the layer implementations we run.

The method is that of Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models" (arXiv 2205.05198, §4 and Table 2), which Megatron-LM's own estimator
(``megatron/training/theoretical_memory_usage.py``) uses: count every tensor a layer keeps for
backward, in bytes per token, and divide the tensor-parallel ones by ``t`` (all of them under
sequence parallelism). Their 34·s·b·h + 5·a·s²·b is for a GPT with GELU MLP, LayerNorm and
dropout; the terms below are recounted for our decoder (RMSNorm, SwiGLU, GQA, RoPE, optional
q/k norms, no dropout) and for the two layer implementations:

``local`` (megatron's local spec: every CPU run, and GPUs without Transformer Engine), per
token and layer, ``e`` bytes per activation element, ``t`` TP size, ``p`` = t with sequence
parallelism else 1, ``dq = a·d``, ``dkv = g·d``::

    2 RMSNorms (torch's composite: fp32 input/upcast + fp32 normalised + fp32 rstd) 2·(8h + 4)/p
    linear inputs: QKV e·h/p, projection e·dq/t, fc1 e·h/p, fc2 e·f/t
    core attention: q, k and v (k, v repeated to all a heads) 3·e·dq/t,
        softmax output fp32 4·a·s/t, + its e copy e·a·s/t when e != 4
    SwiGLU: fc1 output 2f, silu output f, (x_linear + 0) f: 4·e·f/t
    q/k norms: as the norms, on dq/t and dkv/t channels
    RoPE: cos and sin for q and k, 4·s·d·e per layer

``te`` (Transformer Engine spec: fused norm+linear, flash/cuDNN attention, fused RoPE and
SwiGLU; derived from what those kernels save, not measured on this machine)::

    2 norm+linear: input e·h/p + normalised e·h/p + rstd 4/p (each)
    attention: q and k after RoPE e·(dq + dkv)/t, the QKV output (v is a view of it)
        e·(dq + 2·dkv)/t, output e·dq/t (also the projection's input), softmax LSE 4·a/t
    SwiGLU input e·2f/t, fc2 input e·f/t

Recomputation: ``selective`` keeps only the inputs of core attention (q, k after RoPE and the
QKV output); ``full`` keeps each layer's input ``e·h/p`` and recomputes one layer at a time in
backward, when that layer's whole set is live again. The ``local`` terms are exact against the
tensors autograd saves (``tests/unit/test_plan.py`` counts them with saved-tensor hooks).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_wmss.config import ModelConfig

__all__ = ["IMPLS", "Shape", "forward_working_bytes", "head_bytes", "kv_cache_bytes",
           "layer_bytes", "loss_workspace_bytes", "score_buffer_bytes"]

#: Layer implementations the formulas cover.
IMPLS = ("local", "te")
_CHUNK_TOKENS = 2048  # linear_cross_entropy's default chunk (tokens)
_TILE_ELEMENTS = 1 << 20  # its tile: fp32 logits


@dataclass(frozen=True)
class Shape:
    """One micro-batch at one layout: the sizes every formula reads."""

    cfg: ModelConfig
    tp: int
    seq: int
    """Tokens per row (s)."""
    batch: int
    """Rows per micro-batch (b)."""
    sequence_parallel: bool = False
    impl: str = "local"

    def __post_init__(self) -> None:
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {list(IMPLS)}, got {self.impl!r}")

    @property
    def tokens(self) -> int:
        return self.seq * self.batch

    @property
    def e(self) -> int:
        """Bytes per activation element (the parameter dtype)."""
        return 4 if self.cfg.params_dtype == "float32" else 2

    @property
    def p(self) -> int:
        """Divisor of the non-tensor-parallel terms: t under sequence parallelism."""
        return self.tp if self.sequence_parallel else 1

    @property
    def local_vocab(self) -> int:
        return self.cfg.padded_vocab_size(self.tp) // self.tp


def _dims(sh: Shape) -> tuple[int, int, int, int, int, int]:
    c, t = sh.cfg, sh.tp
    return (c.hidden_size, c.num_attention_heads // t, c.num_query_groups // t, c.head_dim,
            c.ffn_hidden_size // t, c.num_attention_heads // c.num_query_groups)


def layer_bytes(sh: Shape, recompute: str) -> dict[str, int]:
    """Bytes one transformer layer keeps for backward for one micro-batch, by term.

    ``recompute='full'`` gives the kept layer input only; the recomputed layer's own set is
    ``layer_bytes(sh, 'none')``.
    """
    h, a, g, d, f, ratio = _dims(sh)
    T, e, p, s = sh.tokens, sh.e, sh.p, sh.seq
    dq, dkv = a * d, g * d
    if recompute == "full":
        return {"layer input": T * e * h // p}
    if recompute not in ("none", "selective"):
        raise ValueError(f"recompute must be none, selective or full, got {recompute!r}")
    qkv_out = T * e * (dq + 2 * dkv)  # the QKV projection's output (q, k, v are views of it)
    keeps_qkv = recompute == "selective"
    terms: dict[str, int] = {}
    if sh.impl == "local":
        terms["norms"] = 2 * T * (8 * h + 4) // p
        terms["linear inputs"] = 2 * T * e * h // p + T * e * (dq + f)
        terms["swiglu"] = 4 * T * e * f
        terms["rope"] = 4 * s * d * e
        if sh.cfg.qk_layernorm:
            # q: an fp32 copy (bf16) or the reshape's copy of the grouped layout (fp32, more
            # than one group per rank); k: an fp32 copy (bf16) or, in fp32, a view that keeps
            # the QKV output alive.
            q_in = 4 * T * dq if (e != 4 or (ratio > 1 and g > 1)) else 0
            k_in = 4 * T * dkv if e != 4 else 0
            terms["q/k norms"] = q_in + k_in + 4 * T * (dq + dkv) + 4 * T * (a + g)
            keeps_qkv = keeps_qkv or e == 4
        if recompute == "none":
            probs = sh.batch * a * s * s
            # q, and k and v repeated to all heads; with a == g, v is a view of the QKV output
            qkv = T * e * dq * (3 if ratio > 1 else 2)
            terms["attention"] = qkv + probs * (4 + (e if e != 4 else 0))
            keeps_qkv = keeps_qkv or ratio == 1
        else:  # plus a 4-byte scalar megatron's checkpoint of core attention keeps
            terms["attention inputs"] = T * e * (dq + dkv) + 4
    else:
        terms["norm+linear"] = 2 * T * (2 * e * h + 4) // p
        terms["linear inputs"] = T * e * f
        terms["swiglu"] = 2 * T * e * f
        terms["rope"] = 4 * s * d
        if sh.cfg.qk_layernorm:  # TE norms keep their input and rstd
            terms["q/k norms"] = (T * e * dq if ratio > 1 and g > 1 else 0) + 4 * T * (a + g)
        terms["attention"] = T * e * (2 * dq + dkv)
        if recompute == "none":
            terms["attention"] += 4 * T * a
        keeps_qkv = True
    if keeps_qkv:
        terms["qkv output"] = qkv_out
    return terms


def score_buffer_bytes(sh: Shape) -> int:
    """megatron's GlobalMemoryBuffer ("mpu"), allocated once and kept: the local spec's
    ``[b·a/t, s, s]`` attention-score buffer, or the sequence-parallel all-gather target of a
    linear input ``[s, b, h]``, whichever is larger. Transformer Engine needs neither."""
    if sh.impl != "local":
        return 0
    h, a, *_ = _dims(sh)
    gathered = sh.tokens * h if sh.sequence_parallel else 0
    return sh.e * max(sh.batch * a * sh.seq * sh.seq, gathered)


def head_bytes(sh: Shape, cross_entropy: str, saved_models: int, hidden_models: int,
               recompute: str = "none") -> int:
    """What the last stage keeps for backward outside the layers, per micro-batch: the final
    norm of each trained model, what the loss saves (``hidden_models`` final hidden states for
    the chunked loss, which re-makes the logits in backward; the output layers' inputs and the
    fp32 ``exp(z − max)`` ``[T, V/t]`` for the unfused one), its [T] vectors (14 or 18 B per
    token, one more at TP > 1), and under full recompute the fp32 RoPE table ``[s, d]`` every
    checkpointed layer keeps (one per model)."""
    h = sh.cfg.hidden_size
    T, e, p = sh.tokens, sh.e, sh.p
    norm = T * (8 * h + 4) // p if sh.impl == "local" else T * (e * h + 4) // p
    if cross_entropy == "chunked":
        loss = hidden_models * T * e * h + 14 * T
    else:
        loss = saved_models * T * e * h // p + 4 * T * sh.local_vocab + 18 * T
    vectors = T if sh.tp > 1 else 0
    rope = saved_models * 4 * sh.seq * sh.cfg.head_dim if recompute == "full" else 0
    return saved_models * norm + loss + vectors + rope


def loss_workspace_bytes(sh: Shape, cross_entropy: str, models: int, trained: int,
                         chunk_tokens: int | None = None, gpu: bool = True) -> int:
    """Transient bytes of the loss beyond what it saves, at its peak.

    unfused (``loss/mixed_cross_entropy.py``; its fp32 exp is in :func:`head_bytes`): the
        models' ``[T, V/t]`` logits (dtype e) beside it in forward; in backward the logit
        gradients it makes (bf16: a new tensor per trained model; fp32: the exp buffer turned
        into the gradient in place, the strong model's a new one when the weak is trained
        too), then, with the exp freed unless it became a gradient, one output-layer weight
        gradient ``e·V/t·h``; the largest of these moments. On CPU, casting the fp32
        gradient into a bf16 one (``torch.mul(..., out=bf16)``) goes through an fp32
        temporary ``4·T·V/t``; CUDA casts on the fly.
    chunked (``loss/linear_cross_entropy.py``): per trained model an fp32 ``[V/t, h]`` weight
        gradient (+ its bf16 cast at return), an ``[T, h]`` hidden gradient and an fp32
        ``[chunk, h]`` accumulator; one fp32 tile of ≤ 2^20 logits (4 MiB); at TP > 1 without
        sequence parallelism the fp32 all-reduce buffer ``[T, Σh]`` (and its fp32 inputs
        when e = 2).
    """
    h, V, T, e = sh.cfg.hidden_size, sh.local_vocab, sh.tokens, sh.e
    if cross_entropy == "unfused":
        new_grads = trained * T * V * e if e != 4 else (T * V * 4 if trained == 2 else 0)
        exp_freed = 4 * T * V if e != 4 else 0
        cast = 4 * T * V if e != 4 and not gpu else 0
        return max(T * V * models * e, new_grads + cast, new_grads + e * V * h - exp_freed)
    if cross_entropy != "chunked":
        raise ValueError(f"cross_entropy must be unfused or chunked, got {cross_entropy!r}")
    chunk = min(chunk_tokens or _CHUNK_TOKENS, T)
    tile = 4 * chunk * min(V, max(1, _TILE_ELEMENTS // chunk))
    weight_grads = trained * V * h * (4 + (2 if e == 2 else 0))
    hidden_grads = trained * (T * e * h + 4 * chunk * h)
    reduce = 0
    if sh.tp > 1 and not sh.sequence_parallel:
        reduce = trained * T * h * (8 if e == 2 else 4)
    return weight_grads + hidden_grads + max(tile, reduce)


def forward_working_bytes(sh: Shape) -> int:
    """The largest set one layer holds while it runs without autograd (entropy passes,
    evaluation prefill): nothing is kept between layers but the residual stream.

    local attention: residual, QKV output, q/k/v repeated to all heads, and the scores
        ``b·a/t·s²`` as baddbmm output (e), fp32 upcast (e = 2) and fp32 softmax;
    te attention: residual, QKV output, rotated q/k, output;
    MLP: residual, normalised input, fc1 output 2f/t, and the SwiGLU's f/t temporaries
        (three in the local spec, one fused).
    """
    h, a, g, d, f, _ = _dims(sh)
    T, e, s = sh.tokens, sh.e, sh.seq
    dq, dkv = a * d, g * d
    if sh.impl == "local":
        scores = sh.batch * a * s * s * (e + (4 if e != 4 else 0) + 4)
        attention = T * e * (h + dq + 2 * dkv + 3 * dq) + scores
        mlp = T * e * (2 * h + 5 * f)
    else:
        attention = T * e * (h + 2 * dq + 3 * dkv + dq)
        mlp = T * e * (2 * h + 3 * f)
    return max(attention, mlp)


def kv_cache_bytes(cfg: ModelConfig, tp: int, batch: int, max_sequence: int) -> int:
    """megatron's StaticInferenceContext: keys and values of every layer, ``[max_sequence,
    batch, g/t, d]`` each, in the parameter dtype."""
    e = 4 if cfg.params_dtype == "float32" else 2
    return 2 * cfg.num_layers * max_sequence * batch * (cfg.num_query_groups // tp) \
        * cfg.head_dim * e
