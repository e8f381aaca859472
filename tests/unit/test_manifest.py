"""Checkpoint manifests: a truncated, changed or missing file is named; an intact tree passes."""

from __future__ import annotations

import json
import os
import zlib

import pytest

from megatron_wmss.platform import manifest


def _tree(root):
    root.mkdir()
    (root / "__0_0.distcp").write_bytes(os.urandom(3 << 20))  # more than one read chunk
    (root / ".metadata").write_bytes(b"meta")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tok.model").write_bytes(b"pieces")
    (root / "train_state.json").write_text('{"step": 2}')
    return root


def test_a_recorded_tree_checks_intact_and_lists_every_file(tmp_path):
    root = _tree(tmp_path / "iter_0000002")
    recorded = manifest.record_manifest(root)
    assert json.loads((root / manifest.MANIFEST_FILE).read_text()) == recorded
    assert sorted(recorded["files"]) == [".metadata", "__0_0.distcp", "tokenizer/tok.model",
                                         "train_state.json"]
    data = (root / "__0_0.distcp").read_bytes()
    assert recorded["files"]["__0_0.distcp"] == {"size": len(data),
                                                 "crc32": f"{zlib.crc32(data):08x}"}
    check = manifest.check_manifest(root)
    assert check.intact and check.has_manifest


def test_truncation_a_changed_byte_and_a_missing_file_are_named(tmp_path):
    root = _tree(tmp_path / "ckpt")
    manifest.record_manifest(root)
    shard = root / "__0_0.distcp"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(1024)
    assert manifest.check_manifest(root).problem == f"__0_0.distcp: size 1024, expected {size}"

    root = _tree(tmp_path / "ckpt2")
    recorded = manifest.record_manifest(root)
    (root / "train_state.json").write_text('{"step": 7}')  # same size, other bytes
    want = recorded["files"]["train_state.json"]["crc32"]
    got = f"{zlib.crc32((root / 'train_state.json').read_bytes()):08x}"
    assert manifest.check_manifest(root).problem == \
        f"train_state.json: checksum {got}, expected {want}"

    (root / "tokenizer" / "tok.model").unlink()
    assert manifest.check_manifest(root).problem == "tokenizer/tok.model: missing"


def test_no_manifest_is_reported_as_unchecked_and_a_broken_one_as_damaged(tmp_path):
    root = _tree(tmp_path / "old")
    check = manifest.check_manifest(root)
    assert check.intact and not check.has_manifest  # written before manifests: accepted
    (root / manifest.MANIFEST_FILE).write_text('{"files": {"a": ')
    check = manifest.check_manifest(root)
    assert not check.intact and check.problem.startswith("manifest.json: unreadable")


def test_shares_give_every_file_to_exactly_one_rank_and_balance_bytes():
    sizes = {f"f{i}": size for i, size in enumerate([900, 500, 400, 300, 100, 1, 1, 1])}
    shares = manifest._shares(sizes, 3)
    assert sorted(n for share in shares for n in share) == sorted(sizes)
    loads = [sum(sizes[n] for n in share) for share in shares]
    assert max(loads) <= 900 + manifest._PER_FILE_COST  # the largest file alone at worst


@pytest.mark.parametrize("size", [0, 1, (1 << 20) + 3])
def test_file_crc32_matches_zlib_on_the_whole_file(tmp_path, size):
    path = tmp_path / "f"
    data = os.urandom(size)
    path.write_bytes(data)
    assert manifest.file_crc32(path) == f"{zlib.crc32(data):08x}"
