"""The command-line tools ``drep-train`` and ``drep-fuse`` (``python -m drep_kernels.train``,
``python -m drep_kernels.fuse_checkpoint``).

They need the ``train`` extra (timm, torchvision, tqdm); ``import drep_kernels`` never imports
this package, so the core package keeps torch and triton as its only dependencies.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Optional, Sequence

NEEDS = ("timm", "torchvision", "tqdm")


class UsageError(Exception):
    """Input the user can fix (a path, a model name, a checkpoint that does not fit): reported
    as one line, before anything is written."""


def run_command(prog: str, module: str, argv: Optional[Sequence[str]] = None) -> int:
    """Run ``module.run(prog, argv)``; a UsageError becomes one line on stderr and exit code 2.

    Under torchrun every rank meets the same bad input, so only rank 0 says it."""
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        print(f"{prog}: error: needs {', '.join(NEEDS)} (missing: {', '.join(missing)}); "
              "pip install 'drep-kernels[train]'", file=sys.stderr)
        return 2
    try:
        importlib.import_module(module).run(prog, argv)
    except UsageError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0
