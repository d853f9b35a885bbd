"""examples/digits.py end to end, in its --quick mode (a few seconds), imported and as a script."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import drep_kernels

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "digits.py"
# examples/ is not installed with the package: import it from the checkout (appended, so the
# source tree cannot shadow the installed drep_kernels).
sys.path.append(str(ROOT))
from examples import digits  # noqa: E402

# The compiled backend of each op on CPU tensors: the example must run these, never the
# torch reference (a build without _C makes it exit instead).
COMPILED = "backends denoise_loss: cpu, merge_weights: cpu"
# Chance is 10 %. After 2 + 2 quick epochs every seed reaches 33 % or more (seeds 0 and 1:
# 33.1 / 50.1 % equal-epoch baseline, 34.0 / 46.5 % DenoiseRep, the same on 1 and 2 threads);
# a run that does not learn stays near chance.
LEARNED = 0.25


@pytest.fixture
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("convert", ["mlp", "all"])
def test_digits_quick_prints_the_table_and_fuses_exactly(convert, capsys, _restore_threads):
    result = digits.main(["--quick", "--convert", convert])
    out = capsys.readouterr().out
    for label in ("baseline (", "baseline, equal epochs", "DenoiseRep, fused", "parameters: original / fused", "latency", "max |logits"):
        assert label in out, f"{label!r} missing from the table:\n{out}"
    assert COMPILED in out, out
    diff = float(re.search(r"max \|logits unfused \(eval\) - fused\|\s+(\S+)", out).group(1))
    assert diff < 1e-5, out
    original, fused = result["runs"][0]["original"], result["runs"][0]["fused"]
    assert sum(p.numel() for p in original.parameters()) == sum(p.numel() for p in fused.parameters())
    expected_converted = 4 if convert == "mlp" else 1 + 2 * 4 + 1  # patch embed, 4 Linears per block, head
    assert result["runs"][0]["converted"] == expected_converted
    for seed, run in enumerate(result["runs"]):
        for acc in ("equal_epoch", "drep"):
            assert run[acc] >= LEARNED, f"seed {seed}: {acc} accuracy {run[acc]:.3f} is near chance (0.1)"


def test_digits_is_deterministic_for_a_seed(capsys, _restore_threads):
    args = digits.parse_args(["--quick", "--seeds", "1"])
    data = digits.load_digits(args.n_train)
    torch.set_num_threads(args.threads)
    a = digits.run_seed(0, args, data, drep_kernels)
    b = digits.run_seed(0, args, data, drep_kernels)
    assert (a["baseline"], a["equal_epoch"], a["drep"]) == (b["baseline"], b["equal_epoch"], b["drep"])
    for p, q in zip(a["fused"].parameters(), b["fused"].parameters()):
        assert torch.equal(p, q)


def test_digits_without_drep_kernels_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "drep_kernels", None)  # import drep_kernels -> ImportError
    with pytest.raises(SystemExit) as exit_:
        digits.installed_drep_kernels()
    message = str(exit_.value.code)
    assert message.startswith("digits.py: cannot import drep_kernels") and digits.INSTALL in message, message
    assert "\n" not in message


def _run_script(cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--quick", "--backend", "cpu"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a fresh interpreter: about 10 s on 2 busy cores
@pytest.mark.parametrize("where", ["elsewhere", "repo root"])
def test_digits_script_runs_the_installed_build(where, tmp_path):
    proc = _run_script(tmp_path if where == "elsewhere" else ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert COMPILED in proc.stdout, proc.stdout
    installed = Path(drep_kernels.__file__).resolve().parent  # the test process imports the installed one
    used = re.search(r"^drep_kernels \S+ from (.+)$", proc.stdout, re.MULTILINE)
    assert used and Path(used.group(1)).resolve() == installed, proc.stdout


@pytest.mark.slow  # a fresh interpreter: about 5 s on 2 busy cores
def test_digits_script_refuses_a_build_without_the_extension(tmp_path):
    """A source tree without _C first on the path (what the removed sys.path hack imported in a
    regular install): the script must stop with one line, not train on the torch backend."""
    shadow = tmp_path / "drep_kernels"
    shutil.copytree(Path(drep_kernels.__file__).parent, shadow, ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    # Leaving _C out is not enough under an editable install: its import hook would still find
    # the checkout's _C. A module that fails to import, as an unbuilt or stale _C does, is.
    (shadow / "_C.py").write_text('raise ImportError("no compiled _C in this source tree")\n')
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = _run_script(tmp_path, env)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout == "", proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"digits.py: drep_kernels from {shadow} has no compiled extension"), lines[0]
    assert lines[0].endswith("run `pip install --no-build-isolation .` (or `-e .`) first"), lines[0]
