"""A real full disk (a small tmpfs mounted for the test; skipped where this process may not mount one): a
checkpoint or a metrics line that does not fit is a one-line error that keeps the previous checkpoint, and an
image cache that does not fit is a warning (tests/data/test_data_cache.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
import torch

from metasam.atomic_write import save_atomic
from metasam.checkpoint import load_checkpoint
from metasam.cli.main import main
from metasam.errors import CheckpointError
from metasam.train.config import MetaTrainConfig
from metasam.train.meta import MetaTrainer

CLI = ["train", "--dataset", "glyphs", "--ways", "3", "--queries", "2", "--meta-batch", "2", "--iterations", "4",
       "--val-every", "2", "--val-tasks", "3", "--no-progress"]


def fill(folder) -> None:
    """Write a file into ``folder`` until its file system has no space left."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


def test_a_checkpoint_that_does_not_fit_keeps_the_previous_one(tmpfs):
    disk = tmpfs("3m")
    save_atomic({"w": torch.arange(4.0)}, disk / "last.pt", digest=True)
    before = (disk / "last.pt").read_bytes()
    with pytest.raises(CheckpointError) as info:
        save_atomic({"w": torch.zeros(1_000_000)}, disk / "last.pt", digest=True)  # 3.8 MiB
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"cannot write {disk / 'last.pt'}: no space left on device; "
                                                      "the previous last.pt is intact. It needs 3.8")
    assert (disk / "last.pt").read_bytes() == before and sorted(p.name for p in disk.iterdir()) == ["last.pt"]
    assert torch.equal(load_checkpoint(disk / "last.pt")["w"], torch.arange(4.0))


def test_a_run_on_a_full_disk_stops_in_one_line_keeps_its_checkpoint_and_resumes_once_there_is_space(tmpfs, capsys):
    disk = tmpfs("3m")  # config, val tasks and two 1.3 MiB checkpoints fit; a third write does not
    run = disk / "run"
    assert main([*CLI, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if ": error: " in x]
    assert re.fullmatch(rf"metasam train: error: cannot write {re.escape(str(run))}/last\.pt: no space left on "
                        rf"device; the previous last\.pt is intact\. It needs [\d.]+ MiB in {re.escape(str(run))} "
                        rf"\([\d.]+ MiB free\): .*then continue the run with: metasam train --resume {re.escape(str(run))}",
                        line), line
    kept = load_checkpoint(run / "last.pt", require_digest=True)["learner"]["iteration"]
    assert not list(run.glob(".*.tmp"))
    subprocess.run(["mount", "-o", "remount,size=10m", str(disk)], check=True)  # space was freed
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines if "val_acc" not in r] == [1, 2, 3, 4] and kept < 4
    assert [r["iteration"] for r in lines if "val_acc" in r] == [2, 4]  # each line once, validations too


def test_a_metrics_line_that_does_not_fit_stops_the_run_in_one_error(tmpfs):
    run = tmpfs("3m") / "run"
    cfg = MetaTrainConfig(ways=3, queries=2, meta_batch=2, iterations=2, val_tasks=2, hidden=8)
    with MetaTrainer(cfg, run) as trainer:
        trainer.start()
        fill(run.parent)
        with pytest.raises(CheckpointError) as info:
            trainer.train(progress=False)
    assert str(info.value).startswith(f"cannot append to {run / 'metrics.jsonl'}: no space left on device; "
                                      f"{run / 'last.pt'} keeps iteration 0. ")
    assert str(info.value).endswith(f"then continue the run with: metasam train --resume {run}")
    assert load_checkpoint(run / "last.pt", require_digest=True)["learner"]["iteration"] == 0
