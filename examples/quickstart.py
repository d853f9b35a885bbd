"""A short end-to-end DenoiseRep run on random data (no download, ~1 s of training).

    python examples/quickstart.py

Trains a small MLP classifier, converts it, alternates the denoiser and backbone phases for a
few steps, fuses it, and checks the fused (plain nn.Linear) model computes what the trained
converted model computes.
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import drep_kernels as dk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per phase")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    x = torch.randn(512, 32)
    y = (x[:, :4].sum(1) > 0).long() + (x[:, 4:8].sum(1) > 0).long()  # 3 classes
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(100):  # a "pretrained" backbone
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    dk.convert(model)
    print("converted layers (name: t):", dk.timesteps(model))
    print("backends here:", dk.backends())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for phase in ("denoiser", "backbone"):
        dk.set_phase(model, phase)
        model.train()
        for _ in range(args.steps):
            opt.zero_grad()
            task = F.cross_entropy(model(x), y)
            denoise = dk.denoise_loss(model)  # 0 in the backbone phase: nothing could use it
            (task + 0.01 * denoise).backward()
            opt.step()
        print(f"{phase:>8} phase: task loss {task.item():.4f}, denoising loss {denoise.item():.4f}")

    model.eval()
    with torch.no_grad():
        unfused = model(x)
        fused = dk.fuse(model)
        out = fused(x)
    print("fused model:", fused)
    print(f"max |fused - unfused| logits: {(out - unfused).abs().max().item():.3e}")
    print(f"accuracy: {(out.argmax(1) == y).float().mean().item():.3f}")


if __name__ == "__main__":
    main()
