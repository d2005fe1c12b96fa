"""Running a bench: train its cells (resuming the unfinished, skipping the finished), then the controls of the
selected points, then test and write OUT/results.{json,md,png}; as one process, or as shards or workers and a merge.

Shard I/N trains the grid cells whose index (in :meth:`BenchPlan.grid_cells` order) is I modulo N, then, once
every grid cell of a setting is finished (by any shard), the control cells of index I modulo N: the cells are
split in advance. Workers split them as they go (:func:`run_worker`): each trains the next cell no other process
is training, whatever each cell costs. Neither tests (but with ``test_on_finish``, see :func:`finish_cell`):
``merge`` tests the selected points and controls and writes the table, and refuses, naming them, while cells are
unfinished.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from metasam.atomic_write import write_text_atomic
from metasam.checkpoint import config_differences
from metasam.errors import CheckpointError, ConfigError, NonFiniteError, RunFolderInUse
from metasam.train.bench.plan import BenchPlan, Cell, test_rules
from metasam.train.bench.report import plot, render_markdown
from metasam.train.bench.results import (
    build_results,
    control_cells,
    divergence_of,
    fully_tested,
    has_ended,
    summary_of,
    test_result,
)
from metasam.train.config import MetaTrainConfig, check_device
from metasam.train.distributed import barrier, launched_as, main_process
from metasam.train.meta import MetaTrainer
from metasam.train.run_folder import RunLock, check_restartable, is_run_dir

PLAN_FILE = "bench.json"
TRAINING_FLAGS = {"settings": "--settings", "algos": "--algos", "seeds": "--seeds", "grids": "--grid",
                  "overrides": "run settings (--inner-lr, --iterations, …)", "rules": "rule settings (--inner-rho, …)"}


def run_bench(plan: BenchPlan, out: str | Path, shard: tuple[int, int] | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Train what ``shard`` (None: all) owns of the plan, then, without a shard, write the results and return
    them; with one, return ``{"trained": cells trained now, "waiting": grid cells the controls wait for}``."""
    out = Path(out)
    configs = _prepare(plan, out)
    cells = list(configs)
    check_testable(plan, out, _share(cells, shard))
    trained = [c for c in _share(cells, shard) if _finish_or_record(plan, out, c, configs[c], f"{len(cells)} grid cells", progress)]
    waiting: list[Cell] = []
    if plan.controls:
        controls, waiting = control_cells(plan, out)
        controls = [c for c in controls if c not in configs]  # a grid cell a control reuses is trained above
        check_testable(plan, out, _share(controls, shard))
        trained += [c for c in _share(controls, shard)
                    if _finish_or_record(plan, out, c, plan.config(c), f"{len(controls)} control cells", progress)]
    if shard is not None:
        return {"trained": trained, "waiting": waiting}
    return merge(plan, out, progress)


def run_worker(plan: BenchPlan, out: str | Path, progress: bool = True, poll_s: float = 60.0) -> dict[str, list[Cell]]:
    """Train, as one of any number of processes started alike on ``out``, each cell that is unfinished (or, with
    ``plan.test_on_finish``, untested) and that no other process is training, then the controls of each setting
    once its grid is finished, until every cell is done. A cell is claimed by taking its run folder's lock
    (:class:`~metasam.train.run_folder.RunLock`) for its training and test; a busy one is passed over, and when
    the only cells left are busy the worker checks again every ``poll_s`` seconds: N workers keep N cores busy to
    the end however long each cell takes, where ``--shard I/N`` fixes each process's share in advance. A cell whose
    training diverges (:class:`NonFiniteError`, named on stderr) is an outcome (:func:`_finish_or_record`), and the
    worker goes on, as it does past a test that diverges (:func:`finish_cell`). Returns ``{"trained": the cells this
    process trained, "diverged": those of them that diverged}``; writes no results (:func:`merge` does). One process
    each: not under torchrun."""
    if launched_as()[1] > 1:
        raise ConfigError("--worker shares the cells between independent processes; under torchrun, run the bench "
                          "without it (or with --shard), or start N workers without torchrun")
    out = Path(out)
    configs = _prepare(plan, out)
    check_testable(plan, out, list(configs))
    trained: list[Cell] = []
    seen: set[Cell] = set()  # the cells this worker saw through (done, diverged, or a test that diverged)
    diverged: list[Cell] = []
    waiting_for = None
    while True:
        controls = {c: plan.config(c) for c in control_cells(plan, out)[0] if c not in configs}  # a reused grid cell is one
        check_testable(plan, out, list(controls))
        todo = {**configs, **controls}
        left = [c for c, cfg in todo.items() if c not in seen and not _is_done(plan, out, c, cfg)]
        if not left:
            return {"trained": trained, "diverged": diverged}
        claimed = False
        for cell in left:
            lock = RunLock(out / cell.folder, create=True)
            try:
                lock.acquire()
            except RunFolderInUse:
                continue  # another process trains (or tests) it
            try:
                of = f"{len(configs)} grid cells" if cell in configs else f"{len(controls)} control cells"
                if not _is_done(plan, out, cell, todo[cell]) and _finish_or_record(  # not done by another since `left`
                        plan, out, cell, todo[cell], of, progress):
                    trained.append(cell)
                    if divergence_of(out / cell.folder) is not None:
                        diverged.append(cell)
            finally:
                lock.release()
            seen.add(cell)
            claimed = True
        if not claimed:
            if waiting_for != left:
                print(f"metasam bench: waiting for {len(left)} cell(s) that other processes are training (e.g. "
                      f"{left[0].folder}); checking every {poll_s:g} s", file=sys.stderr)
                waiting_for = left
            time.sleep(poll_s)


def _prepare(plan: BenchPlan, out: Path) -> dict[Cell, MetaTrainConfig]:
    """Check the plan against the machine and OUT and record it; return every grid cell's configuration."""
    configs = {cell: plan.config(cell) for cell in plan.grid_cells()}  # every grid cell's settings are checked first
    check_device(next(iter(configs.values())).device)
    check_layout(out, plan)
    record_plan(out, plan)
    return configs


def _is_done(plan: BenchPlan, out: Path, cell: Cell, cfg: MetaTrainConfig) -> bool:
    """Whether ``cell`` diverged or is finished (with ``cfg``: :func:`check_trained_with`) and, with
    ``plan.test_on_finish``, tested by every test rule it needs."""
    run = out / cell.folder
    if not has_ended(run):
        return False
    check_trained_with(run, cfg)
    return summary_of(run) is None or not plan.test_on_finish or fully_tested(plan, out, cell, cfg)


def merge(plan: BenchPlan, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Test the selected points and their controls (reusing evaluations already in the run folders) and write
    OUT/results.json, results.md and results.png; refuses, naming them, while cells are unfinished."""
    out = Path(out)
    results = build_results(plan, out, progress)
    if main_process():
        write_text_atomic(json.dumps(results, indent=1), out / "results.json")
        write_text_atomic(render_markdown(results), out / "results.md")
        plot(results, out / "results.png")
    return results


def _share(cells: list[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    return cells if shard is None else cells[shard[0]::shard[1]]


def train_cell(out: Path, cell: Cell, cfg: MetaTrainConfig, of: str, progress: bool) -> bool:
    """Train ``cell`` to the end (a new run, or resumed from its last.pt); a finished or diverged one
    (:func:`~metasam.train.bench.results.divergence_of`) is left alone. A run's config.json, where there is one,
    must be ``cfg`` (:func:`check_trained_with`): a run resumed by hand with other settings (say ``--skip-nonfinite``
    past the step where it diverged) and stopped is refused, not continued under the bench's. Returns whether it
    trained."""
    run = out / cell.folder
    if (run / "config.json").exists():
        check_trained_with(run, cfg)
    if has_ended(run):
        return False
    if main_process():
        print(f"metasam bench: {cell.folder} (one of {of})", file=sys.stderr)
    with MetaTrainer(cfg, run) as trainer:
        if (run / "last.pt").exists():
            trainer.resume()
        else:  # new, or killed before its first checkpoint (nothing trained)
            check_restartable(run)
            trainer.start(restart=is_run_dir(run))
        try:
            trainer.train(progress=progress)
        except KeyboardInterrupt as exc:
            raise KeyboardInterrupt(f"{exc}, or rerun the same metasam bench command: it resumes every unfinished cell") from exc
    return True


def check_trained_with(run: Path, cfg: MetaTrainConfig) -> None:
    """Refuse a cell whose config.json is not ``cfg``, what the bench gives it."""
    saved, wanted = MetaTrainConfig.load(run).to_dict(), cfg.to_dict()
    if saved != wanted:
        raise ConfigError(f"{run} was trained with other settings than this bench gives it ({config_differences(saved, wanted)}); "
                          "rerun the bench with the flags it was started with, or use another --out")


def finish_cell(plan: BenchPlan, out: Path, cell: Cell, cfg: MetaTrainConfig, of: str, progress: bool) -> bool:
    """Train ``cell`` (:func:`train_cell`); then, with ``plan.test_on_finish``, test it at once unless its
    evaluations are there: best.pt on the bench's fixed test TaskSet, adapted by the run's own test rule and, where
    its inner rule is not plain gradient descent, by the other one too (what a test-time control would need). The
    run folder then holds all a merge needs, even once its checkpoints are deleted; the selection still reads
    validation accuracy only. A diverged run (trained before) is not tested. Returns whether it trained."""
    trained = train_cell(out, cell, cfg, of, progress)
    if plan.test_on_finish and divergence_of(out / cell.folder) is None:
        for rule in test_rules(cfg):
            try:
                test_result(plan, out, cell, rule, progress)
            except NonFiniteError as exc:  # a diverged point not chosen must not stop the bench; a merge that needs it refuses
                if main_process():
                    print(f"metasam bench: {out / cell.folder} not tested: {exc}", file=sys.stderr)
    return trained


def _finish_or_record(plan: BenchPlan, out: Path, cell: Cell, cfg: MetaTrainConfig, of: str, progress: bool) -> bool:
    """:func:`finish_cell`, where a training that stops on a NaN/Inf step is an outcome of the cell, not an error:
    its run folder records where (:func:`~metasam.train.bench.results.divergence_of`), the table marks it (a grid
    point with a diverged run is not chosen; a control's row says it diverged), the bench goes on and never trains
    it again. Returns whether it trained (diverged included)."""
    try:
        return finish_cell(plan, out, cell, cfg, of, progress)
    except NonFiniteError as exc:
        barrier()  # under torchrun every process stops at the same step, and rank 0 alone writes where
        if divergence_of(out / cell.folder) is None:  # not the stop of a training step: an error
            raise
        if main_process():
            print(f"metasam bench: {out / cell.folder} diverged, an outcome the table marks (to train it again, delete "
                  f"its folder and rerun): {exc}", file=sys.stderr)
        return True


def check_testable(plan: BenchPlan, out: Path, cells: list[Cell]) -> None:
    """With ``plan.test_on_finish``, refuse before training anything when a finished cell of ``cells`` lost its
    best.pt before all its evaluations were written: it can be neither tested nor merged without training it again."""
    if not plan.test_on_finish:
        return
    lost = [c for c in cells if summary_of(out / c.folder) is not None and not (out / c.folder / "best.pt").exists()
            and not fully_tested(plan, out, c, MetaTrainConfig.load(out / c.folder))]
    if lost:
        shown = ", ".join(str(out / c.folder) for c in lost[:3]) + (f" and {len(lost) - 3} more" if len(lost) > 3 else "")
        raise CheckpointError(f"{len(lost)} finished run(s) lack best.pt and a test evaluation of this bench ({shown}): "
                              "their checkpoints were deleted before they were tested; delete those run folders and "
                              "rerun, which trains them again")


def check_layout(out: Path, plan: BenchPlan) -> None:
    """Refuse an OUT where ``OUT/<setting>/<algo>`` is itself a run: the one-seed layout of earlier benches."""
    for ways, shots in plan.settings:
        for algo in plan.algos:
            old = out / f"{ways}w{shots}s" / algo
            if is_run_dir(old):
                raise ConfigError(f"{old} is a run of an earlier metasam bench (one seed per cell, no seed folder); use "
                                  f"another --out, or move it to {old}/<grid point>/seed<its seed> if it is a cell of this bench")


def record_plan(out: Path, plan: BenchPlan) -> None:
    """Write the plan to OUT/bench.json (for merge); refuse one that trains otherwise than the plan already there."""
    stored = load_plan(out, required=False)
    if stored is not None:
        differ = plan.training_differences(stored)
        if differ:
            raise ConfigError(f"{out} holds a bench with other {', '.join(TRAINING_FLAGS[k] for k in differ)} "
                              f"({out / PLAN_FILE}: {stored.command(out)}); rerun that command, or choose another --out")
        if stored.test_on_finish and not plan.test_on_finish:
            raise ConfigError(f"{out} holds a bench whose runs are tested as they finish; add --test-on-finish, so "
                              "that the runs trained now are tested too (a run without its evaluation cannot be merged "
                              "once its checkpoints are deleted)")
    if main_process():
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps({"format": "metasam.bench", "version": 1, "plan": plan.to_json()}, indent=1),
                          out / PLAN_FILE)


def load_plan(out: Path, required: bool = True) -> BenchPlan | None:
    """The plan in OUT/bench.json (None when absent and not ``required``)."""
    path = Path(out) / PLAN_FILE
    if not path.exists():
        if required:
            raise ConfigError(f"{out} has no {PLAN_FILE}: it is not the folder of a metasam bench; pass the --out "
                              "the bench (or its shards) ran with")
        return None
    try:
        data = json.loads(path.read_text())
        return BenchPlan.from_json(data["plan"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is damaged ({exc}); rerun the bench's command to write it again "
                          "(its finished cells are kept)") from exc
