"""Run files survive failed writes and kills; checkpoints never run code from the file; logs survive torn lines."""

from __future__ import annotations

import errno
import io
import os
import pickle

import pytest
import torch

from metasam.atomic_write import save_atomic, write_text_atomic
from metasam.checkpoint import load_checkpoint, read_jsonl, state_dict_mismatch
from metasam.errors import CheckpointError


def disk_full_at_fsync(monkeypatch) -> None:
    """Make every fsync fail with ENOSPC, as a full disk with delayed allocation does (the real thing, a full
    tmpfs failing the write itself, is tests/test_full_disk.py)."""
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)


def test_disk_full_keeps_the_old_checkpoint_and_says_what_is_needed_where(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic({"w": torch.arange(4.0)}, path)
    before = path.read_bytes()
    disk_full_at_fsync(monkeypatch)
    big = {"w": torch.zeros(300_000)}
    serialized = io.BytesIO()
    torch.save(big, serialized)
    with pytest.raises(CheckpointError) as info:
        save_atomic(big, path)
    message = str(info.value)
    assert "no space left on device" in message and "the previous last.pt is intact" in message
    assert f"needs {serialized.tell() / 2**20:.2f} MiB in {tmp_path}" in message and "MiB free" in message
    assert path.read_bytes() == before and torch.equal(load_checkpoint(path)["w"], torch.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # the partial temporary file is gone


def test_disk_full_on_a_first_write_says_there_was_nothing_to_keep(tmp_path, monkeypatch):
    disk_full_at_fsync(monkeypatch)
    with pytest.raises(CheckpointError, match="no earlier best.pt existed"):
        save_atomic({"w": torch.ones(3)}, tmp_path / "best.pt")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    write_text_atomic("old", path)

    def interrupted(f):
        f.write(b"half of the new")
        raise KeyboardInterrupt

    import metasam.atomic_write as ck

    with pytest.raises(KeyboardInterrupt):
        ck.replace_atomically(path, interrupted)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


class RunsCode:
    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_loading_never_runs_code_from_the_file(tmp_path):
    RunsCode.marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save({"w": torch.ones(1), "payload": RunsCode()}, f, pickle_module=pickle)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()
    message = str(info.value)  # one line, torch's finding without its advice to load the file unsafely
    assert "\n" not in message and "\x1b" not in message and "weights_only" not in message
    assert message.startswith(f"checkpoint {path} cannot be loaded safely (UnpicklingError: ") and "mkdir" in message
    assert message.endswith("restore it from a copy, or use the run's other checkpoint")
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and "evil.pt cannot be loaded safely (RuntimeError: " in str(info.value)


def test_jsonl_reader_drops_only_a_torn_last_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"iteration": 1}\n{"iteration": 2}\n{"itera')  # a kill in the middle of an append
    assert read_jsonl(log) == [{"iteration": 1}, {"iteration": 2}]
    from metasam.analysis import read_metrics

    assert read_metrics(tmp_path) == [{"iteration": 1}, {"iteration": 2}]  # metasam plot reads a killed run too
    log.write_text('{"iteration": 1}\nnot json\n{"iteration": 3}\n')
    with pytest.raises(CheckpointError, match="metrics.jsonl line 2 is not JSON"):
        read_jsonl(log)


def test_state_dict_mismatch_names_keys_and_shapes():
    here = {"a.weight": torch.zeros(8, 3), "a.bias": torch.zeros(8), "b.weight": torch.zeros(2, 8)}
    saved = {"a.weight": torch.zeros(16, 3), "a.bias": torch.zeros(8), "c.weight": torch.zeros(1)}
    text = state_dict_mismatch(saved, here)
    assert "missing b.weight" in text and "unexpected c.weight" in text
    assert "a.weight (16, 3) in the checkpoint vs (8, 3) here" in text
    assert state_dict_mismatch(here, here) == ""


def test_a_read_only_folder_is_told_to_be_made_writable_not_to_free_space(tmpfs):
    folder = tmpfs("1m", read_only=True)
    with pytest.raises(CheckpointError) as info:
        write_text_atomic("{}", folder / "config.json")
    assert str(info.value) == (f"cannot write {folder / 'config.json'}: read-only file system; no earlier config.json "
                               f"existed. Make {folder} writable (or choose another folder) and try again")
