"""Compile every shipped Triton build for sm_80 and sm_90 ahead of time, no GPU needed, and check it.

A build is one kernel launch of the triton backend, one config that launch can ship, one dtype
path and one target. The launches are found, not listed: the backend's entry points run on
small CPU tensors while every Triton kernel of their modules is replaced by a recorder, so the
check compiles exactly the arguments, constexprs and specializations the launchers pass (and
follows them when a launcher changes). Each build goes through ``triton.compile`` with a
``GPUTarget`` (Triton's own ptxas), and is read:

- spill stores: Triton's own ``ptxas -v`` log of the build;
- registers, stack frame and local memory: ``cuobjdump --dump-resource-usage`` of the cubin.
  A stack frame without spills is a local array: in the loss kernels that draw the noise
  (x_noisy, and L1 without given noise), the 32 bytes libdevice's sinf / cosf (tl.randn4x's
  Box-Muller) keep for reducing arguments above 105615, which the angles 2 pi u < 2 pi never
  reach, so the stack is reported, not failed;
- shared memory: the compiled kernel's metadata (what the launch asks for);
- tensor-core MMA: ``wgmma`` (sm_90) or ``mma.sync`` (sm_80) in the PTX.

A build fails on any spill store or local memory, on more shared memory than one block of the target
may have, and on a tensor-core path (a TF32 dot, or a dot fed bf16 / fp16) without the target's
MMA. ``python -m benchmarks.triton_aot`` compiles every build, prints the table, writes it as
markdown (``--out``) and exits 1 when a build fails; tests/test_triton_aot.py runs the same
builds in CI. Builds compile in a pool of spawned processes (``--jobs``, default 2): the kernels
must be imported without ``TRITON_INTERPRET``, which the test session sets. Triton caches each
build by its source hash (``TRITON_CACHE_DIR``), so an unchanged build costs a cache read; the
180 builds of 2026-11 took 2 to 4 minutes on 2 cores from an empty cache (6.5 on a loaded
machine); there are 238 since the row splits of the dL/dW_d GEMM.

The check runs under triton 3.6, 3.8 and 3.9 (a build that does not compile is reported with its
cause); the JIT internals it mirrors are used in ``_specialize`` only. The table goes to
benchmarks/results/triton-aot-sm80-sm90.md under triton 3.8 (CI's pinned release), to
benchmarks/results/triton-aot-sm80-sm90-triton<major.minor>.md under any other.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PINNED_TRITON = "3.8"  # CI's pinned release: its table is the unsuffixed one

# (capability, the most dynamic shared memory one block may have: cudaDevAttrMaxSharedMemoryPerBlockOptin
# of an A100 and an H100 / H200, which is what Triton checks before a launch).
TARGETS = {"sm_80": (80, 166912), "sm_90": (90, 232448)}
MMA = {"sm_80": "mma.sync", "sm_90": "wgmma"}
_MMA_PATTERNS = {"mma.sync": re.compile(r"\bmma\.sync\."), "wgmma": re.compile(r"\bwgmma\.mma_async\.")}


@dataclasses.dataclass(frozen=True)
class DtypePath:
    name: str
    dtype: str  # a torch dtype's name
    tf32: bool  # torch's float32 matmuls set to TF32, which the backend's dots follow


# The tensor-core policy (drep_kernels.precision): bf16 / fp16 operands go to the dots as they
# are, so those paths are tensor-core paths and must show MMA; float32 is one too exactly when
# torch's float32 matmuls are set to TF32 ("fp32 tf32"), else its dots are IEEE float32 (FMA
# units), as are float64's.
PATHS = (
    DtypePath("fp32 ieee", "float32", False),
    DtypePath("fp32 tf32", "float32", True),
    DtypePath("fp64", "float64", False),
    DtypePath("bf16", "bfloat16", False),
    DtypePath("fp16", "float16", False),
)

# The shapes of the example calls: a ViT-S MLP layer at batch 8 x 197 tokens (M = 1576 is not
# a multiple of 16, K = 384 is), contiguous tensors, so sizes and strides specialize as in training.
# The loss then runs in one row chunk; the two-chunk call lowers its chunk budget to 1024 rows,
# so that the later chunks' dW_d GEMM (ACCUMULATE: adding to dW_d) is compiled too.
_M, _K, _OUT = 1576, 384, 1536
_CHUNK_ROWS = 1024


def _entries(torch, dtype) -> list[tuple[str, str, Callable[[], object], list[Optional[str]]]]:
    """(module, entry, call, names of the launches it makes, in order) for each backend entry
    point; None names a launch that repeats the build of a named one (checked by _launches)."""
    from drep_kernels.triton import denoise_loss, merge_weights

    def t(*shape):
        return torch.randn(*shape, dtype=dtype)

    x, wd, bd, noise = t(_M, _K), t(_K, _K), t(_K), t(_M, _K)
    w, b, gw, gb = t(_OUT, _K), t(_OUT), t(_OUT, _K), t(_OUT)
    seed = torch.tensor(12345, dtype=torch.int64)
    loss, merge = denoise_loss.__name__, merge_weights.__name__

    def loss_call(noise, grad, chunk_rows=None, split_min_rows=None):
        def call():
            saved = denoise_loss.CHUNK_BYTES, denoise_loss.SPLIT_MIN_ROWS
            if chunk_rows is not None:
                denoise_loss.CHUNK_BYTES = chunk_rows * _K * 2 * x.dtype.itemsize
            if split_min_rows is not None:
                denoise_loss.SPLIT_MIN_ROWS = split_min_rows
            try:
                return denoise_loss.denoise_loss_fwd(x, wd, bd, 0.9, 0.1, noise, seed, grad)
            finally:
                denoise_loss.CHUNK_BYTES, denoise_loss.SPLIT_MIN_ROWS = saved

        return call

    # With grad, the dW_d GEMM splits the rows of a chunk of 1024 rows or more in two or more
    # (denoise_loss.grad_splits on an H100's SM count, as the launcher sizes them off the GPU):
    # one chunk of 1576 rows in three, then its split sum; two chunks (1024, 552 rows), the
    # first in two, the second whole and adding to dW_d in place; and with splits of 128 rows
    # allowed, the second in three too, its split sum adding to dW_d.
    return [
        (loss, "denoise_loss_fwd", loss_call(None, False), ["loss x_noisy", "loss L1", "loss finalize"]),
        (loss, "denoise_loss_fwd(grad)", loss_call(None, True),
         [None, "loss L1+L2", "loss dW_d", "loss dW_d split sum", "loss finalize dL/db_d"]),
        (loss, "denoise_loss_fwd(grad, noise)", loss_call(noise, True), ["loss x_noisy noise given"] + [None] * 4),
        (loss, "denoise_loss_fwd(grad, 2 chunks)", loss_call(None, True, _CHUNK_ROWS),
         [None] * 6 + ["loss dW_d accumulate", None]),
        (loss, "denoise_loss_fwd(grad, 2 chunks, 128-row splits)", loss_call(None, True, _CHUNK_ROWS, 128),
         [None] * 7 + ["loss dW_d split sum accumulate", None]),
        (merge, "merge_weights_fwd", lambda: merge_weights.merge_weights_fwd(w, b, wd, bd, 0.05, 0.99), ["merge M1+M2"]),
        (merge, "merge_weights_bwd", lambda: merge_weights.merge_weights_bwd(gw, gb, w, wd, bd, 0.05, 0.99, True, True),
         ["merge M3", "merge M4+M5"]),
    ]


@dataclasses.dataclass(frozen=True)
class Build:
    launch: str  # a name from _entries
    config: int  # index into the launch's shipped configs
    path: str  # a DtypePath name
    target: str  # a TARGETS key


@dataclasses.dataclass
class Row:
    build: Build
    kernel: str = ""
    config: str = ""
    regs: int = -1
    stack: int = -1
    local: int = -1
    spill_stores: int = -1
    shared: int = -1
    mma: str = ""  # the MMA instructions found in the PTX, "-" for none
    tensor_core: bool = False
    seconds: float = 0.0
    error: str = ""  # compile error, if any

    def failures(self) -> list[str]:
        """Why this build may not ship (empty when it may)."""
        if self.error:
            return [f"does not compile: {self.error}"]
        out = []
        if self.spill_stores > 0:
            out.append(f"{self.spill_stores} bytes of spill stores ({self.regs} registers, {self.stack} bytes of stack)")
        if self.local > 0:
            out.append(f"{self.local} bytes of local memory")
        limit = TARGETS[self.build.target][1]
        if self.shared > limit:
            out.append(f"{self.shared} bytes of shared memory, more than the {limit} a block may have on {self.build.target}")
        want = MMA[self.build.target]
        if self.tensor_core and want not in self.mma.split(", "):
            out.append(f"a tensor-core path without {want} in its PTX (found: {self.mma})")
        return out


# ---------------------------------------------------------------- in the worker processes

def _worker_init(package_root: str) -> None:
    """Import the kernels as real JIT functions (not the interpreter's) with every config the
    autotuner ships, from the drep_kernels the caller uses."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.pop("DREP_TRITON_AUTOTUNE", None)
    sys.path.insert(0, package_root)
    import torch

    torch.set_num_threads(1)


@contextlib.contextmanager
def _float32_precision(torch, tf32: bool):
    """torch's float32 matmul precision, which drep_kernels.precision.dot_precision reads, for one call."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        saved = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if tf32 else "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = saved
    else:  # torch without the fp32_precision API
        saved = matmul.allow_tf32
        matmul.allow_tf32 = tf32
        try:
            yield
        finally:
            matmul.allow_tf32 = saved


class _Recorder:
    """Stands for a kernel during a launcher call: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))

    def __getattr__(self, name):  # the launcher reads the kernel's own attributes (its configs)
        return getattr(self.kernel, name)


@contextlib.contextmanager
def _recording(modules: list, launches: list):
    """Replace every Triton kernel object in ``modules`` by a recorder (restored on exit:
    compiling reads the kernels' globals) and let the launchers take CPU tensors."""
    from triton.runtime.jit import KernelInterface

    from drep_kernels.triton import _common

    saved = [(_common, "check_device", _common.check_device)]
    for m in modules:
        saved += [(m, k, v) for k, v in vars(m).items() if isinstance(v, KernelInterface)]
    try:
        for m, k, v in saved[1:]:
            setattr(m, k, _Recorder(v, launches))
        _common.check_device = lambda *tensors: None
        yield
    finally:
        for m, k, v in saved:
            setattr(m, k, v)


_launch_cache: dict = {}


def _launches(path: DtypePath) -> dict:
    """{launch name: (JIT function, args, kwargs, shipped configs)} of the backend's entry points
    on ``path``; a launch not autotuned ships the options it is launched with (config None)."""
    if path.name in _launch_cache:
        return _launch_cache[path.name]
    import torch
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    torch.manual_seed(0)
    out = {}
    for module_name, entry, call, names in _entries(torch, getattr(torch, path.dtype)):
        module = importlib.import_module(module_name)
        recorded: list = []
        with _recording([module], recorded), _float32_precision(torch, path.tf32):
            call()
        if len(recorded) != len(names):
            raise RuntimeError(f"{entry} made {len(recorded)} launches, expected {len(names)} ({names}): update _entries")
        for name, (kernel, args, kwargs) in zip(names, recorded):
            fn = kernel
            while not isinstance(fn, JITFunction):  # autotuners and heuristics wrap the JIT function
                fn = fn.fn
            if name is None:
                # Unnamed: the same kernel with the same constexprs as a named launch (its other
                # arguments are the same shapes and strides, or not specialized on).
                if not any(v[0] is fn and v[2] == kwargs for v in out.values()):
                    raise RuntimeError(f"{entry}: an unnamed launch of {fn.__name__} is a new build: name it in _entries")
                continue
            configs = list(kernel.configs) if isinstance(kernel, Autotuner) else [None]
            out[name] = (fn, args, kwargs, configs)
    _launch_cache[path.name] = out
    return out


def _specialize(fn, args: tuple, kwargs: dict, target):
    """(ASTSource, options) of the launch ``fn[grid](*args, **kwargs)`` on ``target``, built by
    the JIT's own binder, so the signature, constexprs and divisibility / ==1 specializations
    (and any do_not_specialize) are the ones a launch on a GPU would compile. The JIT internals
    used here are the same in triton 3.6, 3.8 and 3.9; a triton that changes them fails here."""
    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime import jit

    backend = make_backend(target)
    kwargs = dict(kwargs, debug=bool(fn.debug or triton.knobs.runtime.debug))
    try:
        binder = jit.create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    except (AttributeError, TypeError) as e:
        raise RuntimeError(f"triton {triton.__version__}'s JIT binder differs from 3.6 / 3.8: adapt _specialize ({e})") from e
    return ASTSource(fn, signature, constexprs, attrs), options


def _cuobjdump(cubin: bytes, *options: str) -> str:
    import triton

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "kernel.cubin"
        f.write_bytes(cubin)
        return subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, *options, str(f)], check=True, capture_output=True, text=True
        ).stdout


def parse_resource_usage(text: str) -> dict[tuple[str, str], dict[str, int]]:
    """{(arch, function): {"REG": n, "STACK": n, "SHARED": n, "LOCAL": n, ...}} from cuobjdump
    --dump-resource-usage output; arch is "" for a bare cubin (a fat binary names it per ELF).
    Also reads the CUDA extension's kernels (tests/test_cuda_resources.py)."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    arch, current = "", None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = (\S+)", line):
            arch, current = m.group(1), None
        elif m := re.match(r"\s*Function (\S+):\s*$", line):
            current = out.setdefault((arch, m.group(1)), {})
        elif current is not None and "REG:" in line:
            current.update({k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)})
    return out


_PTXAS_LOG = "drep_ptxas.log"


def _compile(src, target, options):
    """(the compiled kernel, Triton's own ptxas -v log of it). Triton prints that log
    (TRITON_DUMP_PTXAS_LOG) only when it runs ptxas, so the log is kept beside the build in
    Triton's cache; a build cached without one is compiled again."""
    import io

    import triton
    from triton.runtime.cache import get_cache_manager

    for always in (False, True):
        out = io.StringIO()
        with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope(), contextlib.redirect_stdout(out):
            triton.knobs.nvidia.dump_ptxas_log = True
            triton.knobs.compilation.always_compile = always
            compiled = triton.compile(src, target=target, options=options.__dict__)
        cache = get_cache_manager(compiled.hash)
        if "spill stores" in out.getvalue():
            cache.put(out.getvalue(), _PTXAS_LOG, binary=False)
            return compiled, out.getvalue()
        if cached := cache.get_file(_PTXAS_LOG):
            return compiled, Path(cached).read_text()
    # A Triton whose knobs differ (3.9 served the build from its cache without running ptxas):
    # run Triton's ptxas on the build's own PTX with the flags Triton passes it.
    log = _ptxas_log(compiled.asm["ptx"])
    get_cache_manager(compiled.hash).put(log, _PTXAS_LOG, binary=False)
    return compiled, log


def _ptxas_log(ptx: str) -> str:
    """``ptxas -v`` of ``ptx`` by Triton's own ptxas, with Triton's flags (-lineinfo,
    --regAllocOptLevel=2) and the PTX's own target; a ``.maxnreg`` travels in the PTX."""
    import tempfile

    import triton

    target = re.search(r"^\.target\s+(\S+)", ptx, re.MULTILINE)
    if target is None:
        raise RuntimeError("the PTX names no .target")
    arch = target.group(1).rstrip(",")
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = Path(get_ptxas(int(re.sub(r"\D", "", arch))).path)
    except (ImportError, TypeError, AttributeError, ValueError):
        pass
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [str(ptxas), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.cubin")]
        run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0 or "spill stores" not in run.stderr + run.stdout:
        raise RuntimeError(f"ptxas failed ({run.returncode}): {(run.stderr or run.stdout)[-500:]}")
    return run.stderr + run.stdout


def spill_stores(ptxas_log: str) -> int:
    """Bytes of spill stores in a ptxas -v log (one kernel)."""
    found = re.findall(r"(\d+) bytes spill stores", ptxas_log)
    if not found:
        raise ValueError(f"no spill count in the ptxas log: {ptxas_log[:300]!r}")
    return sum(int(n) for n in found)


def mma_found(ptx: str) -> str:
    return ", ".join(name for name, pattern in _MMA_PATTERNS.items() if pattern.search(ptx)) or "-"


def is_tensor_core_path(constexprs: dict) -> bool:
    """Whether a launch's dot must run on tensor cores: it is TF32, or its operands are bf16 /
    fp16. Read from what the launcher asks for (the INPUT_PRECISION and GEMM_DTYPE constexprs),
    not from the compiled code, which is what is being checked. A launch without
    INPUT_PRECISION has no dot (the loss's x_noisy kernel); one with a dot must say its
    operands' dtype in GEMM_DTYPE."""
    import triton.language as tl

    if "INPUT_PRECISION" not in constexprs:
        return False
    if "GEMM_DTYPE" not in constexprs:
        raise ValueError("a kernel with a dot (INPUT_PRECISION) must name its operands' dtype in a GEMM_DTYPE constexpr")
    return constexprs["INPUT_PRECISION"] == "tf32" or constexprs["GEMM_DTYPE"] in (tl.bfloat16, tl.float16)


def config_label(config, launch_kwargs: Optional[dict] = None) -> str:
    """A config's block sizes and options; for a launch not autotuned (config None), the block
    sizes and options it is launched with (Triton's defaults where it passes none)."""
    if config is None:
        kw = launch_kwargs or {}
        sizes = {k: v for k, v in kw.items() if k.startswith(("BLOCK_", "GROUP_"))}
        warps, stages, maxnreg = kw.get("num_warps", 4), kw.get("num_stages", 3), kw.get("maxnreg")
    else:
        sizes, warps, stages, maxnreg = config.kwargs, config.num_warps, config.num_stages, config.maxnreg
    label = " ".join(f"{k}={v}" for k, v in sizes.items())
    return f"{label} warps={warps} stages={stages}" + (f" maxnreg={maxnreg}" if maxnreg else "")


def plan() -> dict[str, dict[str, list[str]]]:
    """{dtype path: {launch name: labels of the configs it ships on that path}} (a launch may
    use another autotuned kernel, with other configs, per path)."""
    return {
        p.name: {name: [config_label(c, v[2]) for c in v[3]] for name, v in _launches(p).items()} for p in PATHS
    }


def compile_build(build: Build) -> Row:
    import triton
    from triton.backends.compiler import GPUTarget

    row = Row(build)
    start = time.perf_counter()
    try:
        path = next(p for p in PATHS if p.name == build.path)
        fn, args, kwargs, configs = _launches(path)[build.launch]
        config = configs[build.config]
        row.kernel, row.config = fn.__name__, config_label(config, kwargs)
        target = GPUTarget("cuda", TARGETS[build.target][0], 32)
        src, options = _specialize(fn, args, {**kwargs, **(config.all_kwargs() if config else {})}, target)
        named = {fn.arg_names[k[0]]: v for k, v in src.constants.items()}
        row.tensor_core = is_tensor_core_path(named)
        compiled, ptxas_log = _compile(src, target, options)
        usage = parse_resource_usage(_cuobjdump(compiled.asm["cubin"], "--dump-resource-usage"))
        usage = usage[("", compiled.metadata.name)]
        row.regs, row.stack, row.local = usage["REG"], usage["STACK"], usage["LOCAL"]
        row.spill_stores = spill_stores(ptxas_log)
        row.shared = compiled.metadata.shared
        row.mma = mma_found(compiled.asm["ptx"])
    except Exception as e:  # reported as this build's failure; the other builds go on
        row.error = _describe(e)
    row.seconds = time.perf_counter() - start
    return row


def _describe(e: BaseException) -> str:
    """One line: the error and its innermost cause (a CompilationError's own text is the source
    position; its cause says what went wrong)."""
    def line(x):
        return f"{type(x).__name__}: {' '.join(str(x).split())}"[:300]

    cause = e
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return line(e) if cause is e else f"{line(e)[:120]} ... caused by {line(cause)}"


# ---------------------------------------------------------------- in the caller

def _pool(jobs: int) -> ProcessPoolExecutor:
    import drep_kernels

    package_root = str(Path(drep_kernels.__file__).resolve().parents[1])
    return ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_worker_init, initargs=(package_root,))


def builds(plans: dict[str, dict[str, list[str]]]) -> list[Build]:
    """Every (launch, config, dtype path, target) of ``plans`` ({path: {launch: config labels}})."""
    return [
        Build(launch, c, path, t) for path, configs in plans.items() for launch, labels in configs.items()
        for c in range(len(labels)) for t in TARGETS
    ]


def run(jobs: int = 2, progress: Optional[Callable[[Row], None]] = None) -> list[Row]:
    with _pool(jobs) as pool:
        todo = builds(pool.submit(plan).result())
        rows = []
        for row in pool.map(compile_build, todo):
            rows.append(row)
            if progress:
                progress(row)
    return rows


def table(rows: list[Row]) -> str:
    """The markdown table of ``rows``."""
    head = ("| launch | kernel | config | dtype path | target | regs | spill stores (B) | stack (B) | local (B) "
            "| shared (B) | tensor-core path | MMA in PTX | compile (s) | verdict |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        b = r.build
        verdict = "; ".join(r.failures()) or "ok"
        lines.append(
            f"| {b.launch} | `{r.kernel}` | {r.config} | {b.path} | {b.target} | {r.regs} | {r.spill_stores} | {r.stack} "
            f"| {r.local} | {r.shared} | {'yes' if r.tensor_core else 'no'} | {r.mma} | {r.seconds:.1f} | {verdict} |"
        )
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    """The markdown table of ``rows`` per launch, config and target, over the dtype paths: the
    register range, the most spill stores and shared memory, and the MMA of the tensor-core paths."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.build.launch, r.config, r.build.target), []).append(r)
    head = "| launch | config | target | regs | spill stores (B) | shared (B) | MMA on the tensor-core paths | failing |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (launch, config, target), rs in groups.items():
        regs = sorted(r.regs for r in rs)
        mma = sorted({f"{r.build.path}: {r.mma}" for r in rs if r.tensor_core}) or ["no tensor-core path"]
        lines.append(
            f"| {launch} | {config} | {target} | {regs[0]}-{regs[-1]} | {max(r.spill_stores for r in rs)} "
            f"| {max(r.shared for r in rs)} | {', '.join(mma)} | {sum(1 for r in rs if r.failures())} of {len(rs)} |"
        )
    return "\n".join(lines)


def markdown(rows: list[Row], command: str, wall: float, jobs: int) -> str:
    import torch
    import triton
    from triton.backends.nvidia.compiler import get_ptxas_version

    failed = [r for r in rows if r.failures()]
    return (
        "# Triton AOT builds for sm_80 and sm_90\n\n"
        f"Written by `{command}` on {datetime.date.today().isoformat()}: triton {triton.__version__} "
        f"(ptxas {next(ln for ln in get_ptxas_version(80).splitlines() if 'release' in ln).split('release ')[-1]}), torch {torch.__version__}, no GPU. "
        f"{len(rows)} builds, {len(failed)} failing; {wall:.0f} s wall on {jobs} processes "
        f"({sum(r.seconds for r in rows):.0f} s of compiles; cached builds cost a cache read).\n\n"
        "Each row is one launch of the triton backend, one shipped config, one dtype path and one target, "
        "compiled with `triton.compile` and Triton's ptxas. The loss launches per row chunk `x_noisy` (no dot; it "
        "stores eps too; `noise given`: the noise read, not drawn), `L1` or `L1+L2` (GEMM 1 and its epilogue, which "
        "reads the stored eps) and, with gradients, `dW_d` (GEMM 2; `accumulate`: the later chunks', adding to dW_d in "
        "place) and, where GEMM 2 splits the chunk's rows, `dW_d split sum` (the splits' partials added to dW_d; "
        "`accumulate`: after the earlier chunks). Spill stores: Triton's `ptxas -v` log; registers, "
        "stack and local memory: `cuobjdump --dump-resource-usage` of the cubin (the 32-byte stack of the kernel that draws noise "
        "is libdevice's sinf / cosf reduction array for arguments above 105615, never reached by Box-Muller's "
        "angles below 2 pi); shared memory: the kernel's metadata; MMA: `wgmma` / `mma.sync` in the PTX. A build "
        "passes with no spill stores and no local memory, shared memory within the target's per-block maximum, and, on a "
        "tensor-core path (TF32, or bf16 / fp16 fed to the dot), the target's MMA instructions.\n\n"
        + "## Per launch, config and target (over the five dtype paths)\n\n" + summary(rows) + "\n\n"
        + "## Every build\n\n" + table(rows) + "\n"
    )


def default_out() -> Path:
    """Where the table of the running triton goes (see the module doc)."""
    import triton

    release = ".".join(triton.__version__.split(".")[:2])
    return RESULTS / ("triton-aot-sm80-sm90.md" if release == PINNED_TRITON else f"triton-aot-sm80-sm90-triton{release}.md")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.triton_aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    out = default_out()
    parser.add_argument("--out", type=Path, default=out, help=f"markdown file (default here: {out.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    def progress(row: Row) -> None:
        b = row.build
        print(f"{b.launch:24} {row.config:70} {b.path:9} {b.target}  regs {row.regs:3}  spills {row.spill_stores:3}  stack {row.stack:4}  "
              f"shared {row.shared:6}  mma {row.mma:8}  {row.seconds:6.1f} s  {'; '.join(row.failures()) or 'ok'}",
              flush=True)

    rows = run(args.jobs, progress)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, "python -m benchmarks.triton_aot", time.perf_counter() - start, args.jobs))
    failed = [r for r in rows if r.failures()]
    print(f"{len(rows)} builds, {len(failed)} failing, {time.perf_counter() - start:.0f} s; table: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
