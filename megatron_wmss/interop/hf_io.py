"""Files of an HF model directory: safetensors (single or sharded), tokenizer files.

Only safetensors are read: no pickle (``torch.load``) ever touches a downloaded file. Tensors
are read lazily with ``safe_open``, one at a time, so a rank reads only what its shard needs.
Output directories are published atomically by :mod:`megatron_wmss.platform.files`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_wmss.platform.errors import UserError
from megatron_wmss.platform.files import check_output_dir, publishing_directory

# Older names of the publishing helpers, for the callers that import them from here.
atomic_directory = publishing_directory

__all__ = [
    "INDEX_FILE",
    "SINGLE_FILE",
    "TOKENIZER_PATTERNS",
    "SafetensorsCheckpoint",
    "atomic_directory",
    "check_output_dir",
    "copy_tokenizer_files",
    "parse_size",
    "read_json",
    "write_safetensors",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files that travel with the weights so the result tokenizes, chats and generates like the
# source: tokenizer files, chat template, generation defaults.
TOKENIZER_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
    "chat_template.json", "generation_config.json",
)


class SafetensorsCheckpoint:
    """The weights of an HF model directory: ``model.safetensors`` or an index plus shards.

    Every file the index names is checked to exist up front, so a missing shard fails before
    any work (and on every rank alike) with the file's name.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        index, single = self.directory / INDEX_FILE, self.directory / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text()).get("weight_map")
            except json.JSONDecodeError as err:
                raise UserError(f"{index} is not valid JSON ({err})") from err
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index}: no 'weight_map' (expected tensor name -> file)")
            self.files = {name: self.directory / f for name, f in weight_map.items()}
        elif single.is_file():
            with _open_safetensors(single) as f:
                self.files = {name: single for name in f.keys()}
        else:
            found = sorted(p.name for p in self.directory.glob("*.bin"))
            hint = (f"; found {found}: re-save with save_pretrained(safe_serialization=True) "
                    "(pickled .bin weights are not read)") if found else ""
            raise FileNotFoundError(f"{self.directory}: neither {SINGLE_FILE} nor {INDEX_FILE} "
                                    f"found{hint}")
        missing = sorted({str(p) for p in self.files.values() if not p.is_file()})
        if missing:
            raise FileNotFoundError(f"{self.directory}: shard file(s) named in {INDEX_FILE} "
                                    f"are missing: {missing}")

    @property
    def names(self) -> list[str]:
        """Every tensor name in the checkpoint."""
        return list(self.files)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from its file (KeyError naming the tensor and the directory)."""
        if name not in self.files:
            raise KeyError(f"tensor {name!r} is not in the HF checkpoint {self.directory}")
        with _open_safetensors(self.files[name]) as f:
            return f.get_tensor(name)

    def dtype_of(self, name: str) -> str:
        """The stored dtype of one tensor (``float32``, ``bfloat16``, ...), from its header."""
        if name not in self.files:
            raise KeyError(f"tensor {name!r} is not in the HF checkpoint {self.directory}")
        with _open_safetensors(self.files[name]) as f:
            code = f.get_slice(name).get_dtype()
        return _SAFETENSORS_DTYPES.get(code, code)


def _open_safetensors(path: Path):
    """``safe_open(path)``; a truncated or corrupt file raises a UserError naming it (the
    header and the file's length are checked on opening)."""
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as err:
        raise UserError(f"{path} is not a valid safetensors file (truncated or corrupt?): "
                        f"{err}") from err


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20,
          "gib": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"``, ``"500MiB"``, ``"20KB"``."""
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE_RE.match(str(size))
        if match is None:
            raise ValueError(f"size {size!r} is not understood; use bytes or e.g. '5GB', "
                             "'500MB', '2GiB'")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])
    if value < 1:
        raise ValueError(f"size {size!r} must be at least one byte")
    return value


def write_safetensors(tensors: Mapping[str, torch.Tensor], directory: str | os.PathLike,
                      max_shard_size: int | str = "5GB") -> list[str]:
    """Write ``tensors`` (in order) as HF safetensors; returns the file names written.

    Up to ``max_shard_size`` bytes: one ``model.safetensors``. Above: files
    ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json`` (HF's layout).
    A tensor larger than the limit gets a file of its own.
    """
    limit = parse_size(max_shard_size)
    directory = Path(directory)
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and used + nbytes > limit:
            shards.append({})
            used = 0
        # safetensors refuses views and shared storage (tied weights): store owned copies.
        shards[-1][name] = tensor.detach().to("cpu").contiguous().clone()
        used += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE_FILE), metadata={"format": "pt"})
        return [SINGLE_FILE]
    files, weight_map, total = [], {}, 0
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        files.append(fname)
        for name, tensor in shard.items():
            weight_map[name] = fname
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files + [INDEX_FILE]


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer / chat-template / generation files present in ``src`` to ``dst``."""
    src, dst = Path(src), Path(dst)
    copied = []
    if not src.is_dir():
        return copied
    for path in sorted(src.iterdir()):
        if path.is_file() and any(fnmatch.fnmatch(path.name, p) for p in TOKENIZER_PATTERNS):
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied


def read_json(path: str | os.PathLike, what: str | None = None) -> dict:
    """Parse a JSON file; FileNotFoundError says what the file is for."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found" + (f" ({what})" if what else ""))
    return json.loads(path.read_text())
