"""python -m benchmarks.costmodel [--out FILE]: print the model's tables (or write them to FILE)."""
from __future__ import annotations

import argparse
import sys

from .tables import markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.costmodel",
                                     description="Cost model of the GPU kernels (a model, not a measurement).")
    parser.add_argument("--out", help="write the markdown to FILE instead of printing it")
    args = parser.parse_args(argv)
    text = markdown() + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"costmodel: wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
