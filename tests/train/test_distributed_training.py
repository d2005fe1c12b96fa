"""``metasam train`` under torchrun: 2 gloo processes on loopback reach the weights of one process, write one run.

This file is also the program the processes of the stop, resume and evaluate tests, and of the diverging bench
test, run (``__main__`` at the end).

One caveat shapes the weight comparisons: Conv4's convolutions have biases that feed a batch norm, which
cancels them, so their meta-gradient is 0 in exact arithmetic and rounding noise in practice; Adam scales
that noise up to steps of about ±lr, and noise that depends on the order of summation (1 process or 2)
differs. Those biases are compared to within Adam's largest steps; every other weight to float tolerance.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from metasam import ConfigError
from metasam.cli.main import main
from metasam.models import BatchNorm, Conv4
from metasam.train.distributed import join, leave
from metasam.train.config import MetaTrainConfig
from metasam.train.meta import MetaTrainer

GLYPHS = ["--dataset", "glyphs", "--ways", "3", "--queries", "2", "--meta-batch", "4", "--iterations", "3",
          "--val-every", "3", "--val-tasks", "5", "--algo", "agnostic-sam-up", "--no-progress"]
TINY = {"dataset": "glyphs", "ways": 3, "shots": 1, "queries": 2, "meta_batch": 3, "hidden": 8, "val_every": 2,
        "val_tasks": 5, "algo": "agnostic-sam-both", "iterations": 4}


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Two processes on this machine (rendezvous on a free loopback port), one thread each."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    out = Path(args[args.index("--out") + 1]) if "--out" in args else None
    if done.returncode != 0 and out is not None and out.is_dir():  # how far it got, for a failure seen once in a while
        metrics = out / "metrics.jsonl"
        lines = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        pytest.fail(f"torchrun exited {done.returncode}; {out} holds {sorted(p.name for p in out.iterdir())}, "
                    f"{lines} metrics lines\n{done.stderr[-4000:]}")
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def cancelled_biases(model: nn.Module) -> set[str]:
    """Names of the convolution biases that a batch norm right after the convolution cancels, read from
    Conv4's layers (CPUConv4, which the trainer builds on a CPU, has the same names and no layers)."""
    layers = Conv4(**model.config).features
    return {f"features.{i}.bias" for i, (a, b) in enumerate(itertools.pairwise(layers))
            if isinstance(a, nn.Conv2d) and isinstance(b, BatchNorm)}


def assert_same_weights(got: dict, want: dict, cancelled: set[str], lr: float, steps: int) -> None:
    """The weights of two runs whose gradients agree up to float32 rounding, after ``steps`` Adam steps of ``lr``.

    Adam's first step is ±lr per coordinate, whatever the gradient's size: a bias that the next batch norm
    cancels has a gradient of rounding noise, so its sign, and the bias, differ between two summation orders (up
    to 2·lr·steps). Every other weight agrees to rounding but where Adam's m/√v is ill-conditioned (a gradient
    that changes sign between steps): on a 2-core AMD EPYC, 93 of 111,875 weights differed by up to 1.0e-5 after
    3 steps of 1e-3. A gradient that misses a process's share moves most weights by about lr instead."""
    assert len(cancelled) == 4 and got.keys() == want.keys()
    outside, total = 0, 0
    for name, w in want.items():
        if name in cancelled:
            assert (got[name] - w).abs().max() <= 2 * lr * steps, name
        else:
            assert (got[name] - w).abs().max() <= lr / 10, name
            outside += int((~torch.isclose(got[name], w, rtol=1e-4, atol=1e-6)).sum())
            total += w.numel()
    assert outside <= total / 200, f"{outside} of {total} weights differ beyond rounding"


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["learner"]["model"]


def training_lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_torchrun_of_the_cli_writes_one_run_with_the_weights_of_one_process(tmp_path, capsys):
    single = tmp_path / "single"
    assert main(["train", *GLYPHS, "--out", str(single)]) == 0  # also fills the glyph cache the processes read
    assert not torch.distributed.is_initialized()  # a single process creates no process group
    capsys.readouterr()

    shared = tmp_path / "shared"
    done = torchrun("-m", "metasam", "train", *GLYPHS, "--out", str(shared / "run"))
    assert [p.name for p in shared.iterdir()] == ["run"]
    assert sorted(p.name for p in (shared / "run").iterdir()) == sorted(p.name for p in single.iterdir())
    assert {"best.pt", "last.pt", "metrics.jsonl", "config.json", "val_tasks.json"} <= {p.name for p in single.iterdir()}
    assert done.stdout.count('"best_iteration"') == 1  # rank 0 alone reports
    lines, ref = training_lines(shared / "run"), training_lines(single)
    assert [(r["iteration"], "val_acc" in r) for r in lines] == [(1, False), (2, False), (3, False), (3, True)]
    for got, want in zip(lines, ref):  # logged numbers are those of the whole meta-batch
        rel = 1e-4 if got["iteration"] == 1 else 1e-2  # later: at weights Adam made differ a little (assert_same_weights)
        for key in ("query_loss", "query_acc_before", "outer_grad_norm", "outer_cos_train_val", "val_acc"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=rel), (got["iteration"], key)
    cancelled = cancelled_biases(MetaTrainer(MetaTrainConfig.load(single), tmp_path / "unused").learner.model)
    for name in ("last.pt", "best.pt"):
        assert_same_weights(weights(shared / "run" / name), weights(single / name), cancelled, lr=1e-3, steps=3)


def stop_resume_evaluate(out: Path) -> None:
    """Each process: train, rank 1 alone gets SIGTERM during iteration 2; resume the run to the end;
    ``metasam evaluate`` it."""
    import torch.distributed as dist

    trainer = MetaTrainer(MetaTrainConfig(**TINY), out / "run")
    trainer.start()
    if trainer.procs.rank == 1:
        step = trainer.learner.meta_step

        def step_then_signal(*args, **kwargs):
            metrics = step(*args, **kwargs)
            if trainer.learner.iteration == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return metrics

        trainer.learner.meta_step = step_then_signal
    try:
        trainer.train(progress=False)
        stopped = None
    except KeyboardInterrupt:
        stopped = trainer.learner.iteration
    dist.barrier()  # a new launch would start after rank 0 wrote last.pt; so must the resume here
    resumed = MetaTrainer(MetaTrainConfig.load(out / "run"), out / "run")
    resumed.resume()
    start = resumed.learner.iteration
    resumed.train(progress=False)
    result = {"stopped": stopped, "resumed_from": start, "weights": resumed.learner.model.state_dict()}
    torch.save(result, out / f"rank{trainer.procs.rank}.pt")
    dist.barrier()  # likewise the evaluation: rank 0 may still be writing the final best.pt
    assert main(["evaluate", str(out / "run"), "--episodes", "7", "--no-progress"]) == 0


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("stop-resume-evaluate")
    return out, torchrun(__file__, str(out)).stdout


@pytest.mark.slow
def test_a_signal_to_one_process_stops_all_after_the_same_iteration_and_the_run_resumes(two_processes):
    tmp_path, _ = two_processes
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [(r["stopped"], r["resumed_from"]) for r in ranks] == [(2, 2), (2, 2)]
    for name, w in ranks[0]["weights"].items():
        assert torch.equal(ranks[1]["weights"][name], w), name
    assert [r["iteration"] for r in training_lines(tmp_path / "run") if "query_loss" in r] == [1, 2, 3, 4]

    uninterrupted = MetaTrainer(MetaTrainConfig(**TINY), tmp_path / "single")
    uninterrupted.start()
    uninterrupted.train(progress=False)
    want = uninterrupted.learner.model.state_dict()
    assert_same_weights(ranks[0]["weights"], want, cancelled_biases(uninterrupted.learner.model), lr=1e-3, steps=4)


@pytest.mark.slow
def test_evaluation_shared_between_processes_gives_the_single_process_accuracies_in_order(two_processes):
    run, stdout = two_processes[0] / "run", two_processes[1]
    assert stdout.count("7 tasks of test") == 1  # rank 0 alone reports
    written = json.loads((run / "eval_best_7_seed1234.json").read_text())
    assert main(["evaluate", str(run), "--episodes", "7", "--no-progress"]) == 0
    alone = json.loads((run / "eval_best_7_seed1234.json").read_text())
    assert len(set(alone["task_accuracies"])) > 1  # the order is checkable
    assert written["task_accuracies"] == alone["task_accuracies"] and written["ci95"] == alone["ci95"]


def test_launch_settings_that_cannot_work_are_refused_before_any_process_group(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["train", *GLYPHS, "--meta-batch", "1", "--out", str(tmp_path / "run")]) == 2
    assert "--meta-batch 1 is smaller than the 2 processes" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="pass --device cuda"):
        join("cuda:1")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="RANK=2"):
        join("cpu")
    monkeypatch.delenv("RANK")
    with pytest.raises(ConfigError, match="RANK is not"):
        join("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="not an integer"):
        join("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert join("cuda:1").world_size == 1  # one process: any device, no group
    assert not torch.distributed.is_initialized() and not (tmp_path / "run").exists()


def diverging_bench(out: Path) -> int:
    """Each process: a bench whose second maml point (α = 1e30) diverges at its first step, with rank 0 writing
    the stop record 2 s late: the other process must wait for it, not take the stop for an error."""
    if os.environ["RANK"] == "0":
        log = MetaTrainer._log

        def late_log(trainer, record):
            if record.get("stopped"):
                time.sleep(2)
            log(trainer, record)

        MetaTrainer._log = late_log
    return main(["bench", "--dataset", "glyphs", "--settings", "3w1s", "--queries", "2", "--meta-batch", "2",
                 "--iterations", "2", "--val-every", "2", "--val-tasks", "3", "--test-inner-steps", "1", "--episodes",
                 "12", "--seeds", "0", "--algos", "maml", "--grid", "maml:inner_lr=0.4,1e30", "--no-progress",
                 "--out", str(out)])


@pytest.mark.slow
def test_a_bench_under_torchrun_records_a_diverged_cell_on_every_process(tmp_path):
    out = tmp_path / "bench"
    done = torchrun(__file__, "diverging-bench", "--out", str(out))
    maml = json.loads((out / "results.json").read_text())["settings"][0]["grids"]["maml"]
    assert maml["selected"] == 0 and maml["points"][1]["diverged"] == {"0": {"iteration": 1, "nonfinite": "query loss"}}
    assert done.stderr.count("3w1s/maml/inner_lr=1e+30/seed0 diverged, an outcome the table marks") == 1  # rank 0's
    assert done.stdout.count("Reproduce from nothing") == 1  # rank 0 prints the table


if __name__ == "__main__":
    if sys.argv[1] == "diverging-bench":
        sys.exit(diverging_bench(Path(sys.argv[3])))
    stop_resume_evaluate(Path(sys.argv[1]))
    leave()  # as metasam's commands end under torchrun: together, after a barrier


@pytest.mark.parametrize("command", [["analyze", "RUN"], ["plot", "RUN"], ["supervised", "--epochs", "1"]])
def test_single_process_commands_refuse_to_run_under_torchrun(command, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.chdir(tmp_path)
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"metasam {command[0]} [rank 1/2]: error: metasam {command[0]} runs in one process: "
                          "start it without torchrun"), err
    assert list(tmp_path.iterdir()) == []  # nothing ran, nothing was written


def test_an_error_under_torchrun_names_the_process_that_raised_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--dataset", "glyphs", "--meta-batch", "0", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metasam train [rank 1/2]: error: ") and "--meta-batch" in err, err
    assert err.count("\n") == 1
