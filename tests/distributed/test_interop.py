"""HF ⇄ megatron checkpoint interop against transformers itself, on CPU, no downloads.

Three tiny random fp32 models — Llama (untied, sharded safetensors with an index), Qwen2 (QKV
bias), Qwen3 (q/k norm, tied embeddings, head_dim ≠ hidden/heads) — with vocab 300, which pads
to 384 rows at TP=1 and 512 at TP=2. Each layout spawn imports all of them, loads the written
checkpoint into a freshly initialised model and returns the megatron logits; the parent compares
them with transformers' logits. One world-size-1 spawn exports every checkpoint back to HF
(resharding from TP=2/PP=2), plus both halves of a joint checkpoint; the parent checks the HF
files are bit-identical to the originals and that the exported strong model, loaded with
``AutoModelForCausalLM``, reproduces the joint model's strong logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_wmss.testing import run_distributed

VOCAB, BATCH, SEQ = 300, 2, 12
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
# fp32 on both sides; the two implementations differ only in summation order (fused QKV vs
# three GEMMs, row-parallel partial sums, attention kernels): measured ≲1e-6 on logits of ~1.
LOGIT_ATOL = 1e-4
CONFIG_FIELDS = ("architectures", "model_type", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "rms_norm_eps", "rope_parameters", "rope_theta", "tie_word_embeddings",
                 "vocab_size", "max_position_embeddings", "attention_bias", "hidden_act")
TOKENIZER_FILES = {"tokenizer_config.json": '{"model_max_length": 64}\n',
                   "special_tokens_map.json": '{"eos_token": "</s>"}\n'}


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))


def _hf_labels() -> torch.Tensor:
    """transformers' labels for ``_tokens()``: the tokens, -100 where no loss is taken (HF
    shifts them itself)."""
    labels = _tokens().clone()
    labels[0, 2:5] = -100  # a prompt-like stretch without loss
    return labels


def _labels() -> torch.Tensor:
    """The same supervision in this project's convention: position t predicts token t+1."""
    hf = _hf_labels()
    return torch.cat([hf[:, 1:], torch.full((BATCH, 1), -100)], dim=1)


def _hf_model(name: str, seed: int):
    import transformers as tf

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                  max_position_embeddings=64, rms_norm_eps=1e-5)
    if name == "llama":
        cfg = tf.LlamaConfig(**common, rope_theta=500000.0, tie_word_embeddings=False)
        cls = tf.LlamaForCausalLM
    elif name == "qwen2":
        cfg = tf.Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=False)
        cls = tf.Qwen2ForCausalLM
    else:
        cfg = tf.Qwen3Config(**common, head_dim=32, rope_theta=1000000.0,
                             tie_word_embeddings=True)
        cls = tf.Qwen3ForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # HF initialises biases to 0 and norms to 1: randomise everything so that a swapped
        # or transposed tensor cannot hide.
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if "norm" in pname else 0.08 * noise)
    return model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (HF dir, reference logits [b, s, V]); ``qwen3_strong`` is the joint's strong."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, arch, seed in (("llama", "llama", 1), ("qwen2", "qwen2", 2), ("qwen3", "qwen3", 3),
                             ("qwen3_strong", "qwen3", 4)):
        model = _hf_model(arch, seed)
        directory = root / name
        # The Llama checkpoint is written in ~40 KB shards: the index path.
        model.save_pretrained(directory, max_shard_size="40KB" if name == "llama" else "1GB")
        for fname, text in TOKENIZER_FILES.items():
            (directory / fname).write_text(text)
        with torch.no_grad():
            out[name] = (str(directory), model(_tokens()).logits.float())
    assert (root / "llama" / "model.safetensors.index.json").is_file()
    return out


def _forward(model, tokens, labels=None):
    """Megatron logits ``[b, s, V]`` (vocab gathered over TP, padding dropped), or with
    ``labels`` the mean loss over supervised tokens, on the last stage; None elsewhere. Stages
    are chained by hand with point-to-point send/recv."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    b, s = tokens.shape
    positions = torch.arange(s).expand(b, s)
    mask = torch.ones(1, 1, s, s, dtype=torch.bool).triu_(1)
    with torch.no_grad():
        if not ps.is_pipeline_first_stage():
            hidden = torch.empty(s, b, model.config.hidden_size)
            dist.recv(hidden, ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(tokens, positions, mask, labels=labels)
        if not ps.is_pipeline_last_stage():
            dist.send(out.contiguous(), ps.get_pipeline_model_parallel_next_rank())
            return None
    if labels is not None:  # per-token loss [b, s], 0 where labels are -100
        return float(out.sum() / (labels != -100).sum())
    outs = out if isinstance(out, tuple) else (out,)
    full = tuple(gather_from_tensor_model_parallel_region(o)[..., :VOCAB].clone() for o in outs)
    return full if isinstance(out, tuple) else full[0]


def _layout_run(cases, workdir, tokens, joint):
    from megatron.core import parallel_state as ps

    from megatron_wmss.interop import (
        import_hf,
        load_joint_from_checkpoints,
        read_model_metadata,
        write_joint_checkpoint,
    )
    from megatron_wmss.interop.convert import build_stage_model
    from megatron_wmss.models import JointGPTModel
    from megatron_wmss.models.checkpoint import load_model_checkpoint

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    result = {}
    for name, hf_dir in cases.items():
        ckpt = Path(workdir) / f"{name}-tp{tp}pp{pp}"
        import_hf(hf_dir, ckpt)
        cfg = read_model_metadata(ckpt).model
        # A fresh model with other random weights: only the checkpoint can make it right.
        model = build_stage_model(cfg, seed=123)
        load_model_checkpoint(model, ckpt)
        result[name] = _forward(model, tokens)
        if name == "qwen3":
            # Imported Qwen3: the padded vocabulary rows are zero, and their logits must stay
            # out of the softmax, in SFT and in joint training at λ = 1 alike.
            result["qwen3_sft_loss"] = _forward(model, tokens, _labels())
            other = build_stage_model(cfg, seed=5)  # a weak model that must not count at λ=1
            result["qwen3_joint_loss_lambda1"] = _forward(
                JointGPTModel(model, other, mix_lambda=1.0), tokens, _labels())
        if (tp, pp) == (1, 1):
            # megatron's own local -> checkpoint key map spells names the TE way.
            result[f"{name}_sharded_keys"] = [
                (k, v.key) for k, v in model.sharded_state_dict().items()
                if hasattr(v, "key") and not k.endswith("_extra_state")]
    if joint:
        strong, weak = (Path(workdir) / f"{n}-tp{tp}pp{pp}" for n in ("qwen3_strong", "qwen3"))
        write_joint_checkpoint(strong, weak, Path(workdir) / "joint")
        cfg = read_model_metadata(strong).model
        fresh = JointGPTModel(build_stage_model(cfg, seed=7), build_stage_model(cfg, seed=8))
        load_joint_from_checkpoints(fresh, strong, weak)
        result["joint_direct"] = _forward(fresh, tokens)
        reloaded = JointGPTModel(build_stage_model(cfg, seed=9), build_stage_model(cfg, seed=10))
        load_model_checkpoint(reloaded, Path(workdir) / "joint")
        result["joint"] = _forward(reloaded, tokens)
    return result


@pytest.fixture(scope="module")
def layouts(hf_models, tmp_path_factory):
    """(tp, pp) -> the last stage's results; the megatron checkpoints live in ``workdir``."""
    workdir = tmp_path_factory.mktemp("mcore")
    cases = {name: d for name, (d, _) in hf_models.items()}
    out = {}
    for tp, pp in LAYOUTS:
        joint = (tp, pp) == (2, 2)
        ranks = run_distributed(_layout_run, world_size=tp * pp, tp=tp, pp=pp,
                                args=(cases, str(workdir), _tokens(), joint), timeout=300)
        last = [r for r in ranks if r["llama"] is not None]
        for r in last:  # keys lists are not tensors; compare only the logits below
            for k in [k for k in r if k.endswith("_sharded_keys")]:
                out.setdefault("sharded_keys", {})[k[: -len("_sharded_keys")]] = r.pop(k)
        assert len(last) == tp  # every TP rank of the last stage gathered the full vocab
        for r in last[1:]:
            assert all(torch.equal(torch.stack(list(_as_tuple(r[k]))),
                                   torch.stack(list(_as_tuple(last[0][k]))))
                       for k in r if not k.endswith("_loss") and not k.endswith("lambda1"))
        out[(tp, pp)] = last[0]
    return workdir, out


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_imported_logits_match_transformers(hf_models, layouts, tp, pp):
    _, results = layouts
    for name, (_, ref) in hf_models.items():
        got = results[(tp, pp)][name]
        diff = float((got - ref).abs().max())
        print(f"max |logit diff| {name} tp{tp} pp{pp}: {diff:.2e}")
        assert diff <= LOGIT_ATOL, (name, tp, pp, diff)
        assert float(ref.abs().max()) > 0.5  # the comparison is not between tiny numbers


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_sft_and_joint_lambda1_losses_match_transformers(hf_models, layouts, tp, pp):
    """Vocab 300 pads to 384 rows at TP=1 and 512 at TP=2: the loss over the real vocabulary
    is transformers' loss at every layout (fp32: summation order only, well under 1e-5)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_models["qwen3"][0]).eval()
    with torch.no_grad():
        want = float(model(_tokens(), labels=_hf_labels()).loss)
    _, results = layouts
    for key in ("qwen3_sft_loss", "qwen3_joint_loss_lambda1"):
        got = results[(tp, pp)][key]
        print(f"{key} tp{tp} pp{pp}: {got:.7f} vs transformers {want:.7f}")
        assert abs(got - want) <= 1e-5, (key, got, want)


def test_te_spec_names_agree_with_megatrons_checkpoint_keys(hf_models, layouts):
    """The TE table spelling is what megatron itself maps local-spec names to (Transformer
    Engine cannot run here, so its fused-norm names are checked against this map)."""
    import re

    from megatron_wmss.interop.mapping import DECODER_TABLE

    _, results = layouts
    checked = set()
    for name, pairs in results["sharded_keys"].items():
        assert pairs, name
        for local, sharded in pairs:
            generic = re.sub(r"^decoder\.layers\.\d+\.", "decoder.layers.{i}.", local)
            rows = [r for r in DECODER_TABLE if r.megatron == generic]
            assert rows, local
            te = (rows[0].te or rows[0].megatron).replace("{i}.", "")
            assert sharded == te, (local, sharded, te)
            checked.add(generic)
    # Both fused norms, QKV bias (Qwen2) and q/k norms (Qwen3) were among the names checked.
    assert {r.megatron for r in DECODER_TABLE if r.te} <= checked
    assert any("linear_qkv.bias" in n for n in checked)
    assert any("q_layernorm" in n for n in checked)


def _export_run(workdir, names):
    from megatron_wmss.interop import export_hf, extract_megatron

    work = Path(workdir)
    for name in names:
        export_hf(work / f"{name}-tp2pp2", work / f"hf-{name}", max_shard_size="30KB")
    export_hf(work / "joint", work / "hf-joint-strong", which="strong")
    export_hf(work / "joint", work / "hf-joint-weak", which="weak")
    extract_megatron(work / "joint", work / "extracted-strong")
    export_hf(work / "extracted-strong", work / "hf-extracted-strong")
    return True


@pytest.fixture(scope="module")
def exported(hf_models, layouts):
    workdir, _ = layouts
    run_distributed(_export_run, world_size=1, args=(str(workdir), ["llama", "qwen2", "qwen3"]),
                    timeout=300)
    return workdir


def _safetensors(directory):
    from safetensors.torch import load_file

    files = sorted(Path(directory).glob("*.safetensors"))
    assert files, directory
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def _assert_same_hf_model(got_dir, want_dir):
    got, want = _safetensors(got_dir), _safetensors(want_dir)
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key
    got_cfg = json.loads((Path(got_dir) / "config.json").read_text())
    want_cfg = json.loads((Path(want_dir) / "config.json").read_text())
    for field in CONFIG_FIELDS:
        assert got_cfg.get(field) == want_cfg.get(field), field
    for fname, text in TOKENIZER_FILES.items():
        assert (Path(got_dir) / fname).read_text() == text


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_export_round_trip_is_bit_identical(hf_models, exported, name):
    out = exported / f"hf-{name}"
    _assert_same_hf_model(out, hf_models[name][0])
    # 30 KB shards: every export here is written as an index plus several files.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (out / "generation_config.json").is_file()


def test_extracted_strong_model_serves_the_joint_strong_logits(hf_models, layouts, exported):
    from transformers import AutoModelForCausalLM

    _, results = layouts
    strong_logits, weak_logits = results[(2, 2)]["joint"]
    direct_strong, direct_weak = results[(2, 2)]["joint_direct"]
    assert torch.equal(strong_logits, direct_strong) and torch.equal(weak_logits, direct_weak)
    # The halves are different models, so a strong/weak swap would show.
    assert float((strong_logits - weak_logits).abs().max()) > 0.1
    for directory in ("hf-joint-strong", "hf-extracted-strong"):
        model = AutoModelForCausalLM.from_pretrained(exported / directory).eval()
        assert type(model).__name__ == "Qwen3ForCausalLM"
        with torch.no_grad():
            logits = model(_tokens()).logits.float()
        diff = float((logits - strong_logits).abs().max())
        print(f"max |logit diff| {directory} vs joint strong (tp2 pp2): {diff:.2e}")
        assert diff <= LOGIT_ATOL, directory
        _assert_same_hf_model(exported / directory, hf_models["qwen3_strong"][0])
    _assert_same_hf_model(exported / "hf-joint-weak", hf_models["qwen3"][0])


def test_cli_bf16_import_at_tp2_then_export_round_trips(tmp_path, capsys):
    from megatron_wmss.interop import read_model_metadata
    from megatron_wmss.interop.cli import export_main, import_main

    hf_dir = tmp_path / "hf-bf16"
    _hf_model("qwen2", 5).to(torch.bfloat16).save_pretrained(hf_dir)
    for fname, text in TOKENIZER_FILES.items():
        (hf_dir / fname).write_text(text)
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    assert import_main(["--hf-dir", str(hf_dir), "--out", str(ckpt), "--tp", "2"]) == 0
    assert read_model_metadata(ckpt).model.params_dtype == "bfloat16"  # the stored dtype
    out.mkdir()
    (out / "stale.txt").write_text("old")
    # An existing output is refused before any rank starts, and replaced with --overwrite.
    assert export_main(["--ckpt", str(ckpt), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "stale.txt").is_file()
    assert export_main(["--ckpt", str(ckpt), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").is_file()  # under the default 5GB: one file
    _assert_same_hf_model(out, hf_dir)  # includes: every tensor still bfloat16
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary directories left behind
