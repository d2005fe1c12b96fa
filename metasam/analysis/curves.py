"""Training curves and gradient alignment of one or several runs, read from their metrics.jsonl."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from metasam.atomic_write import replace_atomically
from metasam.checkpoint import read_jsonl
from metasam.errors import ConfigError

ALIGNMENT_LEVELS = {  # panel title: the (before, after) keys a run logs per aligned step
    "cos(g_S, g_V), supervised": ("cos_before", "cos_after"),
    "outer cos(g_S, g_V): meta-batch vs validation meta-batch": ("outer_cos_before", "outer_cos_after"),
    "inner cos(g_S, g_V): support vs query": ("inner_cos_before", "inner_cos_after"),
}
CURVE_KEYS = ("train_loss", "query_loss", "query_acc", "val_acc", "test_acc", "inner_lr_mean")  # the last: Meta-SGD runs
STEP_KEYS = ("step", "iteration", "epoch")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl``, one dict per line, in the order they were written."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: not a metasam run folder")
    return read_jsonl(path)  # a run killed mid-append leaves a torn last line, which is left out


def run_labels(run_dirs: Sequence[str | Path]) -> list[str]:
    """A distinct label per run folder: the shortest tail of each path that tells it from the others
    (OUT/5w1s/maml and OUT/5w5s/maml become 5w1s/maml and 5w5s/maml). The same folder twice is refused."""
    parts = [Path(d).resolve().parts for d in run_dirs]
    if len(set(parts)) < len(parts):
        raise ConfigError("the same run folder is given twice: give each run once")
    for n in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-n:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    raise AssertionError("distinct resolved paths always have distinct tails")


def check_out_path(out: str | Path, overwrite: bool = False) -> Path:
    """``out`` as a Path, refused in one line when a file stands where its folder should be, or when ``out``
    exists and ``overwrite`` is not set (checked before any run is read or anything is drawn)."""
    out = Path(out)
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--out {out}: {parent} is a file, not a folder; choose a path inside a folder")
            break
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder: give the PNG's file name, e.g. {out / 'curves.png'}")
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out} exists: choose another --out, or pass --overwrite (overwrite=True in Python) "
                          "to replace it")
    return out


def _series(records: list[dict], key: str) -> tuple[str, list[float], list[float]]:
    """(x-axis name, x, y) of ``key``: x is the step, iteration or epoch that the lines holding ``key`` carry."""
    rows = [r for r in records if key in r]
    step = next((k for k in STEP_KEYS if rows and k in rows[0]), "iteration")
    return step, [r[step] for r in rows], [r[key] for r in rows]


def _figure(panels: int, size: tuple[int, int], dpi: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, squeeze=False)
    return plt, fig, axes[0]


def _save(plt, fig, out: Path, dpi: int) -> Path:
    """Write ``fig`` to ``out`` atomically (a kill or a full disk leaves any earlier file whole)."""
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(out, lambda f: fig.savefig(f, format="png", dpi=dpi))
    plt.close(fig)
    return out


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, keys: Sequence[str] = CURVE_KEYS,
              size: tuple[int, int] = (1200, 400), dpi: int = 100, overwrite: bool = False) -> Path:
    """One subplot per metric in ``keys`` that any run logged, one line per run (labelled by its path, see
    :func:`run_labels`); writes a PNG of ``size`` pixels. An existing ``out`` is replaced only with
    ``overwrite``."""
    out = check_out_path(out, overwrite)
    runs = dict(zip(run_labels(run_dirs), (read_metrics(d) for d in run_dirs)))
    present = [k for k in keys if any(any(k in r for r in recs) for recs in runs.values())]
    if not present:
        raise ConfigError(f"none of the runs logged any of {list(keys)}: their metrics.jsonl holds no such record yet "
                          "(train them longer), or pass the keys they logged")
    plt, fig, axes = _figure(len(present), size, dpi)
    for ax, key in zip(axes, present):
        for name, records in runs.items():
            step, x, y = _series(records, key)
            if x:
                ax.plot(x, y, label=name, marker="." if len(x) < 50 else None)
                ax.set_xlabel(step)
        ax.set_title(key)
        ax.legend(fontsize=7)
    return _save(plt, fig, out, dpi)


def plot_alignment(run_dirs: Sequence[str | Path], out: str | Path, size: tuple[int, int] = (1200, 400),
                   dpi: int = 100, overwrite: bool = False) -> Path:
    """cos(g_S, g_V) before (solid) and after (dashed) each logged update, one colour per run, one panel per
    level that any run logged (supervised; the bilevel outer and inner levels): the seed paper's Figure 1.
    An existing ``out`` is replaced only with ``overwrite``."""
    out = check_out_path(out, overwrite)
    runs = dict(zip(run_labels(run_dirs), (read_metrics(d) for d in run_dirs)))
    levels = {title: keys for title, keys in ALIGNMENT_LEVELS.items()
              if any(keys[0] in r for recs in runs.values() for r in recs)}
    if not levels:
        raise ConfigError("no run logged cos(g_S, g_V) before and after its updates: train with --alignment-every N")
    plt, fig, axes = _figure(len(levels), size, dpi)
    for ax, (title, (before, after)) in zip(axes, levels.items()):
        for colour, (name, records) in enumerate(runs.items()):
            for key, style, when in ((before, "-", "before"), (after, "--", "after")):
                step, x, y = _series(records, key)
                if x:
                    ax.plot(x, y, style, color=f"C{colour}", label=f"{name} ({when})")
                    ax.set_xlabel(step)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    return _save(plt, fig, out, dpi)
