"""From finished cells to the numbers of a bench: the selection of each grid on validation accuracy, the test
evaluation of the selected points and their controls (read back where the run folders hold it), the intervals
over seeds, and the test accuracies the grid's run folders hold."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from metasam.errors import CheckpointError, ConfigError
from metasam.stats import mean_ci95, paired_difference, t_interval
from metasam.train.bench.grid import edges, point_name
from metasam.train.bench.plan import BenchPlan, Cell, Method, test_rules
from metasam.train.config import MetaTrainConfig
from metasam.train.evaluation import eval_file_name, evaluate_run
from metasam.train.run_folder import lock_holder

SELECTION_RULE = (
    "For each algorithm and setting, the grid point whose runs have the highest mean, over seeds, of their best "
    "validation accuracy (each run's best mean accuracy on its fixed validation TaskSet: --val-tasks tasks of the "
    "validation split drawn with the run's seed, so every point of a seed is scored on the same tasks; the "
    "checkpoint of that accuracy, best.pt, is the one tested). Ties go to the first point in grid order. The choice "
    "reads validation accuracies only. A point one of whose runs diverged (its training stopped on a NaN or Inf step) is "
    "not chosen; the grid table marks it."
)
TESTED = {
    False: "Only the chosen points and the controls built from them are tested: no test task is read before the choice.",
    True: "Runs of points not chosen were tested too, some before the choice (with --test-on-finish every run is "
          "tested as it finishes, so that the bench keeps its evidence when its checkpoints are deleted); their test "
          "accuracies, listed with the grid below, played no part in the choice.",
}
"""What was tested: by whether the bench tests on finish or runs outside the table hold test evaluations."""
SAME_TASKS = ("test_split", "episodes", "seed", "ways", "shots")
"""What fixes a test TaskSet: two evaluations that agree on these (and the dataset) scored the same tasks."""
ROW_NUMBERS = ("val_acc", "test_acc", "test_acc_mean", "test_acc_t95", "pooled_mean", "pooled_ci95", "paired_diff",
               "paired_t95", "paired_diff_per_seed", "test_tasks", "task_accuracies")
"""The numbers of a table's row (:func:`method_numbers`): null in the row of a method with a diverged run."""


def summary_of(run: Path) -> dict[str, Any] | None:
    """The run's train_summary.json (written when it finished), or None while it is unfinished; a damaged one
    raises :class:`CheckpointError` naming it and the command that writes it again."""
    path = run / "train_summary.json"
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
        float(summary["best_val_acc"])
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{path} is damaged ({type(exc).__name__}: {exc}): delete it and run metasam train "
                              f"--resume {run}, which writes it again from the run's checkpoints") from exc
    return summary


def divergence_of(run: Path) -> dict[str, Any] | None:
    """The record of the NaN/Inf step that stopped the unfinished run, the last complete line of its metrics.jsonl
    (``{"iteration": k, "nonfinite": what, "stopped": true}``, written by ``metasam train`` as it stops), or None.
    A bench takes such a run as an outcome of its grid point, not as a run to resume: resumed, it would reach the
    same step again."""
    if summary_of(run) is not None:
        return None
    record = _last_record(run)
    return record if record is not None and record.get("stopped") is True else None


def has_ended(run: Path) -> bool:
    """Whether the run is finished (train_summary.json) or diverged (:func:`divergence_of`): nothing is left to train."""
    return summary_of(run) is not None or divergence_of(run) is not None


def select(plan: BenchPlan, out: Path, ways: int, shots: int) -> tuple[dict[str, Method], dict[str, Any], list[Cell]]:
    """(selected method per algorithm, the grid report, the cells still to train) of one setting: once all its
    grid's cells have ended, an algorithm is selected by :data:`SELECTION_RULE` among the points none of whose
    runs diverged; where every point has a diverged run, the report's ``selected`` is None and nothing is selected."""
    selected, report, missing = {}, {}, []
    for algo in plan.algos:
        scored = []
        for method in (m for m in plan.methods() if m.algo == algo):
            val, diverged = {}, {}
            for cell in method.cells(ways, shots, plan.seeds):
                summary = summary_of(out / cell.folder)
                if summary is not None:
                    val[cell.seed] = summary["best_val_acc"]
                elif (stop := divergence_of(out / cell.folder)) is not None:
                    diverged[cell.seed] = stop
                else:
                    missing.append(cell)
            scored.append((method, val, diverged))
        if any(len(val) + len(diverged) < len(plan.seeds) for _, val, diverged in scored):
            continue
        means = [None if diverged else sum(val.values()) / len(val) for _, val, diverged in scored]
        candidates = [i for i, mean in enumerate(means) if mean is not None]
        best = max(candidates, key=lambda i: (means[i], -i)) if candidates else None
        if best is not None:
            selected[algo] = scored[best][0]
        report[algo] = {
            "points": [{"point": dict(m.point), "name": point_name(dict(m.point)), "val_acc": {str(s): v for s, v in val.items()},
                        "mean_val_acc": mean, "diverged": _stops(diverged)} for (m, val, diverged), mean in zip(scored, means)],
            "selected": best, "edges": [] if best is None else edges(plan.entries[algo], dict(scored[best][0].point)),
        }
    return selected, report, missing


def _stops(diverged: dict[int, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Seed → where its run diverged: ``{"iteration": k, "nonfinite": the tensor that held NaN/Inf}``."""
    return {str(seed): {"iteration": stop["iteration"], "nonfinite": stop.get("nonfinite")} for seed, stop in diverged.items()}


def methods_of(plan: BenchPlan, selected: dict[str, Method], ways: int, shots: int) -> list[Method]:
    """The rows of a setting: the selected method of each algorithm, then (with ``plan.controls``) the controls."""
    rows = [selected[a] for a in plan.algos]
    return rows + (plan.controls_of(ways, shots, selected) if plan.controls else [])


def test_result(plan: BenchPlan, out: Path, cell: Cell, test_rule: str | None, progress: bool) -> dict[str, Any]:
    """The run's best checkpoint on the bench's fixed test TaskSet, adapted by ``test_rule`` (None: its own):
    its :func:`stored_test` when there is one, else evaluated now (and written to the run folder)."""
    result = stored_test(plan, out, cell, test_rule)
    if result is not None:
        return result
    run = out / cell.folder
    if not (run / "best.pt").exists():
        path = eval_path(plan, run, MetaTrainConfig.load(run), test_rule)
        if path.exists():
            raise CheckpointError(f"{run} has no best.pt, and its test evaluation {path.name} is damaged, or of other "
                                  "test settings (--test-rule, --non-transductive or not) or an earlier best.pt; restore the file from a copy, or delete the run "
                                  "folder and rerun the bench's command to train it again")
        raise CheckpointError(f"{run} has neither best.pt nor a test evaluation on this TaskSet ({path.name}): its "
                              "checkpoints were deleted before it was tested on it; merge with the test settings it was "
                              "tested with (--episodes, --test-seed, --non-transductive or not), or delete the run "
                              "folder and rerun the bench's command to train it again")
    return evaluate_run(run, plan.episodes, plan.test_seed, "best", test_rule=test_rule, progress=progress,
                        transductive=plan.transductive)


def eval_path(plan: BenchPlan, run: Path, cfg: MetaTrainConfig, test_rule: str | None) -> Path:
    """Where the evaluation of the run's (``cfg``'s) best.pt on the bench's test TaskSet with ``test_rule`` is written."""
    return run / eval_file_name("best", plan.episodes, plan.test_seed, cfg, test_rule, transductive=plan.transductive)


def stored_test(plan: BenchPlan, out: Path, cell: Cell, test_rule: str | None) -> dict[str, Any] | None:
    """The evaluation of the run's best.pt on the bench's test TaskSet with ``test_rule`` that its folder holds,
    or None: where best.pt is there, the evaluation must be newer; where it was deleted, the evaluation stands
    for it if it is of the run's final best.pt (its ``best_iteration`` is train_summary.json's; evaluations
    written before 2026-12-02 do not record it, nor, before 2026-12-03, ``transductive``: they were transductive).
    A damaged one, or one of other test settings, is None."""
    run = out / cell.folder
    cfg = MetaTrainConfig.load(run)
    path, best = eval_path(plan, run, cfg, test_rule), run / "best.pt"
    if not path.exists() or (best.exists() and path.stat().st_mtime_ns < best.stat().st_mtime_ns):
        return None
    try:
        result = json.loads(path.read_text())
    except ValueError:
        return None
    setting = {"test_rule": test_rule or cfg.test_rule, "test_inner_steps": cfg.test_inner_steps}
    summary = summary_of(run)
    if not best.exists() and isinstance(result, dict) and "best_iteration" in result and summary is not None:
        setting["best_iteration"] = summary["best_iteration"]
    if isinstance(result, dict) and result.get("transductive", True) == plan.transductive and all(
            result.get(k) == v for k, v in setting.items()):
        return result  # (metasam evaluate --steps K before 2026-12-02 wrote other steps under this name: evaluated again)
    return None


def fully_tested(plan: BenchPlan, out: Path, cell: Cell, cfg: MetaTrainConfig) -> bool:
    """Whether the folder of ``cell`` (run with ``cfg``) holds a valid evaluation (:func:`stored_test`) by every
    test rule a table may test it with (:func:`~metasam.train.bench.plan.test_rules`): what ``--test-on-finish``
    writes."""
    return all(stored_test(plan, out, cell, rule) is not None for rule in test_rules(cfg))


def control_cells(plan: BenchPlan, out: Path) -> tuple[list[Cell], list[Cell]]:
    """(the cells of the controls of every setting whose grid is finished, in order and once each, a grid cell
    that a control reuses included; the grid cells still unfinished). Without ``plan.controls``, no controls."""
    controls, unfinished = [], []
    for ways, shots in plan.settings:
        selected, _, missing = select(plan, out, ways, shots)
        unfinished += missing
        if not missing and plan.controls:
            controls += [c for m in plan.controls_of(ways, shots, selected) for c in m.cells(ways, shots, plan.seeds)]
    return list(dict.fromkeys(controls)), unfinished


def missing_cells(plan: BenchPlan, out: Path) -> list[Cell]:
    """The cells the table needs that have not ended (:func:`has_ended`): grid cells, and the controls of the
    settings whose grid has."""
    controls, unfinished = control_cells(plan, out)
    return list(dict.fromkeys(unfinished + [c for c in controls if not has_ended(out / c.folder)]))


def cell_states(plan: BenchPlan, out: Path) -> list[dict[str, Any]]:
    """Where each cell of the bench stands, reading its run folder only (nothing is trained or tested): the grid
    cells, then the controls of every setting whose grid is finished. Each: ``{"cell": its folder, "state":
    "not started" | "training" | "unfinished" | "diverged" | "finished" | "tested", "iteration": the last logged
    (None before the first), "best_val_acc": when finished}``; "training": not finished, and a process holds its
    run folder's lock now (:func:`~metasam.train.run_folder.lock_holder`); "unfinished": not finished, and no
    process does (a stopped run: the bench's command resumes it); "diverged": stopped on a NaN/Inf step
    (:func:`divergence_of`; "iteration" is that step's); "tested": finished, and its folder holds the evaluation of
    its best.pt on the bench's test TaskSet by its own test rule."""
    states = []
    for cell in dict.fromkeys(plan.grid_cells() + control_cells(plan, out)[0]):
        run, summary = out / cell.folder, summary_of(out / cell.folder)
        state = {"cell": str(cell.folder), "state": "not started", "iteration": _last_iteration(run), "best_val_acc": None}
        if summary is not None:
            tested = stored_test(plan, out, cell, None) is not None
            state.update(state="tested" if tested else "finished", best_val_acc=summary["best_val_acc"])
        elif divergence_of(run) is not None:
            state["state"] = "diverged"
        elif (run / "config.json").exists():
            state["state"] = "training" if lock_holder(run) else "unfinished"
        states.append(state)
    return states


def _last_iteration(run: Path) -> int | None:
    """The iteration of the last complete line of the run's metrics.jsonl (None before the first)."""
    record = _last_record(run)
    return None if record is None else record["iteration"]


def _last_record(run: Path) -> dict[str, Any] | None:
    """The last complete line of the run's metrics.jsonl that records an iteration (None before the first)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
            record["iteration"] = int(record["iteration"])
            return record
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by a kill, or not an iteration's
    return None


def build_results(plan: BenchPlan, out: Path, progress: bool = True) -> dict[str, Any]:
    """The numbers of the table (see :func:`method_numbers`), per setting; refuses while a cell is unfinished."""
    missing = missing_cells(plan, out)
    if missing:
        shown = ", ".join(str(c.folder) for c in missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ConfigError(f"{out} lacks {len(missing)} finished cell(s): {shown}; finish them with the bench's command "
                          f"(or its shards): {plan.command(out)}")
    settings, tested_outside = [], False
    for ways, shots in plan.settings:
        selected, report, _ = select(plan, out, ways, shots)
        check_selected(plan, report, ways, shots)
        rows = methods_of(plan, selected, ways, shots)
        stops = {m: {c.seed: stop for c in m.cells(ways, shots, plan.seeds) if (stop := divergence_of(out / c.folder))}
                 for m in rows}
        tested = {m: [test_result(plan, out, c, m.test_rule, progress) for c in m.cells(ways, shots, plan.seeds)]
                  for m in rows if not stops[m]}
        reference = tested[selected[plan.reference]]
        numbers = [diverged_row(plan, out, m, stops[m], ways, shots) if stops[m] else
                   method_numbers(plan, out, m, tested[m], reference, ways, shots) for m in rows]
        in_table = {c for m in rows for c in m.cells(ways, shots, plan.seeds)}
        outside = grid_tests(plan, out, report, in_table, ways, shots)
        tested_outside |= plan.test_on_finish or outside
        settings.append({"ways": ways, "shots": shots, "grids": report, "methods": numbers})
    return {"format": "metasam.bench.results", "version": 2, "command": plan.command(out),
            "selection_rule": f"{SELECTION_RULE} {TESTED[tested_outside]}", "tested_outside_table": tested_outside,
            "reference": plan.reference, "seeds": plan.seeds, "plan": plan.to_json(), "settings": settings}


def check_selected(plan: BenchPlan, report: dict[str, Any], ways: int, shots: int) -> None:
    """Refuse a table where an algorithm has no point to choose: every point of its grid has a diverged run."""
    for algo, grid in report.items():
        if grid["selected"] is None:
            shown = "; ".join(f"{p['name'] or algo}: seed {seed} at iteration {stop['iteration']}"
                              for p in grid["points"] for seed, stop in list(p["diverged"].items())[:1])
            raise ConfigError(f"every grid point of {algo} ({ways}w{shots}s) has a run that diverged ({shown}), so there "
                              "is no point to choose; run the bench again in another --out with smaller values in its "
                              "grid (or a smaller --inner-lr or --outer-lr)")


def diverged_row(plan: BenchPlan, out: Path, method: Method, stops: dict[int, dict[str, Any]], ways: int,
                 shots: int) -> dict[str, Any]:
    """The row of a method (a control: a chosen point has no diverged run) one of whose runs diverged: where,
    and no test numbers (a mean over seeds needs every seed; none of its runs is tested here)."""
    cells = method.cells(ways, shots, plan.seeds)
    cfg = MetaTrainConfig.load(out / cells[0].folder)
    return {**_row_head(plan, method, cells, method.test_rule or cfg.test_rule, cfg.val_view),
            **dict.fromkeys(ROW_NUMBERS), "diverged": _stops(stops)}


def grid_tests(plan: BenchPlan, out: Path, report: dict[str, Any], in_table: set[Cell], ways: int, shots: int) -> bool:
    """Add to each point of the grid ``report`` (of :func:`select`) the test accuracies, by seed, that its run
    folders hold (with the runs' own test rule; nothing is evaluated here), and their mean where every seed has
    one. Returns whether a run outside ``in_table``, the cells of the table's rows, holds one."""
    outside = False
    for algo, grid in report.items():
        for method, point in zip((m for m in plan.methods() if m.algo == algo), grid["points"]):
            stored = {c: stored_test(plan, out, c, None) for c in method.cells(ways, shots, plan.seeds)}
            point["test_acc"] = {str(c.seed): r["accuracy"] for c, r in stored.items() if r is not None}
            complete = len(point["test_acc"]) == len(stored)
            point["mean_test_acc"] = sum(point["test_acc"].values()) / len(stored) if complete else None
            outside |= any(r is not None and c not in in_table for c, r in stored.items())
    return outside


def method_numbers(plan: BenchPlan, out: Path, method: Method, tested: list[dict[str, Any]],
                   reference: list[dict[str, Any]], ways: int, shots: int) -> dict[str, Any]:
    """A row: test accuracy per seed (the mean over the test tasks), their mean ± 95 % t-interval over seeds,
    the mean over seeds × tasks ± 1.96·sd/√n, and the paired difference to the reference method (per seed the
    mean over the same test tasks of the difference, t-interval over seeds)."""
    for result in tested:
        if any(result[k] != reference[0][k] for k in SAME_TASKS):
            raise ConfigError(f"{result['run']} was tested on other tasks than {reference[0]['run']} "
                              f"({', '.join(f'{k} {result[k]} vs {reference[0][k]}' for k in SAME_TASKS)}); "
                              "delete its eval_*.json files and merge again")
    per_seed = [r["accuracy"] for r in tested]
    mean, t95 = t_interval(per_seed)
    pooled, pooled_ci = mean_ci95([a for r in tested for a in r["task_accuracies"]])
    diff, diff_t95, diff_per_seed = paired_difference([r["task_accuracies"] for r in tested],
                                                      [r["task_accuracies"] for r in reference])
    cells = method.cells(ways, shots, plan.seeds)
    cfg = MetaTrainConfig.load(out / cells[0].folder)
    numbers = {
        "val_acc": [summary_of(out / c.folder)["best_val_acc"] for c in cells],
        "test_acc": per_seed, "test_acc_mean": mean, "test_acc_t95": t95,
        "pooled_mean": pooled, "pooled_ci95": pooled_ci,
        "paired_diff": diff, "paired_t95": diff_t95, "paired_diff_per_seed": diff_per_seed,
        "test_tasks": {k: tested[0][k] for k in SAME_TASKS},
        "task_accuracies": [r["task_accuracies"] for r in tested],
    }
    return _finite({**_row_head(plan, method, cells, tested[0]["test_rule"], cfg.val_view), **numbers,
                    "diverged": {}})


def _row_head(plan: BenchPlan, method: Method, cells: list[Cell], test_rule: str, val_view: str) -> dict[str, Any]:
    """What names a row (its runs: ``cells``), whether or not its runs have numbers."""
    return {"name": method.name, "control": method.control, "algo": method.algo, "point": dict(method.point),
            "test_rule": test_rule, "val_view": val_view, "runs": [str(c.folder) for c in cells], "seeds": plan.seeds}


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    """NaN (a t-interval of one seed) as null, which JSON has."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}
