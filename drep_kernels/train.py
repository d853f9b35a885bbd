"""``drep-train``: fine-tune a timm or torchvision model with DenoiseRep on an image folder, on
one process or under torchrun. ``python -m drep_kernels.train --help``; the implementation is
``drep_kernels.cli.train``."""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .cli import run_command

    return run_command("drep-train", "drep_kernels.cli.train", argv)


if __name__ == "__main__":
    sys.exit(main())
