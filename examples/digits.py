"""DenoiseRep end to end on a small ViT for scikit-learn's 8x8 digits (no download).

    python examples/digits.py            # after `pip install --no-build-isolation .` (or `-e .`)
    python examples/digits.py --quick    # a tiny run (seconds), as the tests do

Per seed: train a baseline ViT; then, from that baseline, (a) keep training it as many more
epochs as DenoiseRep gets (the equal-epoch baseline, so the comparison is fair) and (b) convert
it, alternate denoiser and backbone phases on task + 0.01 * denoise_loss (as the authors
train), and fuse. It prints one table: test accuracies (mean and spread over the seeds),
parameter count and inference latency of the fused model against the original architecture,
and the largest |logit difference| between the converted model (eval) and its fused form.
The numbers are whatever the run gives.

It runs the installed drep_kernels and refuses to start without its compiled extension: the
reference backend it would otherwise fall back to is slow and is not what this shows.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

LAMBDA = 0.01  # weight of the denoising loss, as the authors train
INSTALL = "in the repository root, run `pip install --no-build-isolation .` (or `-e .`) first"


def installed_drep_kernels():
    """The installed drep_kernels, with its compiled extension loaded; else exit with one line
    saying how to build it."""
    try:
        import drep_kernels
    except ImportError as e:
        sys.exit(f"digits.py: cannot import drep_kernels ({e}); {INSTALL}")
    from drep_kernels.backends import extension_error

    err = extension_error()
    if err is not None:
        where = os.path.dirname(os.path.abspath(drep_kernels.__file__))
        sys.exit(f"digits.py: drep_kernels from {where} has no compiled extension "
                 f"({' '.join(err.split())}); {INSTALL}")
    return drep_kernels


# --- data ----------------------------------------------------------------------------------

def load_digits(n_train: int | None = None) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test): 1797 8x8 images in [0, 1], an 80/20 split that is
    the same for every seed (a fixed permutation), so seeds vary only init and batch order."""
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    x = torch.tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n_test = len(y) // 5
    x_test, y_test, x_train, y_train = x[:n_test], y[:n_test], x[n_test:], y[n_test:]
    if n_train is not None:
        x_train, y_train = x_train[:n_train], y_train[:n_train]
    return x_train, y_train, x_test, y_test


# --- model ---------------------------------------------------------------------------------

class Block(nn.Module):
    """Pre-norm transformer block: multi-head self-attention, then an MLP (fc1, GELU, fc2)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """ViT for 1 x 8 x 8 images: a Conv2d patch embedding (4x4 patches: 4 tokens), a class
    token, learned positions, ``depth`` blocks, a linear head on the class token."""

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 2, mlp_ratio: int = 2, patch: int = 4):
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, patch, stride=patch)
        tokens = (8 // patch) ** 2 + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


# --- training ------------------------------------------------------------------------------

def train(model, opt, x, y, epochs: int, batch: int, gen: torch.Generator, desc: str, drep=None, phases=None):
    """Train ``epochs`` epochs. With ``drep`` (the drep_kernels module) the objective is
    task + LAMBDA * denoise_loss, and ``phases[e]`` names the phase of epoch e."""
    model.train()
    bar = tqdm(range(epochs), desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)
    for epoch in bar:
        if phases is not None:
            drep.set_phase(model, phases[epoch])
        perm = torch.randperm(len(y), generator=gen)
        total, extra = 0.0, 0.0
        for i in range(0, len(y), batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if drep is not None:
                dl = drep.denoise_loss(model)
                extra += dl.detach().item()
                loss = loss + LAMBDA * dl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach().item()
        steps = -(-len(y) // batch)
        post = {"loss": f"{total / steps:.3f}"}
        if phases is not None:
            post.update(phase=phases[epoch], denoise=f"{extra / steps:.3f}")
        bar.set_postfix(post)


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


@torch.inference_mode()
def latencies_ms(models, x, repeats: int) -> list[float]:
    """Median wall time of one eval forward of each model; runs interleaved so that load from
    other processes hits them alike."""
    for m in models:
        m.eval()
        m(x)  # warm-up
    times = [[] for _ in models]
    for _ in range(repeats):
        for m, ts in zip(models, times):
            t0 = time.perf_counter()
            m(x)
            ts.append(time.perf_counter() - t0)
    return [1e3 * statistics.median(ts) for ts in times]


def run_seed(seed: int, args, data, drep) -> dict:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    base = TinyViT(dim=args.dim, depth=args.depth)
    opt = torch.optim.Adam(base.parameters(), lr=args.lr)
    train(base, opt, x_train, y_train, args.epochs, args.batch, gen, f"seed {seed} baseline")
    result = {"baseline": accuracy(base, x_test, y_test), "original": copy.deepcopy(base)}

    # Both continuations start from the same trained baseline, batch order and fresh optimizer.
    state = gen.get_state()
    longer = copy.deepcopy(base)
    train(longer, torch.optim.Adam(longer.parameters(), lr=args.lr), x_train, y_train, args.drep_epochs,
          args.batch, gen, f"seed {seed} baseline +{args.drep_epochs}")
    result["equal_epoch"] = accuracy(longer, x_test, y_test)

    gen.set_state(state)
    model = copy.deepcopy(base)
    include = (nn.Linear, nn.Conv2d) if args.convert == "all" else (nn.Linear,)
    exclude = None if args.convert == "all" else (lambda name, m: not name.endswith(("fc1", "fc2")))
    drep.convert(model, include=include, exclude=exclude, example_inputs=(x_train[:2],))
    result["converted"] = len(drep.timesteps(model))
    # One optimizer over everything; set_phase decides what has a gradient (Adam skips the rest).
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    train(model, opt, x_train, y_train, args.drep_epochs, args.batch, gen, f"seed {seed} DenoiseRep",
          drep=drep, phases=drep.phase_plan(args.drep_epochs, args.phase_len))
    with torch.no_grad():
        model.eval()
        unfused = model(x_test)
        fused = drep.fuse(model)
        logits = fused(x_test)
    result["drep"] = (logits.argmax(1) == y_test).float().mean().item()
    result["fuse_diff"] = (logits - unfused).abs().max().item()
    result["fused"] = fused
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=30, help="baseline training epochs")
    p.add_argument("--drep-epochs", type=int, default=4, help="DenoiseRep epochs after the baseline (the equal-epoch baseline gets as many)")
    p.add_argument("--phase-len", type=int, default=1, help="epochs per denoiser / backbone phase")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--backend", default=None, help="drep_kernels backend for every op (sets DREP_BACKEND)")
    p.add_argument("--convert", choices=("mlp", "all"), default="mlp",
                   help="mlp: the blocks' fc1/fc2; all: every Linear and the Conv2d patch embedding")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads: this model is too small to gain from more, and on a shared CPU they cost")
    p.add_argument("--quick", action="store_true", help="a tiny run for tests: few samples, epochs and seeds")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.drep_epochs, args.phase_len, args.seeds = 2, 2, 1, 2
        args.n_train, args.repeats = 128, 3
    else:
        args.n_train, args.repeats = None, 30
    if args.seeds < 1 or args.epochs < 0 or args.drep_epochs < 1 or args.phase_len < 1:
        p.error("need --seeds >= 1, --epochs >= 0, --drep-epochs >= 1, --phase-len >= 1")
    return args


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:6.2f} % +- {100 * sd:4.2f}  (min {100 * min(values):.2f}, max {100 * max(values):.2f})"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.backend:
        os.environ["DREP_BACKEND"] = args.backend
    torch.set_num_threads(args.threads)
    drep = installed_drep_kernels()
    from drep_kernels.backends import OPS, select

    t0 = time.perf_counter()
    data = load_digits(args.n_train)
    runs = [run_seed(seed, args, data, drep) for seed in range(args.seeds)]
    train_s = time.perf_counter() - t0
    original, fused = runs[0]["original"], runs[0]["fused"]
    assert [type(m) for m in original.modules()] == [type(m) for m in fused.modules()]
    lat_orig, lat_fused = latencies_ms([original, fused], data[2], args.repeats)
    n_params = [sum(p.numel() for p in m.parameters()) for m in (original, fused)]
    n_train, n_test = len(data[1]), len(data[3])

    rows = [
        (f"baseline ({args.epochs} epochs)", _spread([r["baseline"] for r in runs])),
        (f"baseline, equal epochs ({args.epochs}+{args.drep_epochs})", _spread([r["equal_epoch"] for r in runs])),
        (f"DenoiseRep, fused ({args.epochs}+{args.drep_epochs})", _spread([r["drep"] for r in runs])),
        ("parameters: original / fused", f"{n_params[0]} / {n_params[1]}"),
        (f"latency, batch {n_test}: original / fused", f"{lat_orig:.3f} ms / {lat_fused:.3f} ms (median of {args.repeats})"),
        ("max |logits unfused (eval) - fused|", f"{max(r['fuse_diff'] for r in runs):.3e}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"DenoiseRep on digits: TinyViT dim={args.dim} depth={args.depth}, {runs[0]['converted']} layers converted "
          f"({args.convert}), train {n_train} / test {n_test}, {args.seeds} seeds, lambda={LAMBDA}, "
          f"phases of {args.phase_len} epoch(s)")
    chosen = ", ".join(f"{op}: {select(op, torch.device('cpu'))}" for op in OPS)
    print(f"backends {chosen} (DREP_BACKEND={os.environ.get('DREP_BACKEND') or 'unset'}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.machine()}")
    print(f"drep_kernels {drep.__version__} from {os.path.dirname(os.path.abspath(drep.__file__))}")
    print("-" * (width + 60))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("-" * (width + 60))
    print(f"total time {time.perf_counter() - t0:.1f} s (training {train_s:.1f} s)")
    return {"runs": runs, "rows": dict(rows)}


if __name__ == "__main__":
    main()
