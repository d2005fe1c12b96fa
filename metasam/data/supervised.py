"""Datasets for supervised training: scikit-learn's bundled digits (offline) and CIFAR-10/100."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from metasam.errors import DatasetError


@dataclass(frozen=True)
class SupervisedSplits:
    """Tensors of a supervised classification problem, split three ways.

    ``train`` and ``val`` come from the training set (their labels may be noised later); ``test`` is
    the untouched test set. Images are float [N, C, H, W], labels int64 [N].
    """

    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    num_classes: int
    name: str


def _stratified_split(labels: Tensor, fraction: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Indices (rest, held) where ``held`` takes round(fraction · count) of every class."""
    rest, held = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        k = round(fraction * idx.numel())
        held.append(idx[:k])
        rest.append(idx[k:])
    return torch.cat(rest).sort().values, torch.cat(held).sort().values


def load_digits_splits(seed: int = 0, test_fraction: float = 0.2, val_fraction: float = 0.15) -> SupervisedSplits:
    """scikit-learn's 1,797 8×8 digit images (bundled with the package, no download), pixels in [0, 1].

    Stratified, seeded: ``test_fraction`` of each class is the test set; ``val_fraction`` of each
    class of the rest is a validation split (for tuning radii honestly), the remainder trains.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    trainval, test = _stratified_split(y, test_fraction, gen)
    train_rel, val_rel = _stratified_split(y[trainval], val_fraction, gen)
    train, val = trainval[train_rel], trainval[val_rel]
    return SupervisedSplits((x[train], y[train]), (x[val], y[val]), (x[test], y[test]), 10, "digits")


def load_cifar_splits(
    root: str | Path, num_classes: int = 10, download: bool = False, seed: int = 0, val_fraction: float = 0.1
) -> SupervisedSplits:
    """CIFAR-10 or CIFAR-100 through torchvision, normalised per channel, as in-memory tensors.

    ``download=True`` needs a network; otherwise the archive's extracted folder must already be in
    ``root`` (``cifar-10-batches-py`` or ``cifar-100-python``).
    """
    from torchvision import datasets

    if num_classes not in (10, 100):
        raise DatasetError(f"CIFAR has 10 or 100 classes, got num_classes={num_classes}")
    cls = datasets.CIFAR10 if num_classes == 10 else datasets.CIFAR100
    folder = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    try:
        train_set = cls(str(root), train=True, download=download)
        test_set = cls(str(root), train=False, download=download)
    except RuntimeError as exc:
        raise DatasetError(
            f"CIFAR-{num_classes} not found in {root}: put the extracted '{folder}' folder there, or download it on a "
            f"machine with a network (metasam supervised --download, download=True in Python) ({exc})"
        ) from exc

    def to_tensors(ds) -> tuple[Tensor, Tensor]:
        return torch.tensor(ds.data).permute(0, 3, 1, 2).float() / 255.0, torch.tensor(ds.targets)

    (x, y), (xt, yt) = to_tensors(train_set), to_tensors(test_set)
    mean, std = x.mean(dim=(0, 2, 3), keepdim=True), x.std(dim=(0, 2, 3), keepdim=True)
    x, xt = (x - mean) / std, (xt - mean) / std
    train, val = _stratified_split(y, val_fraction, torch.Generator().manual_seed(seed))
    return SupervisedSplits((x[train], y[train]), (x[val], y[val]), (xt, yt), num_classes, f"cifar{num_classes}")
