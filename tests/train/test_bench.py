"""metasam bench as an experiment runner, on a 2-seed × 2-value grid of two algorithms (glyphs, a tiny budget):
selection on validation accuracy only, intervals over seeds, paired differences on the same test tasks, the
controls, shards or workers + merge giving one process's table, and a killed grid resuming without retraining what finished."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from metasam.cli.main import main
from metasam.errors import NonFiniteError
from metasam.train.bench import runner
from metasam.train.bench.results import ROW_NUMBERS
from metasam.train.evaluation import evaluate_run
from metasam.train.meta import MetaTrainer

pytestmark = pytest.mark.slow

T_975_1 = 12.706204736174707
"""Student's t quantile 0.975 at 1 degree of freedom (two seeds), from a table."""
TINY = ["--dataset", "glyphs", "--settings", "3w1s", "--queries", "2", "--meta-batch", "2", "--iterations", "2",
        "--val-every", "2", "--val-tasks", "3", "--test-inner-steps", "1", "--episodes", "12", "--seeds", "0,1", "--no-progress"]
GRID = ["--algos", "maml,agnostic-sam", "--grid", "maml:inner_lr=0.001,0.4", "--grid", "agnostic-sam:inner_rho1=0.01,0.05",
        "--grid", "agnostic-sam:inner_rho2=rho1/2", "--controls"]
ARGS = ["bench", *TINY, *GRID]
MAML = ["3w1s/maml/inner_lr=0.001", "3w1s/maml/inner_lr=0.4"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tasks gain nothing from a second intra-op thread, and on a machine whose cores are busy with other work
    torch's threads wait on each other: a run of this module took 20× longer with two threads than with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bench(out: Path, *extra: str) -> int:
    return main([*ARGS, "--out", str(out), *extra])


def contents(out: Path) -> dict[Path, bytes]:
    """Every file under ``out`` with its bytes: what a refusal must leave as it was."""
    return {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def trained(err: str) -> list[str]:
    """The cells a bench announced it trains (stderr lines 'metasam bench: <cell> (one of …)')."""
    return [line.split(": ", 1)[1].split(" (one of")[0] for line in err.splitlines() if "(one of" in line]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """One bench of the grid, run once for the tests that only read it: (OUT, results.json)."""
    out = tmp_path_factory.mktemp("bench") / "out"
    assert bench(out) == 0
    return out, json.loads((out / "results.json").read_text())


def rows(results):
    (setting,) = results["settings"]
    return {m["name"]: m for m in setting["methods"]}


def mean(values):
    return sum(values) / len(values)


def test_the_table_has_the_selected_methods_and_the_controls_and_nothing_else_was_tested(grid):
    out, results = grid
    assert list(rows(results)) == ["maml", "agnostic-sam", "sharp-maml-low at ρ = ρ1 − ρ2 of agnostic-sam",
                                   "agnostic-sam with β = 0", "agnostic-sam, adapted by gd at test"]
    agnostic = rows(results)["agnostic-sam"]
    radius = rows(results)["sharp-maml-low at ρ = ρ1 − ρ2 of agnostic-sam"]
    assert radius["point"] == {"inner_rho": agnostic["point"]["inner_rho1"] - agnostic["point"]["inner_rho2"]}
    assert rows(results)["agnostic-sam with β = 0"]["point"] == {**agnostic["point"], "inner_beta": 0.0}
    gd = rows(results)["agnostic-sam, adapted by gd at test"]
    assert gd["runs"] == agnostic["runs"] and gd["test_rule"] == "gd" and agnostic["test_rule"] == "same"
    tested = {str(p.parent.relative_to(out)) for p in out.glob("3w1s/**/eval_*.json")}
    assert tested == {run for m in rows(results).values() for run in m["runs"]}  # the grid's other points: never tested
    assert not results["tested_outside_table"] and "no test task is read before the choice" in results["selection_rule"]
    table = (out / "results.md").read_text()
    assert results["command"] in table and results["selection_rule"] in table and (out / "results.png").stat().st_size > 0
    assert "is the smallest of" in table or "is the largest of" in table  # two-value grids: always at an edge


def test_the_intervals_are_over_seeds(grid):
    out, results = grid
    for m in rows(results).values():
        per_seed = []
        for run in m["runs"]:
            name = "eval_best_12_seed1234" + ("_gd" if m["test_rule"] == "gd" else "") + ".json"
            per_seed.append(mean(json.loads((out / run / name).read_text())["task_accuracies"]))
        assert m["test_acc"] == pytest.approx(per_seed)
        sd = math.sqrt(sum((a - mean(per_seed)) ** 2 for a in per_seed) / (len(per_seed) - 1))
        assert m["test_acc_mean"] == pytest.approx(mean(per_seed))
        assert m["test_acc_t95"] == pytest.approx(T_975_1 * sd / math.sqrt(2))
        pooled = [a for seed in m["task_accuracies"] for a in seed]
        assert len(pooled) == 24 and m["pooled_mean"] == pytest.approx(mean(pooled))
        row = f"{100 * m['test_acc_mean']:.2f} ± {100 * m['test_acc_t95']:.2f} |"
        assert row in (out / "results.md").read_text()


def test_the_paired_difference_takes_each_seed_on_the_same_test_tasks(grid):
    out, results = grid
    reference = rows(results)["maml"]
    for m in rows(results).values():
        assert m["test_tasks"] == reference["test_tasks"] == {"test_split": "test", "episodes": 12, "seed": 1234,
                                                             "ways": 3, "shots": 1}
        by_hand = [mean([a - b for a, b in zip(mine, ref)]) for mine, ref in zip(m["task_accuracies"], reference["task_accuracies"])]
        assert m["paired_diff_per_seed"] == pytest.approx(by_hand)
        sd = math.sqrt(sum((d - mean(by_hand)) ** 2 for d in by_hand))
        assert m["paired_diff"] == pytest.approx(mean(by_hand))
        assert m["paired_t95"] == pytest.approx(T_975_1 * sd / math.sqrt(2))


def test_selection_reads_validation_accuracy_only(grid, tmp_path, capsys):
    """A constructed case: the validation accuracies are rewritten so that the point that is worse on the test
    tasks is the better one on validation. The bench must choose it; a choice on test accuracy would not."""
    out = tmp_path / "out"
    shutil.copytree(grid[0], out)
    test_acc = {p: mean([evaluate_run(out / p / f"seed{s}", 12, 1234, progress=False)["accuracy"] for s in (0, 1)]) for p in MAML}
    worse, better = sorted(MAML, key=test_acc.get)
    assert test_acc[worse] < test_acc[better], "the construction needs two points that differ on the test tasks"
    for p, val in ((worse, 0.9), (better, 0.1)):
        for s in (0, 1):
            summary = out / p / f"seed{s}" / "train_summary.json"
            summary.write_text(json.dumps({**json.loads(summary.read_text()), "best_val_acc": val}))
    capsys.readouterr()
    assert bench(out) == 0
    assert trained(capsys.readouterr().err) == []  # every cell was finished: nothing trained again
    results = json.loads((out / "results.json").read_text())
    maml = rows(results)["maml"]
    assert maml["runs"] == [f"{worse}/seed0", f"{worse}/seed1"] and maml["val_acc"] == [0.9, 0.9]
    assert maml["test_acc_mean"] == pytest.approx(test_acc[worse])
    grid_report = results["settings"][0]["grids"]["maml"]
    assert [p["mean_val_acc"] for p in grid_report["points"]] == [0.9, 0.1][:: 1 if worse == MAML[0] else -1]


def test_shards_and_merge_give_the_table_of_one_process(grid, tmp_path, capsys):
    out = tmp_path / "sharded"
    for i in range(3):  # the first round: the grid cells; the controls wait until every grid cell is finished
        assert bench(out, "--shard", f"{i}/3") == 0
    err = capsys.readouterr().err
    assert len(trained(err)) == 8 + 1  # shard 2 found the grid finished and trained its share of the 4 control cells
    assert err.count("the controls wait for the selection") == 2
    assert main(["bench", "--out", str(out), "--merge", "--no-progress"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"metasam bench: error: {out} lacks 3 finished cell(s): 3w1s/") and f"--out {out} " in line
    for i in range(2):  # the second round: the controls of shards 0 and 1
        assert bench(out, "--shard", f"{i}/3") == 0
    assert len(trained(capsys.readouterr().err)) == 3
    assert main(["bench", "--out", str(out), "--merge", "--no-progress"]) == 0
    one, merged = grid[1], json.loads((out / "results.json").read_text())
    assert merged["settings"] == one["settings"]
    assert (out / "results.md").read_text().replace(str(out), "OUT") == (grid[0] / "results.md").read_text().replace(str(grid[0]), "OUT")


def _worker(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "metasam", *ARGS, "--test-on-finish", "--out", str(out), "--worker"],
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_workers_share_the_cells_as_they_go_and_merge_gives_the_table_of_one_process(grid, tmp_path, capsys):
    out = tmp_path / "workers"
    workers = [_worker(out) for _ in range(2)]
    errs = [w.communicate(timeout=600)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], errs
    each = [trained(err) for err in errs]
    cells = sorted(str(p.parent.relative_to(grid[0])) for p in grid[0].rglob("train_summary.json"))
    assert sorted(each[0] + each[1]) == cells  # every cell trained once, by one of the two
    for cell in cells:  # and tested once it finished
        gd = [] if "/maml/" in cell else ["eval_best_12_seed1234_gd.json"]
        assert sorted(p.name for p in (out / cell).glob("eval_*.json")) == ["eval_best_12_seed1234.json", *gd], cell
    assert all(err.rstrip().endswith(f"no cell is left to train; then: metasam bench --out {out} --merge") for err in errs)
    assert not (out / "results.json").exists()  # workers write no results: the merge does
    assert main(["bench", "--out", str(out), "--merge", "--no-progress"]) == 0
    assert trained(capsys.readouterr().err) == []
    assert json.loads((out / "results.json").read_text())["settings"][0]["methods"] == grid[1]["settings"][0]["methods"]


def diverge(monkeypatch, where) -> None:
    """Make the training of every run whose configuration ``where`` accepts stop on a NaN query loss at iteration 2,
    through the trainer's own stop (what a real NaN step does: the trainer logs where and raises)."""
    train = MetaTrainer.train

    def diverging_train(trainer, progress=True):
        if where(trainer.cfg):
            step = trainer.learner.meta_step

            def meta_step(*args, **kwargs):
                if trainer.learner.iteration == 1:
                    raise NonFiniteError("iteration 2: the query loss is NaN", iteration=2, tensor="query loss")
                return step(*args, **kwargs)

            trainer.learner.meta_step = meta_step
        return train(trainer, progress)

    monkeypatch.setattr(MetaTrainer, "train", diverging_train)


def test_a_worker_records_a_cell_whose_training_diverges_and_trains_the_others(tmp_path, capsys, monkeypatch):
    diverging = f"{MAML[1]}/seed1"
    diverge(monkeypatch, lambda cfg: cfg.algo == "maml" and cfg.inner_lr == 0.4 and cfg.seed == 1)
    out = tmp_path / "out"
    assert bench(out, "--worker") == 0
    err = capsys.readouterr().err
    assert len(trained(err)) == 12  # the 8 grid cells, the diverged one among them, and the 4 control runs
    assert f"metasam bench: {out / diverging} diverged, an outcome the table marks" in err
    assert err.splitlines()[-1] == (f"metasam bench: this worker trained 12 cell(s) (1 of them diverged, named above) "
                                    f"and no cell is left to train; then: metasam bench --out {out} --merge")
    assert bench(out, "--worker") == 0 and trained(capsys.readouterr().err) == []  # not trained again
    assert main(["bench", "--out", str(out), "--merge"]) == 0
    maml = json.loads((out / "results.json").read_text())["settings"][0]["grids"]["maml"]
    assert maml["selected"] == 0 and maml["points"][1]["diverged"] == {"1": {"iteration": 2, "nonfinite": "query loss"}}


def test_a_diverged_run_is_an_outcome_the_table_marks_and_no_command_trains_it_again(tmp_path, capsys, monkeypatch):
    """A real NaN (maml at α = 1e30) and stops through the trainer (agnostic-sam ρ1 = 0.05 on seed 1, its β = 0
    control on both seeds): the bench goes on, the point with a diverged run is not chosen however its other seed
    validates, the diverged control's row has no numbers, and status, reruns, workers and the export agree."""
    diverge(monkeypatch, lambda cfg: cfg.algo == "agnostic-sam" and (cfg.inner_rule.beta == 0 or (
        cfg.inner_rule.rho1 == 0.05 and cfg.seed == 1)))
    args = ["bench", *TINY, "--algos", "maml,agnostic-sam", "--grid", "maml:inner_lr=0.4,1e30", "--grid",
            "agnostic-sam:inner_rho1=0.01,0.05", "--grid", "agnostic-sam:inner_rho2=rho1/2", "--controls"]
    out = tmp_path / "out"
    assert main([*args, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    diverged = ["3w1s/maml/inner_lr=1e+30/seed0", "3w1s/maml/inner_lr=1e+30/seed1",
                "3w1s/agnostic-sam/inner_rho1=0.05,inner_rho2=0.025/seed1",
                "3w1s/agnostic-sam/inner_beta=0.0,inner_rho1=0.01,inner_rho2=0.005/seed0",
                "3w1s/agnostic-sam/inner_beta=0.0,inner_rho1=0.01,inner_rho2=0.005/seed1"]
    assert [c for c in trained(err) if f"{out / c} diverged, an outcome the table marks" in err] == diverged
    assert "the query loss is NaN" in err.split(f"{out / diverged[0]} diverged")[1].splitlines()[0]  # the real one
    results = json.loads((out / "results.json").read_text())
    (setting,) = results["settings"]
    maml, agnostic = setting["grids"]["maml"], setting["grids"]["agnostic-sam"]
    assert maml["selected"] == 0 and maml["points"][1]["mean_val_acc"] is None and maml["points"][1]["val_acc"] == {}
    assert maml["points"][1]["diverged"] == {"0": {"iteration": 1, "nonfinite": "query loss"},
                                             "1": {"iteration": 1, "nonfinite": "query loss"}}
    assert agnostic["selected"] == 0 and agnostic["points"][1]["mean_val_acc"] is None
    assert list(agnostic["points"][1]["val_acc"]) == ["0"] and list(agnostic["points"][1]["diverged"]) == ["1"]
    control = rows(results)["agnostic-sam with β = 0"]
    assert control["diverged"] == {s: {"iteration": 2, "nonfinite": "query loss"} for s in ("0", "1")}
    assert control["test_acc_mean"] is None and control["paired_diff"] is None
    assert [k for k, v in control.items() if v is None] == list(ROW_NUMBERS)  # every number null, and the same keys:
    assert all(list(m) == list(control) for m in rows(results).values())  # a diverged row is shaped like the others
    assert all(m["test_acc_mean"] is not None and m["diverged"] == {} for name, m in rows(results).items() if m is not control)
    assert not any(p.name.startswith("eval_") for d in diverged for p in (out / d).iterdir())  # never tested
    md = (out / "results.md").read_text()
    assert ("| control: agnostic-sam with β = 0 | inner_beta=0.0,inner_rho1=0.01,inner_rho2=0.005 | – | diverged (seed 0 "
            "at iteration 2, seed 1 at iteration 2): no numbers | – | – | – |") in md
    assert "| maml | inner_lr=1e+30 | diverged at iteration 1, diverged at iteration 1 | diverged: not chosen |  |" in md
    assert "diverged at iteration 2 | diverged: not chosen |  |" in md.split("| agnostic-sam | inner_rho1=0.05,")[1].splitlines()[0]

    monkeypatch.undo()  # from here on a diverged cell would train to the end: none may be trained again, nor tested
    kept = {d: contents(out / d) for d in diverged}
    assert main([*args, "--out", str(out), "--test-on-finish"]) == 0 and trained(capsys.readouterr().err) == []
    assert main([*args, "--out", str(out), "--test-on-finish", "--worker"]) == 0
    assert trained(capsys.readouterr().err) == [] and {d: contents(out / d) for d in diverged} == kept
    assert main(["bench", "--out", str(out), "--status"]) == 0
    captured = capsys.readouterr()
    states = {line.split("\t")[0]: line.split("\t")[1:] for line in captured.out.splitlines()[1:]}
    assert {c: states[c] for c in diverged} == {c: ["diverged", "1" if "maml" in c else "2", "-"] for c in diverged}
    assert "metasam bench: 7 of 12 cells finished, 7 of them tested; 5 diverged" in captured.err
    assert main(["bench", "--out", str(out), "--export", str(tmp_path / "kept")]) == 0
    assert "7 finished run(s) and 5 diverged run(s) of" in capsys.readouterr().err
    assert main(["bench", "--out", str(tmp_path / "kept"), "--merge"]) == 0
    merged = json.loads((tmp_path / "kept" / "results.json").read_text())["settings"]
    assert merged == json.loads((out / "results.json").read_text())["settings"] and merged[0]["methods"] == setting["methods"]


def test_a_table_whose_every_grid_point_diverged_is_refused_naming_them(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", *TINY, "--algos", "maml", "--grid", "maml:inner_lr=1e30,1e31", "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "metasam bench: error: every grid point of maml (3w1s) has a run that diverged (inner_lr=1e+30: seed 0 at "
        "iteration 1; inner_lr=1e+31: seed 0 at iteration 1), so there is no point to choose; run the bench again in "
        "another --out with smaller values in its grid (or a smaller --inner-lr or --outer-lr)")
    assert [line.split("\t")[1] for line in (main(["bench", "--out", str(out), "--status"]), capsys.readouterr())[1]
            .out.splitlines()[1:]] == ["diverged"] * 4


def _hold_lock(run: Path) -> subprocess.Popen:
    """A process that holds the lock of ``run`` (as a training one does) until it is killed."""
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)",
                               str(run / ".metasam.lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_worker_passes_over_a_cell_another_process_trains_and_waits_for_it(grid, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    busy = out / MAML[0] / "seed0"
    busy.mkdir(parents=True)
    holder = _hold_lock(busy)  # another process trains this cell (as far as a worker can tell)
    waits = []

    def sleep(seconds):  # the other process finishes its work while the worker waits: it lets go of the cell
        waits.append(seconds)
        holder.kill()
        holder.wait()

    monkeypatch.setattr(runner, "time", SimpleNamespace(sleep=sleep))
    assert bench(out, "--worker") == 0
    err = capsys.readouterr().err
    order, cells = trained(err), {str(p.parent.relative_to(grid[0])) for p in grid[0].rglob("train_summary.json")}
    grid_cells = [str(c.folder) for c in runner.load_plan(out).grid_cells()]  # setting, algorithm, point, seed
    assert order[:7] == [c for c in grid_cells if c != str(busy.relative_to(out))]  # in order, passing over the busy one
    assert order[7] == str(busy.relative_to(out))  # trained once its holder let go
    assert sorted(order[8:]) == sorted(cells - set(grid_cells))  # the controls, once the grid was finished
    assert waits == [60]
    assert f"waiting for 1 cell(s) that other processes are training (e.g. {busy.relative_to(out)}); checking every 60 s" in err


def test_a_worker_is_one_process_on_its_own(tmp_path, capsys, monkeypatch):
    assert bench(tmp_path / "a", "--worker", "--shard", "0/2") == 2
    assert capsys.readouterr().err == ("metasam bench: error: --worker and --shard are two ways to share the cells "
                                       "between processes; give one\n")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert bench(tmp_path / "b", "--worker") == 2
    assert capsys.readouterr().err.startswith("metasam bench [rank 1/2]: error: --worker shares the cells between "
                                              "independent processes; under torchrun")
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_merge_tests_again_a_cell_whose_result_file_holds_other_test_steps(grid, tmp_path, capsys):
    """``metasam evaluate --steps K`` of metasam before 2026-12-02 wrote its result under the standard name; the
    merge must not take such a file for the run's own test setting."""
    out = tmp_path / "out"
    shutil.copytree(grid[0], out)
    run = out / rows(grid[1])["maml"]["runs"][0]
    path = run / "eval_best_12_seed1234.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "test_inner_steps": 7, "accuracy": -1.0}))
    assert main(["bench", "--out", str(out), "--merge", "--no-progress"]) == 0
    assert json.loads(path.read_text())["test_inner_steps"] == 1  # tested again, and rewritten
    assert json.loads((out / "results.json").read_text())["settings"] == grid[1]["settings"]


def test_test_on_finish_keeps_the_evidence_of_a_bench_whose_checkpoints_are_deleted(grid, tmp_path, capsys):
    """A bench rerun with --test-on-finish trains nothing and tests every finished run: by its own test rule, and by
    gd too where its inner rule is not plain gradient descent (what a test-time control would need). With every
    checkpoint and val_tasks.json deleted, the merge gives the same choice and the same rows from those evaluations,
    and lists every grid point's test accuracy beside the validation accuracy that chose."""
    out = tmp_path / "out"
    shutil.copytree(grid[0], out)
    for evaluation in out.rglob("eval_*.json"):
        evaluation.unlink()
    assert bench(out, "--test-on-finish") == 0
    assert trained(capsys.readouterr().err) == []
    runs = sorted(p.parent for p in out.glob("3w1s/**/config.json"))
    assert len(runs) == 12  # 8 grid runs, and 2 of each trained control (effective radius, β = 0)
    for run in runs:
        gd = [] if "/maml/" in str(run) else ["eval_best_12_seed1234_gd.json"]
        assert sorted(p.name for p in run.glob("eval_*.json")) == ["eval_best_12_seed1234.json", *gd], run
    assert main(["bench", "--out", str(out), "--merge", "--no-progress", "--episodes", "13"]) == 0
    assert json.loads((out / "results.json").read_text())["tested_outside_table"]  # every run was tested, on other tasks
    for large in [*out.rglob("*.pt"), *out.rglob("val_tasks.json")]:
        large.unlink()
    assert main(["bench", "--out", str(out), "--merge", "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"][0]["methods"] == grid[1]["settings"][0]["methods"]
    assert results["command"].endswith(" --test-on-finish") and results["tested_outside_table"]
    assert "played no part in the choice" in results["selection_rule"]
    for algo, report in results["settings"][0]["grids"].items():
        assert report["selected"] == grid[1]["settings"][0]["grids"][algo]["selected"]
        for point in report["points"]:
            run = out / "3w1s" / algo / point["name"]
            tests = [json.loads((run / f"seed{s}/eval_best_12_seed1234.json").read_text())["accuracy"] for s in (0, 1)]
            assert point["test_acc"] == {"0": tests[0], "1": tests[1]} and point["mean_test_acc"] == pytest.approx(mean(tests))
    table = (out / "results.md").read_text()
    assert "| algorithm | point | validation per seed | mean | test per seed | mean | |" in table


def test_an_export_keeps_the_evidence_of_the_tested_runs_and_its_merge_gives_the_same_table(grid, tmp_path, capsys):
    out, dest = tmp_path / "out", tmp_path / "kept"
    shutil.copytree(grid[0], out)
    assert main(["bench", "--out", str(out), "--export", str(dest)]) == 0
    err = capsys.readouterr().err  # without --test-on-finish, only the chosen points and the controls were tested
    assert f"12 finished run(s) of {out} are in {dest}, with bench.json (not their checkpoints); 0 not finished" in err
    assert "4 of them were not tested (e.g. 3w1s/maml/inner_lr=0.001/seed0), and cannot be from " in err
    kept = {p.relative_to(dest) for p in dest.rglob("*") if p.is_file()}
    assert not [p for p in kept if p.suffix == ".pt" or p.name in ("val_tasks.json", ".metasam.lock")]
    runs = {p.parent for p in kept if p.name == "train_summary.json"}
    assert len(runs) == 12 and all((dest / p).read_bytes() == (out / p).read_bytes() for p in kept)
    assert kept == {Path("bench.json")} | {run / p.name for run in runs for p in (out / run).iterdir()
                                           if p.is_file() and p.name not in ("best.pt", "last.pt", "val_tasks.json", ".metasam.lock")}
    assert main(["bench", "--out", str(dest), "--merge", "--no-progress"]) == 0
    assert trained(capsys.readouterr().err) == []
    assert json.loads((dest / "results.json").read_text())["settings"] == grid[1]["settings"]

    assert bench(out, "--test-on-finish") == 0  # tests the other four (and the controls by gd); bench.json changes
    assert main(["bench", "--out", str(out), "--export", str(dest)]) == 0  # adds their evaluations, keeps the rest
    assert "were not tested" not in capsys.readouterr().err
    assert len(list(dest.rglob("eval_best_*.json"))) == 12 + 8  # each run by its own rule, the SAM-type ones by gd too
    assert json.loads((dest / "bench.json").read_text()) == json.loads((out / "bench.json").read_text())
    assert bench(dest, "--test-on-finish") == 0  # the bench continued on DEST: nothing to train or test again
    assert trained(capsys.readouterr().err) == []
    gd = next(out.glob("3w1s/agnostic-sam/inner_rho1=0.01,*/seed0/eval_best_12_seed1234_gd.json"))
    gd.unlink()  # as when the bench is stopped between a run's two tests
    assert main(["bench", "--out", str(out), "--export", str(tmp_path / "other")]) == 0
    err = capsys.readouterr().err
    assert "11 finished run(s)" in err and "1 finished run(s) are not tested yet and were not copied" in err
    assert not (tmp_path / "other" / gd.parent.relative_to(out)).exists()

    shutil.rmtree(dest / MAML[1] / "seed0")  # a run the export would copy, had it not refused
    metrics = next(dest.rglob("metrics.jsonl"))
    metrics.write_text(metrics.read_text() + "\n")
    before = contents(dest)
    assert main(["bench", "--out", str(out), "--export", str(dest)]) == 2
    line = capsys.readouterr().err
    assert line.startswith(f"metasam bench: error: {metrics} differs from {out / metrics.relative_to(dest)}: ") and line.count("\n") == 1
    assert contents(dest) == before  # nothing copied, nothing overwritten
    assert main(["bench", "--out", str(out), "--export", str(out / "copy")]) == 2
    assert "is inside the bench's folder" in capsys.readouterr().err and not (out / "copy").exists()
    assert main(["bench", "--out", str(out), "--merge", "--export", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == "metasam bench: error: --merge and --export are different commands; give one\n"
    other = json.loads((out / "bench.json").read_text())
    other["plan"]["seeds"] = [0, 1, 2]
    (tmp_path / "another").mkdir()
    (tmp_path / "another" / "bench.json").write_text(json.dumps(other))
    assert main(["bench", "--out", str(out), "--export", str(tmp_path / "another")]) == 2
    assert "is the plan of another bench (other --seeds); export to another folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "another").iterdir()] == ["bench.json"]
    assert main(["bench", "--out", str(out), "--export", str(tmp_path / "x"), "--episodes", "13"]) == 2
    assert capsys.readouterr().err.startswith("metasam bench: error: --export copies the bench as its plan in ")
    assert not (tmp_path / "x").exists()


def test_an_export_leaves_out_an_evaluation_older_than_its_checkpoint(grid, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(grid[0], out)
    stale = next(out.glob("3w1s/maml/*/seed0/eval_best_*.json"))  # the chosen maml point's test
    run = stale.parent
    os.utime(run / "best.pt", ns=(stale.stat().st_mtime_ns + 10**9,) * 2)  # best.pt written again since its test
    assert main(["bench", "--out", str(out), "--export", str(tmp_path / "kept")]) == 0
    err = capsys.readouterr().err
    assert f"1 evaluation(s) older than the checkpoint they evaluate were not copied (e.g. {stale})" in err
    assert not (tmp_path / "kept" / stale.relative_to(out)).exists()
    assert (tmp_path / "kept" / run.relative_to(out) / "metrics.jsonl").exists()


def test_an_export_to_a_full_disk_is_one_line_and_leaves_only_complete_files(grid, tmp_path, capsys, tmpfs):
    dest = tmpfs("100k") / "kept"  # tmpfs gives each file a 4 kB page at least: room for about half the files
    out = tmp_path / "out"
    shutil.copytree(grid[0], out)
    before = contents(out)
    assert main(["bench", "--out", str(out), "--export", str(dest)]) == 2
    line = capsys.readouterr().err
    assert line.startswith(f"metasam bench: error: cannot write {dest}/") and line.count("\n") == 1, line
    assert "MiB free): free space there (or choose another folder) and try again" in line
    copied = [p for p in dest.rglob("*") if p.is_file()]
    assert copied and all(p.read_bytes() == (out / p.relative_to(dest)).read_bytes() for p in copied)
    assert not (dest / "bench.json").exists()  # copied last: DEST is not yet a bench
    assert {k: v for k, v in contents(out).items() if k.name != ".metasam.lock"} == {
        k: v for k, v in before.items() if k.name != ".metasam.lock"}  # OUT untouched (the export locked each run)


def test_without_checkpoints_a_run_that_was_not_tested_is_one_line_and_nothing_is_lost(grid, tmp_path, capsys):
    """Once *.pt are deleted: the merge names a chosen run whose evaluation is damaged or missing, or made on
    other test tasks; a rerun refuses before training when a finished run lost best.pt before it was tested, and
    refuses to drop --test-on-finish. Nothing is written by any of them."""
    out = tmp_path / "out"
    shutil.copytree(grid[0], out)
    assert bench(out, "--test-on-finish") == 0
    for checkpoint in out.rglob("*.pt"):
        checkpoint.unlink()
    capsys.readouterr()
    chosen = out / rows(grid[1])["maml"]["runs"][1] / "eval_best_12_seed1234.json"
    evaluation = json.loads(chosen.read_text())
    assert evaluation["best_iteration"] == json.loads((chosen.parent / "train_summary.json").read_text())["best_iteration"] == 2
    merge = ["bench", "--out", str(out), "--merge", "--no-progress"]
    damaged = (f"{chosen.parent} has no best.pt, and its test evaluation {chosen.name} is damaged, or of other test "
               "settings (--test-rule, --non-transductive or not) or an earlier best.pt")
    chosen.write_text(json.dumps({**evaluation, "best_iteration": 1}))  # written by metasam evaluate during training
    assert main(merge) == 2 and damaged in capsys.readouterr().err
    chosen.write_text('{"accuracy": 0.5, "task_acc')  # torn
    for argv, problem in (
        (merge, damaged),
        ([*merge, "--episodes", "13"], f"{out / rows(grid[1])['maml']['runs'][0]} has neither best.pt nor a test "
                                       "evaluation on this TaskSet (eval_best_13_seed1234.json)"),
        ([*ARGS, "--out", str(out), "--test-on-finish"],
         f"1 finished run(s) lack best.pt and a test evaluation of this bench ({chosen.parent})"),
        ([*ARGS, "--out", str(out)], f"{out} holds a bench whose runs are tested as they finish; add --test-on-finish"),
    ):
        kept = contents(out)
        assert main(argv) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("metasam bench: error: ") and problem in line, line
        assert contents(out) == kept
    chosen.unlink()
    assert main(merge) == 2
    assert f"{chosen.parent} has neither best.pt nor a test evaluation on this TaskSet" in capsys.readouterr().err


def test_a_run_whose_test_diverges_does_not_stop_a_bench_that_tests_on_finish(grid, tmp_path, capsys, monkeypatch):
    """A diverged point that may never be chosen must not stop the training of the others: it is named, and the
    bench goes on (a merge that needs it evaluates it again, and refuses)."""
    from metasam.errors import NonFiniteError
    from metasam.train.bench import runner

    def diverges(plan, out, cell, test_rule, progress):
        raise NonFiniteError("the logits become NaN/Inf", tensor="logits")

    out = tmp_path / "out"
    shutil.copytree(grid[0], out)
    monkeypatch.setattr(runner, "test_result", diverges)
    plan = dataclasses.replace(runner.load_plan(out), test_on_finish=True)
    assert runner.run_bench(plan, out, (0, 1), progress=False) == {"trained": [], "waiting": []}
    err = capsys.readouterr().err
    assert err.count(" not tested: the logits become NaN/Inf") == 4 + 2 * 8  # 4 maml runs, 8 others with two test rules


def test_status_says_where_each_cell_stands_from_its_folder_alone(grid, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(grid[0], out)

    def status() -> tuple[dict[str, tuple[str, str, str]], str]:
        kept = contents(out)
        assert main(["bench", "--out", str(out), "--status"]) == 0
        assert contents(out) == kept  # it only reads
        captured = capsys.readouterr()
        header, *lines = captured.out.splitlines()
        assert header == "cell\tstate\titeration\tbest_val_acc"
        return {cell: (state, it, val) for cell, state, it, val in (line.split("\t") for line in lines)}, captured.err

    states, err = status()
    assert len(states) == 12 and "metasam bench: 12 of 12 cells finished, 8 of them tested" in err  # 8 grid cells, 4 control runs
    table = {run for m in rows(grid[1]).values() for run in m["runs"]}
    for cell, (state, iteration, val) in states.items():
        summary = json.loads((out / cell / "train_summary.json").read_text())
        assert state == ("tested" if cell in table else "finished") and iteration == "2", cell
        assert float(val) == summary["best_val_acc"]

    unfinished = out / "3w1s/maml/inner_lr=0.4/seed1"
    (unfinished / "train_summary.json").unlink()
    with open(unfinished / "metrics.jsonl", "a") as metrics:
        metrics.write('{"iteration": 3, "query_lo')  # torn by a kill
    shutil.rmtree(out / "3w1s/maml/inner_lr=0.001/seed0")
    states, err = status()
    assert list(states)[:4] == [f"{p}/seed{s}" for p in MAML for s in (0, 1)] and len(states) == 8  # no controls yet
    assert states["3w1s/maml/inner_lr=0.001/seed0"] == ("not started", "-", "-")
    assert states["3w1s/maml/inner_lr=0.4/seed1"] == ("unfinished", "2", "-")  # the torn line is not an iteration
    assert "metasam bench: 6 of 8 cells finished" in err
    holder = _hold_lock(unfinished)  # another process trains it now
    states, err = status()
    holder.kill()
    holder.wait()
    assert states["3w1s/maml/inner_lr=0.4/seed1"] == ("training", "2", "-")
    assert status()[0]["3w1s/maml/inner_lr=0.4/seed1"] == ("unfinished", "2", "-")  # its process is gone
    assert main(["bench", "--out", str(out), "--status", "--seeds", "0,1"]) == 2
    assert "drop --seeds" in capsys.readouterr().err


def test_a_bench_refuses_to_train_again_a_cell_whose_last_checkpoint_is_gone(grid, tmp_path, capsys):
    """A cell with metrics and best.pt but no last.pt (moved or deleted) is not started again from iteration 0 over
    what it holds, as metasam train --resume would not."""
    out = tmp_path / "out"
    shutil.copytree(grid[0], out)
    cell = out / "3w1s/maml/inner_lr=0.4/seed1"
    (cell / "train_summary.json").unlink()
    (cell / "last.pt").unlink()
    kept = contents(out)
    assert bench(out) == 2
    announced, line = capsys.readouterr().err.strip().splitlines()  # the cell it reached, then why it stops
    assert announced.startswith("metasam bench: 3w1s/maml/inner_lr=0.4/seed1 (one of 8 grid cells)")
    assert line == (f"metasam bench: error: {cell} has no last.pt but has best.pt, metrics.jsonl: its last.pt was moved "
                    "or deleted; put it back to continue the run, or delete the folder to train it again")
    assert contents(out) == kept


def test_a_bench_resumes_a_cell_only_with_the_settings_it_gives_it(grid, tmp_path, capsys):
    """A diverged cell resumed by hand with --skip-nonfinite and stopped before its end holds the config.json that
    resume wrote and no stop record: the bench must refuse it, not continue it under its own settings (the run
    would then finish past a skipped NaN step, and its point could be chosen)."""
    out = tmp_path / "out"
    shutil.copytree(grid[0], out)
    cell = out / "3w1s/maml/inner_lr=0.4/seed1"
    (cell / "train_summary.json").unlink()  # stopped before its end
    config = json.loads((cell / "config.json").read_text())
    (cell / "config.json").write_text(json.dumps({**config, "skip_nonfinite": 1}, indent=2))
    kept = contents(out)
    assert bench(out) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        f"metasam bench: error: {cell} was trained with other settings than this bench gives it (skip_nonfinite")
    assert contents(out) == kept


def test_a_bench_refuses_an_out_of_another_plan_and_merge_refuses_training_flags(grid, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(grid[0], out)
    kept = contents(out)
    assert main([*ARGS, "--seeds", "0,1,2", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"metasam bench: error: {out} holds a bench with other --seeds")
    other_grid = [a.replace("maml:inner_lr=0.001,0.4", "maml:inner_lr=0.001,0.2") for a in ARGS]
    assert main([*other_grid, "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"metasam bench: error: {out} holds a bench with other --grid")
    assert main([*ARGS, "--iterations", "3", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"metasam bench: error: {out} holds a bench with other ")
    assert main(["bench", "--out", str(out), "--merge", "--iterations", "5"]) == 2
    assert "drop --iterations" in capsys.readouterr().err
    assert contents(out) == kept  # every cell and result kept


def test_a_damaged_train_summary_is_one_line_naming_the_command_that_writes_it_again(grid, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(grid[0], out)
    summary = out / "3w1s" / "maml" / "inner_lr=0.4" / "seed1" / "train_summary.json"
    summary.write_text('{"iterations": 2, "best_val')  # torn
    assert main(["bench", "--out", str(out), "--merge", "--no-progress"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"metasam bench: error: {summary} is damaged (JSONDecodeError: ")
    assert line.endswith(f"delete it and run metasam train --resume {summary.parent}, which writes it again from the "
                         "run's checkpoints")


def _launch(out: Path) -> subprocess.Popen:
    argv = ["bench", *TINY, "--iterations", "12", "--val-every", "4", "--episodes", "4", "--algos", "maml",
            "--grid", "maml:inner_lr=0.1,0.4"]
    log = open(out.parent / "bench.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "metasam", *argv, "--out", str(out)], stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    proc.argv = argv
    return proc


def test_a_killed_grid_resumes_without_training_its_finished_cells_again(tmp_path, capsys):
    out = tmp_path / "out"
    proc = _launch(out)
    first, second = out / "3w1s/maml/inner_lr=0.1/seed0", out / "3w1s/maml/inner_lr=0.1/seed1"
    deadline = time.monotonic() + 300
    while not any("val_acc" in r for r in _records(second)):  # the second cell validated (and checkpoints)
        assert proc.poll() is None, (out.parent / "bench.log").read_text()
        assert time.monotonic() < deadline, "the second cell did not reach its first checkpoint in time"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert (first / "train_summary.json").exists() and not (second / "train_summary.json").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    assert main([*proc.argv, "--out", str(out)]) == 0
    assert trained(capsys.readouterr().err) == [str(c.relative_to(out)) for c in (second, second.parent.parent / "inner_lr=0.4/seed0",
                                                                             second.parent.parent / "inner_lr=0.4/seed1")]
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir() if p.name in finished} == finished
    iterations = [r["iteration"] for r in _records(second) if "query_loss" in r]
    assert iterations == list(range(1, 13))  # resumed from its checkpoint: every iteration logged once
    assert json.loads((out / "results.json").read_text())["settings"][0]["methods"][0]["seeds"] == [0, 1]


def _records(run: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.endswith("}")]
    except FileNotFoundError:
        return []
