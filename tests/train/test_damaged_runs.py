"""A damaged or diverged run is refused, never reported: a flipped byte in a checkpoint, a NaN weight, logits
that overflow during adaptation, an analysis that would write NaN; and a run whose loss explodes says so."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_reliability import folder_bytes

from metasam.atomic_write import save_atomic
from metasam.checkpoint import DIGEST_KEY, load_checkpoint
from metasam.cli.main import main
from metasam.train import analyze

CLI = ["train", "--dataset", "glyphs", "--ways", "3", "--queries", "2", "--meta-batch", "2", "--iterations", "2",
       "--val-every", "2", "--val-tasks", "3", "--no-progress"]


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if ": error: " in x]
    return line


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main([*CLI, "--out", str(run)]) == 0
    return run


@pytest.fixture
def run(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def flip_a_weight_byte(path) -> None:
    """Flip one bit inside the stored bytes of the first weight, as a bad disk or a cosmic ray would."""
    weight = next(iter(load_checkpoint(path)["learner"]["model"].values()))
    data = bytearray(path.read_bytes())
    at = data.find(weight.reshape(-1)[:4].numpy().tobytes())
    assert at > 0
    data[at + 3] ^= 0x40
    path.write_bytes(bytes(data))


def rewrite(path, change) -> None:
    """Load a checkpoint, change its weights, save it again with a valid content hash (damage the hash cannot see)."""
    ckpt = load_checkpoint(path)
    change(ckpt["learner"]["model"])
    save_atomic({k: v for k, v in ckpt.items() if k != DIGEST_KEY}, path, digest=True)


def test_a_flipped_byte_in_a_checkpoint_is_named_by_resume_and_evaluate(run, capsys):
    flip_a_weight_byte(run / "last.pt")
    flip_a_weight_byte(run / "best.pt")
    damaged = folder_bytes(run)
    assert main(["train", "--resume", str(run), "--iterations", "4", "--no-progress"]) == 2
    assert f"checkpoint {run / 'last.pt'} fails its content check" in error_line(capsys)
    assert main(["evaluate", str(run), "--episodes", "3", "--no-progress"]) == 2
    assert f"checkpoint {run / 'best.pt'} fails its content check" in error_line(capsys)
    assert folder_bytes(run) == damaged  # the run folder is kept as it was, the damaged files too


def test_evaluate_before_the_first_validation_points_to_the_last_checkpoint(run, capsys):
    (run / "best.pt").unlink()  # as in a run stopped before it first validated
    assert main(["evaluate", str(run), "--episodes", "3", "--no-progress"]) == 2
    assert error_line(capsys).endswith(f"error: {run / 'best.pt'} does not exist: the run has not validated yet; evaluate "
                                       "its last checkpoint with --checkpoint last (which='last' in Python), or train it further")
    assert main(["evaluate", str(run), "--episodes", "3", "--checkpoint", "last", "--no-progress"]) == 0


def test_a_checkpoint_that_lost_its_hash_is_refused(run, capsys):
    ckpt = load_checkpoint(run / "last.pt")
    del ckpt[DIGEST_KEY]
    torch.save(ckpt, run / "last.pt")
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    assert f"checkpoint {run / 'last.pt'} has lost its content hash" in error_line(capsys)


def test_a_nan_weight_is_refused_by_evaluate_and_analyze(run, capsys):
    def nan(model):
        next(iter(model.values()))[0] = float("nan")

    rewrite(run / "best.pt", nan)
    name = next(iter(load_checkpoint(run / "best.pt")["learner"]["model"]))
    assert main(["evaluate", str(run), "--episodes", "3", "--no-progress"]) == 2
    assert f"{run / 'best.pt'} holds non-finite weights: {name} (NaN)." in error_line(capsys)
    assert main(["analyze", str(run), "--tasks", "2", "--steps", "3", "--k", "1"]) == 2
    assert f"{run / 'best.pt'} holds non-finite weights: {name} (NaN)." in error_line(capsys)
    assert not list(run.glob("eval_*")) and not list(run.glob("analysis*.json"))


def test_logits_that_overflow_during_adaptation_are_refused(run, capsys):
    def huge(model):
        for value in model.values():
            if value.is_floating_point():
                value.mul_(1e30).clamp_(-3e38, 3e38)  # finite, but the first layer's output overflows

    rewrite(run / "best.pt", huge)
    assert main(["evaluate", str(run), "--episodes", "3", "--no-progress"]) == 2
    assert f"the logits of {run / 'best.pt'} become NaN/Inf during adaptation (its weights are finite)" in error_line(capsys)


def test_analyze_refuses_an_infinite_span_before_loading_and_a_landscape_that_overflows(run, capsys, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(analyze, "_meta_loss", lambda *a: pytest.fail("the run was loaded before the options were checked"))
        assert main(["analyze", str(run), "--span", "inf"]) == 2
        assert error_line(capsys).endswith("error: --span must be a finite number > 0, got inf")
        assert main(["analyze", str(run), "--k", "100000"]) == 2
        assert error_line(capsys).endswith("error: --k must be an int between 1 and 100, got 100000")
    assert main(["analyze", str(run), "--landscape", "--tasks", "2", "--steps", "3", "--span", "1e38"]) == 2
    assert "the loss landscape is not finite" in error_line(capsys)
    assert not list(run.glob("analysis*.json")) and not list(run.glob("landscape*.png"))


def test_a_run_whose_loss_explodes_warns_once(tmp_path, capsys):
    assert main([*CLI, "--iterations", "3", "--inner-lr", "1e6", "--out", str(tmp_path / "run")]) in (0, 2)
    warnings = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert len(warnings) == 1 and "the run is diverging" in warnings[0] and "--inner-lr (now 1000000.0)" in warnings[0]


@pytest.mark.parametrize("text, why", [("[1]", "(it holds a list)"), ("{bad", "(Expecting property name")])
def test_analyze_refuses_a_config_that_is_not_a_json_object(tmp_path, capsys, text, why):
    (tmp_path / "config.json").write_text(text)
    assert main(["analyze", str(tmp_path)]) == 2
    assert f"{tmp_path / 'config.json'} is not a JSON object {why}" in error_line(capsys)
