"""Real ``metasam train`` processes killed with SIGKILL (or stopped with SIGTERM) at several moments, and mid-save,
resume from their last complete checkpoint to exactly the weights and metrics of an uninterrupted run.

The killed runs are subprocesses; the resumes and the uninterrupted reference run through the same CLI entry point
in this process (a second interpreter start per test would double the time), so every comparison also checks that
a run continued in another process reaches the same bits.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metasam.cli.main import main

pytestmark = pytest.mark.slow

ARGS = ["train", "--dataset", "glyphs", "--ways", "3", "--queries", "2", "--meta-batch", "2", "--iterations", "6",
        "--val-every", "2", "--val-tasks", "3", "--no-progress"]

# Kills this process in the middle of a checkpoint write: the 3rd write of last.pt (iteration 4; the previous
# last.pt holds iteration 2), either after a fsync'ed half of the temporary file or just before os.replace.
MID_SAVE_DRIVER = """
import io, os, signal, sys
from pathlib import Path
import metasam.atomic_write as ck
from metasam.cli.main import main

mode, argv = sys.argv[1], sys.argv[2:]
real, writes = ck.replace_atomically, []

def die(*args):
    os.kill(os.getpid(), signal.SIGKILL)

def dying(path, write):
    if Path(path).name == "last.pt":
        writes.append(path)
        if len(writes) == 3 and mode == "before-replace":
            os.replace = die
        elif len(writes) == 3:
            def half(f):
                buffer = io.BytesIO()
                write(buffer)
                f.write(buffer.getvalue()[: buffer.tell() // 2])
                f.flush()
                os.fsync(f.fileno())
                die()
            return real(path, half)
    return real(path, write)

ck.replace_atomically = dying
sys.exit(main(argv))
"""


def launch(run: Path, *extra: str, driver: list[str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, *(driver or ["-m", "metasam"]), *ARGS, "--out", str(run), *extra]
    with open(run.parent / f"{run.name}-{time.monotonic_ns()}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    proc.log_path = log.name
    return proc


def output(proc: subprocess.Popen) -> str:
    return Path(proc.log_path).read_text()


def finish(proc: subprocess.Popen, timeout: float = 120) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"metasam train did not finish in {timeout} s:\n{output(proc)}")


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line]  # a torn last line is no record


def wait_until(proc: subprocess.Popen, ready, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"metasam train exited (rc {proc.returncode}) before the kill point:\n{output(proc)}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"kill point not reached in {timeout} s:\n{output(proc)}")
        time.sleep(0.002)


def validated(run: Path, iteration: int):
    return lambda: any(r.get("val_acc") is not None and r["iteration"] == iteration for r in records(run))


def resume(run: Path) -> None:
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0


def state(path: Path) -> dict:
    ckpt = torch.load(path, weights_only=True)
    return {"model": ckpt["learner"]["model"], "optimizer": ckpt["learner"]["outer_optimizer"]["state"],
            "iteration": ckpt["learner"]["iteration"], "best": (ckpt["best_val"], ckpt["best_iteration"])}


def assert_same_run(run: Path, reference: Path) -> None:
    for name in ("last.pt", "best.pt"):
        got, want = state(run / name), state(reference / name)
        assert got["iteration"] == want["iteration"] and got["best"] == want["best"], name
        for key, tensor in want["model"].items():
            assert torch.equal(got["model"][key], tensor), f"{name}: {key}"
        for index, slots in want["optimizer"].items():
            for slot, tensor in slots.items():
                assert torch.equal(got["optimizer"][index][slot], tensor), f"{name}: Adam {index} {slot}"
    # the log of the resumed run is the log of the uninterrupted run: each line once, same values
    def strip(rs):
        return [{k: v for k, v in r.items() if k != "tasks_per_s"} for r in rs]

    assert strip(records(run)) == strip(records(reference))
    assert not list(run.glob(".*.tmp")), "a temporary file of an interrupted write was left behind"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main([*ARGS, "--out", str(run)]) == 0
    assert [r["iteration"] for r in records(run) if "val_acc" in r] == [2, 4, 6]
    return run


KILL_POINTS = {
    "after-the-iteration-0-checkpoint": lambda run: lambda: (run / "last.pt").exists(),  # before any training step
    "at-the-first-validation": lambda run: validated(run, 2),
    "at-the-second-validation": lambda run: validated(run, 4),
}


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_sigkill_at_a_checkpoint_then_resume_equals_an_uninterrupted_run(tmp_path, reference, point):
    run = tmp_path / "run"
    proc = launch(run)
    wait_until(proc, KILL_POINTS[point](run))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    resume(run)
    assert_same_run(run, reference)


@pytest.mark.parametrize("seed", [1])
def test_sigkill_at_a_random_moment_then_resume_equals_an_uninterrupted_run(tmp_path, reference, seed):
    run = tmp_path / "run"
    proc = launch(run)
    wait_until(proc, lambda: bool(records(run)))  # training has begun
    time.sleep(random.Random(seed).uniform(0.0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    if proc.returncode == 0:
        pytest.skip("the run finished before the random kill time on this machine")
    assert proc.returncode == -signal.SIGKILL, output(proc)
    resume(run)
    assert_same_run(run, reference)


@pytest.mark.parametrize("mode", ["mid-write", "before-replace"])
def test_sigkill_inside_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, reference, mode):
    run = tmp_path / "run"
    proc = launch(run, driver=["-c", MID_SAVE_DRIVER, mode])
    assert finish(proc) == -signal.SIGKILL, output(proc)
    (stale,) = run.glob(".last.pt.*.tmp")  # the new checkpoint, complete or not, never replaced the old one
    assert state(run / "last.pt")["iteration"] == 2
    assert stale.stat().st_size > 0
    resume(run)
    assert_same_run(run, reference)


def test_sigterm_saves_closes_and_names_the_resume_command(tmp_path, reference):
    run = tmp_path / "run"
    proc = launch(run)
    wait_until(proc, validated(run, 2))
    proc.send_signal(signal.SIGTERM)
    assert finish(proc) == 130, output(proc)
    message = output(proc).strip().splitlines()[-1]
    assert message.startswith("metasam train: stopped by SIGTERM at iteration ")
    assert message.endswith(f"Continue with: metasam train --resume {run}")
    assert f"; checkpoint {run / 'last.pt'} saved. " in message
    stopped_at = int(message.split("at iteration ")[1].split(";")[0])
    assert state(run / "last.pt")["iteration"] == stopped_at >= 2
    assert (run / "metrics.jsonl").read_text().endswith("\n")  # no torn line: the log was closed cleanly
    resume(run)
    assert_same_run(run, reference)
