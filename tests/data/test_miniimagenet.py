"""MiniImageNet's three formats round-trip on generated files; each malformed input is named in its error."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from metasam.data import ImageFolderClasses, MiniImageNet
from metasam.errors import ConfigError, DatasetError

CLASSES = ["n01532829", "n01558993", "n01704323"]
PER_CLASS = 4


def pictures(size=84, seed=0):
    """{class: [uint8 H×W×3 array, …]} with random content."""
    rng = np.random.default_rng(seed)
    return {c: [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(PER_CLASS)] for c in CLASSES}


def write_csv_format(root, split, pics):
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = ["filename,label"]
    for c, arrays in pics.items():
        for k, a in enumerate(arrays):
            name = f"{c}{k:08d}.png"
            Image.fromarray(a).save(root / "images" / name)
            rows.append(f"{name},{c}")
    (root / f"{split}.csv").write_text("\n".join(rows) + "\n")


def write_pickle_format(root, split, pics):
    root.mkdir(parents=True, exist_ok=True)
    data, class_dict = [], {}
    for c, arrays in pics.items():
        class_dict[c] = list(range(len(data), len(data) + len(arrays)))
        data += arrays
    name = {"train": "train", "val": "validation", "test": "test"}[split]
    with open(root / f"mini-imagenet-cache-{name}.pkl", "wb") as f:
        pickle.dump({"image_data": np.stack(data), "class_dict": class_dict}, f)


def write_folder_format(root, split, pics):
    for c, arrays in pics.items():
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for k, a in enumerate(arrays):
            Image.fromarray(a).save(root / split / c / f"{k}.png")


WRITERS = {"csv": write_csv_format, "pickle": write_pickle_format, "folders": write_folder_format}


def expected(array, size):
    img = Image.fromarray(array)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy())


@pytest.mark.parametrize("fmt", sorted(WRITERS))
@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("size", [84, 21])
def test_each_format_round_trips(tmp_path, fmt, split, size):
    pics = pictures(seed=sorted(WRITERS).index(fmt) * 10 + len(split))
    WRITERS[fmt](tmp_path, split, pics)
    ds = MiniImageNet(tmp_path, split, image_size=size, cache_dir=tmp_path / "cache")
    assert ds.classes == CLASSES and ds.image_shape == (3, size, size)
    assert ds.class_sizes() == [PER_CLASS] * 3
    for c, arrays in pics.items():
        got = ds.images[ds.images_of(ds.classes.index(c))]
        want = torch.stack([expected(a, size) for a in arrays])
        assert torch.equal(got, want), f"{fmt}: pixels of {c}"
    again = MiniImageNet(tmp_path, split, image_size=size, cache_dir=tmp_path / "cache")  # from the cache
    assert torch.equal(again.images, ds.images) and again.file_ids == ds.file_ids
    x, y = ds[0]
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and y == int(ds.targets[0])


def test_found_through_environment_variable(tmp_path, monkeypatch):
    write_pickle_format(tmp_path / "miniimagenet", "test", pictures())
    monkeypatch.setenv("METASAM_DATA", str(tmp_path))
    assert MiniImageNet(split="test", cache_dir=False).classes == CLASSES


def test_unknown_split_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown split 'validation'.*'val'"):
        MiniImageNet(tmp_path, "validation")
    with pytest.raises(DatasetError, match=r"no 'test' split .*test\.csv.*mini-imagenet-cache-test\.pkl"):
        MiniImageNet(tmp_path, "test", cache_dir=False)
    with pytest.raises(DatasetError, match="does not exist"):
        MiniImageNet(tmp_path / "absent", "test", cache_dir=False)


def test_csv_naming_missing_files_and_bad_rows(tmp_path):
    write_csv_format(tmp_path, "train", pictures())
    (tmp_path / "images" / f"{CLASSES[1]}00000002.png").unlink()
    with pytest.raises(DatasetError, match=rf"1 file\(s\) listed in .*train\.csv are missing .*{CLASSES[1]}00000002\.png"):
        MiniImageNet(tmp_path, "train", cache_dir=False)
    (tmp_path / "train.csv").write_text("filename,label\nonly-one-column\n")
    with pytest.raises(DatasetError, match=r"train\.csv line 2 should be 'filename,label'"):
        MiniImageNet(tmp_path, "train", cache_dir=False)


def test_corrupt_image_is_named(tmp_path):
    write_csv_format(tmp_path, "train", pictures())
    (tmp_path / "images" / f"{CLASSES[0]}00000001.png").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=rf"cannot decode image file .*{CLASSES[0]}00000001\.png"):
        MiniImageNet(tmp_path, "train", cache_dir=False)


@pytest.mark.parametrize("payload, message", [
    ({"images": np.zeros((2, 84, 84, 3), np.uint8), "class_dict": {}}, r"'image_data' and 'class_dict', got \['class_dict', 'images'\]"),
    ([1, 2, 3], r"got list"),
    ({"image_data": np.zeros((2, 84, 84), np.uint8), "class_dict": {"a": [0]}}, r"uint8 N×H×W×3, got uint8 \(2, 84, 84\)"),
    ({"image_data": np.zeros((2, 84, 84, 3), np.float32), "class_dict": {"a": [0]}}, r"got float32"),
    ({"image_data": np.zeros((2, 84, 84, 3), np.uint8), "class_dict": {"a": [0, 5]}}, r"class 'a' has row 5 outside 0..1"),
])
def test_malformed_pickle(tmp_path, payload, message):
    with open(tmp_path / "mini-imagenet-cache-train.pkl", "wb") as f:
        pickle.dump(payload, f)
    with pytest.raises(DatasetError, match=message):
        MiniImageNet(tmp_path, "train", cache_dir=False)
    (tmp_path / "mini-imagenet-cache-train.pkl").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="cannot unpickle"):
        MiniImageNet(tmp_path, "train", cache_dir=False)


def test_image_folder_classes(tmp_path):
    pics = pictures(size=10)
    write_folder_format(tmp_path, "mine", pics)
    ds = ImageFolderClasses(tmp_path / "mine", image_size=None, cache_dir=False)
    assert ds.classes == CLASSES and ds.image_shape == (3, 10, 10)
    assert torch.equal(ds.images[ds.images_of(2)][1], expected(pics[CLASSES[2]][1], 10))
    gray = ImageFolderClasses(tmp_path / "mine", image_size=5, mode="L", cache_dir=False)
    assert gray.image_shape == (1, 5, 5)
    Image.fromarray(np.zeros((7, 7, 3), np.uint8)).save(tmp_path / "mine" / CLASSES[0] / "odd.png")
    with pytest.raises(DatasetError, match=r"odd\.png decodes to shape \(3, 7, 7\).*image_size="):
        ImageFolderClasses(tmp_path / "mine", image_size=None, cache_dir=False)
    (tmp_path / "mine" / "n09999999").mkdir()
    with pytest.raises(DatasetError, match=r"class folder .*n09999999 is empty"):
        ImageFolderClasses(tmp_path / "mine", cache_dir=False)
    with pytest.raises(DatasetError, match="no class subfolders"):
        ImageFolderClasses(tmp_path / "mine" / "n09999999", cache_dir=False)
    with pytest.raises(ConfigError, match="mode"):
        ImageFolderClasses(tmp_path / "mine", mode="CMYK")
