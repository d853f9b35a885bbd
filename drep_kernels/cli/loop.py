"""One training epoch, and evaluation, of a (converted) model on this process's share of the data."""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import drep_kernels as dk

from .data import counted
from .distributed import Processes, total

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


@dataclass
class EpochStats:
    lr: float  # of the epoch's last update
    task_loss: float
    denoise_loss: Optional[float]  # None when no layer computed it (backbone phase, baseline)
    images_per_s: float
    seconds: float


def train_epoch(
    model: nn.Module, forward: nn.Module, loader, optimizer, scheduler, scaler, *, epoch: int, step: int,
    phase: Optional[str], lam: float, amp: str, procs: Processes, progress: str,
) -> EpochStats:
    """One pass over the loader. ``forward`` is what runs the batches (DDP wrapper, sharded or
    plain model); ``model`` is the module whose layers hold the denoising losses. ``phase`` is
    None for a baseline. The scheduler is stepped per update, from update ``step``."""
    from tqdm import tqdm

    model.train()
    loader.sampler.set_epoch(epoch)
    device = procs.device
    task_sum = torch.zeros((), dtype=torch.float64, device=device)
    denoise_sum = torch.zeros((), dtype=torch.float64, device=device)
    bar = tqdm(total=len(loader) * loader.batch_size * procs.world, desc=progress, unit="img", unit_scale=True,
               disable=not procs.main, leave=False, file=sys.stderr, dynamic_ncols=True)
    start = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if procs.fsdp and phase == "denoiser":
            # FSDP2 reduces gradients from hooks on outputs that require grad; with the backbone
            # frozen only the input can make them (docs/distributed.md).
            x.requires_grad_()
        with autocast(device, amp):
            task = F.cross_entropy(forward(x), y)
        loss = task
        if phase is not None:
            denoise = dk.denoise_loss(model)
            loss = task + lam * denoise
            denoise_sum += denoise.detach()
        optimizer.zero_grad(set_to_none=True)
        lr = optimizer.param_groups[0]["lr"]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        step += 1
        scheduler.step_update(num_updates=step)
        task_sum += task.detach()
        bar.update(len(x) * procs.world)
    bar.close()
    seconds = time.perf_counter() - start
    sums = total(torch.stack((task_sum, denoise_sum)), procs) / (len(loader) * procs.world)
    return EpochStats(
        lr=lr,
        task_loss=sums[0].item(),
        denoise_loss=sums[1].item() if phase == "denoiser" else None,
        images_per_s=len(loader) * loader.batch_size * procs.world / seconds,
        seconds=seconds,
    )


@torch.no_grad()
def top1(model: nn.Module, loader, amp: str, procs: Processes) -> float:
    """Validation top-1 accuracy (a fraction) over all processes' shares."""
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=procs.device)
    for x, y in loader:
        x, y = x.to(procs.device, non_blocking=True), y.to(procs.device, non_blocking=True)
        with autocast(procs.device, amp):
            pred = model(x).argmax(1)
        keep = counted(y)
        counts += torch.stack(((pred == y)[keep].sum(), keep.sum())).double()
    correct, n = total(counts, procs).tolist()
    return correct / n


@dataclass
class FuseCheck:
    unfused_top1: float
    fused_top1: float
    max_logit_diff: float
    max_logit: float


@torch.no_grad()
def compare_fused(unfused: nn.Module, fused: nn.Module, loader, procs: Processes) -> FuseCheck:
    """Top-1 of both models and their largest logit difference on the validation images, in
    float32 (no autocast): the difference the fusion itself makes."""
    unfused.eval(), fused.eval()
    stats = torch.zeros(2, dtype=torch.float64, device=procs.device)  # correct unfused, fused
    n = torch.zeros((), dtype=torch.float64, device=procs.device)
    peaks = torch.zeros(2, dtype=torch.float64, device=procs.device)  # max |diff|, max |logit|
    for x, y in loader:
        x, y = x.to(procs.device), y.to(procs.device)
        keep = counted(y)
        a, b = unfused(x)[keep].double(), fused(x)[keep].double()
        stats += torch.stack(((a.argmax(1) == y[keep]).sum(), (b.argmax(1) == y[keep]).sum())).double()
        n += keep.sum()
        if a.numel():
            peaks = torch.maximum(peaks, torch.stack(((a - b).abs().max(), a.abs().max())))
    stats, n = total(stats, procs), total(n, procs).item()
    peaks = total(peaks, procs, largest=True)
    return FuseCheck(stats[0].item() / n, stats[1].item() / n, peaks[0].item(), peaks[1].item())
