"""Shared fixtures: the real (small) Omniglot data when present, and tiny generated datasets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metasam.data import FewShotDataset

REPO = Path(__file__).resolve().parents[2]
SMALL = ["images_background_small1", "images_background_small2"]


def omniglot_folder() -> Path | None:
    """The folder holding the two small Omniglot zips: $METASAM_DATA(/omniglot) or <repo>/../shared/data/omniglot."""
    env = os.environ.get("METASAM_DATA")
    candidates = [Path(env) / "omniglot", Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data" / "omniglot")
    for folder in candidates:
        if all((folder / f"{s}.zip").is_file() or (folder / s).is_dir() for s in SMALL):
            return folder
    return None


@pytest.fixture(scope="session")
def omniglot_dir() -> Path:
    folder = omniglot_folder()
    if folder is None:
        pytest.skip("Omniglot small subsets not found: set METASAM_DATA to the folder holding "
                    "omniglot/images_background_small1.zip and images_background_small2.zip")
    return folder


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("metasam-cache")


@pytest.fixture(scope="session")
def small_omniglot(omniglot_dir, cache_root):
    from metasam.data import Omniglot

    return Omniglot(omniglot_dir, subset=SMALL, cache_dir=cache_root)


def tiny_dataset(n_classes: int = 8, per_class: int = 6, *, sizes=None, shape=(1, 4, 4), seed: int = 0) -> FewShotDataset:
    """Random pixels; class c has ``sizes[c]`` (default ``per_class``) images with file ids ``c<c>/<k>``."""
    sizes = sizes or [per_class] * n_classes
    g = torch.Generator().manual_seed(seed)
    targets = [c for c, n in enumerate(sizes) for _ in range(n)]
    images = torch.randint(0, 256, (len(targets), *shape), generator=g, dtype=torch.uint8)
    file_ids = [f"c{c}/{k}" for c, n in enumerate(sizes) for k in range(n)]
    return FewShotDataset(images, torch.tensor(targets), [f"class{c}" for c in range(len(sizes))], file_ids, name="tiny")


def write_drawing(path: Path, seed: int, size: int = 105) -> None:
    """A random black-on-white 1-bit drawing, like Omniglot's PNGs."""
    rng = np.random.default_rng(seed)
    pixels = rng.random((size, size)) > 0.1  # True = white background
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert("1").save(path)


def fake_omniglot(root: Path, subset: str = "images_background", alphabets=("Alpha", "Beta"), chars=3, drawings=4) -> Path:
    """An extracted-folder Omniglot subset with generated drawings."""
    for a, alpha in enumerate(alphabets):
        for c in range(1, chars + 1):
            for d in range(1, drawings + 1):
                write_drawing(root / subset / alpha / f"character{c:02d}" / f"{a:02d}{c:02d}_{d:02d}.png", seed=a * 1000 + c * 10 + d)
    return root
