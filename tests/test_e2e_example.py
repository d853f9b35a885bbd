"""examples/digits.py end to end, in its --quick mode (a few seconds)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

# examples/ is not installed with the package: import it from the checkout.
sys.path.append(str(Path(__file__).resolve().parents[1]))
from examples import digits  # noqa: E402


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
    diff = float(re.search(r"max \|logits unfused \(eval\) - fused\|\s+(\S+)", out).group(1))
    assert diff < 1e-5, out
    original, fused = result["runs"][0]["original"], result["runs"][0]["fused"]
    assert sum(p.numel() for p in original.parameters()) == sum(p.numel() for p in fused.parameters())
    expected_converted = 4 if convert == "mlp" else 1 + 2 * 4 + 1  # patch embed, 4 Linears per block, head
    assert result["runs"][0]["converted"] == expected_converted
    for acc in ("baseline", "equal_epoch", "drep"):
        assert 0.0 <= result["runs"][0][acc] <= 1.0


def test_digits_is_deterministic_for_a_seed(capsys, _restore_threads):
    args = digits.parse_args(["--quick", "--seeds", "1"])
    data = digits.load_digits(args.n_train)
    import drep_kernels

    torch.set_num_threads(args.threads)
    a = digits.run_seed(0, args, data, drep_kernels)
    b = digits.run_seed(0, args, data, drep_kernels)
    assert (a["baseline"], a["equal_epoch"], a["drep"]) == (b["baseline"], b["equal_epoch"], b["drep"])
    for p, q in zip(a["fused"].parameters(), b["fused"].parameters()):
        assert torch.equal(p, q)
