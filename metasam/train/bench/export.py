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
from metasam.errors import ConfigError, RunFolderInUse
from metasam.train.bench.plan import BenchPlan, Cell
from metasam.train.bench.results import control_cells, divergence_of, fully_tested, stored_test, summary_of
from metasam.train.bench.runner import PLAN_FILE, TRAINING_FLAGS, load_plan
from metasam.train.config import MetaTrainConfig
from metasam.train.run_folder import RunLock

LEFT_OUT = ("last.pt", "best.pt", "val_tasks.json")
"""The files of a run folder an export leaves out (with hidden files: the lock, temporary files)."""
LAST = ("metrics.jsonl", "train_summary.json")
"""Copied last in each run, in this order: a run folder an interrupted export leaves without train_summary.json is
a run still to finish, which a rerun of the export completes (and which a bench on DEST would train), never a
finished run with missing files; the same holds for a diverged run, whose record is metrics.jsonl's last line."""


def export_evidence(plan: BenchPlan, out: str | Path, dest: str | Path) -> dict[str, list]:
    """Copy OUT/bench.json and, of each finished cell of the bench (grid cells, and the controls of every finished
    grid), the files of its run folder (metasam writes no subfolder there) but :data:`LEFT_OUT`, hidden ones and
    evaluations older than the checkpoint they evaluate (OUT would evaluate again), to the same places under
    ``dest``. Each copied cell's run folder is locked while it is copied; one another process holds (a run being
    extended, a test being written) is passed over.

    With ``plan.test_on_finish``, a cell is copied once it is tested by every test rule it needs, as the bench
    does as it goes (a copy without one could never get it). Without, a cell not tested by its own rule is copied
    too, since the selection reads its validation accuracy, but can no longer be tested from ``dest``: a merge of
    ``dest`` works while its table does not need that test (as after a merge of OUT with the same report flags).
    A run's file already in ``dest`` must hold the same bytes (it is then left as it is): a difference is refused,
    naming it, before anything is copied, so an export never overwrites a run and can be repeated as more cells
    finish. ``dest``'s bench.json is replaced where it plans the same training (as a rerun of the bench replaces
    OUT's: the flags that change only what is tested may differ), and refused otherwise; it is copied last.

    A diverged run (:func:`~metasam.train.bench.results.divergence_of`) is copied too, its metrics.jsonl (which
    records where it stopped) last: it is an outcome the table marks, and a bench on ``dest`` does not train it.

    Returns ``{"copied": cells (diverged ones included), "diverged": the diverged cells among them, "untested":
    finished cells not tested by every rule checked (copied unless ``plan.test_on_finish``), "unfinished": cells
    neither finished nor diverged, "busy": cells passed over, "stale": evaluations left out}``."""
    out, dest = Path(out).resolve(), Path(dest).resolve()
    if dest == out or dest.is_relative_to(out):
        raise ConfigError(f"--export {dest} is inside the bench's folder {out}; export to a folder outside it")
    kept = load_plan(dest, required=False)
    differ = [] if kept is None else plan.training_differences(kept)
    if differ:
        raise ConfigError(f"{dest / PLAN_FILE} is the plan of another bench (other "
                          f"{', '.join(TRAINING_FLAGS[k] for k in differ)}); export to another folder")
    state: dict[str, list] = {"copied": [], "diverged": [], "untested": [], "unfinished": [], "busy": [], "stale": []}
    locks = []
    try:
        for cell in dict.fromkeys(plan.grid_cells() + control_cells(plan, out)[0]):
            run = out / cell.folder
            diverged = divergence_of(run) is not None
            if summary_of(run) is None and not diverged:
                state["unfinished"].append(cell)
                continue
            try:
                locks.append(RunLock(run).acquire())
            except RunFolderInUse:
                state["busy"].append(cell)
                continue
            if diverged:
                state["diverged"].append(cell)
                state["copied"].append(cell)
                continue
            tested = _tested(plan, out, cell)
            if not tested:
                state["untested"].append(cell)
            if tested or not plan.test_on_finish:
                state["copied"].append(cell)
        copies = []
        for cell in state["copied"]:
            files, stale = _evidence(out / cell.folder)
            copies += [(f, dest / f.relative_to(out)) for f in files]
            state["stale"] += stale
        _check_differences(copies, out, dest)
        for source, target in [*copies, (out / PLAN_FILE, dest / PLAN_FILE)]:
            if not target.exists() or source.name == PLAN_FILE:
                target.parent.mkdir(parents=True, exist_ok=True)
                data = source.read_bytes()
                replace_atomically(target, lambda f, data=data: f.write(data))
    finally:
        for lock in locks:
            lock.release()
    return state


def _tested(plan: BenchPlan, out: Path, cell: Cell) -> bool:
    """Whether the finished ``cell`` is tested by every test rule it needs (its own only, without --test-on-finish)."""
    if plan.test_on_finish:
        return fully_tested(plan, out, cell, MetaTrainConfig.load(out / cell.folder))
    return stored_test(plan, out, cell, None) is not None


def _evidence(run: Path) -> tuple[list[Path], list[Path]]:
    """(the files of ``run`` an export copies, :data:`LAST` last; the evaluations it leaves out as stale:
    older than the checkpoint they evaluate, ``eval_<best|last>_….json`` of best.pt or last.pt)."""
    files, stale = [], []
    for f in sorted(run.iterdir(), key=lambda f: (LAST.index(f.name) if f.name in LAST else -1, f.name)):
        if not f.is_file() or f.name in LEFT_OUT or f.name.startswith("."):
            continue
        checkpoint = run / f"{f.name.split('_')[1]}.pt" if f.name.startswith("eval_") else None
        if checkpoint is not None and checkpoint.exists() and f.stat().st_mtime_ns < checkpoint.stat().st_mtime_ns:
            stale.append(f)
        else:
            files.append(f)
    return files, stale


def _check_differences(copies: list[tuple[Path, Path]], out: Path, dest: Path) -> None:
    differ = [target for source, target in copies if target.exists() and target.read_bytes() != source.read_bytes()]
    if differ:
        raise ConfigError(f"{differ[0]} differs from {out / differ[0].relative_to(dest)}" +
                          (f" (and {len(differ) - 1} more files)" if len(differ) > 1 else "") +
                          f": {dest} holds another version (another run, or an evaluation made again since the last "
                          "export); nothing was copied. Move the differing files out of it if OUT's are the ones to "
                          "keep, or export to another folder")
