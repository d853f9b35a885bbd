"""Speed and memory runs of a Case.

Speed: the first call (compilation, autotuning, lazy initialisation) is untimed and, on CPU
for uncompiled code, estimates one call's cost (elsewhere further untimed calls, one per input
set, do); the number of rounds follows from it (more for cheap calls, down to
``min_rounds_slow`` for calls over a second). On CPU each round is one call timed by
pytest-benchmark's clock. On CUDA each round is one call between two CUDA events (no host
synchronisation inside the timed region; one at the end), rotating the input sets; the event
times replace pytest-benchmark's host times, so its stats and the saved JSON are device times.

Memory: the bytes autograd saves for backward (saved_tensors_hooks; each storage counted
once), total and beyond the case's own parameters and inputs, measured on the first call of
the speed run; on CUDA also the peak memory a further call allocates beyond what was
allocated before it.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch

from .cases import Case


@dataclass(frozen=True)
class RoundsPolicy:
    target_s: float  # timed seconds to aim for per case
    min_rounds: int
    max_rounds: int
    min_rounds_slow: int  # for calls over one second

    def rounds(self, est_s: float) -> int:
        floor = self.min_rounds_slow if est_s > 1.0 else self.min_rounds
        return max(floor, min(self.max_rounds, math.ceil(self.target_s / max(est_s, 1e-9))))


POLICIES = {
    "smoke": RoundsPolicy(target_s=0.05, min_rounds=2, max_rounds=5, min_rounds_slow=1),
    "default": RoundsPolicy(target_s=1.0, min_rounds=5, max_rounds=50, min_rounds_slow=3),
    "full": RoundsPolicy(target_s=0.1, min_rounds=20, max_rounds=100, min_rounds_slow=5),
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _warm_up(case: Case, device: str, compiled: bool) -> tuple[float, dict]:
    """Run untimed calls until compilation is done; return the estimated cost of one call and
    the saved-for-backward bytes, measured on the first call."""
    start = time.perf_counter()
    info = saved_for_backward(case)  # the first call: compiles / autotunes / initialises
    _sync(device)
    first = time.perf_counter() - start
    if device != "cuda" and not compiled:
        return first, info  # a CPU call costs the same the first time, up to allocation
    n = len(case.sets)
    start = time.perf_counter()
    for i in range(n):
        case.run(i)
        case.reset()
    _sync(device)
    return (time.perf_counter() - start) / n, info


def measure_speed(
    benchmark, case: Case, device: str, policy: RoundsPolicy, compiled: bool = False, floor: Case | None = None
) -> dict:
    """Time ``case`` with pytest-benchmark; return extra_info entries (median_s, rounds, ...).

    ``floor`` (CPU): a reference case run, untimed by pytest-benchmark but timed here, right
    before each round; ``x_floor_paired`` is the median over rounds of time / floor time, a
    ratio that slow changes in the machine's load cancel out of."""
    est, saved = _warm_up(case, device, compiled)
    rounds = policy.rounds(est)
    order = iter(range(10**9))
    n = len(case.sets)

    if device != "cuda":
        floor_s: list[float] = []
        if floor is not None:
            floor.run(0)
            floor.reset()

        def setup():
            case.reset()
            if floor is not None:
                start = time.perf_counter()
                floor.run(0)
                floor_s.append(time.perf_counter() - start)
                floor.reset()
            return (next(order) % n,), {}

        benchmark.pedantic(case.run, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)
        stats = benchmark.stats
        info = {"median_s": stats.stats.median if stats else None, "rounds": rounds, "timer": "perf_counter",
                "n_sets": n, **saved}
        if stats and floor_s and len(floor_s) == len(stats.stats.data):
            info["x_floor_paired"] = statistics.median(t / f for t, f in zip(stats.stats.data, floor_s))
            info["floor_paired_median_s"] = statistics.median(floor_s)
        return info

    events = []

    def timed_round(i: int) -> None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        case.run(i)
        end.record()
        events.append((start, end))

    def setup():
        case.reset()  # host-side only (drops .grad references)
        return (next(order) % n,), {}

    benchmark.pedantic(timed_round, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)
    torch.cuda.synchronize()
    device_s = [s.elapsed_time(e) / 1e3 for s, e in events]
    info = {"rounds": len(device_s), "timer": "cuda_event", "n_sets": n, **saved}
    if device_s:
        info["median_s"] = statistics.median(device_s)
        stats = benchmark.stats
        if stats:
            info["host_median_s"] = stats.stats.median
            _replace_stats(stats.stats, device_s)
    return info


def _replace_stats(stats, values: list[float]) -> None:
    """Make pytest-benchmark's own table and JSON report the device times."""
    data = getattr(stats, "data", None)
    if isinstance(data, list) and len(data) == len(values):
        data[:] = values
        for name in [n for n in vars(stats) if n != "data"]:
            del vars(stats)[name]  # cached statistics of the host times


def saved_for_backward(case: Case) -> dict:
    """One call of ``case``, its forward under saved_tensors_hooks: the bytes autograd saved
    for backward (each storage once), in all and beyond the case's parameters and inputs."""
    if case.backward is None:
        case.run(0)
        case.reset()
        return {}
    per_storage: dict[int, int] = {}

    def pack(t):
        if t.numel():
            key = t.untyped_storage().data_ptr()
            per_storage[key] = max(per_storage.get(key, 0), t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = case.forward(*case.sets[0])
    own = {t.untyped_storage().data_ptr() for t in case.owned if t.numel()}
    case.backward(out)  # frees the graph
    del out
    case.reset()
    return {
        "saved_bytes": sum(per_storage.values()),
        "saved_extra_bytes": sum(v for k, v in per_storage.items() if k not in own),
    }


def measure_memory(case: Case, device: str, saved: bool = True) -> dict:
    """Saved-for-backward bytes (unless ``saved`` is False: the speed run measured them) and,
    on CUDA, the peak memory one call allocates beyond what was allocated before it."""
    info = saved_for_backward(case) if saved else {}
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        case.run(0)
        torch.cuda.synchronize()
        info["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
        case.reset()
    return info
