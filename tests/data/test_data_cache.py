"""The decoded-image cache: reused, invalidated by source changes, written atomically, self-healing."""

from __future__ import annotations

import os
import time

import pytest
import torch

from conftest import fake_omniglot, write_drawing
from metasam.data import Omniglot


def cache_files(folder):
    return sorted(p.name for p in folder.iterdir())


def loads_from_the_cache(monkeypatch, root, cache, **kwargs):
    """An Omniglot load that must not decode a drawing: the cache alone gives its images."""
    import metasam.data.omniglot as om

    with monkeypatch.context() as patch:
        patch.setattr(om, "_decode", lambda *a: pytest.fail("decoded again: the cache was not rewritten"))
        return Omniglot(root, cache_dir=cache, **kwargs)


def test_second_load_uses_the_cache(tmp_path, monkeypatch):
    fake_omniglot(tmp_path / "data", chars=4, drawings=5)
    cache = tmp_path / "cache"
    first = Omniglot(tmp_path / "data", cache_dir=cache)
    files = cache_files(cache)
    assert len(files) == 1 and files[0].endswith(".pt")  # no temporary file left behind
    second = loads_from_the_cache(monkeypatch, tmp_path / "data", cache)
    assert torch.equal(first.images, second.images) and first.classes == second.classes


def test_changed_added_or_removed_source_invalidates_the_cache(tmp_path):
    fake_omniglot(tmp_path / "data")
    cache = tmp_path / "cache"
    before = Omniglot(tmp_path / "data", rotations=False, cache_dir=cache)
    drawing = tmp_path / "data" / "images_background" / "Alpha" / "character01" / "0001_01.png"
    write_drawing(drawing, seed=999)
    os.utime(drawing, ns=(time.time_ns(), time.time_ns() + 10**9))
    after = Omniglot(tmp_path / "data", rotations=False, cache_dir=cache)
    assert len(cache_files(cache)) == 2
    assert not torch.equal(before.images[0], after.images[0])
    # a different image size is a different cache entry too
    Omniglot(tmp_path / "data", image_size=20, cache_dir=cache)
    assert len(cache_files(cache)) == 3
    # so is an added drawing; removing it again finds the earlier entry
    extra = tmp_path / "data" / "images_background" / "Beta" / "character01" / "0201_09.png"
    write_drawing(extra, seed=77)
    assert len(Omniglot(tmp_path / "data", rotations=False, cache_dir=cache)) == len(after) + 1
    extra.unlink()
    assert torch.equal(Omniglot(tmp_path / "data", rotations=False, cache_dir=cache).images, after.images)
    assert len(cache_files(cache)) == 4


def test_default_cache_dir_comes_from_environment(tmp_path, monkeypatch):
    fake_omniglot(tmp_path / "data")
    monkeypatch.setenv("METASAM_CACHE", str(tmp_path / "envcache"))
    Omniglot(tmp_path / "data")
    assert len(cache_files(tmp_path / "envcache")) == 1


def test_corrupt_cache_file_is_rebuilt(tmp_path, monkeypatch):
    fake_omniglot(tmp_path / "data")
    cache = tmp_path / "cache"
    good = Omniglot(tmp_path / "data", cache_dir=cache)
    (path,) = cache.iterdir()
    path.write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unreadable cache") as record:
        again = Omniglot(tmp_path / "data", cache_dir=cache)
    assert len(record) == 1 and str(path) in str(record[0].message)
    assert torch.equal(good.images, again.images)
    assert torch.equal(loads_from_the_cache(monkeypatch, tmp_path / "data", cache).images, good.images)


def test_a_failed_cache_write_leaves_no_file_to_read_and_the_next_load_rebuilds(tmp_path, monkeypatch):
    import errno

    fake_omniglot(tmp_path / "data")
    cache = tmp_path / "cache"
    def disk_full(fd):  # a full disk with delayed allocation fails the fsync (a real full disk: test_full_disk.py)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.warns(UserWarning, match=r"cannot write the image cache .*no space left on device.*continuing without it") as record:
        first = Omniglot(tmp_path / "data", cache_dir=cache)
    assert len(record) == 1 and cache_files(cache) == []  # neither a half-written cache file nor a temporary one
    monkeypatch.undo()
    import metasam.data.omniglot as om

    decoded = []
    decode = om._decode
    monkeypatch.setattr(om, "_decode", lambda *a: decoded.append(1) or decode(*a))
    again = Omniglot(tmp_path / "data", cache_dir=cache)
    assert decoded == [1] and torch.equal(first.images, again.images) and len(cache_files(cache)) == 1


def test_an_image_cache_on_a_real_full_disk_is_a_warning(tmp_path, tmpfs):
    fake_omniglot(tmp_path / "data")
    cache = tmpfs("1m")
    fd = os.open(cache / "filler", os.O_WRONLY | os.O_CREAT)
    with pytest.raises(OSError):
        while True:
            os.write(fd, b"\0" * 4096)
    os.close(fd)
    with pytest.warns(UserWarning, match=r"cannot write the image cache .*no space left on device.*continuing without it") as record:
        ds = Omniglot(tmp_path / "data", cache_dir=cache / "metasam")
    assert len(record) == 1 and len(ds) > 0 and not list((cache / "metasam").glob("*.pt"))


def test_an_edited_pixel_in_the_cache_is_caught_and_the_cache_rebuilt(tmp_path, monkeypatch):
    fake_omniglot(tmp_path / "data")
    cache = tmp_path / "cache"
    good = Omniglot(tmp_path / "data", rotations=False, cache_dir=cache)
    (path,) = cache.iterdir()
    data = bytearray(path.read_bytes())
    at = data.find(good.images[5].reshape(-1)[:64].numpy().tobytes())  # the stored pixels of image 5
    assert at > 0
    data[at + 40] ^= 0xFF  # same size, one pixel changed: the file still loads
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"unreadable cache file .*fails its content check") as record:
        again = Omniglot(tmp_path / "data", rotations=False, cache_dir=cache)
    assert len(record) == 1 and str(path) in str(record[0].message)
    assert torch.equal(good.images, again.images)
    assert torch.equal(loads_from_the_cache(monkeypatch, tmp_path / "data", cache, rotations=False).images, good.images)
