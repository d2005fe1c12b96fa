"""MiniImageNet (Vinyals et al. 2016) with the Ravi & Larochelle class split, in its common on-disk formats."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metasam.data._cache import load_or_build
from metasam.data._decode import to_array
from metasam.data._pickle import load_arrays
from metasam.data._files import Item, decode_items
from metasam.data._roots import find_root
from metasam.data.base import FewShotDataset
from metasam.data.folder import check_size_and_mode, load_class_folders
from metasam.errors import ConfigError, DatasetError

SPLITS = ("train", "val", "test")
PICKLE_NAMES = {"train": "train", "val": "validation", "test": "test"}


class MiniImageNet(FewShotDataset):
    """One split of MiniImageNet as RGB images resized to ``image_size`` (antialiased BILINEAR; None keeps
    the files' own size, 84×84 in the standard releases).

    ``root`` (or ``$METASAM_DATA/miniimagenet``, or ``$METASAM_DATA``) holds one of, tried in this order:

    (a) ``images/`` and ``train.csv`` / ``val.csv`` / ``test.csv`` with rows ``filename,label`` (Ravi &
        Larochelle); file ids are the file names;
    (b) ``mini-imagenet-cache-{train,validation,test}.pkl``: a pickled dict with ``image_data`` (uint8
        N×H×W×3) and ``class_dict`` (class name → list of row indices); file ids are ``<class>/<row>``.
        The file is read by a restricted unpickler that admits numpy arrays and plain containers only
        and refuses a file that names anything else (which could run code);
    (c) ``train/``, ``val/``, ``test/`` folders with one subfolder per class.
    """

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train", *, image_size: int | None = 84,
                 cache_dir: str | os.PathLike | None | bool = None) -> None:
        if split not in SPLITS:
            raise ConfigError(f"MiniImageNet: unknown split {split!r}; choose among {list(SPLITS)}")
        check_size_and_mode("MiniImageNet", image_size, "RGB")
        folder = _locate(find_root(root, "miniimagenet", "MiniImageNet"), split)
        csv_path = folder / f"{split}.csv"
        pkl_path = folder / f"mini-imagenet-cache-{PICKLE_NAMES[split]}.pkl"
        if csv_path.is_file():
            items = _csv_items(csv_path, folder / "images")
            images, meta = load_or_build(
                "miniimagenet-csv", {"image_size": image_size}, [csv_path, *(it.source for it in items)],
                lambda: decode_items(items, _converter(image_size), "MiniImageNet"), cache_dir)
        elif pkl_path.is_file():
            images, meta = load_or_build("miniimagenet-pkl", {"image_size": image_size}, [pkl_path],
                                         lambda: _decode_pickle(pkl_path, image_size), cache_dir)
        else:
            images, meta = load_class_folders(folder / split, "MiniImageNet", "miniimagenet-folders",
                                              image_size, "RGB", cache_dir)
        self._set_data(images, meta["targets"], meta["classes"], meta["file_ids"], name=f"miniimagenet:{split}")


def _converter(image_size: int):
    return lambda img: to_array(img, "RGB", image_size, Image.Resampling.BILINEAR)


def _locate(candidates: list[Path], split: str) -> Path:
    for folder in candidates:
        if ((folder / f"{split}.csv").is_file() or (folder / f"mini-imagenet-cache-{PICKLE_NAMES[split]}.pkl").is_file()
                or (folder / split).is_dir()):
            return folder
    where = candidates[1]
    raise DatasetError(
        f"MiniImageNet: no {split!r} split in {where} or {candidates[0]}. Expected one of: "
        f"{split}.csv with an images/ folder; mini-imagenet-cache-{PICKLE_NAMES[split]}.pkl; "
        f"or a {split}/ folder with one subfolder per class (see docs/data.md)."
    )


def _csv_items(csv_path: Path, image_dir: Path) -> list[Item]:
    if not image_dir.is_dir():
        raise DatasetError(f"MiniImageNet: {csv_path.name} found but the images folder {image_dir} does not exist")
    items, missing = [], []
    with open(csv_path, newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row or (line == 1 and [c.strip().lower() for c in row] == ["filename", "label"]):
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise DatasetError(f"MiniImageNet: {csv_path} line {line} should be 'filename,label', got {row}")
            name, label = row[0].strip(), row[1].strip()
            path = image_dir / name
            if not path.is_file():
                missing.append(name)
            items.append(Item(label, name, path, str(path)))
    if missing:
        raise DatasetError(
            f"MiniImageNet: {len(missing)} file(s) listed in {csv_path} are missing from {image_dir}, "
            f"e.g. {missing[:3]}; put the images there"
        )
    if not items:
        raise DatasetError(f"MiniImageNet: {csv_path} lists no images")
    return items


def _decode_pickle(path: Path, image_size: int) -> tuple[torch.Tensor, dict]:
    data = load_arrays(path, "MiniImageNet")
    if not isinstance(data, dict) or not {"image_data", "class_dict"} <= set(data):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DatasetError(f"MiniImageNet: {path} should hold a dict with 'image_data' and 'class_dict', got {keys}")
    array, class_dict = np.asarray(data["image_data"]), data["class_dict"]
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] != 3:
        raise DatasetError(
            f"MiniImageNet: {path}: image_data should be uint8 N×H×W×3, got {array.dtype} {array.shape}")
    if not isinstance(class_dict, dict) or not class_dict:
        raise DatasetError(f"MiniImageNet: {path}: class_dict should be a non-empty dict class → row indices")
    classes = sorted(class_dict)
    rows, targets, file_ids = [], [], []
    for c, name in enumerate(classes):
        idx = [int(i) for i in class_dict[name]]
        bad = [i for i in idx if not 0 <= i < len(array)]
        if bad or not idx:
            raise DatasetError(f"MiniImageNet: {path}: class {name!r} has {'no rows' if not idx else f'row {bad[0]} outside 0..{len(array) - 1}'}")
        rows += idx
        targets += [c] * len(idx)
        file_ids += [f"{name}/{i}" for i in idx]
    picked = array[rows]
    if picked.shape[1:3] != (image_size, image_size):
        convert = _converter(image_size)
        chw = np.stack([convert(Image.fromarray(im)) for im in picked])
    else:
        chw = picked.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(chw)), {"classes": classes, "targets": targets, "file_ids": file_ids}
