"""Training curves and gradient alignment of one or several runs, read from their metrics.jsonl."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from metasam.checkpoint import read_jsonl
from metasam.errors import ConfigError

ALIGNMENT_KEYS = ("cos_train_val", "outer_cos_train_val")
CURVE_KEYS = ("train_loss", "query_loss", "query_acc", "val_acc", "test_acc")


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: not a metasam run folder")
    return read_jsonl(path)  # a run killed mid-append leaves a torn last line, which is left out


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    step = "epoch" if any("epoch" in r for r in records) else "iteration"
    pairs = [(r[step], r[key]) for r in records if key in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, keys: Sequence[str] = CURVE_KEYS,
              size: tuple[int, int] = (1200, 400), dpi: int = 100) -> Path:
    """One subplot per metric in ``keys`` that any run logged, one line per run; writes a PNG of ``size`` pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {Path(d).name: read_metrics(d) for d in run_dirs}
    present = [k for k in keys if any(any(k in r for r in recs) for recs in runs.values())]
    if not present:
        raise ConfigError(f"none of the runs logged any of {list(keys)}")
    fig, axes = plt.subplots(1, len(present), figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, squeeze=False)
    for ax, key in zip(axes[0], present):
        for name, records in runs.items():
            x, y = _series(records, key)
            if x:
                ax.plot(x, y, label=name, marker="." if len(x) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel("epoch" if any("epoch" in r for recs in runs.values() for r in recs) else "iteration")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def plot_alignment(run_dirs: Sequence[str | Path], out: str | Path, size: tuple[int, int] = (640, 400)) -> Path:
    """cos(g_S, g_V) over training for several runs on one figure (the seed paper's Figure 1 style)."""
    runs = {d: read_metrics(d) for d in run_dirs}
    keys = [k for k in ALIGNMENT_KEYS if any(k in r for recs in runs.values() for r in recs)]
    if not keys:
        raise ConfigError("no run logged cos(g_S, g_V): only Agnostic-SAM runs (optimizer or outer rule) record it")
    return plot_runs(run_dirs, out, keys=keys, size=size)
