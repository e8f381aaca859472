"""``wmss``: the command-line entry point. Thin: parse, then call one library function."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional, Sequence


def _env(args: argparse.Namespace) -> int:
    """Print what this process can use: versions, CUDA, Transformer Engine, Apex."""
    import importlib.metadata as md

    import torch

    from megatron_wmss import __version__
    from megatron_wmss.platform import apex_available, cuda_available, te_available

    def version(dist: str) -> Optional[str]:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    info = {
        "megatron_wmss": __version__,
        "torch": torch.__version__,
        "megatron_core": version("megatron-core"),
        "cuda": cuda_available(),
        "transformer_engine": te_available(),
        "apex": apex_available(),
        "layer_spec": "transformer_engine" if te_available() else "local",
    }
    print(json.dumps(info, indent=2))
    return 0


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {
    "env": ("show versions and which GPU libraries are usable", lambda p: None, _env),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="wmss", description="Weak-Driven Learning on megatron-core")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    return COMMANDS[args.command][2](args)


if __name__ == "__main__":
    sys.exit(main())
