"""What is benchmarked: the shapes of each size set, the dtypes per device, the contenders.

Shapes are the MLP layers of ViT-S/B/L (197 tokens per image, M = batch x 197):
fc1 maps K -> 4K, fc2 maps 4K -> K, so the denoiser widths K are 384, 768, 1024, 1536, 3072
and 4096. The denoising loss depends on (M, K); the merge on (out, K); a layer's training step
and its inference on (M, K, out).

Size sets (``--drep-sizes``):
- ``smoke``: one tiny shape per op, to check that the suite runs (seconds, no meaning);
- ``default``: what a shared 2-core CPU finishes in under 10 minutes (the published CPU
  table): batch 8 (M = 1576), loss at K = 384..3072, merge at ViT-S fc1/fc2 and ViT-B fc1,
  steps and inference at ViT-S fc1/fc2;
- ``full``: the GPU sweep, every layer of ViT-S/B/L: the loss at batch 32 and 128, a
  layer's step and inference at batch 128.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from drep_kernels.backends import NAMES, implements

TOKENS = 197

# (name, K = in_features, out_features) of the ViT MLP layers.
VIT_LAYERS = {
    "vit_s.fc1": (384, 1536),
    "vit_s.fc2": (1536, 384),
    "vit_b.fc1": (768, 3072),
    "vit_b.fc2": (3072, 768),
    "vit_l.fc1": (1024, 4096),
    "vit_l.fc2": (4096, 1024),
}


@dataclass(frozen=True)
class Shape:
    K: int
    M: int = 0  # rows of the layer input (batch x 197); 0 where the op has none (merge)
    out: int = 0  # out_features; 0 where the op has none (loss)
    layer: str = ""

    @property
    def batch(self) -> int:
        return self.M // TOKENS

    @property
    def label(self) -> str:
        parts = []
        if self.M:
            parts.append(f"M{self.M}")
        if self.out:
            parts.append(f"out{self.out}")
        parts.append(f"K{self.K}")
        return "x".join(parts)


def _loss_shapes(sizes: str) -> list[Shape]:
    if sizes == "smoke":
        return [Shape(K=64, M=2 * TOKENS)]
    if sizes == "default":
        # One shared CPU core does ~20 GFLOP/s: batch 8 keeps K = 3072 near 3 s a call.
        return [Shape(K=k, M=8 * TOKENS) for k in (384, 768, 1536, 3072)]
    ks = sorted({k for k, _ in VIT_LAYERS.values()})
    return [Shape(K=k, M=b * TOKENS) for b in (32, 128) for k in ks]


def _layer_shapes(sizes: str, with_rows: bool, batches: tuple[int, ...]) -> list[Shape]:
    if sizes == "smoke":
        return [Shape(K=64, out=96, M=2 * TOKENS if with_rows else 0, layer="smoke")]
    names = ["vit_s.fc1", "vit_s.fc2", "vit_b.fc1"] if sizes == "default" else list(VIT_LAYERS)
    out = []
    for b in batches if with_rows else (0,):
        for name in names:
            k, o = VIT_LAYERS[name]
            out.append(Shape(K=k, out=o, M=b * TOKENS, layer=name))
    return out


def shapes(op: str, sizes: str) -> list[Shape]:
    if op == "denoise_loss":
        return _loss_shapes(sizes)
    if op == "merge_weights":
        return _layer_shapes(sizes, with_rows=False, batches=())
    if op == "host_step":
        # One image of 197 tokens through an 8 -> 8 layer: the device work is nil, what is
        # timed is the host's (Python, dispatch, launches), every size set alike.
        return [Shape(K=8, out=8, M=TOKENS, layer="tiny")]
    if op in ("train_step", "inference"):
        if sizes == "default":  # ViT-S layers at batch 8 on a CPU
            return [Shape(K=k, out=o, M=8 * TOKENS, layer=n)
                    for n, (k, o) in VIT_LAYERS.items() if n.startswith("vit_s")]
        return _layer_shapes(sizes, with_rows=True, batches=(128,) if sizes == "full" else (2,))
    raise ValueError(op)


def dtypes(device: str) -> list[str]:
    """fp32 on CPU; bf16, fp16, fp32 (TF32 off) and tf32 (fp32 storage, TF32 matmuls) on CUDA."""
    return ["float32"] if device == "cpu" else ["bfloat16", "float16", "float32", "tf32"]


def torch_dtype(name: str) -> torch.dtype:
    return torch.float32 if name == "tf32" else getattr(torch, name)


# --- contenders ---------------------------------------------------------------------------
STEP_OPS = ("train_step", "host_step")  # a layer's training step: at a real shape, and at a tiny one
LAYER_OPS = STEP_OPS + ("inference",)  # ops of a whole layer (its loss and its merge)

# role: "floor" (the unavoidable GEMMs, or the plain layer), "eager" (the authors' way),
# "compile" (that under torch.compile), "drep" (our ops). Ratios are taken against the
# floor and the eager contender of the same group.

def drep_backends(op: str, device: str) -> list[str]:
    """Every backend that implements ``op`` (or, for a layer, every op it runs) here.

    The Triton interpreter (TRITON_INTERPRET=1 on a CPU) is a test tool, not a contender."""
    ops = ("denoise_loss", "merge_weights") if op in LAYER_OPS else (op,)
    found = []
    for b in NAMES:
        if b == "triton" and device == "cpu":
            continue
        if all(implements(b, o, device) for o in ops):
            found.append(b)
    return found


@dataclass(frozen=True)
class Spec:
    """One benchmark case: op, mode, shape, dtype and contender."""

    op: str
    mode: str
    shape: Shape
    dtype: str
    contender: str
    device: str
    sizes: str

    @property
    def role(self) -> str:
        c = self.contender
        if c.startswith("drep"):
            return "drep"
        if c.startswith("compile"):
            return "compile"
        return {"floor": "floor", "linear": "floor", "eager": "eager"}.get(c, "other")

    @property
    def backend(self) -> str | None:
        c = self.contender
        return c[5:-1] if c.startswith("drep[") else None

    @property
    def runs_loss(self) -> bool:
        return self.op == "denoise_loss" or (self.op in STEP_OPS and self.mode == "denoiser")

    @property
    def group(self) -> str:
        return f"{self.op}[{self.mode}]/{self.shape.label}/{self.dtype}"

    @property
    def id(self) -> str:
        return f"{self.mode}-{self.shape.label}-{self.dtype}-{self.contender}"


def contenders(op: str, device: str, compile_: bool) -> list[str]:
    backends = [f"drep[{b}]" for b in drep_backends(op, device)]
    if op in ("denoise_loss", "merge_weights"):
        names = ["floor", "eager"]
        if compile_:
            names.append("compile")
            if device == "cuda":
                names.append("compile-max-autotune")
        return names + backends
    if op in STEP_OPS:
        # drep[default]: what a user gets (each op's fastest built backend).
        return ["linear", "eager", "drep[default]"] + backends
    if op == "inference":
        return ["linear", "fused", "drep[eval]"]
    raise ValueError(op)


def floor_contender(op: str) -> str:
    return "floor" if op in ("denoise_loss", "merge_weights") else "linear"


MODES = {
    "denoise_loss": ("full",),  # forward + backward: the forward already does all the work
    "merge_weights": ("forward", "full"),
    "train_step": ("denoiser", "backbone"),
    "host_step": ("denoiser", "backbone"),
    "inference": ("eval",),
}


def _dtypes_for(op: str, device: str) -> list[str]:
    # A layer's step and its inference in the two dtypes training runs in: bf16 and fp32 (TF32).
    if device == "cuda" and op == "train_step":
        return ["bfloat16", "tf32"]
    if op == "host_step":  # host time does not depend on the dtype: the one training runs in
        return ["bfloat16"] if device == "cuda" else ["float32"]
    if device == "cuda" and op == "inference":
        return ["bfloat16", "float32"]
    return dtypes(device)


def specs(op: str, sizes: str, device: str, compile_: bool = True) -> list[Spec]:
    out = []
    for dtype in _dtypes_for(op, device):
        for mode in MODES[op]:
            for shape in shapes(op, sizes):
                for c in contenders(op, device, compile_):
                    if c.startswith("compile") and device == "cuda" and dtype not in ("bfloat16", "tf32"):
                        continue  # compile time: the two dtypes training runs in
                    if c == "compile-max-autotune" and dtype != "bfloat16":
                        continue  # minutes of autotuning per shape: bf16 only
                    out.append(Spec(op, mode, shape, dtype, c, device, sizes))
    return out


# The torch backend computes the counter-based noise with int64 tensor arithmetic (about 250
# elementwise passes over M x K / 4 counters): right as an oracle, but slow: about 0.2 us per
# element on one core of the CPU the published results come from (1 s at M x K = 4.8M). Its
# loss is benchmarked up to this many elements.
TORCH_LOSS_MAX_ELEMENTS = {"cpu": 5_000_000, "cuda": 8_000_000}


def too_slow(spec: Spec, loss_backend: str | None) -> str | None:
    """Why a case is skipped, or None. ``loss_backend``: the backend its loss would run on."""
    if not spec.runs_loss or loss_backend != "torch" or spec.role != "drep":
        return None
    limit = TORCH_LOSS_MAX_ELEMENTS.get(spec.device, 0)
    elements = spec.shape.M * spec.shape.K
    if elements > limit:
        return (f"the torch backend's loss on M x K = {elements} elements (limit {limit} on {spec.device}): "
                "its int64 Philox emulation is too slow for the suite")
    return None


def default_device() -> str:
    forced = os.environ.get("DREP_BENCH_DEVICE")
    if forced:
        return forced
    return "cuda" if torch.cuda.is_available() else "cpu"
