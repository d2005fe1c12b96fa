"""A bench's evidence without its checkpoints: what a merge reads, copied to a folder that keeps it.

Most of a bench's folder is its checkpoints and validation tasks (``last.pt``, ``best.pt``, ``val_tasks.json``:
about 4 MB of a 20-way Omniglot Conv-4 run's 4.1). Once a run is finished and tested on the bench's test
TaskSet (``--test-on-finish`` tests each run as it finishes, by every test rule the table may use), its other
files, config.json, metrics.jsonl, train_summary.json and the evaluations, are all a merge needs
(docs/bench.md). :func:`export_evidence` copies them, and OUT/bench.json, into another folder (a paper's
repository, a disk that is kept), where ``metasam bench --out DEST --merge`` gives the table a merge of OUT gives.
"""

from __future__ import annotations

from pathlib import Path

from metasam.atomic_write import replace_atomically
from metasam.errors import ConfigError
from metasam.train.bench.plan import BenchPlan, Cell, test_rules
from metasam.train.bench.results import control_cells, stored_test, summary_of
from metasam.train.bench.runner import PLAN_FILE, TRAINING_FLAGS, load_plan
from metasam.train.config import MetaTrainConfig

LEFT_OUT = ("last.pt", "best.pt", "val_tasks.json")
"""The files of a run folder an export leaves out (with hidden files: the lock, temporary files)."""


def export_evidence(plan: BenchPlan, out: str | Path, dest: str | Path) -> dict[str, list[Cell]]:
    """Copy OUT/bench.json and, of each finished cell of the bench (grid cells, and the controls of every finished
    grid), the files of its run folder but :data:`LEFT_OUT` and hidden ones, to the same places under ``dest``.

    With ``plan.test_on_finish``, a cell is copied once it is tested by every test rule it needs, as the bench
    does as it goes (a copy without one could never get it). Without, a cell not tested by its own rule is copied
    too, since the selection reads its validation accuracy, but can no longer be tested from ``dest``: a merge of
    ``dest`` works while its table does not need that test (as after a merge of OUT with the same report flags).
    A run's file already in ``dest`` must hold the same bytes (it is then left as it is): a difference is refused,
    naming it, before anything is copied, so an export never overwrites a run and can be repeated as more cells
    finish. ``dest``'s bench.json is replaced where it plans the same training (as a rerun of the bench replaces
    OUT's: the flags that change only what is tested may differ), and refused otherwise.

    Returns ``{"copied": cells, "untested": finished cells without an evaluation (copied unless
    ``plan.test_on_finish``), "unfinished": cells not copied}``."""
    out, dest = Path(out).absolute(), Path(dest).absolute()
    if dest == out or dest.is_relative_to(out):
        raise ConfigError(f"--export {dest} is inside the bench's folder {out}; export to a folder outside it")
    cells = list(dict.fromkeys(plan.grid_cells() + control_cells(plan, out)[0]))
    state: dict[str, list[Cell]] = {"tested": [], "untested": [], "unfinished": []}
    for cell in cells:
        state[_state(plan, out, cell)].append(cell)
    copied = state["tested"] + ([] if plan.test_on_finish else state["untested"])
    kept = load_plan(dest, required=False)
    if kept is not None and plan.training_differences(kept):
        raise ConfigError(f"{dest / PLAN_FILE} is the plan of another bench (other "
                          f"{', '.join(TRAINING_FLAGS[k] for k in plan.training_differences(kept))}); export to another folder")
    files = [f for cell in copied for f in sorted((out / cell.folder).iterdir())
             if f.is_file() and f.name not in LEFT_OUT and not f.name.startswith(".")]
    copies = [(f, dest / f.relative_to(out)) for f in files]
    differ = [target for source, target in copies if target.exists() and target.read_bytes() != source.read_bytes()]
    if differ:
        raise ConfigError(f"{differ[0]} differs from {out / differ[0].relative_to(dest)}" +
                          (f" (and {len(differ) - 1} more files)" if len(differ) > 1 else "") +
                          f": {dest} holds runs other than these; nothing was copied. Export to another folder, or move "
                          "the differing files away")
    for source, target in [*copies, (out / PLAN_FILE, dest / PLAN_FILE)]:  # the plan last: as a rerun writes it
        if not target.exists() or source.name == PLAN_FILE:
            target.parent.mkdir(parents=True, exist_ok=True)
            data = source.read_bytes()
            replace_atomically(target, lambda f, data=data: f.write(data))
    return {"copied": copied, "untested": state["untested"], "unfinished": state["unfinished"]}


def _state(plan: BenchPlan, out: Path, cell: Cell) -> str:
    run = out / cell.folder
    if summary_of(run) is None:
        return "unfinished"
    rules = test_rules(MetaTrainConfig.load(run)) if plan.test_on_finish else [None]
    return "tested" if all(stored_test(plan, out, cell, rule) is not None for rule in rules) else "untested"
