"""A run folder never costs a user a file: a new run refuses a folder of other files or one it cannot write,
one process at a time trains in a folder, and the files it writes follow the umask."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from metasam.cli.main import main
from metasam.train.run_folder import RunLock
from metasam.train import meta

BASE = ["train", "--dataset", "glyphs", "--ways", "3", "--queries", "2", "--meta-batch", "2", "--val-every", "2",
        "--val-tasks", "3", "--no-progress"]
CLI = [*BASE, "--iterations", "2"]
HOLD_LOCK = """
import sys, time
from metasam.train.run_folder import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if ": error: " in line]


@pytest.fixture
def no_data(monkeypatch):
    def load_splits(*args, **kwargs):
        raise AssertionError("data loaded before the run folder was checked")

    monkeypatch.setattr(meta, "load_splits", load_splits)


def test_an_out_folder_of_other_files_is_refused_and_every_file_kept(tmp_path, capsys, no_data):
    mine = tmp_path / "experiments"
    mine.mkdir()
    files = {"config.json": '{"lr": 0.1}', "val_tasks.json": "[1, 2]", "best.pt": "my model", ".a.tmp": "notes"}
    for name, text in files.items():
        (mine / name).write_text(text)
    assert main([*CLI, "--out", str(mine)]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line == (f"metasam train: error: --out {mine} holds files that are not a metasam run (.a.tmp, best.pt, "
                    "config.json and 1 more); a new run needs an empty or new folder, so that none of your files is "
                    "overwritten: choose another --out")
    assert {p.name: p.read_text() for p in mine.iterdir()} == files


def test_an_out_folder_that_cannot_be_written_is_refused_before_any_data_loads(tmp_path, capsys, no_data, tmpfs):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("")
    assert main([*CLI, "--out", str(a_file / "run")]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"metasam train: error: cannot create {a_file / 'run'}: {a_file} is a file, not a folder; choose another folder"]
    read_only = tmpfs("1m", read_only=True)
    assert main([*CLI, "--out", str(read_only / "run")]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"metasam train: error: cannot write into {read_only} (for {read_only / 'run'}): read-only file system. "
        f"Make {read_only} writable (or choose another folder) and try again"]


def test_a_second_process_in_a_run_folder_is_refused_and_a_dead_ones_lock_does_not_block(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*CLI, "--out", str(run)]) == 0
    log = (run / "metrics.jsonl").read_text()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert main(["train", "--resume", str(run), "--iterations", "4", "--no-progress"]) == 2
        (line,) = error_lines(capsys.readouterr().err)
        assert f"{run} is in use by another metasam process (pid {holder.pid} on " in line
        assert line.endswith("wait for it to finish or stop it, then try again (one process per run folder). To give a "
                             "running run more iterations, stop it (Ctrl-C, or kill -TERM: it saves last.pt), then: "
                             f"metasam train --resume {run} --iterations N")
        assert (run / "metrics.jsonl").read_text() == log
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the killed holder's lock file is still there, with its pid, but the kernel released its lock
    assert f"pid {holder.pid}" in (run / ".metasam.lock").read_text()
    assert main(["train", "--resume", str(run), "--iterations", "4", "--no-progress"]) == 0
    iterations = [r["iteration"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                  if "val_acc" not in r]
    assert iterations == [1, 2, 3, 4]


@pytest.mark.slow
def test_two_real_resumes_at_once_one_is_refused_and_every_metric_line_is_written_once(tmp_path):
    run = tmp_path / "run"
    assert main([*CLI, "--out", str(run)]) == 0
    resume = [sys.executable, "-m", "metasam", "train", "--resume", str(run), "--iterations", "30", "--no-progress"]
    first = subprocess.Popen(resume, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while f"pid {first.pid} on" not in (run / ".metasam.lock").read_text():  # it holds the folder
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.1)
        second = subprocess.run(resume, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        (line,) = [x for x in second.stderr.splitlines() if ": error: " in x]
        assert f"is in use by another metasam process (pid {first.pid} on " in line
        assert first.wait(timeout=600) == 0
    finally:
        first.kill()
    iterations = [r["iteration"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                  if "val_acc" not in r]
    assert iterations == list(range(1, 31))


def test_resume_with_more_iterations_reaches_the_weights_of_a_longer_run(tmp_path):
    short, long = tmp_path / "short", tmp_path / "long"
    assert main([*CLI, "--out", str(short)]) == 0
    assert main(["train", "--resume", str(short), "--iterations", "4", "--no-progress"]) == 0
    assert main(["train", "--resume", str(short), "--iterations", "3", "--no-progress"]) == 2  # cannot shrink
    assert main([*BASE, "--iterations", "4", "--out", str(long)]) == 0
    got, want = (torch.load(d / "last.pt", weights_only=True)["learner"] for d in (short, long))
    assert got["iteration"] == want["iteration"] == 4
    assert all(torch.equal(got["model"][k], v) for k, v in want["model"].items())
    assert json.loads((short / "config.json").read_text())["iterations"] == 4


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o007, 0o660)])
def test_run_files_take_the_mode_the_umask_gives(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        assert main([*CLI, "--out", str(tmp_path / "run")]) == 0
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir() if p.name != ".metasam.lock"}
    assert modes == dict.fromkeys(["config.json", "val_tasks.json", "last.pt", "best.pt", "metrics.jsonl",
                                   "train_summary.json"], mode)


def test_a_lock_leaves_no_trace_of_a_run_that_never_started_but_keeps_what_another_process_made(tmp_path):
    lock = RunLock(tmp_path / "bench/3w1s/maml/seed0", create=True).acquire()
    lock.release()
    assert list(tmp_path.iterdir()) == []  # the folder and the parents it made are gone
    lock = RunLock(tmp_path / "bench/3w1s/maml/seed0", create=True).acquire()
    (tmp_path / "bench/3w1s/maml/seed1").mkdir()  # another process's cell, made while the lock was held
    lock.release()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "bench", "bench/3w1s", "bench/3w1s/maml", "bench/3w1s/maml/seed1"]
