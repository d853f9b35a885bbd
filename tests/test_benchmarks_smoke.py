"""The benchmark suite is honest and works: its baselines compute our ops' math, its cases run,
its reporter turns saved pytest-benchmark JSON into the table, and a run ends with that table."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not installed with the package; appended so
    sys.path.append(str(ROOT))  # the source tree cannot shadow the installed drep_kernels

import drep_kernels  # noqa: E402
from benchmarks import baselines, noise_paths, report, shapes  # noqa: E402
from benchmarks.cases import STEP, make_case  # noqa: E402
from benchmarks.timing import measure_memory  # noqa: E402
from conftest import assert_close  # noqa: E402
from drep_kernels import ops  # noqa: E402
from drep_kernels.nn import DenoiseLinear  # noqa: E402
from drep_kernels.schedule import Schedule  # noqa: E402

RTOL, ATOL = 2e-5, 2e-6  # float32; the baseline's schedule buffers are float32, ours float64


def _loss_backends():
    return shapes.drep_backends("denoise_loss", "cpu")


def _merge_backends():
    return shapes.drep_backends("merge_weights", "cpu")


# --- the baselines compute the math of our ops ------------------------------------------

@pytest.mark.parametrize("backend", _loss_backends())
def test_baseline_loss_is_the_op(backend, monkeypatch):
    """With the time embedding folded into the bias (docs/method.md T1), the authors' loss is
    drep::denoise_loss: same value, same dL/db_d; their dL/dW_d differs by outer(dL/db_d, e_t)
    because their W_d also multiplies e_t."""
    monkeypatch.setenv("DREP_BACKEND", backend)
    torch.manual_seed(0)
    B, N, K = 3, 7, 24  # odd shape
    den = baselines.ReferenceDenoiser(K, t=5)
    x = torch.randn(B, N, K)
    eps = torch.randn(B, N, K)
    loss_ref = den.loss(x, noise=eps)
    loss_ref.backward()

    e_t = den.time_embedding().detach()
    w_d = den.dm.weight.detach().clone().requires_grad_(True)
    b_d = (den.dm.bias.detach() + w_d.detach() @ e_t).requires_grad_(True)
    co = Schedule().coefficients(5)
    loss = ops.denoise_loss(x, w_d, b_d, co.a, co.s, noise=eps)
    loss.backward()

    assert_close(loss, loss_ref, RTOL, ATOL, "loss")
    assert_close(b_d.grad, den.dm.bias.grad, RTOL, ATOL, "dL/db_d")
    assert_close(w_d.grad + torch.outer(b_d.grad, e_t), den.dm.weight.grad, RTOL, ATOL, "dL/dW_d")


def test_baseline_loss_draws_fresh_noise():
    torch.manual_seed(0)
    den = baselines.ReferenceDenoiser(16, t=3)
    x = torch.randn(2, 5, 16)
    assert den.loss(x).item() != den.loss(x).item()


@pytest.mark.parametrize("backend", _merge_backends())
def test_baseline_merge_is_the_op(backend, monkeypatch):
    """Their merge expression (z = 0) is drep::merge_weights, forward and backbone backward."""
    monkeypatch.setenv("DREP_BACKEND", backend)
    torch.manual_seed(1)
    out, K = 10, 13
    tables = baselines.schedule_tables()
    co = Schedule().coefficients(STEP)
    W = torch.randn(out, K, requires_grad=True)
    b = torch.randn(out, requires_grad=True)
    w_d, b_d = torch.randn(K, K) / K**0.5, torch.randn(K)
    gW, gb = torch.randn(out, K), torch.randn(out)

    mw_ref, mb_ref = baselines.reference_merge_tensors(W, b, w_d, b_d, tables["c1"][STEP], tables["c3"][STEP])
    torch.autograd.backward((mw_ref, mb_ref), (gW, gb))
    dW_ref, db_ref = W.grad.clone(), b.grad.clone()
    W.grad = b.grad = None

    mw, mb = ops.merge_weights(W, b, w_d, b_d, co.c1, co.c3)
    torch.autograd.backward((mw, mb), (gW, gb))
    assert_close(mw, mw_ref, RTOL, ATOL, "W'")
    assert_close(mb, mb_ref, RTOL, ATOL, "b'")
    assert_close(W.grad, dW_ref, RTOL, ATOL, "dW")
    assert_close(b.grad, db_ref, RTOL, ATOL, "db")
    # The floor computes the same W' in one addmm.
    assert_close(baselines.floor_merge(W.detach(), w_d, co.c1, co.c3), mw_ref, RTOL, ATOL, "floor W'")


def test_baseline_layer_is_the_layer():
    """In the backbone phase (the phase where both merge at every call), the authors' converted
    layer computes DenoiseLinear's function when their time embedding is zero (theirs leaves
    it out of the merge: defect 4 of the spec)."""
    torch.manual_seed(2)
    lin = torch.nn.Linear(12, 9)
    ref = baselines.ReferenceDenoiseLinear(lin, STEP)
    with torch.no_grad():
        ref.denoiser.time_mlp[3].weight.zero_()
        ref.denoiser.time_mlp[3].bias.zero_()
    ref.set_phase("backbone")
    ours = DenoiseLinear.from_linear(lin, STEP, init="linear")
    with torch.no_grad():
        ours.denoise_weight.copy_(ref.denoiser.dm.weight)
        ours.denoise_bias.copy_(ref.denoiser.dm.bias)
    drep_kernels.set_phase(ours, "backbone")
    x = torch.randn(4, 5, 12)
    assert_close(ours(x), ref(x), RTOL, 1e-5, "layer output")
    ref.take_loss()


# --- every case of the suite builds and runs; the memory run measures what it should ---

def _smoke_specs():
    out = []
    for op in ("denoise_loss", "merge_weights", "train_step", "host_step", "inference"):
        out += [s for s in shapes.specs(op, "smoke", "cpu", compile_=False)]
    return out


@pytest.mark.parametrize("spec", _smoke_specs(), ids=lambda s: f"{s.op}-{s.id}")
def test_case_runs(spec, monkeypatch):
    if spec.backend not in (None, "default", "eval"):
        monkeypatch.setenv("DREP_BACKEND", spec.backend)
    case = make_case(spec)
    for i in range(2):
        case.run(i)
        case.reset()
    info = measure_memory(case, "cpu")
    assert (case.backward is None) == ("saved_bytes" not in info)


def test_fused_inference_runs_the_original_architecture():
    shape = shapes.Shape(K=64, out=96, M=2 * shapes.TOKENS)
    cases = {c: make_case(shapes.Spec("inference", "eval", shape, "float32", c, "cpu", "smoke"))
             for c in ("linear", "fused")}
    assert cases["fused"].info["module"] == cases["linear"].info["module"] == "Linear"
    assert [p.shape for p in cases["fused"].owned] == [p.shape for p in cases["linear"].owned]


@pytest.mark.parametrize("backend", _loss_backends())
def test_loss_saves_nothing_of_size_m_by_k(backend, monkeypatch):
    """Our op keeps only dL/dW_d and dL/db_d for backward; the authors' loss keeps M x K tensors."""
    monkeypatch.setenv("DREP_BACKEND", backend)
    shape = shapes.Shape(K=32, M=2 * shapes.TOKENS)
    ours = measure_memory(make_case(shapes.Spec("denoise_loss", "full", shape, "float32", f"drep[{backend}]", "cpu", "smoke")), "cpu")
    eager = measure_memory(make_case(shapes.Spec("denoise_loss", "full", shape, "float32", "eager", "cpu", "smoke")), "cpu")
    assert ours["saved_extra_bytes"] == (32 * 32 + 32) * 4
    assert eager["saved_extra_bytes"] >= shape.M * shape.K * 4


def test_contenders_follow_the_registry():
    names = shapes.contenders("denoise_loss", "cpu", compile_=True)
    assert names[:3] == ["floor", "eager", "compile"]
    assert [n for n in names if n.startswith("drep[")] == [f"drep[{b}]" for b in _loss_backends()]
    assert "compile-max-autotune" in shapes.contenders("merge_weights", "cuda", compile_=True)


# --- the reporter -----------------------------------------------------------------------

def _bench(group, contender, role, median, **info):
    op, mode = group.split("/")[0].rstrip("]").split("[")
    extra = {"median_s": median, "contender": contender, "role": role, "rounds": 5, "op": op, "mode": mode,
             "dtype": "float32", "device": "cpu", **info}
    return {
        "group": group,
        "name": f"test_x[{contender}]",
        "fullname": f"benchmarks/test_x.py::test_x[{contender}]",
        "params": {},
        "param": contender,
        "extra_info": extra,
        "stats": {"median": median, "q1": median * 0.9, "q3": median * 1.1, "rounds": 5},
    }


SAVED = {
    "machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2}, "python_version": "3.11",
                     "drep": {"device_name": "Test CPU", "torch": "2.x", "triton": None,
                              "command": "pytest benchmarks/ --benchmark-only",
                              "cpu_vector_extensions": ["avx", "avx2", "avx512f", "fma"], "cpu_vector_path": "avx512",
                              "blas": "MKL, its own choice"}},
    "datetime": "2026-01-01T00:00:00",
    "benchmarks": [
        _bench("denoise_loss[full]/M394xK64/float32", "floor", "floor", 1e-3, K=64, M=394, gflops=10.0),
        _bench("denoise_loss[full]/M394xK64/float32", "eager", "eager", 4e-3, K=64, M=394, saved_extra_bytes=4096),
        _bench("denoise_loss[full]/M394xK64/float32", "drep[torch]", "drep", 2e-3, K=64, M=394, saved_extra_bytes=16640),
        _bench("denoise_loss[full]/M394xK128/float32", "floor", "floor", 2e-3, K=128, M=394),
        _bench("denoise_loss[full]/M394xK128/float32", "eager", "eager", 8e-3, K=128, M=394),
        _bench("denoise_loss[full]/M394xK128/float32", "drep[torch]", "drep", 2e-3, K=128, M=394),
        # Paired with a floor call per round (CPU): the ratios come from those, not the medians.
        _bench("merge_weights[full]/out96xK64/float32", "floor", "floor", 1e-3, K=64, out=96),
        _bench("merge_weights[full]/out96xK64/float32", "eager", "eager", 9e-3, K=64, out=96, x_floor_paired=3.0),
        _bench("merge_weights[full]/out96xK64/float32", "drep[cpu]", "drep", 9e-3, K=64, out=96, x_floor_paired=1.5),
    ],
}


def test_report_turns_saved_json_into_a_table(tmp_path, capsys):
    path = tmp_path / "saved.json"
    path.write_text(json.dumps(SAVED))
    assert report.main([str(path), "--out", str(tmp_path / "out"), "--print", "summary"]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "### `denoise_loss[full]/M394xK64/float32`" in text
    assert "- device: Test CPU" in text and "pytest benchmarks/ --benchmark-only" in text
    assert "- CPU vector extensions: avx, avx2, avx512f, fma; the CPU kernels' vector path: avx512" in text
    assert "- BLAS: MKL, its own choice" in text
    row = next(line for line in text.splitlines() if line.startswith("| drep[torch] | 2 ms"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5:8] == ["2.00", "2.00", "16.2 KiB"]  # x floor, vs eager, saved
    assert "| `denoise_loss[full]/M394xK128/float32` | 2 ms | 8 ms | - | drep[torch] | 2 ms | 1.00 | 4.00 | - |" in text
    assert "| `merge_weights[full]/out96xK64/float32` | 1 ms | 9 ms | - | drep[cpu] | 9 ms | 1.50 | 2.00 | - |" in text
    printed = capsys.readouterr().out
    assert printed.startswith("| group |")
    if (tmp_path / "out" / "speedup.png").exists():
        assert "PNG written" in text
    else:
        assert "PNG skipped" in text


def test_report_without_matplotlib_still_writes_markdown(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    path = tmp_path / "saved.json"
    path.write_text(json.dumps(SAVED))
    assert report.main([str(path), "--out", str(tmp_path), "--print", "none"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "PNG skipped: matplotlib is not installed" in text
    assert not (tmp_path / "speedup.png").exists()


def test_report_refuses_empty_input(tmp_path):
    assert report.main([str(tmp_path / "missing.json")]) == 2


def test_noise_paths_times_the_path_it_names(capsys):
    # The baseline path exists on every CPU; its process must really take it (DREP_CPU_NO_AVX2).
    assert noise_paths.main(["--rows", "3", "--cols", "37", "--repeats", "1", "--paths", "baseline"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| baseline |"))
    assert float(row.split("|")[2]) > 0, row


# --- the suite's own output ---------------------------------------------------------------

@pytest.mark.slow  # the smoke suite without compile baselines in a fresh pytest: about 20 s on 2 busy cores
def test_suite_ends_with_the_summary_table(tmp_path):
    """`pytest benchmarks/ --benchmark-only` ends with report.py's summary: after pytest-benchmark's
    tables, one row per group, the command for the full report and the session's time."""
    # Run from elsewhere: `python -m pytest` in the repository root would put the source tree,
    # which a regular install leaves without _C, ahead of the installed drep_kernels.
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "benchmarks"), "--benchmark-only", "--drep-sizes=smoke",
         "--drep-no-compile", "-p", "no:cacheprovider"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.rstrip("\n").splitlines()
    start = max(i for i, line in enumerate(lines) if "drep-kernels summary (smoke sizes)" in line)
    legend = max(i for i, line in enumerate(lines) if line.startswith("Legend:"))  # ends pytest-benchmark's tables
    assert start > legend, "the summary is not after pytest-benchmark's tables"
    block = lines[start + 1:]
    groups = sorted({s.group for op in ("denoise_loss", "merge_weights", "train_step", "host_step", "inference")
                     for s in shapes.specs(op, "smoke", "cpu", compile_=False)})
    assert block[:2] == report.summary_table({}), block[:2]  # the header and its rule
    assert len(block) == 2 + len(groups) + 3, "\n".join(block)  # rows, hint, time, pytest's last line
    rows = block[2:2 + len(groups)]
    assert sorted(row.split(" | ")[0] for row in rows) == [f"| `{g}`" for g in groups], "\n".join(block)
    hint, took, final = block[2 + len(groups):]
    assert hint == ("full report and plot: add --benchmark-json=bench-out/run.json to this command, "
                    "then python -m benchmarks.report bench-out/run.json"), hint
    assert re.fullmatch(r"the pytest session took \d+ s; smoke sizes check that the suite runs: "
                        r"their times are not results", took), took
    assert re.fullmatch(r"=+ \d+ passed in .* =+", final), final


class _Saved:
    """A result as pytest-benchmark's session holds it (only what the summary hook reads)."""

    has_error = False

    def __init__(self, bench: dict):
        self.bench = bench

    def as_dict(self, include_data=True):
        return self.bench


class _Terminal:
    def __init__(self):
        self.lines = []

    def write_sep(self, sep, title):
        self.lines.append(f"{sep * 3} {title} {sep * 3}")

    def write_line(self, line):
        self.lines.append(line)


def test_summary_hook_names_the_saved_json_and_the_shorter_run():
    """With --benchmark-json the hint is the report command for that file; at default sizes the
    time line offers the shorter runs. The table is report.py's, for the session's results."""
    from benchmarks import conftest as bench_conftest

    class Config:
        _benchmarksession = type("Session", (), {"benchmarks": [_Saved(b) for b in SAVED["benchmarks"]]})()
        _drep_start = time.monotonic() - 65

        def getoption(self, name, default=None):
            return {"--drep-sizes": "default", "benchmark_json": Path("bench-out/cpu.json")}.get(name, default)

    tr = _Terminal()
    bench_conftest.pytest_terminal_summary(tr, Config())
    table = report.summary_table(report.by_group(report.rows_of(SAVED["benchmarks"])))
    assert tr.lines[0] == "=== drep-kernels summary (default sizes) ==="
    assert tr.lines[1:-2] == table and len(table) == 2 + 3, tr.lines
    assert tr.lines[-2] == "full report and plot: python -m benchmarks.report bench-out/cpu.json"
    assert re.fullmatch(r"the pytest session took 6\d s; shorter: --drep-sizes=smoke .* --drep-budget-s=SECONDS .*",
                        tr.lines[-1]), tr.lines[-1]


# --- the GPU run script -----------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path without a GPU")
def test_gpu_run_fails_fast_without_a_gpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("DREP_GPU_RUN_PLUMBING", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "gpu_run: FAILED: no CUDA GPU visible to torch" in proc.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["run.log"]


def test_half_rows_on_cuda_run_the_baselines_under_autocast():
    """bf16 / fp16 rows on CUDA: the eager baseline (and every step contender) keeps float32
    parameters and runs under autocast, as the authors' code trains in half precision; float32
    rows and CPU rows run as given."""
    from benchmarks import cases

    def spec(device, dtype):
        return shapes.Spec("denoise_loss", "full", shapes.Shape(K=8, M=197), dtype, "eager", device, "smoke")

    for dtype, want in (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", None), ("tf32", None)):
        assert cases._autocast_dtype(spec("cuda", dtype)) == want
        assert cases._param_dtype(spec("cuda", dtype)) == (torch.float32 if want else shapes.torch_dtype(dtype))
    assert cases._autocast_dtype(spec("cpu", "bfloat16")) is None
    fn = lambda: torch.is_autocast_enabled("cpu")  # noqa: E731
    assert cases._under_autocast(fn, spec("cpu", "float32")) is fn
