"""Omniglot: real small subsets (dedup, splits), generated folders/zips (formats, bad input), download errors."""

from __future__ import annotations

import shutil
import urllib.request
import zipfile

import numpy as np
import pytest
import torch

from conftest import SMALL, fake_omniglot, write_drawing
from metasam.data import EpisodeSampler, Omniglot, check_disjoint
from metasam.data import omniglot as omniglot_module
from metasam.errors import ConfigError, DatasetError


# --- the real small subsets --------------------------------------------------------------------
def test_small_subsets_deduplicate_to_8_alphabets_242_characters(small_omniglot):
    ds = small_omniglot
    assert ds.alphabets == ["Balinese", "Early_Aramaic", "Greek", "Japanese_(katakana)", "Korean", "Latin", "Sanskrit", "Tagalog"]
    assert len(set(ds.source_classes)) == 242
    assert len(ds.classes) == 4 * 242 and len(set(ds.classes)) == 968
    assert set(ds.class_sizes()) == {20}  # every character has 20 drawers, no duplicates kept
    for c in range(len(ds.classes)):
        ids = [ds.file_ids[i] for i in ds.images_of(c).tolist()]
        assert len(set(ids)) == 20


def test_greek_comes_once_even_though_both_subsets_hold_it(omniglot_dir, cache_root):
    one = Omniglot(omniglot_dir, subset=SMALL[0], rotations=False, cache_dir=cache_root)
    two = Omniglot(omniglot_dir, subset=SMALL[1], rotations=False, cache_dir=cache_root)
    greek1 = {c for c in one.classes if c.startswith("Greek/")}
    greek2 = {c for c in two.classes if c.startswith("Greek/")}
    assert greek1 == greek2 and len(greek1) == 24
    both = Omniglot(omniglot_dir, subset=SMALL, rotations=False, cache_dir=cache_root)
    assert len(both.classes) == len(set(one.classes) | set(two.classes)) == 242


def test_rotations_are_distinct_classes_of_rotated_pixels(omniglot_dir, cache_root):
    plain = Omniglot(omniglot_dir, subset=SMALL[0], rotations=False, cache_dir=cache_root)
    rot = Omniglot(omniglot_dir, subset=SMALL[0], rotations=True, cache_dir=cache_root)
    c = rot.classes.index("Latin/character05/rot090")
    assert rot.source_classes[c] == "Latin/character05"
    base = plain.stack(plain.images_of(plain.classes.index("Latin/character05")))
    turned = rot.stack(rot.images_of(c))
    want = torch.from_numpy(np.ascontiguousarray(np.rot90(base.numpy(), 1, axes=(2, 3))))
    assert torch.equal(turned, want)


def test_alphabet_split_and_character_split_are_disjoint(omniglot_dir, cache_root):
    kw = dict(subset=SMALL, cache_dir=cache_root)
    a = Omniglot(omniglot_dir, alphabets=["Greek", "Latin"], **kw)
    b = Omniglot(omniglot_dir, alphabets=["Korean"], **kw)
    assert {c.split("/")[0] for c in a.classes} == {"Greek", "Latin"}
    check_disjoint(a, b)
    sizes = {"train": 150, "val": 30, "test": None}
    parts = {s: Omniglot(omniglot_dir, split=s, split_sizes=sizes, split_seed=0, **kw) for s in sizes}
    assert [len(set(p.source_classes)) for p in parts.values()] == [150, 30, 62]
    check_disjoint(*parts.values())
    union = set().union(*(p.source_classes for p in parts.values()))
    assert len(union) == 242
    # every rotation of a character is in the same split
    assert all(len(p.classes) == 4 * len(set(p.source_classes)) for p in parts.values())
    # the seed matters and is reproducible
    again = Omniglot(omniglot_dir, split="val", split_sizes=sizes, split_seed=0, **kw)
    other = Omniglot(omniglot_dir, split="val", split_sizes=sizes, split_seed=1, **kw)
    assert again.classes == parts["val"].classes and other.classes != again.classes
    EpisodeSampler(parts["test"], 5, 1, 5, disjoint_from=[parts["train"], parts["val"]])


def test_split_errors(omniglot_dir, cache_root):
    with pytest.raises(ConfigError, match=r"need 1200 characters but the data has 242"):
        Omniglot(omniglot_dir, subset=SMALL, split="train", cache_dir=cache_root)
    with pytest.raises(ConfigError, match=r"unknown split 'validation'"):
        Omniglot(omniglot_dir, subset=SMALL, split="validation", split_sizes={"train": 100, "val": None}, cache_dir=cache_root)
    with pytest.raises(DatasetError, match=r"no alphabet \['Klingon'\]"):
        Omniglot(omniglot_dir, subset=SMALL, alphabets=["Klingon"], cache_dir=cache_root)


# --- formats and bad input on generated data ---------------------------------------------------
def test_folder_and_zip_give_the_same_dataset(tmp_path):
    fake_omniglot(tmp_path / "folder")
    zip_root = tmp_path / "zipped"
    zip_root.mkdir()
    shutil.make_archive(str(zip_root / "images_background"), "zip", tmp_path / "folder", "images_background")
    a = Omniglot(tmp_path / "folder", cache_dir=False)
    b = Omniglot(zip_root, cache_dir=False)
    assert a.classes == b.classes and a.file_ids == b.file_ids and torch.equal(a.images, b.images)
    assert len(a.classes) == 2 * 3 * 4 and a.image_shape == (1, 28, 28)
    c = Omniglot(tmp_path / "folder", rotations=False, image_size=14, cache_dir=False)
    assert c.image_shape == (1, 14, 14) and c.classes[0] == "Alpha/character01"


def test_data_found_through_environment_variable(tmp_path, monkeypatch):
    fake_omniglot(tmp_path / "omniglot")
    monkeypatch.setenv("METASAM_DATA", str(tmp_path))
    assert len(Omniglot(cache_dir=False).classes) == 24


def test_missing_root_and_missing_files(tmp_path, monkeypatch):
    monkeypatch.delenv("METASAM_DATA", raising=False)
    with pytest.raises(DatasetError, match="METASAM_DATA"):
        Omniglot(cache_dir=False)
    with pytest.raises(DatasetError, match="does not exist"):
        Omniglot(tmp_path / "nowhere", cache_dir=False)
    with pytest.raises(DatasetError, match=r"missing images_evaluation\.zip in .*brendenlake"):
        Omniglot(tmp_path, subset="images_evaluation", cache_dir=False)
    with pytest.raises(ConfigError, match="unknown subset"):
        Omniglot(tmp_path, subset="images_background_small3", cache_dir=False)


def test_empty_character_folder_is_named(tmp_path):
    fake_omniglot(tmp_path)
    (tmp_path / "images_background" / "Beta" / "character09").mkdir()
    with pytest.raises(DatasetError, match=r"Beta/character09 is empty"):
        Omniglot(tmp_path, cache_dir=False)


def test_corrupt_and_non_image_files_are_named(tmp_path):
    fake_omniglot(tmp_path)
    bad = tmp_path / "images_background" / "Alpha" / "character02" / "0102_03.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match=r"cannot decode image file .*Alpha/character02/0102_03\.png"):
        Omniglot(tmp_path, cache_dir=False)
    write_drawing(bad, 0)
    (bad.parent / "notes.txt").write_text("hi")
    with pytest.raises(DatasetError, match=r"non-image file .*character02/notes\.txt"):
        Omniglot(tmp_path, cache_dir=False)


def test_corrupt_zip_is_named(tmp_path):
    (tmp_path / "images_background.zip").write_bytes(b"PK garbage")
    with pytest.raises(DatasetError, match=r"images_background\.zip is not a readable zip"):
        Omniglot(tmp_path, cache_dir=False)


# --- download (never touches the network: urlopen is replaced) ---------------------------------
class _Response:
    def __init__(self, data):
        self.data = data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self):
        return self.data


def test_download_offline_says_where_to_put_files(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DatasetError, match=r"could not download .*images_evaluation\.zip.*Put images_evaluation\.zip in"):
        Omniglot(tmp_path, subset="images_evaluation", download=True, cache_dir=False)


def test_download_verifies_checksum_then_loads(tmp_path, monkeypatch):
    fake_omniglot(tmp_path / "src")
    shutil.make_archive(str(tmp_path / "payload"), "zip", tmp_path / "src", "images_background")
    payload = (tmp_path / "payload.zip").read_bytes()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: _Response(payload))
    dest = tmp_path / "data"
    dest.mkdir()
    with pytest.raises(DatasetError, match="MD5"):
        Omniglot(dest, download=True, cache_dir=False)
    assert not (dest / "images_background.zip").exists()
    import hashlib

    monkeypatch.setitem(omniglot_module.MD5, "images_background", hashlib.md5(payload).hexdigest())
    ds = Omniglot(dest, download=True, cache_dir=False)
    assert (dest / "images_background.zip").is_file() and len(ds.classes) == 24
    assert zipfile.is_zipfile(dest / "images_background.zip")
