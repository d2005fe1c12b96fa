"""The results of a bench as people read them: OUT/results.md (the table) and OUT/results.png (the plot)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metasam.atomic_write import replace_atomically
from metasam.train.bench.grid import point_name

CONTROLS = {
    "effective radius": "sharp-maml-low trained at ρ = ρ1 − ρ2 of the selected agnostic-sam point: with the support "
    "set as validation view, agnostic-sam's first inner step is this SAM step (its only one at one inner step)",
    "validation momentum": "agnostic-sam at the selected point with β = 0 (m = ∇L_V at every inner step; with the "
    "support set as view this is the effective-radius control at every step, up to rounding)",
    "test-time rule": "the same weights (no training), adapted at test by the other rule: `gd` where the run "
    "adapts with its training rule (`same`), and the reverse",
}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _interval(mean: float, half: float | None) -> str:
    return f"{_pct(mean)} ± {_pct(half)}" + (" (1 seed)" if half is None else "")


def _where(diverged: dict[str, dict[str, Any]]) -> str:
    return ", ".join(f"seed {seed} at iteration {stop['iteration']}" for seed, stop in diverged.items())


def render_markdown(results: dict[str, Any]) -> str:
    """The page: how to reproduce it, the selection rule, what the intervals are, then per setting the table
    of methods (and controls), the grid edges, and every grid point's validation accuracy (and its test
    accuracy, where runs outside the table were tested)."""
    ref = results["reference"]
    lines = ["# metasam bench", "", f"Reproduce from nothing: `{results['command']}`", "",
             f"**Selection, on validation only.** {results['selection_rule']}", "",
             f"**Intervals.** *test* is the mean over seeds of each run's mean accuracy on the fixed test tasks, ± the "
             f"95 % Student-t interval over the {len(results['seeds'])} seed(s). *seeds × tasks* pools every (seed, task) "
             "accuracy, ± 1.96·sd/√n: it treats the tasks of one seed's model as independent draws, so it is narrower "
             f"than the spread between seeds warrants. *Δ vs {ref}* is paired: per seed, the mean over the same test "
             f"tasks of (method − {ref}), ± the t-interval over seeds. Accuracies in %.", ""]
    if not results["plan"].get("transductive", True):
        lines += ["**Non-transductive test.** Each query image was predicted in a batch of its own with the support set "
                  "(BatchNorm's statistics of the support set and that image), not with the other queries; validation "
                  "during training used the whole query set.", ""]
    if results["plan"]["overrides"].get("learn_inner_lr"):
        lines += ["**Learned inner step sizes (Meta-SGD, `--learn-inner-lr`).** Every run learned α per parameter "
                  "entry beside θ, from the --inner-lr it started at; each method's name gives its inner and outer "
                  "rules only.", ""]
    if results["plan"]["overrides"].get("adapt", "all") != "all":
        lines += ["**ANIL (`--adapt head`).** Every run adapted the last linear layer alone in its inner loop; the body "
                  "was meta-learned but never adapted. Each method's name gives its inner and outer rules only.", ""]
    controls = {m["control"] for s in results["settings"] for m in s["methods"] if m["control"]}
    if controls:
        lines += ["**Controls.** " + " ".join(f"*{c}*: {CONTROLS[c]}." for c in CONTROLS if c in controls), ""]
    if any(m["val_view"] != "support" for s in results["settings"] for m in s["methods"]):
        lines += ["**Not the paper's:** rows marked *val view: split/augment* used a validation view other than the "
                  "support set itself (metasam/data/val_views.py); the seed paper duplicates the support set.", ""]
    for setting in results["settings"]:
        lines += [f"## {setting['ways']}-way {setting['shots']}-shot", "",
                  f"| method | point (chosen on validation) | validation | test ± 95 % (seeds) | seeds × tasks ± 95 % "
                  f"| Δ vs {ref} ± 95 % (paired) | test per seed |", "| --- " * 7 + "|"]
        for m in setting["methods"]:
            name = m["name"] + ("" if m["val_view"] == "support" else f" (val view: {m['val_view']}, not the paper's)")
            name = ("control: " if m["control"] else "") + name
            if m["diverged"]:
                lines.append(f"| {name} | {point_name(m['point']) or '–'} | – "
                             f"| diverged ({_where(m['diverged'])}): no numbers | – | – | – |")
                continue
            is_ref = m["name"] == ref and not m["control"]
            delta = "reference" if is_ref else f"{100 * m['paired_diff']:+.2f} ± {_pct(m['paired_t95'])}"
            val = sum(m["val_acc"]) / len(m["val_acc"])
            lines.append(f"| {name} | {point_name(m['point']) or '–'} | {_pct(val)} "
                         f"| {_interval(m['test_acc_mean'], m['test_acc_t95'])} | {_pct(m['pooled_mean'])} ± {_pct(m['pooled_ci95'])} "
                         f"| {delta} | {', '.join(_pct(a) for a in m['test_acc'])} |")
        edge_notes = [f"{algo}: {note}" for algo, grid in setting["grids"].items() for note in grid["edges"]]
        if any(m["diverged"] for m in setting["methods"]):
            lines += ["", "**Diverged:** a row marked *diverged* is a control one of whose runs stopped on a NaN or Inf "
                      "training step: a mean over seeds needs every seed, so the row has no numbers, and the merge tests "
                      "none of its runs."]
        if edge_notes:
            lines += ["", "**Selected at the edge of its grid** (the best value may lie outside it): " + "; ".join(edge_notes) + "."]
        lines += ["", *_grid_table(setting, results["tested_outside_table"]), ""]
    return "\n".join(lines)


def _grid_table(setting: dict[str, Any], tested: bool) -> list[str]:
    """Every grid point's validation accuracy, which chose; where runs outside the table were ``tested``
    (--test-on-finish), every point's test accuracy beside it, which did not."""
    grids = setting["grids"].items()
    where = f"{setting['ways']}-way {setting['shots']}-shot"
    if not tested:
        lines = [f"Validation accuracy of every grid point ({where}; only the chosen points, and a point a control "
                 "reuses, were tested):",
                 "", "| algorithm | point | validation per seed | mean | |", "| --- | --- | --- | --- | --- |"]
    else:
        lines = [f"Every grid point ({where}): validation accuracy, which made the choice, and test accuracy (mean over "
                 "seeds, each run adapted by its own test rule), which played no part in it:", "",
                 "| algorithm | point | validation per seed | mean | test per seed | mean | |", "| --- " * 7 + "|"]
    for algo, grid in grids:
        for i, p in enumerate(grid["points"]):
            val = [_pct(p["val_acc"][seed]) if seed in p["val_acc"] else f"diverged at iteration {p['diverged'][seed]['iteration']}"
                   for seed in sorted({*p["val_acc"], *p["diverged"]}, key=int)]
            cells = [algo, p["name"] or "–", ", ".join(val), "diverged: not chosen" if p["diverged"] else _pct(p["mean_val_acc"])]
            if tested:
                cells += [", ".join(_pct(v) for v in p["test_acc"].values()) or "–",
                          "–" if p["mean_test_acc"] is None else _pct(p["mean_test_acc"])]
            lines.append("| " + " | ".join(cells + ["selected" if i == grid["selected"] else ""]) + " |")
    return lines


def plot(results: dict[str, Any], path: Path) -> None:
    """One panel per setting: each method's test accuracy, mean over seeds with its 95 % t-interval, and the
    seeds' own accuracies as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = results["settings"]
    fig, axes = plt.subplots(1, len(settings), figsize=(1.2 + 1.1 * max(len(s["methods"]) for s in settings) * len(settings), 4.5),
                             squeeze=False)
    for ax, setting in zip(axes[0], settings):
        methods = setting["methods"]
        for x, m in enumerate(methods):
            if m["diverged"]:  # no numbers: named on the axis
                continue
            ax.errorbar(x, 100 * m["test_acc_mean"], yerr=None if m["test_acc_t95"] is None else 100 * m["test_acc_t95"],
                        fmt="o", color="tab:gray" if m["control"] else "black", capsize=4, zorder=2,
                        label="mean over seeds ± 95 % t-interval" if x == 0 else None)
            n = len(m["test_acc"])
            ax.scatter([x + 0.15 + 0.1 * i / max(1, n - 1) for i in range(n)], [100 * a for a in m["test_acc"]], s=14,
                       color="tab:blue", zorder=3, label="one seed" if x == 0 else None)
        ax.set_xticks(range(len(methods)), [("control: " if m["control"] else "") + m["name"] +
                                            (" (diverged)" if m["diverged"] else "") for m in methods],
                      rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{setting['ways']}-way {setting['shots']}-shot")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        replace_atomically(path, lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        plt.close(fig)
