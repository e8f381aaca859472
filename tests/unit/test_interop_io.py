"""Safetensors files, output directories, stored model descriptions, and CLI bad-input errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from megatron_wmss.config import ModelConfig
from megatron_wmss.interop.hf_io import (
    INDEX_FILE,
    SafetensorsCheckpoint,
    atomic_directory,
    copy_tokenizer_files,
    parse_size,
    write_safetensors,
)
from megatron_wmss.interop.metadata import (
    copy_model_metadata,
    read_model_metadata,
    write_model_metadata,
)

INTEROP = Path(__file__).resolve().parents[2] / "megatron_wmss" / "interop"


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"model.layers.{i}.w": torch.randn(64, 64, generator=gen) for i in range(4)}


def test_small_models_are_one_file_large_ones_are_sharded_with_an_index(tmp_path):
    tensors = _tensors()  # 16 KiB each
    (tmp_path / "one").mkdir()
    assert write_safetensors(tensors, tmp_path / "one", "1MB") == ["model.safetensors"]
    (tmp_path / "many").mkdir()
    files = write_safetensors(tensors, tmp_path / "many", "40KB")
    assert files[-1] == INDEX_FILE and len(files) == 3  # 2 tensors per 40 KB shard
    index = json.loads((tmp_path / "many" / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 4 * 64 * 64 * 4
    for directory in ("one", "many"):
        ckpt = SafetensorsCheckpoint(tmp_path / directory)
        assert sorted(ckpt.names) == sorted(tensors)
        assert all(torch.equal(ckpt.get(n), t) for n, t in tensors.items())
        assert ckpt.dtype_of("model.layers.0.w") == "float32"


def test_missing_shard_is_named(tmp_path):
    write_safetensors(_tensors(), tmp_path, "40KB")
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        SafetensorsCheckpoint(tmp_path)


def test_pickled_weights_are_not_read(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="safe_serialization"):
        SafetensorsCheckpoint(tmp_path)


def test_unknown_tensor_is_a_key_error_naming_it(tmp_path):
    write_safetensors(_tensors(), tmp_path)
    with pytest.raises(KeyError, match="lm_head.weight"):
        SafetensorsCheckpoint(tmp_path).get("lm_head.weight")


@pytest.mark.parametrize("text,value", [("5GB", 5 * 10**9), ("500MiB", 500 * 2**20),
                                        ("40KB", 40_000), (123, 123), ("1.5 GB", 1.5e9)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_refuses_nonsense():
    with pytest.raises(ValueError, match="'5 parsecs'"):
        parse_size("5 parsecs")


def test_atomic_directory_refuses_existing_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (out / "a.txt").read_text() == "1"
    with pytest.raises(FileExistsError, match="--overwrite"):
        with atomic_directory(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "b.txt").write_text("2")
            raise RuntimeError("crash while writing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary leftovers
    assert (out / "a.txt").is_file()  # a failed write leaves the old output alone
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]


def test_tokenizer_files_are_copied_and_weights_are_not(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "merges.txt", "generation_config.json",
                 "model.safetensors", "config.json", "README.md"):
        (src / name).write_text(name)
    copied = copy_tokenizer_files(src, tmp_path / "dst")
    assert copied == ["generation_config.json", "merges.txt", "tokenizer.json",
                      "tokenizer_config.json"]


def _cfg(**kw) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                num_query_groups=2, vocab_size=300, params_dtype="float32")
    base.update(kw)
    return ModelConfig(**base)


def test_model_description_round_trips_and_copies(tmp_path):
    src, dst = tmp_path / "a", tmp_path / "b"
    src.mkdir(), dst.mkdir()
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    cfg = _cfg(qk_layernorm=True)
    write_model_metadata(src, cfg, hf_architecture="Qwen3ForCausalLM", hf_dtype="bfloat16",
                         hf_config={"vocab_size": 300}, tokenizer_src=tmp_path / "tok")
    copy_model_metadata(src, dst)
    meta = read_model_metadata(dst)
    assert meta.model == cfg and meta.hf_architecture == "Qwen3ForCausalLM"
    assert meta.hf_dtype == "bfloat16" and meta.hf_config == {"vocab_size": 300}
    assert (meta.tokenizer_dir / "tokenizer.json").is_file()


def test_missing_or_foreign_model_description_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="--model-from"):
        read_model_metadata(tmp_path)
    write_model_metadata(tmp_path, _cfg())
    record = json.loads((tmp_path / "wmss_model.json").read_text())
    record["model"]["num_experts"] = 8
    (tmp_path / "wmss_model.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="num_experts"):
        read_model_metadata(tmp_path)


def test_strong_weak_mismatch_names_the_field(tmp_path):
    from megatron_wmss.interop.joint import check_checkpoints_compatible

    strong, weak = tmp_path / "strong", tmp_path / "weak"
    strong.mkdir(), weak.mkdir()
    write_model_metadata(strong, _cfg(rotary_base=1e6))
    write_model_metadata(weak, _cfg(rotary_base=1e4))
    with pytest.raises(ValueError, match=r"rotary_base: strong=1000000.0, weak=10000.0"):
        check_checkpoints_compatible(strong, weak)
    write_model_metadata(weak, _cfg(rotary_base=1e6, params_dtype="bfloat16"))
    check_checkpoints_compatible(strong, weak)  # dtype is not architecture


def test_library_import_refuses_existing_output(tmp_path):
    from megatron_wmss.interop import import_hf

    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        import_hf(tmp_path, tmp_path / "out")


def _hf_dir(tmp_path: Path, **overrides) -> Path:
    from megatron_wmss.interop.hf_config import hf_config_from_model_config

    hf = tmp_path / "hf"
    hf.mkdir()
    config = {**hf_config_from_model_config(_cfg(), "LlamaForCausalLM"), **overrides}
    (hf / "config.json").write_text(json.dumps(config))
    write_safetensors(_tensors(), hf, "40KB")
    return hf


@pytest.mark.parametrize("case,needle", [
    ("arch", "supported architectures: ['LlamaForCausalLM', 'Qwen2ForCausalLM', "
             "'Qwen3ForCausalLM']"),
    ("shard", "model-00001-of-00002.safetensors"),
    ("exists", "--overwrite"),
    ("rope", "'dynamic'"),
])
def test_cli_import_bad_input_fails_fast_with_a_clear_error(tmp_path, capsys, case, needle):
    from megatron_wmss.interop.cli import import_main

    overrides = {"architectures": ["MistralForCausalLM"]} if case == "arch" else {}
    if case == "rope":
        overrides = {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}
    hf = _hf_dir(tmp_path, **overrides)
    if case == "shard":
        (hf / "model-00001-of-00002.safetensors").unlink()
    out = tmp_path / "ckpt"
    if case == "exists":
        out.mkdir()
    assert import_main(["--hf-dir", str(hf), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wmss import-hf: error:") and needle in err, err


def test_cli_export_without_model_description_fails_fast(tmp_path, capsys):
    from megatron_wmss.interop.cli import export_main, extract_main

    assert export_main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "hf")]) == 2
    assert "wmss_model.json" in capsys.readouterr().err
    assert extract_main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "--model-from" in capsys.readouterr().err


def test_no_remote_code_and_no_pickle_loading_in_interop():
    for path in INTEROP.glob("*.py"):
        text = path.read_text()
        assert "trust_remote_code" not in text, path
        assert not re.search(r"torch\.load\(", text), path
        assert not re.search(r"^\s*(import|from) (pickle|dill)", text, re.M), path
