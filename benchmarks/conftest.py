"""pytest options and parametrization of the benchmark suite.

    pytest benchmarks/ --benchmark-only [--drep-sizes=smoke|default|full] [--drep-budget-s=S]

Each test module names its op (``OP``); its test receives one ``spec`` per case (op, mode,
shape, dtype, contender) for the device in use (CUDA when present, else CPU;
``--drep-device`` overrides). Under ``--drep-budget-s`` cases run most-important first:
everything uncompiled, then torch.compile, then max-autotune, so the budget drops the least
important; without a budget a group's contenders run one after the other.

The session ends with report.py's summary table of its results (after pytest-benchmark's own
tables), the command that writes the full report and plot, and the session's wall time.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from . import report
from .shapes import default_device, specs

_TIER = {"compile": 1, "compile-max-autotune": 2}


def pytest_addoption(parser):
    group = parser.getgroup("drep", "drep-kernels benchmarks")
    group.addoption(
        "--drep-sizes",
        choices=("smoke", "default", "full"),
        default="default",
        help="shape set: smoke (seconds), default (the CPU table, < 10 min on 2 cores), full (the GPU sweep)",
    )
    group.addoption(
        "--drep-device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="device to benchmark (auto: cuda when available, else cpu)",
    )
    group.addoption(
        "--drep-budget-s",
        type=float,
        default=None,
        help="skip the cases that would start after this many seconds of the session",
    )
    group.addoption(
        "--drep-threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's). On a shared machine use 1: OpenMP threads that "
        "wait for a descheduled sibling at every barrier make small ops 100x slower",
    )
    group.addoption(
        "--drep-no-pairing",
        action="store_true",
        help="on CPU, do not time the group's floor before each round (ratios from medians only)",
    )
    group.addoption("--drep-no-compile", action="store_true", help="leave out the torch.compile baselines")


def _device(config) -> str:
    choice = config.getoption("--drep-device", default="auto")
    return default_device() if choice == "auto" else choice


def pytest_configure(config):
    saved = config.getoption("benchmark_json", default=None)
    if saved:  # pytest-benchmark does not create the folder
        Path(saved).parent.mkdir(parents=True, exist_ok=True)
    threads = config.getoption("--drep-threads", default=None)
    if threads:
        import torch

        torch.set_num_threads(threads)


def pytest_generate_tests(metafunc):
    op = getattr(metafunc.module, "OP", None)
    if op is None or "spec" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = _device(config)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError("--drep-device=cuda but torch sees no CUDA device")
    # Defaults too, for a run that collects this folder without loading this file first.
    sizes = config.getoption("--drep-sizes", default="default")
    cases = specs(op, sizes, device, not config.getoption("--drep-no-compile", default=False))
    metafunc.parametrize("spec", cases, ids=[c.id for c in cases])


@pytest.fixture
def paired(request) -> bool:
    return not request.config.getoption("--drep-no-pairing", default=False)


def pytest_collection_modifyitems(config, items):
    # Without a budget, a group's contenders stay together (timed close in time).
    if config.getoption("--drep-budget-s", default=None) is None:
        return

    def tier(item):
        spec = getattr(item, "callspec", None)
        spec = spec.params.get("spec") if spec else None
        return _TIER.get(getattr(spec, "contender", ""), 0)

    items.sort(key=tier)  # stable: the declared order holds within a tier


_SKIPPED: list[tuple[str, str]] = []  # (case id, reason): reported with the results


def pytest_runtest_logreport(report):
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = report.longrepr[2].removeprefix("Skipped: ")
        _SKIPPED.append((report.nodeid.split("::")[-1], reason))


def pytest_benchmark_update_machine_info(config, machine_info):
    from .runner import environment

    env = environment(_device(config))
    start = getattr(config, "_drep_start", None)
    env["elapsed_s"] = None if start is None else round(time.monotonic() - start, 1)
    env["skipped"] = [{"case": case, "reason": reason} for case, reason in _SKIPPED]
    machine_info["drep"] = env


def pytest_sessionstart(session):
    session.config._drep_start = time.monotonic()
    _SKIPPED.clear()


def pytest_runtest_setup(item):
    budget = item.config.getoption("--drep-budget-s", default=None)
    start = getattr(item.config, "_drep_start", None)
    if budget is not None and start is not None and time.monotonic() - start > budget:
        pytest.skip(f"--drep-budget-s={budget:g} spent")


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables: the answer comes last
def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None:  # pytest-benchmark not loaded (-p no:benchmark)
        return
    rows = report.rows_of([b.as_dict(include_data=False) for b in session.benchmarks if not b.has_error])
    if not rows:  # nothing timed: --benchmark-skip / --benchmark-disable, or every case skipped
        return
    tr = terminalreporter
    sizes = config.getoption("--drep-sizes", default="default")
    tr.write_sep("=", f"drep-kernels summary ({sizes} sizes)")
    for line in report.summary_table(report.by_group(rows)):
        tr.write_line(line)
    saved = config.getoption("benchmark_json", default=None)
    if saved:
        tr.write_line(f"full report and plot: python -m benchmarks.report {saved}")
    else:
        tr.write_line("full report and plot: add --benchmark-json=bench-out/run.json to this command, "
                      "then python -m benchmarks.report bench-out/run.json")
    start = getattr(config, "_drep_start", None)
    took = "" if start is None else f"the pytest session took {time.monotonic() - start:.0f} s; "
    if sizes == "smoke":
        tr.write_line(f"{took}smoke sizes check that the suite runs: their times are not results")
    else:
        tr.write_line(f"{took}shorter: --drep-sizes=smoke (one tiny shape per group, checks that it runs) "
                      "or --drep-budget-s=SECONDS (skips the cases that would start later)")
