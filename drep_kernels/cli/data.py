"""Image folders (``DIR/train``, ``DIR/val``) with timm's transforms, split over the processes."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import UsageError


def check_root(root: str) -> tuple[Path, Path]:
    """``DIR/train`` and ``DIR/val``, or a UsageError saying which is missing."""
    base = Path(root)
    if not base.is_dir():
        raise UsageError(f"--data {root}: no such directory (it must hold train/ and val/, one folder per class)")
    missing = [s for s in ("train", "val") if not (base / s).is_dir()]
    if missing:
        raise UsageError(f"--data {root}: no {' and no '.join(m + '/' for m in missing)} in it (one folder per class each)")
    return base / "train", base / "val"


def image_folders(root: str, data_config: Mapping[str, Any]):
    """(train set, val set, class names): ``ImageFolder``s with timm's train and eval transforms
    for ``data_config``; both must have the same classes."""
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    train_dir, val_dir = check_root(root)
    try:
        train = ImageFolder(str(train_dir), transform=create_transform(**data_config, is_training=True))
        val = ImageFolder(str(val_dir), transform=create_transform(**data_config, is_training=False))
    except (FileNotFoundError, RuntimeError) as e:  # no class folder, or a class without images
        raise UsageError(f"--data {root}: {e}") from e
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise UsageError(
            f"--data {root}: train/ and val/ have different classes (only in train/: {only_train or '-'}; "
            f"only in val/: {only_val or '-'})"
        )
    return train, val, train.classes


def train_loader(dataset, batch_size: int, workers: int, rank: int, world: int, seed: int, pin: bool):
    """Shuffled batches of this process's share; the order depends only on (seed, epoch): call
    ``loader.sampler.set_epoch(epoch)``. Incomplete batches are dropped."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin, drop_last=True)
    if len(loader) == 0:
        raise UsageError(
            f"{len(dataset)} training images make no batch of --batch-size {batch_size} on each of {world} process(es)"
        )
    return loader


class _Share(Dataset):
    """Images rank, rank + world, ... of ``dataset``, padded to ceil(n / world) items with label -1
    so that every process runs the same number of batches (sharded models gather weights in every
    forward); the padding is not counted."""

    def __init__(self, dataset, rank: int, world: int):
        self.dataset, self.rank, self.world = dataset, rank, world

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.world)

    def __getitem__(self, i: int):
        j = i * self.world + self.rank
        if j < len(self.dataset):
            return self.dataset[j]
        image, _ = self.dataset[0]
        return image, -1


def eval_loader(dataset, batch_size: int, workers: int, rank: int, world: int, pin: bool) -> DataLoader:
    """Every image once over all processes, in order."""
    return DataLoader(_Share(dataset, rank, world), batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin)


def counted(labels: torch.Tensor) -> torch.Tensor:
    """The images of a batch that count (not padding)."""
    return labels >= 0
