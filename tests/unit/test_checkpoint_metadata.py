"""A resumed run keeps writing its model description after keep_last has deleted the
checkpoint it resumed from (found by killing `wmss run` inside the SFT baseline)."""

from __future__ import annotations

import shutil

from megatron_wmss.config import ModelConfig
from megatron_wmss.interop.metadata import MODEL_FILE, read_model_metadata, write_model_metadata
from megatron_wmss.training.trainer import _metadata_writer


def test_saves_after_the_resume_checkpoint_is_deleted_still_carry_the_description(tmp_path):
    cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                      vocab_size=320)
    resume = tmp_path / "checkpoints" / "iter_0000003"
    resume.mkdir(parents=True)
    write_model_metadata(resume, cfg)
    write = _metadata_writer(cfg, {"resume": str(resume)}, tmp_path / ".model_metadata")
    for step in (4, 5, 6):
        directory = tmp_path / "checkpoints" / f"iter_{step:07d}"
        directory.mkdir()
        write(directory)
        shutil.rmtree(resume)  # keep_last=1: the previous checkpoint goes
        resume = directory
        assert (directory / MODEL_FILE).is_file()
        assert read_model_metadata(directory).model.num_layers == 2
