"""Models by name (timm first, then torchvision), the constructor call that rebuilds one plain,
and the checks that say which keys and shapes of a checkpoint do not fit a model."""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
from torch import Tensor

from . import UsageError

TORCHVISION = "torchvision:"  # prefix that picks torchvision for a name both libraries know


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)  # classification models only


def find(name: str) -> tuple[str, str]:
    """(library, model name) for ``--model NAME``: timm's name if timm has it, else torchvision's;
    ``torchvision:NAME`` asks for torchvision's."""
    import timm

    if name.startswith(TORCHVISION):
        bare = name[len(TORCHVISION):]
        if bare in _torchvision_names():
            return "torchvision", bare
        raise UsageError(f"unknown model {name!r}: torchvision.models.list_models() has no {bare!r}")
    if timm.is_model(name):
        return "timm", name
    if name in _torchvision_names():
        return "torchvision", name
    close = difflib.get_close_matches(name, timm.list_models() + _torchvision_names(), n=3)
    hint = f"; close: {', '.join(close)}" if close else ""
    raise UsageError(
        f"unknown model {name!r}: neither timm (timm.list_models()) nor torchvision "
        f"(torchvision.models.list_models()) has it{hint}"
    )


@dataclass
class Architecture:
    """A model as its library builds it: ``library`` is "timm" or "torchvision"; ``kwargs`` are
    the constructor's keyword arguments (num_classes, img_size, the user's --model-kwargs)."""

    library: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self, pretrained: bool = False) -> nn.Module:
        if self.library == "timm":
            import timm

            return timm.create_model(self.name, pretrained=pretrained, **self.kwargs)
        import torchvision

        return torchvision.models.get_model(self.name, weights="DEFAULT" if pretrained else None, **self.kwargs)

    def call(self) -> str:
        """The Python expression that builds this architecture, drep_kernels not needed."""
        args = ", ".join([repr(self.name)] + [f"{k}={v!r}" for k, v in self.kwargs.items()])
        fn = "timm.create_model" if self.library == "timm" else "torchvision.models.get_model"
        return f"{fn}({args})"

    def to_dict(self) -> dict[str, Any]:
        return {"library": self.library, "model": self.name, "kwargs": dict(self.kwargs), "build": self.call()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Architecture":
        return cls(d["library"], d["model"], dict(d["kwargs"]))


def create(
    name: str, num_classes: int, img_size: Optional[int], model_kwargs: Mapping[str, Any], pretrained: bool
) -> tuple[nn.Module, Architecture]:
    """Build ``name`` for ``num_classes`` classes and return it with the architecture that
    rebuilds it. ``img_size`` goes to the constructor of the timm models that take one (ViTs:
    their position embedding depends on it; timm resamples pretrained ones); other models take
    any input size, and torchvision's take theirs through ``model_kwargs`` (``image_size``)."""
    library, name = find(name)
    kwargs = {"num_classes": num_classes, **model_kwargs}
    if library == "timm" and img_size is not None and "img_size" not in kwargs:
        try:
            arch = Architecture(library, name, {**kwargs, "img_size": img_size})
            return _build(arch, pretrained), arch
        except TypeError as e:
            if "img_size" not in str(e):
                raise
    arch = Architecture(library, name, kwargs)
    return _build(arch, pretrained), arch


def _build(arch: Architecture, pretrained: bool) -> nn.Module:
    try:
        return arch.build(pretrained)
    except TypeError as e:  # a --model-kwargs key the constructor does not take
        raise UsageError(f"{arch.call()}: {e}") from e
    except Exception as e:
        if not pretrained:
            raise
        hint = ("; torchvision's weights keep their 1000-class head: fine-tune the timm version of the model, "
                "or start from --checkpoint" if arch.library == "torchvision" else "")
        raise UsageError(f"cannot load the pretrained weights of {arch.call()}: {type(e).__name__}: {e}{hint}") from e


def classifier_prefixes(library: str, name: str) -> list[str]:
    """Module names of the model's classifier (timm's pretrained config names them); [] if unknown."""
    if library != "timm":
        return []
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    names = (cfg.classifier if cfg is not None else None) or ()
    return [names] if isinstance(names, str) else list(names)


def read_state_dict(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """The object saved at ``path``, read with ``weights_only`` (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"cannot read {what} {path} as a torch checkpoint: {type(e).__name__}: {e}") from e


def tensors_of(obj: Any, path: str | Path) -> dict[str, Tensor]:
    """The state dict in a loaded checkpoint: the object itself, or its "model" / "state_dict"
    entry (the usual containers), with DDP's "module." prefix removed."""
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UsageError(f"{path} holds no state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def listed(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def mismatch(expected: Mapping[str, Tensor], given: Mapping[str, Tensor]) -> Optional[str]:
    """Which keys ``given`` lacks or adds and which shapes differ from ``expected``; None if
    it fits."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"missing {listed(missing)}")
    if unexpected:
        parts.append(f"unexpected {listed(unexpected)}")
    if shapes:
        parts.append(f"shapes differ (checkpoint vs model): {listed(shapes)}")
    return "; ".join(parts) or None


def load_initial_weights(model: nn.Module, arch: Architecture, path: str) -> str:
    """Load a plain state dict of this architecture (``--checkpoint``), strictly. A classifier
    whose class count differs is left fresh (fine-tuning on other classes); the returned line
    says so. Raises UsageError naming the keys and shapes that do not fit."""
    sd = tensors_of(read_state_dict(path), path)
    own = model.state_dict()
    fresh = [
        k for p in classifier_prefixes(arch.library, arch.name) for k in list(sd)
        if k.startswith(p + ".") and k in own and sd[k].shape != own[k].shape
    ]
    sd.update({k: own[k] for k in fresh})  # the model's own fresh classifier
    problem = mismatch(own, sd)
    if problem:
        raise UsageError(f"--checkpoint {path} does not fit the model: {problem}")
    model.load_state_dict(sd, strict=True)
    return f"; new classifier ({', '.join(fresh)})" if fresh else ""


def input_size(model: nn.Module, img_size: Optional[int]) -> dict[str, Any]:
    """timm's data config for the model (its pretrained config, or ImageNet defaults for a
    torchvision model), at ``img_size`` when given."""
    from timm.data import resolve_data_config

    args = {"input_size": (3, img_size, img_size)} if img_size is not None else {}
    return resolve_data_config(args, model=model)


def write_plain(path: Path, state_dict: Mapping[str, Tensor], arch: Architecture, extra: Mapping[str, Any]) -> None:
    """The deployable state dict at ``path`` and, beside it (``.json``), how to rebuild and load it."""
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, path)
    meta = {**arch.to_dict(), **extra, "load": f"model.load_state_dict(torch.load({path.name!r}), strict=True)"}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
