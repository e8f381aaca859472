"""Manifests of written directories: each file's size and CRC-32, recorded once, checked on read.

    DIR/manifest.json   {"format": 1, "checksum": "crc32",
                         "files": {"__0_0.distcp": {"size": 670052, "crc32": "1c291ca3"}, ...}}

A checkpoint that was truncated, half-copied or changed on disk is caught before anything in
it is trusted, with the file named (``__0_0.distcp: size 1024, expected 670052``) instead of a
pickle or shape error deep inside a load. Checksum: zlib's CRC-32, the cheapest one in the
standard library here (one core of the project's 2-core CPU machine, 1 MiB chunks in memory:
CRC-32 0.25 s/GiB, SHA-1 0.56, SHA-256 0.60, BLAKE2b 1.14, MD5 1.40). It catches truncation,
torn writes and flipped bits, which is the job; it is no defence against deliberate tampering
(a megatron checkpoint is trusted input anyway: its metadata is a pickle).

With ``collective=True`` every rank of ``group`` (default: the world) takes part: the files
are split over the ranks by size, each rank reads and checksums only its share, and one
all-gather gives every rank the result, so recording or checking costs each rank 1/N of the
bytes and all ranks reach the same verdict. A failure anywhere (an unreadable file) is raised
on every rank alike. Without ``collective`` the calling process does everything.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_wmss.platform.files import write_file_atomic

__all__ = ["MANIFEST_FILE", "ManifestCheck", "check_manifest", "file_crc32", "record_manifest"]

MANIFEST_FILE = "manifest.json"
_FORMAT = 1
_CHUNK = 1 << 20
_PER_FILE_COST = 64 << 10  # bytes a file's open and stat count for when shares are balanced


def file_crc32(path: str | os.PathLike) -> str:
    """CRC-32 of the file's bytes as 8 hex digits."""
    crc = 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
    return f"{crc:08x}"


def _file_sizes(directory: Path) -> dict[str, int]:
    """Relative POSIX path -> size of every file under ``directory`` (the manifest aside)."""
    out = {}
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if name != MANIFEST_FILE and path.is_file():
            out[name] = path.stat().st_size
    return out


def _shares(sizes: dict[str, int], world: int) -> list[list[str]]:
    """Files per rank, largest first to the least loaded rank (deterministic)."""
    loads, shares = [0] * world, [[] for _ in range(world)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = loads.index(min(loads))
        shares[rank].append(name)
        loads[rank] += sizes[name] + _PER_FILE_COST
    return shares


class _Ranks:
    """The collectives of a manifest operation, or their single-process stand-ins."""

    def __init__(self, collective: bool, group) -> None:
        self.group = group
        if collective:
            import torch.distributed as dist

            self.dist = dist
            self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
            self.src = 0 if group is None else dist.get_global_rank(group, 0)
        else:
            self.dist, self.rank, self.world = None, 0, 1

    def from_leader(self, make):
        """``make()`` on rank 0; every rank returns its value or raises its error."""
        box = [None]
        if self.rank == 0:
            try:
                box[0] = (make(), None)
            except (OSError, ValueError) as err:
                box[0] = (None, f"{type(err).__name__}: {err}")
        if self.dist is not None:
            self.dist.broadcast_object_list(box, src=self.src, group=self.group)
        value, error = box[0]
        if error is not None:
            raise OSError(error)
        return value

    def gather(self, mine) -> list:
        if self.dist is None:
            return [mine]
        out = [None] * self.world
        self.dist.all_gather_object(out, mine, group=self.group)
        return out


def _checksums(directory: Path, names: list[str]) -> tuple[dict[str, str], Optional[str]]:
    out = {}
    for name in names:
        try:
            out[name] = file_crc32(directory / name)
        except OSError as err:
            return out, f"cannot read {directory / name}: {err.strerror or err}"
    return out, None


def record_manifest(directory: str | os.PathLike, *, collective: bool = False,
                    group=None) -> dict:
    """Write ``directory``/manifest.json listing every other file under it; return it.

    Call once every file is written (collective: after every rank finished writing). Rank 0
    lists the files and writes the manifest, atomically, as the last step (after the last
    collective, so a failure writing it is rank 0's alone)."""
    directory = Path(directory)
    ranks = _Ranks(collective, group)
    sizes = ranks.from_leader(lambda: _file_sizes(directory))
    crcs, error = _checksums(directory, _shares(sizes, ranks.world)[ranks.rank])
    merged = {}
    for part, part_error in ranks.gather((crcs, error)):
        if part_error is not None:
            raise OSError(f"manifest of {directory}: {part_error}")
        merged.update(part)
    manifest = {"format": _FORMAT, "checksum": "crc32",
                "files": {name: {"size": size, "crc32": merged[name]}
                          for name, size in sizes.items()}}
    if ranks.rank == 0:
        write_file_atomic(directory / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    return manifest


@dataclass(frozen=True)
class ManifestCheck:
    """The outcome of :func:`check_manifest`."""

    problem: Optional[str]
    """The first mismatch on one line (``FILE: size N, expected M``, ``FILE: missing``,
    ``FILE: checksum X, expected Y``, ``manifest.json: unreadable ...``); None if intact."""
    has_manifest: bool
    """False: the directory has no manifest (written before manifests); nothing was checked."""

    @property
    def intact(self) -> bool:
        return self.problem is None


def _read_and_stat(directory: Path) -> tuple[Optional[dict], Optional[str]]:
    """(the manifest's files, None) or (None, problem); ({}, None) without a manifest."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None, None
    try:
        files = json.loads(path.read_text())["files"]
        expected = {name: (int(entry["size"]), str(entry["crc32"]))
                    for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return None, f"{MANIFEST_FILE}: unreadable ({type(err).__name__}: {err})"
    for name, (size, _) in sorted(expected.items()):
        try:
            actual = (directory / name).stat().st_size
        except FileNotFoundError:
            return None, f"{name}: missing"
        if actual != size:
            return None, f"{name}: size {actual}, expected {size}"
    return expected, None


def check_manifest(directory: str | os.PathLike, *, collective: bool = False,
                   group=None) -> ManifestCheck:
    """Check every file ``directory``'s manifest lists: present, of its size, of its CRC-32.

    Rank 0 reads the manifest and compares sizes (no data read); only when they all match are
    the files checksummed, each rank its share. Files the manifest does not list are ignored.
    """
    directory = Path(directory)
    ranks = _Ranks(collective, group)
    expected, problem = ranks.from_leader(lambda: _read_and_stat(directory))
    if problem is not None:
        return ManifestCheck(problem, True)
    if expected is None:
        return ManifestCheck(None, False)
    names = _shares({n: size for n, (size, _) in expected.items()}, ranks.world)[ranks.rank]
    crcs, error = _checksums(directory, names)
    if error is not None:
        mine = error
    else:
        mine = next((f"{n}: checksum {crcs[n]}, expected {expected[n][1]}"
                     for n in sorted(names) if crcs[n] != expected[n][1]), None)
    found = [p for p in ranks.gather(mine) if p is not None]
    return ManifestCheck(min(found) if found else None, True)
