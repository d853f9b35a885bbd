"""drep-fuse: the plain, deployable state dict of a trained DenoiseRep model.

Reads a drep-train checkpoint, a converted model's state dict (``denoise_weight`` keys) or a
checkpoint of the authors' code (``dm.weight`` and ``time_mlp`` keys, loaded with
``load_reference_state_dict``), rebuilds the model by name, fuses it, checks on random input
that the fused model computes what the unfused one does, and writes the plain state dict.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

import drep_kernels as dk
from drep_kernels.model import _REFERENCE_ONLY

from . import UsageError, recipe, zoo
from .checkpoint import is_train_checkpoint
from .train_args import model_kwargs

DENOISER_KEYS = ("denoise_weight", "denoise_bias", "t")


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="drep-fuse", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the model's timm (or torchvision) name, as for drep-train")
    p.add_argument("--checkpoint", required=True, metavar="IN",
                   help="a drep-train checkpoint, a converted model's state dict, or the authors' checkpoint")
    p.add_argument("--output", required=True, metavar="OUT.pt", help="where to write the plain state dict (and OUT.json)")
    arch = p.add_argument_group("architecture of a state dict (a drep-train checkpoint records its own)")
    arch.add_argument("--num-classes", type=int, help="default: read from the checkpoint's classifier")
    arch.add_argument("--img-size", type=int, help="input size (timm ViTs take it at construction); default: the model's")
    arch.add_argument("--model-kwargs", nargs="+", default=[], metavar="KEY=VALUE", help="constructor arguments")
    return p.parse_args(argv)


def run(prog: str, argv: Optional[Sequence[str]] = None) -> None:
    args = parse(argv)
    out = Path(args.output)
    obj = zoo.read_state_dict(args.checkpoint)
    if is_train_checkpoint(obj):
        unfused, arch, x, layout = _from_train_checkpoint(args, obj)
    else:
        unfused, arch, x, layout = _from_state_dict(args, zoo.tensors_of(obj, args.checkpoint))
    unfused.eval()
    fused = dk.fuse(copy.deepcopy(unfused))
    with torch.no_grad():
        a, b = unfused(x).double(), fused(x).double()
    diff, peak = (a - b).abs().max().item(), a.abs().max().item()
    print(f"{args.checkpoint} ({layout}): {len(dk.timesteps(unfused))} layers fused; on random input "
          f"max |logit difference| fused vs unfused {diff:.3e} (largest |logit| {peak:.3g})")
    if not recipe.fuse_matches(diff, peak):
        raise UsageError(f"the fused model differs from the unfused one by {diff:.3e}: {recipe.FUSE_MISMATCH}; nothing written")
    out.parent.mkdir(parents=True, exist_ok=True)
    zoo.write_plain(out, fused.state_dict(), arch, {"source": str(args.checkpoint), "max_logit_diff": diff})
    print(f"wrote {out}: model = {arch.call()}; model.load_state_dict(torch.load({out.name!r}), strict=True)")


def _from_train_checkpoint(args, ckpt: Mapping[str, Any]):
    given = [f for f in ("num_classes", "img_size") if getattr(args, f) is not None] + (["model_kwargs"] if args.model_kwargs else [])
    if given:
        raise UsageError(f"{args.checkpoint} is a drep-train checkpoint, which records its architecture: "
                         f"drop --{', --'.join(g.replace('_', '-') for g in given)}")
    config, trained = ckpt["config"], zoo.Architecture.from_dict(ckpt["architecture"])
    if config["baseline"]:
        raise UsageError(f"{args.checkpoint} is a --baseline run: its model is plain already (model.pt beside it)")
    library, name = zoo.find(args.model)
    arch = zoo.Architecture(library, name, trained.kwargs)
    model = _build(arch)
    x = _input(model, config["img_size"], arch)
    recipe.convert(model, config["convert"], config["exclude"], x)
    _load_checked(model, ckpt["model"], args.checkpoint, arch, trained)
    return model, arch, x, f"drep-train checkpoint, epoch {ckpt['epoch']}"


def _from_state_dict(args, sd: dict[str, Tensor]):
    ours = _layers_with(sd, "denoise_weight")
    theirs = _layers_with(sd, "dm.weight")
    if not ours and not theirs:
        raise UsageError(f"{args.checkpoint} holds no denoiser (no denoise_weight or dm.weight keys): nothing to fuse")
    if ours and theirs:
        raise UsageError(f"{args.checkpoint} mixes this package's layers (denoise_weight) and the authors' (dm.weight)")
    library, name = zoo.find(args.model)
    num_classes = args.num_classes or _num_classes(library, name, sd, args)
    model, arch = zoo.create(args.model, num_classes, args.img_size, model_kwargs(args.model_kwargs), pretrained=False)
    x = _input(model, args.img_size, arch)
    layers = ours or theirs
    # Convert exactly the layers the checkpoint has denoisers for; steps in forward order.
    dk.convert(model.eval(), include=(nn.Linear, nn.Conv2d), exclude=lambda n, m: n not in layers, example_inputs=(x,))
    left = sorted(layers - set(dk.timesteps(model)))
    if left:
        raise UsageError(f"{args.checkpoint} has denoisers for layers {zoo.listed(left)} that {arch.call()} "
                         "does not have or cannot convert")
    if ours:
        _load_checked(model, sd, args.checkpoint, arch, None)
        return model, arch, x, "converted state dict"
    plain = {k: v for k, v in sd.items() if not _reference_key(k, layers)}
    expected = {k: v for k, v in model.state_dict().items() if not _denoiser_key(k, layers)}
    problem = zoo.mismatch(expected, plain)
    if problem:
        raise UsageError(f"{args.checkpoint} does not fit {arch.call()}: {problem}")
    try:
        dk.load_reference_state_dict(model, sd)
    except (KeyError, ValueError, RuntimeError) as e:
        raise UsageError(f"{args.checkpoint}: {e}") from e
    return model, arch, x, "the authors' layout"


def _build(arch: zoo.Architecture) -> nn.Module:
    try:
        return arch.build()
    except TypeError as e:
        raise UsageError(f"{arch.call()}: {e}") from e


def _input(model: nn.Module, img_size: Optional[int], arch: zoo.Architecture) -> Tensor:
    """Random images of the model's input size, the same every run (seeded)."""
    size = zoo.input_size(model, img_size)["input_size"]
    recipe.probe(model, size, arch.call())
    return torch.randn(2, *size, generator=torch.Generator().manual_seed(0))


def _layers_with(sd: Mapping[str, Tensor], suffix: str) -> set[str]:
    return {k[: -len(suffix) - 1] for k in sd if k.endswith("." + suffix)}


def _denoiser_key(key: str, layers: set[str]) -> bool:
    prefix, _, leaf = key.rpartition(".")
    return prefix in layers and leaf in DENOISER_KEYS


def _reference_key(key: str, layers: set[str]) -> bool:
    """A key of the authors' denoiser (dm.*, time_mlp.*, schedule buffers) in one of ``layers``."""
    return any(key.startswith(layer + ".") and key[len(layer) + 1:].split(".")[0] in _REFERENCE_ONLY for layer in layers)


def _num_classes(library: str, name: str, sd: Mapping[str, Tensor], args) -> int:
    """The class count of the checkpoint's classifier (timm names it in the model's config)."""
    for prefix in zoo.classifier_prefixes(library, name):
        weight = sd.get(prefix + ".weight")
        if weight is not None:
            return weight.shape[0]
    raise UsageError(f"cannot tell the class count of {args.checkpoint} for {name}: give --num-classes")


def _load_checked(model: nn.Module, sd: Mapping[str, Tensor], path, arch: zoo.Architecture,
                  trained: Optional[zoo.Architecture]) -> None:
    problem = zoo.mismatch(model.state_dict(), sd)
    if problem:
        was = f" (it was trained as {trained.call()})" if trained is not None and trained != arch else ""
        raise UsageError(f"{path} does not fit {arch.call()}{was}: {problem}")
    model.load_state_dict(sd, strict=True)
