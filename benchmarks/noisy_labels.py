"""The seed paper's label-noise experiment at CPU scale, on scikit-learn's digits.

Grid: noise {0.2, 0.4, 0.6, 0.8} × {SGD, SAM, ASAM, Agnostic-SAM, Agnostic-ASAM} × 3 seeds.
Radii are tuned first on the validation split (carved from the training set, labels as noisy as the
training labels: what a practitioner would have), at noise 0.4 with a tuning seed that is not one of
the reported seeds; the test set is never looked at while choosing. Runs are interleaved (seed, noise,
optimizer) so that the per-step time of each optimizer, reported as a ratio to SGD, is measured under
the same machine load in the same process.

    python benchmarks/noisy_labels.py                      # full grid, writes docs/results/noisy_labels.md
    python benchmarks/noisy_labels.py --quick --out /tmp/x.md   # a 1-minute smoke run
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from metasam.data.supervised import load_digits_splits
from metasam.train.supervised import OPTIMIZERS, SupervisedConfig, train_supervised

RADII = {  # tuning grids for rho (SAM/ASAM) and rho1 (Agnostic; rho2 = rho1 / 2, the paper's rule)
    "sam": [0.02, 0.05, 0.1, 0.2],
    "asam": [0.2, 0.5, 1.0, 2.0],
    "agnostic-sam": [0.02, 0.05, 0.1, 0.2],
    "agnostic-asam": [0.2, 0.5, 1.0, 2.0],
}
NAMES = {"sgd": "SGD", "sam": "SAM", "asam": "ASAM", "agnostic-sam": "Agnostic-SAM", "agnostic-asam": "Agnostic-ASAM"}


def run(optimizer: str, noise: float, seed: int, epochs: int, rho1: float | None, splits) -> dict:
    cfg = SupervisedConfig(optimizer=optimizer, label_noise=noise, seed=seed, epochs=epochs, rho1=rho1)
    return train_supervised(cfg, progress=False, splits=splits)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8])
    parser.add_argument("--tune-noise", type=float, default=0.4)
    parser.add_argument("--tune-seed", type=int, default=100)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs/results/noisy_labels.md"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 epochs, 1 seed, 2 noise levels, 2 radii")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.epochs, args.seeds, args.noise = 2, [0], [0.2, 0.8]
        radii = {k: v[1:3] for k, v in RADII.items()}
    else:
        radii = RADII
    started = time.time()
    splits_of = {seed: load_digits_splits(seed=seed) for seed in {*args.seeds, args.tune_seed}}

    # 1. tune radii on the validation split
    tuning: dict[str, list[tuple[float, float]]] = {}
    for name, grid in radii.items():
        for rho in grid:
            r = run(name, args.tune_noise, args.tune_seed, args.epochs, rho, splits_of[args.tune_seed])
            tuning.setdefault(name, []).append((rho, r["val_acc"]))
            print(f"tune {name:14s} rho={rho:<5} val_acc={r['val_acc']:.4f}", flush=True)
    chosen = {name: max(results, key=lambda t: t[1])[0] for name, results in tuning.items()}
    chosen["sgd"] = None

    # 2. the grid, interleaved
    acc: dict[tuple[str, float], list[float]] = {}
    step_time: dict[str, list[float]] = {}
    for seed in args.seeds:
        for noise in args.noise:
            for name in OPTIMIZERS:
                r = run(name, noise, seed, args.epochs, chosen[name], splits_of[seed])
                acc.setdefault((name, noise), []).append(100 * r["test_acc"])
                step_time.setdefault(name, []).append(r["seconds_per_step"])
                print(f"seed {seed} noise {noise} {name:14s} test_acc={r['test_acc']:.4f} "
                      f"s/step={r['seconds_per_step']:.4f}", flush=True)
    elapsed = time.time() - started

    lines = [
        "# Label noise on digits: SGD, SAM, ASAM, Agnostic-SAM, Agnostic-ASAM",
        "",
        "The seed paper's label-noise experiment (symmetric noise on the training labels, clean test labels) at",
        "CPU scale: scikit-learn's 8×8 digits (1,797 images; 1,222 train / 216 validation / 359 test, stratified),",
        "`DigitsCNN` (2 conv + BN layers, 2 linear), SGD momentum 0.9, lr 0.05 cosine, weight decay 5e-4, batch 64,",
        f"{args.epochs} epochs; Agnostic-SAM's validation batch B_V: 16 images drawn from the training set (S_V = S), β = 0.9.",
        "Test accuracy (%) after the last epoch, mean ± sd over seeds " + ", ".join(map(str, args.seeds)) + ".",
        "",
        "| noise | " + " | ".join(NAMES[n] for n in OPTIMIZERS) + " |",
        "| --- |" + " --- |" * len(OPTIMIZERS),
    ]
    for noise in args.noise:
        cells = []
        best = max(statistics.mean(acc[(n, noise)]) for n in OPTIMIZERS)
        for n in OPTIMIZERS:
            values = acc[(n, noise)]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cell = f"{statistics.mean(values):.2f} ± {sd:.2f}"
            cells.append(f"**{cell}**" if statistics.mean(values) == best else cell)
        lines.append(f"| {int(noise * 100)} % | " + " | ".join(cells) + " |")
    sgd_time = statistics.median(step_time["sgd"])
    lines += [
        "",
        "## Time per step, as a ratio to SGD measured in the same process",
        "",
        "| optimizer | median s/step | ratio to SGD |",
        "| --- | --- | --- |",
    ]
    for n in OPTIMIZERS:
        t = statistics.median(step_time[n])
        lines.append(f"| {NAMES[n]} | {t * 1000:.1f} ms | {t / sgd_time:.2f}× |")
    lines += [
        "",
        "SAM-type steps cost two forward-backward passes on B_S, Agnostic-SAM one more on the smaller B_V.",
        "",
        f"## Radii, tuned on the validation split (noise {args.tune_noise}, seed {args.tune_seed}; validation labels as noisy as training labels)",
        "",
        "| optimizer | grid: validation accuracy | chosen |",
        "| --- | --- | --- |",
    ]
    for n, results in tuning.items():
        grid = ", ".join(f"{rho}: {100 * v:.1f}" for rho, v in results)
        extra = f" (ρ2 = {chosen[n] / 2})" if n.startswith("agnostic") else ""
        lines.append(f"| {NAMES[n]} | {grid} | ρ{'1' if extra else ''} = {chosen[n]}{extra} |")
    lines += [
        "",
        "## How this was made",
        "",
        f"- command: `python benchmarks/noisy_labels.py {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip() + "",
        f"- date: {datetime.date.today().isoformat()}; wall time {elapsed / 60:.1f} min",
        f"- machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"Python {platform.python_version()}, torch {torch.__version__}, CPU only",
        "- the paper's CIFAR-10 / ResNet-32 numbers are in `../shared/ALGORITHMS.md` §3; this is a much smaller problem",
        "  and its absolute numbers are not comparable, only the ordering of the methods is of interest.",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
