"""``drep-fuse``: a plain, deployable state dict from a drep-train checkpoint, a converted
model's state dict or a checkpoint of the authors' code. ``python -m drep_kernels.fuse_checkpoint
--help``; the implementation is ``drep_kernels.cli.fuse``."""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .cli import run_command

    return run_command("drep-fuse", "drep_kernels.cli.fuse", argv)


if __name__ == "__main__":
    sys.exit(main())
