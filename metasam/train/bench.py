"""Train and evaluate a grid of algorithms × settings; write a table shaped like the paper's Tables 6–7.

Every run of the grid is a normal run folder (``OUT/<setting>/<algo>``), so a killed grid is resumed
run by run, and each run can be inspected, re-evaluated or loaded on its own. All methods of a setting
are evaluated on the same fixed, seeded test TaskSet.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from metasam.atomic_write import write_text_atomic
from metasam.errors import ConfigError
from metasam.stats import mean_ci95
from metasam.train.config import MetaTrainConfig, check_int
from metasam.train.evaluation import evaluate_run
from metasam.train.meta import MetaTrainer
from metasam.train.run_folder import is_run_dir

SETTING = re.compile(r"^(\d+)w(\d+)s$")


def parse_settings(text: str) -> list[tuple[int, int]]:
    """'5w1s,20w5s' → [(5, 1), (20, 5)]."""
    out = []
    for item in text.split(","):
        match = SETTING.match(item.strip())
        if not match:
            raise ConfigError(f"setting {item!r} is not of the form <ways>w<shots>s, e.g. 5w1s or 20w5s")
        out.append((int(match.group(1)), int(match.group(2))))
    return out


def run_grid(
    overrides: dict[str, Any], algos: list[str], settings: list[tuple[int, int]], out_dir: str | Path,
    episodes: int = 600, seed: int = 1234, progress: bool = True,
) -> dict[str, Any]:
    """Train (or resume, or skip when finished) every (setting, algo) run, evaluate each, write the table.

    ``overrides`` are the :class:`MetaTrainConfig` fields the user set (dataset, iterations, ...); the
    others take the standard settings of each setting's ways and shots.
    """
    out = Path(out_dir)
    # every cell's settings are checked before the first one trains
    if not algos:
        raise ConfigError("--algos names no algorithm; pass a comma list such as maml,agnostic-sam")
    check_int("episodes", episodes)
    cells = [((ways, shots, algo), MetaTrainConfig(**{**overrides, "ways": ways, "shots": shots, "algo": algo}))
             for ways, shots in settings for algo in algos]
    results = []
    for (ways, shots, algo), cfg in cells:
        run_dir = out / f"{ways}w{shots}s" / algo
        with MetaTrainer(cfg, run_dir) as trainer:
            if (run_dir / "train_summary.json").exists():
                pass  # finished earlier
            elif (run_dir / "last.pt").exists():
                trainer.resume()
                trainer.train(progress=progress)
            else:  # new, or killed before its first checkpoint (nothing trained)
                trainer.start(restart=is_run_dir(run_dir))
                trainer.train(progress=progress)
        results.append(evaluate_run(run_dir, episodes, seed, progress=progress))
    table = render_table(results, algos, settings)
    if trainer.procs.is_main:  # under torchrun every process has the results; rank 0 writes them
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(results, indent=2), out / "results.json")
        write_text_atomic(table, out / "results.md")
    return {"results": results, "table": table}


def render_table(results: list[dict[str, Any]], algos: list[str], settings: list[tuple[int, int]]) -> str:
    """Rows: algorithms; columns: settings; cells: accuracy % ± 95 % CI. A second table gives each
    algorithm's paired difference to the first one on the same test tasks, mean ± 95 % CI of the
    per-task differences (tighter than comparing the two intervals, since the tasks are shared)."""
    by_key = {(r["algo"], r["ways"], r["shots"]): r for r in results}
    cols = " | ".join(f"{w}-way {s}-shot" for w, s in settings)
    lines = [f"| method | {cols} |", "| --- |" + " --- |" * len(settings)]
    for algo in algos:
        cells = []
        for w, s in settings:
            r = by_key.get((algo, w, s))
            cells.append(f"{100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f}" if r else "–")
        lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    base = algos[0]
    if len(algos) > 1:
        lines += ["", f"Paired difference to {base} (percentage points, same test tasks):", "",
                  f"| method | {cols} |", "| --- |" + " --- |" * len(settings)]
        for algo in algos[1:]:
            cells = []
            for w, s in settings:
                a, b = by_key.get((algo, w, s)), by_key.get((base, w, s))
                if a and b and len(a["task_accuracies"]) == len(b["task_accuracies"]):
                    diff, ci = mean_ci95([x - y for x, y in zip(a["task_accuracies"], b["task_accuracies"])])
                    cells.append(f"{100 * diff:+.2f} ± {100 * ci:.2f}")
                else:
                    cells.append("–")
            lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
