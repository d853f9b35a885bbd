"""drep-train's command line: the run's configuration (fixed for its whole life, stored in its
checkpoints) and the per-launch settings (paths, workers, backend, wrapping)."""
from __future__ import annotations

import argparse
import ast
from typing import Any, Mapping, Optional, Sequence

from . import UsageError

# What a resumed run takes from its checkpoint; giving another value is an error.
CONFIG = (
    "model", "pretrained", "checkpoint", "model_kwargs", "img_size", "convert", "exclude", "baseline",
    "epochs", "phase_len", "lam", "lr", "min_lr", "warmup_epochs", "warmup_lr", "weight_decay",
    "batch_size", "amp", "seed",
)

DESCRIPTION = """Fine-tune a timm or torchvision model with DenoiseRep on an image folder: convert its
layers, alternate denoiser and backbone phases (denoiser first) on task + lambda * denoising loss,
then fuse it into the plain architecture. Runs under torchrun unchanged (DDP; --fsdp for FSDP2)."""

EPILOG = """Writes to --output: checkpoint-last.pt after every epoch (and checkpoint-epochN.pt with
--save-every-epoch), log.csv and log.json, and at the end model-fused.pt (model.pt with --baseline),
a plain state dict, with model-fused.json saying how to build the model it loads into."""


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word (act_layer=gelu) is a string, as timm's scripts read it


def model_kwargs(pairs: Optional[Sequence[str]]) -> dict[str, Any]:
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--model-kwargs takes KEY=VALUE pairs, got {pair!r}")
        out[key] = _literal(value)
    return out


def parser() -> tuple[argparse.ArgumentParser, dict[str, Any], dict[str, str]]:
    """The parser (no defaults filled in: a resumed run must tell given flags from defaults),
    the defaults and each setting's flag, by setting."""
    p = argparse.ArgumentParser(prog="drep-train", description=DESCRIPTION, epilog=EPILOG,
                                argument_default=argparse.SUPPRESS)
    defaults: dict[str, Any] = {}
    flag: dict[str, str] = {}

    def add(group, *flags, default=None, help: str, **kw):
        shown = f" (default: {default})" if default not in (None, False, []) else ""
        action = group.add_argument(*flags, help=help + shown, **kw)
        defaults[action.dest] = default
        flag[action.dest] = flags[0]

    run = p.add_argument_group("data and output")
    add(run, "--data", required=True, help="directory with train/ and val/, one folder of images per class", metavar="DIR")
    add(run, "--output", required=True, help="directory for checkpoints, logs and the fused model", metavar="DIR")
    add(run, "--resume", help="continue the run of this drep-train checkpoint (its configuration included)", metavar="PATH")
    add(run, "--save-every-epoch", action="store_true", default=False, help="also keep checkpoint-epochN.pt of every epoch")
    add(run, "--workers", type=int, default=4, help="data loading processes per training process")

    model = p.add_argument_group("model")
    add(model, "--model", help="a timm model name (timm.list_models()), else a torchvision one; "
        "torchvision:NAME picks torchvision's (required unless --resume)")
    add(model, "--pretrained", action="store_true", default=False, help="start from the library's pretrained weights")
    add(model, "--checkpoint", help="start from this plain state dict of the model (a classifier of another "
        "class count is replaced)", metavar="PATH")
    add(model, "--model-kwargs", nargs="+", help="constructor arguments, KEY=VALUE (values are Python literals)", metavar="KEY=VALUE")
    add(model, "--img-size", type=int, help="input size of the transforms (and of timm models that take one); "
        "default: the model's")
    add(model, "--convert", choices=("linear", "linear+conv"), default="linear", help="layers to convert")
    add(model, "--exclude", nargs="+", default=[], help="glob patterns of layer names to leave plain (e.g. 'head')",
        metavar="PATTERN")
    add(model, "--baseline", action="store_true", default=False,
        help="train the model unconverted for as many epochs (the equal-epoch baseline)")

    train = p.add_argument_group("training")
    add(train, "--epochs", type=int, default=20, help="epochs in all")
    add(train, "--phase-len", type=int, default=10, help="epochs per phase, alternating denoiser and backbone")
    add(train, "--lambda", dest="lam", metavar="LAMBDA", type=float, default=0.01, help="weight of the denoising loss")
    add(train, "--lr", type=float, default=1e-4, help="AdamW peak learning rate")
    add(train, "--min-lr", type=float, default=1e-6, help="learning rate at the end of the cosine")
    add(train, "--warmup-epochs", type=int, default=1, help="epochs of linear warmup")
    add(train, "--warmup-lr", type=float, default=1e-6, help="learning rate the warmup starts from")
    add(train, "--weight-decay", type=float, default=0.05, help="AdamW weight decay (none on biases and norms)")
    add(train, "--batch-size", type=int, default=64, help="images per step and process")
    add(train, "--amp", choices=("none", "bf16", "fp16"), help="autocast dtype (default: bf16 on CUDA, none on CPU)")
    add(train, "--seed", type=int, default=0, help="seed of the initial weights, data order and noise")

    system = p.add_argument_group("system")
    add(system, "--backend", help="force this drep_kernels backend for every op (sets DREP_BACKEND)")
    add(system, "--fsdp", action="store_true", default=False, help="under torchrun, shard with FSDP2 (fully_shard) instead of DDP")
    return p, defaults, flag


def _validate(args: argparse.Namespace, flag: Mapping[str, str]) -> None:
    if args.model is None:
        raise UsageError("--model is required (or --resume a checkpoint)")
    for name in ("epochs", "phase_len", "batch_size", "lr"):
        if getattr(args, name) <= 0:
            raise UsageError(f"{flag[name]} must be positive, got {getattr(args, name)}")
    for name in ("lam", "min_lr", "warmup_lr", "weight_decay", "warmup_epochs", "workers"):
        if getattr(args, name) < 0:
            raise UsageError(f"{flag[name]} must be >= 0, got {getattr(args, name)}")
    if args.img_size is not None and args.img_size <= 0:
        raise UsageError(f"--img-size must be positive, got {args.img_size}")
    if args.pretrained and args.checkpoint:
        raise UsageError("give --pretrained or --checkpoint, not both")


def parse(argv: Optional[Sequence[str]], resumed: Optional[Mapping[str, Any]] = None) -> argparse.Namespace:
    """The run's settings. ``resumed``: the configuration of the checkpoint being resumed,
    which the command line may repeat but not change."""
    p, defaults, flag = parser()
    given = vars(p.parse_args(argv))
    if "model_kwargs" in given:
        given["model_kwargs"] = model_kwargs(given["model_kwargs"])
    if resumed is None:
        args = argparse.Namespace(**{**defaults, "model_kwargs": {}, **given})
        inapplicable = [flag[k] for k in ("convert", "exclude", "phase_len", "lam", "backend") if k in given]
        if args.baseline and inapplicable:
            raise UsageError(f"--baseline trains the model unconverted: {', '.join(inapplicable)} do(es) not apply to it")
    else:
        changed = [k for k in CONFIG if k in given and given[k] != resumed[k]]
        if changed:
            raise UsageError(
                "a resumed run keeps the configuration it started with; the checkpoint has "
                + ", ".join(f"{flag[k]} {resumed[k]!r} (given {given[k]!r})" for k in changed)
            )
        args = argparse.Namespace(**{**defaults, **given, **{k: resumed[k] for k in CONFIG}})
    _validate(args, flag)
    return args


def parse_resume_path(argv: Optional[Sequence[str]]) -> Optional[str]:
    """``--resume``'s value, read before the full parse (that needs the checkpoint's configuration)."""
    p, _, _ = parser()
    known, _ = p.parse_known_args(argv)
    return getattr(known, "resume", None)
