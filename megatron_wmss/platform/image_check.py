"""Does this interpreter (a container image's) suit the installed megatron-core and this project?

    python -m megatron_wmss.platform.image_check [--require-cuda-torch]

Compares the running Python and the installed torch with what megatron-core and megatron_wmss
declare (``Requires-Python``, their ``torch`` requirement), prints one JSON object with the
versions found (Transformer Engine and Apex included) and exits 1, naming each mismatch, when
they disagree. The Dockerfile runs it during the build, so an NGC base image whose Python or
torch the pinned megatron-core does not support fails there, not on the cluster.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import sys
from typing import Optional, Sequence

__all__ = ["requirement_problems", "main"]

_PACKAGES = ("megatron-core", "megatron_wmss")


def _version(dist: str) -> Optional[str]:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def requirement_problems(python: str, torch: Optional[str],
                         declared: dict[str, tuple[Optional[str], list[str]]]) -> list[str]:
    """Mismatches between ``python`` / ``torch`` (version strings) and ``declared``: per package,
    (its Requires-Python, its Requires-Dist lines). Extras-only requirements are ignored; torch
    pre-releases (NGC builds such as ``2.10.0a0+b4e4ee8``) count as their release."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    problems = []
    for package, (requires_python, requires) in declared.items():
        if requires_python and not SpecifierSet(requires_python).contains(
                Version(python), prereleases=True):
            problems.append(f"{package} needs Python {requires_python}; this is {python}")
        for line in requires:
            req = Requirement(line)
            if req.name.lower() != "torch" or (req.marker and not req.marker.evaluate(
                    {"extra": ""})):
                continue
            if torch is None:
                problems.append(f"{package} needs torch{req.specifier}; torch is not installed")
            elif not req.specifier.contains(Version(torch), prereleases=True):
                problems.append(f"{package} needs torch{req.specifier}; this is torch {torch}")
    return problems


def _declared() -> dict[str, tuple[Optional[str], list[str]]]:
    out = {}
    for package in _PACKAGES:
        try:
            meta = md.metadata(package)
        except md.PackageNotFoundError:
            raise SystemExit(f"image_check: {package} is not installed in {sys.executable}")
        out[package] = (meta.get("Requires-Python"), list(meta.get_all("Requires-Dist") or []))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_wmss.platform.image_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--require-cuda-torch", action="store_true",
                        help="also fail when torch is a CPU-only build (a GPU image must not "
                        "have had its CUDA torch replaced)")
    args = parser.parse_args(argv)
    python = ".".join(map(str, sys.version_info[:3]))
    torch_version = _version("torch")
    cuda = None
    if torch_version is not None:
        import torch

        cuda = torch.version.cuda
    problems = requirement_problems(python, torch_version, _declared())
    if args.require_cuda_torch and cuda is None:
        problems.append(f"torch {torch_version} is a CPU-only build; the image's CUDA torch "
                        "was replaced or is missing")
    found = {"python": python, "torch": torch_version, "torch_cuda": cuda,
             **{dist: _version(dist) for dist in ("megatron-core", "megatron_wmss",
                                                   "transformer_engine", "apex")},
             "problems": problems}
    print(json.dumps(found, indent=2))
    for problem in problems:
        print(f"image_check: error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
