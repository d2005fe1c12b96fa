"""Corrupt inputs (a truncated PNG, an empty class folder, a pickle with wrong keys, a CSV naming missing files)
each stop ``metasam train`` with one line naming the file, and nothing is written into the run folder."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
from conftest import fake_omniglot
from PIL import Image
from test_miniimagenet import (
    pictures,
    write_csv_format,
    write_folder_format,
    write_pickle_format,
)

from metasam.cli.main import main
from metasam.data import MiniImageNet, Omniglot
from metasam.errors import DatasetError


def truncated_png(path) -> None:
    """The first half of a valid PNG: the header reads, the pixel data ends early."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (84, 84, 3), dtype=np.uint8)).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def corrupt(root, kind: str):
    """Write a MiniImageNet root whose train split has one ``kind`` of damage; return the file to be named."""
    for split in ("val", "test"):
        write_pickle_format(root, split, pictures(size=8, seed=len(split)))
    if kind == "truncated PNG":
        write_folder_format(root, "train", pictures(size=8))
        bad = next((root / "train").glob("*/2.png"))
        truncated_png(bad)
    elif kind == "empty class folder":
        write_folder_format(root, "train", pictures(size=8))
        bad = root / "train" / "n09999999"
        bad.mkdir()
    elif kind == "pickle with wrong keys":
        bad = root / "mini-imagenet-cache-train.pkl"
        with open(bad, "wb") as f:
            pickle.dump({"images": np.zeros((3, 8, 8, 3), np.uint8), "labels": [0, 1, 2]}, f)
    else:  # "CSV naming missing files"
        write_csv_format(root, "train", pictures(size=8))
        bad = root / "train.csv"
        (root / "images" / "n0155899300000003.png").unlink()
    return bad


@pytest.mark.parametrize("kind", ["truncated PNG", "empty class folder", "pickle with wrong keys", "CSV naming missing files"])
def test_corrupt_input_is_one_line_naming_the_file(tmp_path, capsys, kind):
    bad = corrupt(tmp_path / "data", kind)
    run = tmp_path / "run"
    args = ["train", "--dataset", "miniimagenet", "--data-root", str(tmp_path / "data"), "--ways", "2", "--queries", "1",
            "--iterations", "1", "--out", str(run), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if ": error: " in x]
    assert str(bad) in line
    assert not run.exists()


def test_truncated_omniglot_drawing_is_named_and_never_cached(tmp_path):
    fake_omniglot(tmp_path / "data")
    bad = tmp_path / "data" / "images_background" / "Beta" / "character03" / "0103_02.png"
    truncated_png(bad)
    with pytest.raises(DatasetError, match=r"cannot decode image file .*Beta/character03/0103_02\.png: image file is truncated"):
        Omniglot(tmp_path / "data", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


class Payload:
    """Unpickling this runs ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("where", ["image_data", "class_dict"])
def test_a_miniimagenet_pickle_that_would_run_code_is_refused_in_one_line_and_runs_nothing(tmp_path, capsys, where):
    root, marker = tmp_path / "data", tmp_path / "pwned"
    for split in ("train", "val", "test"):
        write_pickle_format(root, split, pictures(size=8, seed=len(split)))
    bad = root / "mini-imagenet-cache-train.pkl"
    with open(bad, "rb") as f:
        data = pickle.load(f)  # our own file: trusted
    data[where] = Payload(f"touch {marker}") if where == "image_data" else {"a": [0, Payload(f"touch {marker}")]}
    bad.write_bytes(pickle.dumps(data))
    args = ["train", "--dataset", "miniimagenet", "--data-root", str(root), "--ways", "2", "--queries", "1",
            "--iterations", "1", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and not marker.exists()
    (line,) = [x for x in err.splitlines() if ": error: " in x]
    assert f"MiniImageNet: {bad} refers to posix.system, which no pickle of numpy arrays needs; it was not loaded" in line


def test_pickles_written_by_numpy_1_and_with_protocol_2_still_load(tmp_path):
    pics = pictures(size=8)
    write_pickle_format(tmp_path, "train", pics)
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    with open(path, "rb") as f:
        data = pickle.load(f)
    legacy = pickle.dumps(data, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(legacy)  # what a numpy 1.x pickle names
    ds = MiniImageNet(tmp_path, "train", image_size=8, cache_dir=False)
    assert ds.classes == sorted(pics) and len(ds) == sum(len(v) for v in pics.values())
