"""Decoding a list of labelled image files into the (images, metadata) pair that datasets cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import numpy as np
import torch
from PIL import Image

from metasam.data._decode import is_image_name, is_special, open_image
from metasam.errors import DatasetError


class Item(NamedTuple):
    class_name: str
    file_id: str  # stable name of the image, unique within its class
    source: bytes | Path  # encoded bytes (from an archive) or a file path
    where: str  # what an error message calls this file


def decode_items(items: Iterable[Item], convert: Callable[[Image.Image], np.ndarray], dataset: str) -> tuple[torch.Tensor, dict]:
    """Decode every item with ``convert`` (PIL image → uint8 [C, H, W]); classes are sorted by name."""
    items = list(items)
    if not items:
        raise DatasetError(f"{dataset}: no images found")
    classes = sorted({it.class_name for it in items})
    index = {c: i for i, c in enumerate(classes)}
    arrays = []
    for it in items:
        arr = convert(open_image(it.source, it.where))
        if arrays and arr.shape != arrays[0].shape:
            raise DatasetError(
                f"{dataset}: image {it.where} decodes to shape {arr.shape}, others to {arrays[0].shape}; "
                "pass image_size= to resize all images to one size"
            )
        arrays.append(arr)
    return torch.from_numpy(np.stack(arrays)), {
        "classes": classes,
        "targets": [index[it.class_name] for it in items],
        "file_ids": [it.file_id for it in items],
    }


def scan_class_folders(root: Path, dataset: str) -> list[Item]:
    """Items of a class-per-subfolder tree ``root/<class>/<image>``; hidden files, FIFOs, sockets and devices
    are ignored.

    Raises on a missing root, no class folders, an empty class folder or a non-image file, naming it.
    """
    if not root.is_dir():
        raise DatasetError(f"{dataset}: folder {root} does not exist")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DatasetError(f"{dataset}: {root} has no class subfolders; expected {root}/<class>/<image files>")
    items = []
    for d in class_dirs:
        files = sorted(f for f in d.iterdir() if not f.name.startswith(".") and not is_special(f))
        if not files:
            raise DatasetError(f"{dataset}: class folder {d} is empty; add its images or delete it")
        for f in files:
            if f.is_dir() or not is_image_name(f.name):
                raise DatasetError(f"{dataset}: unexpected non-image file {f}; remove it")
            items.append(Item(d.name, f"{d.name}/{f.name}", f, str(f)))
    return items


def item_files(items: Iterable[Item]) -> list[Path]:
    """The files whose sizes and dates key the cache (items read from an archive are keyed by the archive)."""
    return [it.source for it in items if isinstance(it.source, (str, os.PathLike))]
