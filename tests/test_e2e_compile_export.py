"""torch.compile of a converted model (train and eval), torch.export and ONNX export of a fused
one, and a bfloat16 autocast training step whose merge stays float32 while its loss runs in bf16."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import drep_kernels as dk
from drep_kernels.backends import reference
from conftest import assert_close


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv_nobias = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = F.relu(self.bn(self.conv_nobias(x)))
        return self.fc2(F.gelu(self.fc1(x.flatten(1))))


def _converted(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return dk.convert(_Net(), include=(nn.Linear, nn.Conv2d), init="linear")


def _step(model, x, y):
    """One training step's loss and gradients (a fixed seed: the same noise in every mode)."""
    torch.manual_seed(1234)
    out = model(x)
    dl = dk.denoise_loss(model)
    loss = F.cross_entropy(out, y) + 0.01 * dl
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return out.detach(), dl.detach(), grads


COMPILE_BACKENDS = ["aot_eager"] + (["inductor"] if os.environ.get("DREP_TEST_INDUCTOR") == "1" else [])


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compile_fullgraph_train_and_eval(backend):
    # aot_eager traces forward and backward through the ops' fake kernels and autograd formulas
    # as inductor does, without its C++ code generation (minutes on a 2-core CPU). Set
    # DREP_TEST_INDUCTOR=1 to run inductor too.
    torch._dynamo.reset()
    eager = _converted()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    for phase in ("joint", "denoiser", "backbone"):
        dk.set_phase(eager, phase)
        dk.set_phase(compiled_model, phase)
        out_e, dl_e, grads_e = _step(eager, x, y)
        out_c, dl_c, grads_c = _step(compiled, x, y)
        assert_close(out_c, out_e, 1e-5, 1e-6, f"{phase}: output")
        assert (dl_e.item() > 0) == (phase != "backbone")
        assert_close(dl_c, dl_e, 1e-5, 1e-6, f"{phase}: denoising loss")
        for i, (gc, ge) in enumerate(zip(grads_c, grads_e)):
            assert_close(gc, ge, 1e-4, 1e-6, f"{phase}: grad {i}")
    eager.eval()
    compiled_model.eval()
    with torch.no_grad():
        assert_close(compiled(x), eager(x), 1e-5, 1e-6, "eval output")


def _fused(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    model = _converted(seed)
    dk.set_phase(model, "joint")
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    _step(model, x, y)  # move the BN statistics off their init
    fused = dk.fuse(model.eval())
    assert not any(isinstance(m, dk.model.DENOISE_TYPES) for m in fused.modules())
    return fused, x


def test_torch_export_of_fused_model():
    fused, x = _fused()
    program = torch.export.export(fused, (x,))
    with torch.no_grad():
        assert_close(program.module()(x), fused(x), 1e-6, 1e-6, "exported program")
        x2 = torch.randn_like(x)
        assert_close(program.module()(x2), fused(x2), 1e-6, 1e-6, "exported program, new input")
    # Only plain aten ops: nothing of drep_kernels is left to deploy.
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("drep" in t for t in targets), targets


def test_onnx_export_of_fused_model(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")  # the dynamo exporter's dependency
    from onnx.reference import ReferenceEvaluator

    fused, x = _fused()
    path = tmp_path / "fused.onnx"
    torch.onnx.export(fused, (x,), str(path), dynamo=True, input_names=["x"], output_names=["logits"])
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    (logits,) = ReferenceEvaluator(model).run(None, {"x": x.numpy()})
    with torch.no_grad():
        assert_close(torch.from_numpy(logits), fused(x), 1e-5, 1e-5, "onnx reference run")


def test_autocast_bf16_training_step_merges_in_float32(monkeypatch):
    model = _converted()
    dk.set_phase(model, "joint")
    seen, seen_loss, loss_grads = [], [], []
    real_merge, real_loss = reference.merge_weights_fwd, reference.denoise_loss_fwd

    def spy(weight, bias, denoise_weight, denoise_bias, c1, c3):
        # The kernel's inputs, and whether autocast would recast its matmuls.
        dtypes = {t.dtype for t in (weight, bias, denoise_weight, denoise_bias) if t is not None}
        seen.append((dtypes, torch.is_autocast_enabled("cpu")))
        return real_merge(weight, bias, denoise_weight, denoise_bias, c1, c3)

    def spy_loss(x, denoise_weight, denoise_bias, *args):
        dtypes = {t.dtype for t in (x, denoise_weight, denoise_bias) if t is not None}
        seen_loss.append((dtypes, torch.is_autocast_enabled("cpu")))
        out = real_loss(x, denoise_weight, denoise_bias, *args)
        assert {t.dtype for t in out} == {torch.float32}  # the loss and its gradients: float32
        loss_grads.append(out[1])
        return out

    monkeypatch.setenv("DREP_BACKEND", "torch")
    monkeypatch.setattr(reference, "merge_weights_fwd", spy)
    monkeypatch.setattr(reference, "denoise_loss_fwd", spy_loss)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        merged_autocast = [m.merged_weight_and_bias() for m in model.modules() if isinstance(m, dk.model.DENOISE_TYPES)]
        loss = F.cross_entropy(out, y) + 0.01 * dk.denoise_loss(model)
    assert out.dtype == torch.bfloat16
    assert seen == [({torch.float32}, False)] * 4
    # The loss gets the autocast dtype's rows and denoiser (GEMMs on tensor cores on a GPU; no
    # float32 copy of the rows), and runs with autocast off.
    assert seen_loss == [({torch.bfloat16}, False)] * 4
    # The merged weights are the float32 merge, not one of bf16 inputs.
    with torch.no_grad():
        layers = [m for m in model.modules() if isinstance(m, dk.model.DENOISE_TYPES)]
        for layer, (w, b) in zip(layers, merged_autocast):
            layer._merge_cache = None
            w32, b32 = layer.merged_weight_and_bias()
            assert w.dtype == torch.float32 and torch.equal(w, w32)
            assert (b is None and b32 is None) or torch.equal(b, b32)
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    loss.backward()
    for p in model.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    # W_d's gradient is the op's float32 dL/dW_d times the loss weight, never rounded to bf16.
    for layer, grad in zip(layers, loss_grads):
        assert torch.equal(layer.denoise_weight.grad, torch.tensor(0.01) * grad)
    opt.step()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_cuda_training_step_merges_in_float32(dtype):
    model = _converted().cuda()
    dk.set_phase(model, "joint")
    x, y = torch.randn(4, 3, 8, 8, device="cuda"), torch.tensor([0, 1, 2, 3], device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        out = model(x)
        merged = [m.merged_weight_and_bias() for m in model.modules() if isinstance(m, dk.model.DENOISE_TYPES)]
        loss = F.cross_entropy(out, y) + 0.01 * dk.denoise_loss(model)
    assert out.dtype == dtype
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    with torch.no_grad():
        layers = [m for m in model.modules() if isinstance(m, dk.model.DENOISE_TYPES)]
        for layer, (w, _) in zip(layers, merged):
            layer._merge_cache = None
            w32, _ = layer.merged_weight_and_bias()  # outside autocast: the float32 merge
            assert w.dtype == torch.float32 and torch.equal(w, w32)
    loss.backward()
    for p in model.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
