"""The CPU kernels' in-kernel noise (docs/method.md N1) timed alone, per vector path.

    python -m benchmarks.noise_paths [--rows 1576] [--cols 384] [--repeats 30] [--paths avx512,avx2,baseline]

Each path runs in a fresh process (the kernels choose theirs once per process: csrc/cpu/isa.h),
on one thread, through the test hook drep::_denoise_noise, which draws the rows exactly as
drep::denoise_loss_fwd does. Prints ns per element, the minimum over the repeats (the least
disturbed by other work on a shared machine); a path this CPU lacks is listed as such.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# What each path needs in the environment (narrowing only: the widest the CPU has is the default).
PATH_ENV = {"avx512": {}, "avx2": {"DREP_CPU_NO_AVX512": "1"}, "baseline": {"DREP_CPU_NO_AVX2": "1"}}


def time_here(rows: int, cols: int, repeats: int) -> dict:
    """This process's path and its noise time in ns per element (1 thread)."""
    import torch

    from drep_kernels import _C

    torch.set_num_threads(1)
    seed, like = torch.tensor(2024), torch.empty(0)
    torch.ops.drep._denoise_noise(like, seed, 0, rows, cols, False)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.ops.drep._denoise_noise(like, seed, 0, rows, cols, False)
        best = min(best, time.perf_counter() - start)
    return {"path": _C.cpu_vector_path(), "ns_per_element": best * 1e9 / (rows * cols)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.noise_paths", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1576)
    parser.add_argument("--cols", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--paths", default=",".join(PATH_ENV), help="comma-separated, of " + ", ".join(PATH_ENV))
    parser.add_argument("--here", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.here:
        print(json.dumps(time_here(args.rows, args.cols, args.repeats)))
        return 0
    paths = args.paths.split(",")
    unknown = [p for p in paths if p not in PATH_ENV]
    if unknown:
        parser.error(f"unknown path(s) {', '.join(unknown)}: choose among {', '.join(PATH_ENV)}")
    print(f"noise of {args.rows} x {args.cols} elements, 1 thread, min of {args.repeats}")
    print("| path | ns / element |\n|---|---|")
    for path in paths:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DREP_CPU_NO_")}
        env.update(PATH_ENV[path])
        # Run as a file, not a module: sys.path then starts at benchmarks/, not the repository
        # root, whose source tree (no compiled _C in a regular install) would shadow the build.
        child = [sys.executable, os.path.abspath(__file__), "--here", "--rows", str(args.rows),
                 "--cols", str(args.cols), "--repeats", str(args.repeats)]
        proc = subprocess.run(child, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        if got["path"] != path:  # the CPU lacks it: the kernels took a narrower one
            print(f"| {path} | not on this CPU (took {got['path']}) |")
        else:
            print(f"| {path} | {got['ns_per_element']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
