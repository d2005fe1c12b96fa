"""Inputs that used to end in a traceback, a hang or an allocation failure: each is now one line naming the
problem and the fix, before any data loads where the problem is in the settings."""

from __future__ import annotations

import json
import os
import struct
import threading
import zipfile
import zlib

import pytest

from metasam.cli.main import main
from metasam.data import ImageFolderClasses, Omniglot
from metasam.errors import ConfigError, DatasetError
from metasam.train import meta
from metasam.train.config import MetaTrainConfig, check_meta_batch_memory

CLI = ["train", "--dataset", "glyphs", "--ways", "3", "--queries", "2", "--meta-batch", "2", "--iterations", "2",
       "--val-every", "2", "--val-tasks", "3", "--no-progress"]
PNG = bytes.fromhex(  # a valid 1×1 grey PNG
    "89504e470d0a1a0a0000000d49484452000000010000000108000000003a7e9b55"
    "0000000a49444154789c63f80f00010101001b29b7be0000000049454e44ae426082")


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if ": error: " in x]
    return line


def huge_png(width: int, height: int) -> bytes:
    """A PNG header claiming width×height pixels (Pillow reads the size before any pixel)."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return PNG[:8] + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + PNG[33:]


def omniglot_zip(root, entries: dict[str, bytes], compression=zipfile.ZIP_STORED):
    root.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(root / "images_background.zip", "w", compression) as z:
        for name, data in entries.items():
            z.writestr(f"images_background/Alpha/character01/{name}", data)
    return root / "images_background.zip"


def test_a_damaged_zip_entry_is_named(tmp_path):
    path = omniglot_zip(tmp_path, {"0101_01.png": PNG, "0101_02.png": PNG})
    data = bytearray(path.read_bytes())
    data[data.find(PNG) + 40] ^= 0xFF  # a byte of the first entry's stored data: its CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"images_background/Alpha/character01/0101_01\.png is damaged \(Bad CRC-32"):
        Omniglot(tmp_path, cache_dir=False)


def test_a_zip_entry_too_large_for_a_drawing_is_refused_before_it_is_read(tmp_path):
    omniglot_zip(tmp_path, {"0101_01.png": b"\0" * (65 * 2**20)}, zipfile.ZIP_DEFLATED)
    with pytest.raises(DatasetError, match=r"0101_01\.png is 65 MiB uncompressed, more than the 64 MiB a drawing"):
        Omniglot(tmp_path, cache_dir=False)


def test_a_decompression_bomb_is_named(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "big.png").write_bytes(huge_png(20000, 20000))
    with pytest.raises(DatasetError, match=r"cannot decode image file .*big\.png: Image size \(400000000 pixels\)"):
        ImageFolderClasses(tmp_path, cache_dir=False)


def test_a_fifo_named_like_an_image_is_skipped(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "1.png").write_bytes(PNG)
    os.mkfifo(tmp_path / "a" / "x.png")
    loaded = []
    reader = threading.Thread(target=lambda: loaded.append(ImageFolderClasses(tmp_path, image_size=None, cache_dir=False)),
                              daemon=True)
    reader.start()
    reader.join(timeout=20)
    if reader.is_alive():  # unblock the reader stuck on the FIFO before failing
        os.close(os.open(tmp_path / "a" / "x.png", os.O_WRONLY))
        pytest.fail("reading the class folders blocked on a FIFO")
    assert len(loaded[0]) == 2


def test_a_setting_of_the_wrong_type_in_config_json_is_named(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*CLI, "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "ways": "5"}))
    for args in (["train", "--resume", str(run)], ["evaluate", str(run), "--episodes", "3"]):
        assert main([*args, "--no-progress"]) == 2
        assert error_line(capsys).endswith(f"{run / 'config.json'}: ways must be int, got '5' (str); correct it there")
    (run / "config.json").write_text(json.dumps({**config, "meta_batch": 0}))  # named by its key, not its flag
    assert main(["evaluate", str(run), "--episodes", "3", "--no-progress"]) == 2
    assert error_line(capsys).endswith(f"{run / 'config.json'}: meta_batch must be an int >= 1, got 0; correct it there")


@pytest.fixture
def no_data(monkeypatch):
    def load_splits(*args, **kwargs):
        raise AssertionError("data loaded before the settings were checked")

    monkeypatch.setattr(meta, "load_splits", load_splits)


@pytest.mark.parametrize("device, message", [
    ("meta", "--device meta: metasam runs on cpu, cuda, mps; use --device cpu or cuda"),
    ("xpu", "--device xpu: metasam runs on cpu, cuda, mps; use --device cpu or cuda"),
    pytest.param("mps", "--device mps but this PyTorch sees no MPS (Apple GPU) device; use --device cpu",
                 marks=pytest.mark.skipif(__import__("torch").backends.mps.is_available(), reason="an MPS machine")),
])
def test_an_unsupported_device_is_refused_before_any_data_loads(tmp_path, capsys, no_data, device, message):
    assert main([*CLI, "--device", device, "--out", str(tmp_path / "run")]) == 2
    assert error_line(capsys).endswith(message)
    assert not (tmp_path / "run").exists()


def test_a_meta_batch_too_large_for_memory_is_refused_before_any_data_loads(tmp_path, capsys, no_data):
    assert main([*CLI, "--meta-batch", "100000000", "--out", str(tmp_path / "run")]) == 2
    assert "--meta-batch 100000000: the images of one meta-batch alone take" in error_line(capsys)
    assert not (tmp_path / "run").exists()
    # the case that was found: 5-way 1-shot with 15 queries on a 16 GiB machine (25 GB of images)
    with pytest.raises(ConfigError, match=r"take 23\.4 GiB, more than half of this machine's 16\.0 GiB"):
        check_meta_batch_memory(MetaTrainConfig(meta_batch=100000), memory=16 * 2**30)
    check_meta_batch_memory(MetaTrainConfig(), memory=16 * 2**30)  # the standard setting fits


def test_a_missing_default_test_split_names_its_flag_and_a_missing_data_root_names_data_root(tmp_path, capsys, monkeypatch):
    for c in range(20):
        (tmp_path / "images_background" / "Alpha" / f"character{c:02d}").mkdir(parents=True)
        (tmp_path / "images_background" / "Alpha" / f"character{c:02d}" / "1.png").write_bytes(PNG)
    args = ["train", "--dataset", "omniglot", "--ways", "2", "--shots", "1", "--queries", "1", "--no-progress"]
    assert main([*args, "--data-root", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    line = error_line(capsys)
    assert line.startswith("metasam train: error: --test-split evaluation: Omniglot: missing images_evaluation.zip")
    assert line.endswith("(or choose another split with --test-split)")
    monkeypatch.delenv("METASAM_DATA", raising=False)
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    assert "no data folder given. Pass --data-root <folder> (root=<folder> in Python) or set" in error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_file_system_error_no_check_foresaw_is_one_line(tmp_path, capsys, tmpfs):
    run = tmp_path / "run"
    assert main([*CLI, "--out", str(run)]) == 0
    read_only = tmpfs("1m", read_only=True)
    capsys.readouterr()
    # making the folder that --out names is the step no check foresees (the PNG itself is written atomically)
    assert main(["plot", str(run), "--out", str(read_only / "figs" / "curves.png")]) == 2
    assert error_line(capsys) == (f"metasam plot: error: {read_only / 'figs'}: read-only file system. "
                                  f"Make {read_only} writable (or choose another folder) and try again")
    # the PNG itself, straight into the read-only folder: the atomic writer's message, nothing left behind
    assert main(["plot", str(run), "--out", str(read_only / "curves.png")]) == 2
    assert error_line(capsys) == (f"metasam plot: error: cannot write {read_only / 'curves.png'}: read-only file system; "
                                  f"no earlier curves.png existed. Make {read_only} writable (or choose another folder) "
                                  "and try again")
    assert list(read_only.iterdir()) == []


def test_a_split_the_dataset_does_not_have_names_its_flag(tmp_path, capsys):
    assert main(["train", "--dataset", "glyphs", "--val-split", "Klingon", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    line = error_line(capsys)
    assert line.startswith("metasam train: error: --val-split Klingon: Glyphs: unknown script(s) ['Klingon']; choose among")
    assert line.endswith("(or choose another split with --val-split)") and not (tmp_path / "run").exists()
