"""Faults injected into meta-training runs: NaN steps, a full disk, bad settings, foreign checkpoints, torn logs.

Each test checks what the run did (a one-line error naming the problem and the fix, or a skipped step) and
that no completed work was lost (the last good checkpoint, a log that matches it, a resumable folder).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from metasam import NonFiniteError
from metasam.cli.main import main
from metasam.data import EpisodeSampler
from metasam.errors import DatasetError
from metasam.meta import AgnosticRule
from metasam.train import meta
from metasam.train.config import MetaTrainConfig
from metasam.train.meta import MetaTrainer

TINY = {"dataset": "glyphs", "ways": 3, "shots": 1, "queries": 2, "meta_batch": 2, "hidden": 8, "val_every": 2, "val_tasks": 4}
CLI = ["train", "--dataset", "glyphs", "--ways", "3", "--queries", "2", "--meta-batch", "2", "--iterations", "6",
       "--val-every", "2", "--val-tasks", "3", "--no-progress"]


def poison(monkeypatch, iterations: set[int], meta_batch: int = 2) -> None:
    """Put a NaN into the query images of the meta-batches of ``iterations`` (numbered as in metrics.jsonl)."""
    real = EpisodeSampler.batch

    def batch(self, indices):
        out = real(self, indices)
        if indices[0] // meta_batch + 1 in iterations:
            out.query_x[0, 0, 0, 0, 0] = float("nan")
        return out

    monkeypatch.setattr(EpisodeSampler, "batch", batch)


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def checkpoint(path):
    return torch.load(path, weights_only=True)


def folder_bytes(run) -> dict:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


def errors(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if ": error: " in line]


def test_nan_stops_the_run_in_one_line_keeps_the_last_good_checkpoint_and_resumes_skipping_it(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    poison(monkeypatch, {3})
    assert main([*CLI, "--out", str(run)]) == 2
    assert errors(capsys.readouterr().err) == [
        "metasam train: error: iteration 3: the query loss is NaN; θ, the outer optimizer and its momentum keep their "
        "values of iteration 2. Try a smaller --inner-lr (now 0.4), --outer-lr (now 0.001). The run stopped; "
        f"{run / 'last.pt'} keeps iteration 2. To skip such steps instead: metasam train --resume {run} --skip-nonfinite 1"]
    last = checkpoint(run / "last.pt")
    assert last["learner"]["iteration"] == 2
    assert all(torch.isfinite(t).all() for t in last["learner"]["model"].values())
    assert records(run)[-1] == {"iteration": 3, "nonfinite": "query loss", "stopped": True}

    assert main(["train", "--resume", str(run), "--skip-nonfinite", "1", "--no-progress"]) == 0
    assert json.loads((run / "config.json").read_text())["skip_nonfinite"] == 1
    assert json.loads((run / "train_summary.json").read_text())["skipped_nonfinite"] == 1
    lines = records(run)
    assert [r["iteration"] for r in lines if "val_acc" not in r] == [1, 2, 3, 4, 5, 6]
    assert [r for r in lines if "nonfinite" in r] == [
        {"iteration": 3, "skipped_nonfinite": 1, "nonfinite": "query loss", "tasks_per_s": lines[3]["tasks_per_s"],
         "task_threads": lines[3]["task_threads"]}]
    # the stopped-then-resumed run equals one that was told to skip from the start
    straight = tmp_path / "straight"
    assert main([*CLI, "--out", str(straight), "--skip-nonfinite", "1"]) == 0
    for k, v in checkpoint(straight / "last.pt")["learner"]["model"].items():
        assert torch.equal(checkpoint(run / "last.pt")["learner"]["model"][k], v), k


def test_a_skipped_step_changes_no_weight_optimizer_state_or_momentum_and_the_next_one_over_budget_stops(tmp_path, monkeypatch):
    cfg = MetaTrainConfig(algo="agnostic-sam-both", iterations=6, skip_nonfinite=1,
                          outer_rule=AgnosticRule(rho1=0.05, rho2=0.02), **TINY)
    trainer = MetaTrainer(cfg, tmp_path / "run")
    trainer.start()
    poison(monkeypatch, {3, 5})
    entering = {}
    step = trainer.learner.meta_step

    def recording(*args, **kwargs):
        entering[trainer.learner.iteration] = copy.deepcopy(trainer.learner.state_dict())
        return step(*args, **kwargs)

    trainer.learner.meta_step = recording
    with pytest.raises(NonFiniteError, match=r"iteration 5: the query loss is NaN.*stopped after skipping 1 such step"):
        trainer.train(progress=False)
    before, after = entering[2], entering[3]  # around the skipped step 3
    assert after["iteration"] == 3 and before["iteration"] == 2
    for k, v in before["model"].items():
        assert torch.equal(after["model"][k], v), k
    assert before["outer_optimizer"]["state"].keys() == after["outer_optimizer"]["state"].keys()
    for i, slots in before["outer_optimizer"]["state"].items():
        assert all(torch.equal(after["outer_optimizer"]["state"][i][s], t) for s, t in slots.items())
    assert before["outer_momentum"] is not None
    assert all(torch.equal(a, b) for a, b in zip(before["outer_momentum"], after["outer_momentum"]))
    assert any(not torch.equal(entering[4]["model"][k], v) for k, v in after["model"].items())  # step 4 trained
    assert checkpoint(tmp_path / "run" / "last.pt")["skipped_nonfinite"] == 1
    assert checkpoint(tmp_path / "run" / "last.pt")["learner"]["iteration"] == 4
    skipped, stopped = [r for r in records(tmp_path / "run") if "nonfinite" in r]
    assert {k: skipped[k] for k in ("iteration", "skipped_nonfinite", "nonfinite")} == {
        "iteration": 3, "skipped_nonfinite": 1, "nonfinite": "query loss"}
    assert stopped == {"iteration": 5, "nonfinite": "query loss", "stopped": True}


def test_settings_are_checked_before_any_data_is_loaded(tmp_path, monkeypatch, capsys):
    def no_data(*args, **kwargs):
        raise AssertionError("data loaded before the settings were checked")

    monkeypatch.setattr(meta, "load_splits", no_data)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "config.json").write_text(json.dumps({"dataset": "glyphs", "algo": "maml"}))
    assert main([*CLI, "--out", str(existing)]) == 2
    assert errors(capsys.readouterr().err) == [
        f"metasam train: error: {existing} already holds a run; continue it with --resume {existing} or choose another --out"]
    for bad, message in [(["--meta-batch", "0"], "--meta-batch must be an int >= 1, got 0"),
                         (["--outer-lr", "nan"], "error: --outer-lr must be a finite number > 0, got nan"),
                         (["--algo", "sharp-maml-low", "--inner-rho", "inf"], "error: --inner-rho must be a finite number >= 0, got inf"),
                         (["--algo", "agnostic-sam-both", "--outer-beta", "1.5"], "error: --outer-beta must lie in [0, 1)"),
                         (["--test-inner-steps", "0"], "error: --test-inner-steps must be an int >= 1, got 0"),
                         (["--device", "cuda:99" if torch.cuda.is_available() else "cuda"], "--device"),
                         (["--device", "gpu"], "--device 'gpu' is not a torch device")]:
        if bad[0] == "--device" and torch.cuda.is_available():
            continue  # a CUDA machine accepts these devices
        assert main([*CLI, "--out", str(tmp_path / "new"), *bad]) == 2
        (line,) = errors(capsys.readouterr().err)
        assert message in line
    assert not (tmp_path / "new").exists()


def test_rho2_above_rho1_warns_once_in_one_line(tmp_path, monkeypatch, capsys):
    def stop(*args, **kwargs):
        raise DatasetError("stop before loading")

    monkeypatch.setattr(meta, "load_splits", stop)
    args = [*CLI, "--algo", "agnostic-sam", "--inner-rho1", "0.01", "--inner-rho2", "0.1", "--out", str(tmp_path / "r")]
    assert main(args) == 2
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [("metasam train: warning: agnostic rule: rho2=0.1 > rho1=0.01; the paper finds rho1 > rho2 "
                         "works best (typically rho2 = rho1 / 2)")]


@pytest.mark.parametrize("bad, message", [
    (["--ways", "60"], "--val-split val: glyphs(seed=0)[53 classes] has 53 classes, fewer than ways=60"),
    (["--shots", "10", "--queries", "15"], ("--train-split train: class 'Arabic/U+0621' of glyphs(seed=0)[371 classes] "
                                            "has 20 images, fewer than shots + queries = 25")),
])
def test_impossible_episodes_are_one_line_errors_naming_the_split(tmp_path, capsys, bad, message):
    assert main([*CLI, "--out", str(tmp_path / "run"), *bad]) == 2
    (line,) = errors(capsys.readouterr().err)
    assert message in line
    assert not (tmp_path / "run").exists()


def test_foreign_checkpoints_and_changed_settings_are_named(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*CLI, "--iterations", "2", "--out", str(a)]) == 0
    assert main([*CLI, "--iterations", "2", "--ways", "4", "--out", str(b)]) == 0
    capsys.readouterr()
    kept = folder_bytes(a)
    assert main(["train", "--resume", str(a), "--outer-lr", "0.1"]) == 2
    assert "drop --outer-lr (only --skip-nonfinite, --iterations, --task-threads and --no-progress may be given)" in errors(
        capsys.readouterr().err)[0]
    assert main(["train", "--resume", str(a / "last.pt")]) == 2
    assert errors(capsys.readouterr().err) == [
        f"metasam train: error: --resume takes the run folder, not a file in it: use --resume {a}"]
    assert folder_bytes(a) == kept
    (a / "best.pt").write_bytes((b / "best.pt").read_bytes())  # a checkpoint copied from another run
    (a / "last.pt").write_bytes((b / "last.pt").read_bytes())
    kept = folder_bytes(a)
    assert main(["evaluate", str(a), "--episodes", "3", "--no-progress"]) == 2
    (line,) = errors(capsys.readouterr().err)
    assert "best.pt was written by another configuration" in line and "ways: 4 vs 3" in line
    assert main(["train", "--resume", str(a), "--no-progress"]) == 2
    (line,) = errors(capsys.readouterr().err)
    assert "last.pt was written by another configuration" in line and "ways: 4 vs 3" in line
    assert folder_bytes(a) == kept  # every refusal left the run folder as it was
    for name in ("last.pt", "best.pt", "metrics.jsonl", "train_summary.json"):  # as if killed before last.pt
        (b / name).unlink()
    assert main([*CLI, "--iterations", "2", "--ways", "4", "--out", str(b)]) == 2
    assert errors(capsys.readouterr().err) == [
        f"metasam train: error: {b} already holds a run; continue it with --resume {b} or choose another --out"]
    assert main(["train", "--resume", str(b), "--no-progress"]) == 0  # nothing was trained: it starts from 0
    assert f"{b} stopped before its first checkpoint; starting it from iteration 0" in capsys.readouterr().err
    assert checkpoint(b / "last.pt")["learner"]["iteration"] == 2
    (b / "metrics.jsonl").unlink()
    (b / "last.pt").unlink()  # lost, while best.pt and train_summary.json show the run trained
    assert main(["train", "--resume", str(b), "--no-progress"]) == 2
    assert f"{b} has no last.pt but has best.pt, train_summary.json" in errors(capsys.readouterr().err)[0]


def test_resume_drops_a_torn_log_line_and_stale_temporary_files(tmp_path):
    cfg = MetaTrainConfig(algo="maml", iterations=2, **TINY)
    trainer = MetaTrainer(cfg, tmp_path / "run")
    trainer.start()
    trainer.train(progress=False)
    run = tmp_path / "run"
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 3, "query_lo')  # SIGKILL in the middle of an append
    (run / ".last.pt.k1ll3d.metasam.tmp").write_bytes(b"half a checkpoint")
    (run / ".notes.md.tmp").write_text("a user's file that merely looks temporary")
    again = MetaTrainer(MetaTrainConfig.load(run), run)
    again.resume()
    assert (run / "metrics.jsonl").read_text().endswith("}\n")
    assert [r["iteration"] for r in records(run)] == [1, 2, 2]
    assert [p.name for p in run.glob(".*.tmp")] == [".notes.md.tmp"]  # only metasam's own temporary file went
    (run / "config.json").write_text('{"dataset": "gly')
    with pytest.raises(meta.CheckpointError, match="config.json is not valid JSON"):
        MetaTrainConfig.load(run)
