"""Which checkpoint a rerun resumes from when some are damaged (one process, fake checkpoints:
the choice reads only file names, sizes and checksums; the trainer's end-to-end version is
tests/distributed/test_checkpoint_storage.py)."""

from __future__ import annotations

import json

import pytest

from megatron_wmss.platform.manifest import record_manifest
from megatron_wmss.training.state import DamagedCheckpointError, find_intact_checkpoint


def _checkpoint(root, step, manifest=True):
    path = root / f"iter_{step:07d}"
    path.mkdir(parents=True)
    (path / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (path / "__0_0.distcp").write_bytes(bytes(range(256)) * 64)
    state = {"train_state": {"step": step}}
    if manifest:
        state["manifest"] = True
    (path / "train_state.json").write_text(json.dumps(state))
    if manifest:
        record_manifest(path)
    (root / "latest").write_text(json.dumps({"checkpoint": path.name, "step": step}))
    return path


def test_a_damaged_newest_checkpoint_gives_way_to_the_one_before_it(tmp_path):
    older, newest = _checkpoint(tmp_path, 3), _checkpoint(tmp_path, 6)
    with open(newest / "__0_0.distcp", "r+b") as f:
        f.truncate(100)
    said = []
    assert find_intact_checkpoint(tmp_path, log=said.append) == older
    assert said == ["checkpoint iter_0000006 is damaged (__0_0.distcp: size 100, expected "
                    "16384); resuming from iter_0000003 (iter_0000006 moved to "
                    "iter_0000006-damaged)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000003", "iter_0000006-damaged", "latest"]
    assert find_intact_checkpoint(tmp_path, log=said.append) == older  # and stays so


def test_no_intact_checkpoint_stops_with_every_damage_named_and_nothing_moved(tmp_path):
    for step in (3, 6):
        path = _checkpoint(tmp_path, step)
    (path / "manifest.json").unlink()  # lost: train_state.json says it had one
    state = tmp_path / "iter_0000003" / "train_state.json"
    state.write_text(state.read_text().replace('"step": 3', '"step": 4'))
    with pytest.raises(DamagedCheckpointError) as info:
        find_intact_checkpoint(tmp_path, log=pytest.fail)
    message = str(info.value)
    assert message.startswith(f"no intact checkpoint to resume from in {tmp_path}: "
                              "iter_0000006 is damaged (manifest.json: missing); iter_0000003 "
                              "is damaged (train_state.json: checksum "), message
    assert "\n" not in message and info.value.every_rank
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000003", "iter_0000006",
                                                          "latest"]


def test_a_checkpoint_from_before_manifests_is_used_unchecked_and_said_so(tmp_path):
    old = _checkpoint(tmp_path, 3, manifest=False)
    said = []
    assert find_intact_checkpoint(tmp_path, log=said.append) == old
    assert said == ["checkpoint iter_0000003 has no manifest.json (written before manifests): "
                    "resuming from it unchecked"]
    assert find_intact_checkpoint(tmp_path / "none", log=pytest.fail) is None
