"""The suite tests the built package or stops saying why (the root conftest.py), and
``python -m drep_kernels.env`` reports what the extension was built against."""
from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import drep_kernels
backends = importlib.import_module("drep_kernels.backends")  # (drep_kernels.backends the attribute is the function)

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import drep_kernels
from drep_kernels.backends import extension_error

def test_probe():
    print("IMPORTED", drep_kernels.__file__)
    assert extension_error() is None, extension_error()
"""


def test_this_run_imports_a_built_package():
    assert backends.extension_error() is None
    assert any(Path(drep_kernels.__file__).parent.glob("_C.*")), drep_kernels.__file__


def _source_tree(tmp_path: Path) -> Path:
    """A checkout without a compiled extension: the package's Python files, setup.py and
    tests/conftest.py, plus a probe test."""
    tree = tmp_path / "checkout"
    shutil.copytree(ROOT / "drep_kernels", tree / "drep_kernels", ignore=shutil.ignore_patterns("_C.*", "__pycache__"))
    shutil.copy(ROOT / "setup.py", tree / "setup.py")
    (tree / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "conftest.py", tree / "tests" / "conftest.py")
    (tree / "tests" / "test_probe.py").write_text(PROBE)
    return tree


def _site_without_drep(tmp_path: Path) -> Path:
    """A copy (by links) of this environment's site-packages minus drep_kernels, for a Python
    run with -S: torch and pytest importable, no installed drep_kernels."""
    import pytest as _pytest

    site = Path(_pytest.__file__).resolve().parents[1]
    view = tmp_path / "site"
    view.mkdir()
    for entry in site.iterdir():
        if entry.name.startswith(("drep_kernels", "drep_kernels-", "__editable__", "drep-kernels")):
            continue
        (view / entry.name).symlink_to(entry)
    return view


def _pytest_in(tree: Path, env_extra: dict[str, str], python_flags=()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DREP_", "PYTEST_"))}
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, *python_flags, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/test_probe.py"],
        cwd=tree, env=env, capture_output=True, text=True, timeout=300,
    )


def test_python_m_pytest_in_a_source_tree_tests_the_installed_build(tmp_path):
    # `python -m pytest` puts the checkout first on sys.path; conftest.py must still pick the
    # installed, built package (here: the one this run imported).
    tree = _source_tree(tmp_path)
    run = _pytest_in(tree, {})
    assert run.returncode == 0, run.stdout + run.stderr
    imported = next(line for line in run.stdout.splitlines() if "IMPORTED" in line).split()[-1]
    assert Path(imported).resolve().parent == Path(drep_kernels.__file__).resolve().parent


def test_a_source_tree_with_nothing_installed_stops_the_run_with_the_fix(tmp_path):
    tree = _source_tree(tmp_path)
    site = _site_without_drep(tmp_path)
    run = _pytest_in(tree, {"PYTHONPATH": str(site)}, python_flags=("-S",))
    out = run.stdout + run.stderr
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, out
    assert "source tree without a compiled extension" in out, out
    assert "pip install --no-build-isolation ." in out and "DREP_ALLOW_NO_EXTENSION=1" in out, out
    assert "1 passed" not in out  # the session ended before any test ran


def test_the_opt_out_runs_without_the_extension(tmp_path):
    tree = _source_tree(tmp_path)
    (tree / "tests" / "test_probe.py").write_text(
        "from drep_kernels.backends import extension_error\n"
        "def test_probe():\n    assert extension_error() is not None\n"
    )
    site = _site_without_drep(tmp_path)
    run = _pytest_in(tree, {"PYTHONPATH": str(site), "DREP_ALLOW_NO_EXTENSION": "1"}, python_flags=("-S",))
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize(
    "error,expected",
    [
        ("/x/_C.so: undefined symbol: _ZN3c104impl", "ABI mismatch"),
        ("No module named 'drep_kernels._C'", "no compiled _C"),
    ],
)
def test_diagnosis_names_the_cause_and_the_fix(monkeypatch, tmp_path, error, expected):
    monkeypatch.setattr(backends, "extension_error", lambda: error)
    # The installed package (no setup.py beside it) without a binary, or with one that fails.
    fake = tmp_path / "site" / "drep_kernels" / "backends" / "__init__.py"
    fake.parent.mkdir(parents=True)
    monkeypatch.setattr(backends, "__file__", str(fake))
    if expected == "ABI mismatch":
        (fake.parents[1] / "_C.cpython-311-x86_64-linux-gnu.so").touch()
    msg = backends.extension_diagnosis()
    assert expected in msg and error in msg, msg
    assert "pip install --no-build-isolation" in msg, msg


def _env_report(**env_extra) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DREP_")}
    env.update(env_extra)
    run = subprocess.run(
        [sys.executable, "-m", "drep_kernels.env"], cwd=tempfile.gettempdir(),  # not the source tree
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_env_reports_the_build_from_the_extension():
    info = importlib.import_module("drep_kernels._C").build_info()
    assert info["torch"] == torch.__version__.split("+")[0]
    out = _env_report()
    assert f"built with torch {info['torch']}" in out and "MISMATCH" not in out, out
    # The run-time choice of csrc/cpu/isa.h (tests/test_cpu_vector_paths.py checks which).
    assert re.search(r"CPU kernels' vector path: (avx512|avx2|baseline) ", out), out
    cuda_registered = torch._C._dispatch_has_kernel_for_dispatch_key("drep::denoise_loss_fwd", "CUDA")
    if cuda_registered:
        # nvcc's own list of the architectures compiled (CI builds 8.0 and 9.0).
        archs = [f"sm_{int(a) // 10}" for a in info["cuda_archs"].split(",")]
        assert info["cuda"] and f"CUDA kernels built for {', '.join(archs)}" in out, out
        if os.environ.get("TORCH_CUDA_ARCH_LIST") == "8.0;9.0":
            assert archs == ["sm_80", "sm_90"], info
    else:
        assert info["cuda"] is None and info["cuda_archs"] is None, info
        assert "CUDA kernels not built" in out, out


@pytest.mark.parametrize("forced", ["cuda", "nonsense"])
def test_env_flags_a_forced_backend_that_cannot_run_here(forced):
    if forced == "cuda" and torch.cuda.is_available():
        pytest.skip("the cuda backend can run here")
    out = _env_report(DREP_BACKEND=forced)
    flagged = [line for line in out.splitlines() if line.strip().startswith("<-")]
    assert flagged, out
    if forced == "nonsense":
        assert "not a backend" in flagged[0], out
    else:
        assert "cannot run denoise_loss, merge_weights on cpu" in out and "no CUDA device" in out, out
