"""drep-train: build, convert, train (alternating phases), checkpoint, resume, fuse, check, save."""
from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import drep_kernels as dk

from . import UsageError, checkpoint, distributed, log, loop, recipe, train_args, zoo
from .data import check_root, eval_loader, image_folders, train_loader


def run(prog: str, argv: Optional[Sequence[str]] = None) -> None:
    resume = train_args.parse_resume_path(argv)
    ckpt = checkpoint.read(resume) if resume else None
    args = train_args.parse(argv, ckpt["config"] if ckpt else None)
    check_root(args.data)
    output = Path(args.output)
    if ckpt is None and (output / "checkpoint-last.pt").exists():
        raise UsageError(f"--output {output} already holds a run (checkpoint-last.pt): --resume it or choose another directory")
    procs = distributed.start(args.fsdp)
    try:
        _train(args, ckpt, procs, output)
    finally:
        distributed.stop(procs)


def _say(procs: distributed.Processes, text: str) -> None:
    if procs.main:
        print(text, flush=True)


def _backends(device: torch.device, forced: Optional[str]) -> str:
    from drep_kernels.backends import OPS, select

    if forced:
        os.environ["DREP_BACKEND"] = forced
    try:
        return ", ".join(f"{op}: {select(op, device)}" for op in OPS)
    except ValueError as e:  # an unknown backend, or one that cannot run here
        raise UsageError(f"--backend {forced}: {e}") from e


def _classes(root: str) -> list[str]:
    from torchvision.datasets.folder import find_classes

    try:
        return find_classes(str(Path(root) / "train"))[0]
    except FileNotFoundError as e:
        raise UsageError(f"--data {root}: {e}") from e


def _train(args, ckpt: Optional[dict], procs: distributed.Processes, output: Path) -> None:
    t0 = time.perf_counter()
    amp = args.amp or ("bf16" if procs.device.type == "cuda" else "none")
    args.amp = amp
    backends = "-" if args.baseline else _backends(procs.device, args.backend)
    classes = _classes(args.data)
    if ckpt is not None and ckpt["classes"] != classes:
        raise UsageError(f"--data {args.data} has other classes than the checkpoint's run: {classes} vs {ckpt['classes']}")

    fresh = ckpt is None
    model, arch, data_config, x, source = _model(args, len(classes), fresh)
    converted = 0 if args.baseline else recipe.convert(model, args.convert, args.exclude, x)
    model.to(procs.device)
    if procs.fsdp:
        distributed.shard(model, (nn.Linear, nn.Conv2d) if args.baseline else dk.model.DENOISE_TYPES)

    train_set, val_set, _ = image_folders(args.data, data_config)
    pin = procs.device.type == "cuda"
    train_batches = train_loader(train_set, args.batch_size, args.workers, procs.rank, procs.world, args.seed, pin)
    val_batches = eval_loader(val_set, args.batch_size, args.workers, procs.rank, procs.world, pin)
    steps = len(train_batches)

    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    # Built while every parameter requires grad: timm leaves frozen ones out of its groups.
    optimizer = create_optimizer_v2(model, "adamw", lr=args.lr, weight_decay=args.weight_decay)
    scheduler = CosineLRScheduler(
        optimizer, t_initial=args.epochs * steps, lr_min=args.min_lr, warmup_t=args.warmup_epochs * steps,
        warmup_lr_init=args.warmup_lr, t_in_epochs=False,
    )
    scaler = torch.amp.GradScaler(procs.device.type, enabled=amp == "fp16")
    if fresh:
        start, rows = 0, []
        checkpoint.seed_all(args.seed + procs.rank)  # each process its own augmentation and noise
    else:
        start, rows = _restore(ckpt, model, optimizer, scheduler, scaler, procs, args.seed)

    if procs.main:
        output.mkdir(parents=True, exist_ok=True)
    what = "unconverted (--baseline)" if args.baseline else f"{converted} layers converted ({args.convert})"
    mode = f"{procs.world} processes ({'FSDP2' if procs.fsdp else 'DDP'})" if procs.distributed else "1 process"
    _say(procs, f"{arch.call()}: {source}, {what}")
    _say(procs, f"data {args.data}: {len(train_set)} train / {len(val_set)} val images, {len(classes)} classes, "
                f"input {'x'.join(map(str, data_config['input_size']))}; {steps} steps of {args.batch_size} per process and epoch")
    _say(procs, f"{mode} on {procs.device.type}, amp {amp}, backends {backends}"
                + (f"; resuming after epoch {start}" if not fresh else ""))

    plan = [None] * args.epochs if args.baseline else dk.phase_plan(args.epochs, args.phase_len)
    for epoch in range(start, args.epochs):
        if plan[epoch] is not None:
            dk.set_phase(model, plan[epoch])
        stats = loop.train_epoch(
            model, distributed.for_training(model, procs), train_batches, optimizer, scheduler, scaler,
            epoch=epoch, step=epoch * steps, phase=plan[epoch], lam=args.lam, amp=amp, procs=procs,
            progress=f"epoch {epoch + 1}/{args.epochs}",
        )
        val_top1 = loop.top1(model, val_batches, amp, procs)  # the unfused model: what fusing must keep
        rows.append({
            "epoch": epoch + 1, "phase": plan[epoch] or "baseline", "lr": stats.lr, "task_loss": stats.task_loss,
            "denoise_loss": stats.denoise_loss, "val_top1": val_top1, "images_per_s": stats.images_per_s,
            "seconds": stats.seconds,
        })
        _save(output, args, arch, classes, model, optimizer, scheduler, scaler, rows, procs)
        _say(procs, log.line(rows[-1], args.epochs))

    if args.baseline:
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if procs.main:
            zoo.write_plain(output / "model.pt", state, arch, {"classes": classes})
            _say(procs, f"wrote {output / 'model.pt'} (the plain model; load: {arch.call()})")
    else:
        _fuse_and_check(args, arch, classes, model, x, val_batches, rows, output, procs)
    _say(procs, f"done in {time.perf_counter() - t0:.1f} s")


def _model(args, num_classes: int, fresh: bool):
    """(model, architecture, timm data config, a probe image, where the weights come from),
    unconverted. The same initial weights (a fresh head included) on every process."""
    checkpoint.seed_all(args.seed)
    model, arch = zoo.create(args.model, num_classes, args.img_size, args.model_kwargs, args.pretrained and fresh)
    source = f"--resume {args.resume}" if not fresh else "pretrained" if args.pretrained else "random init"
    if args.checkpoint and fresh:
        source = f"--checkpoint {args.checkpoint}" + zoo.load_initial_weights(model, arch, args.checkpoint)
    data_config = zoo.input_size(model, args.img_size)
    x = recipe.probe(model, data_config["input_size"], arch.call())
    return model, arch, data_config, x, source


def _restore(ckpt, model, optimizer, scheduler, scaler, procs, seed: int) -> tuple[int, list]:
    checkpoint.load_full_state(model, optimizer, ckpt["model"], ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    start = ckpt["epoch"]
    if len(ckpt["rng"]) == procs.world:
        checkpoint.set_rng_state(ckpt["rng"][procs.rank])
    else:
        # Each process's streams belong to its rank; with another process count there is no
        # such continuation: start fresh streams per (epoch, rank), and say so.
        _say(procs, f"note: the checkpoint was written by {len(ckpt['rng'])} process(es), this run has {procs.world}: "
                    "random streams restart, so the run does not continue bitwise")
        checkpoint.seed_all(seed + 1000 * start + procs.rank)
    return start, list(ckpt["log"])


def _save(output: Path, args, arch, classes, model, optimizer, scheduler, scaler, rows, procs) -> None:
    model_state, optim_state = checkpoint.full_state(model, optimizer)  # a collective under FSDP2
    rngs = distributed.gather(checkpoint.rng_state(), procs)
    if not procs.main:
        return
    epoch = rows[-1]["epoch"]
    config = {k: getattr(args, k) for k in train_args.CONFIG}
    checkpoint.save(output / "checkpoint-last.pt", {
        "format": checkpoint.FORMAT, "config": config, "architecture": arch.to_dict(), "classes": classes,
        "epoch": epoch, "model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(), "rng": rngs, "log": rows,
    })
    if args.save_every_epoch:
        shutil.copyfile(output / "checkpoint-last.pt", output / f"checkpoint-epoch{epoch}.pt")
    log.write(output, rows)


def _fuse_and_check(args, arch, classes, model, x, val_batches, rows, output: Path, procs) -> None:
    """Rebuild the trained model from its full state dict (as drep-fuse does), fuse a copy,
    compare both on the validation images, and write the plain state dict."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # every rank
    unfused = arch.build()
    recipe.convert(unfused, args.convert, args.exclude, x)
    unfused.load_state_dict(state, strict=True)
    unfused.to(procs.device)
    fused = dk.fuse(copy.deepcopy(unfused))
    check = loop.compare_fused(unfused, fused, val_batches, procs)
    final = {"val_top1_unfused": check.unfused_top1, "val_top1_fused": check.fused_top1,
             "max_logit_diff": check.max_logit_diff, "max_abs_logit": check.max_logit}
    _say(procs, f"fused: val top-1 {100 * check.fused_top1:.2f} % (unfused {100 * check.unfused_top1:.2f} %), "
                f"max |logit difference| {check.max_logit_diff:.3e} (largest |logit| {check.max_logit:.3g})")
    if not recipe.fuse_matches(check.max_logit_diff, check.max_logit):
        raise UsageError(
            f"the fused model differs from the trained one (max |logit difference| {check.max_logit_diff:.3e}): "
            f"{recipe.FUSE_MISMATCH}; model-fused.pt not written (checkpoint-last.pt holds the trained run)"
        )
    if procs.main:
        zoo.write_plain(output / "model-fused.pt", fused.state_dict(), arch, {"classes": classes, **final})
        log.write(output, rows, final)
        _say(procs, f"wrote {output / 'model-fused.pt'}: model = {arch.call()}; "
                    "model.load_state_dict(torch.load('model-fused.pt'), strict=True)")
