"""``metasam supervised``: train a classifier with SGD / SAM / ASAM / Agnostic-SAM / Agnostic-ASAM under label noise."""

from __future__ import annotations

import argparse
import json

from metasam.errors import ConfigError
from metasam.optim.sam import ASAM_SCOPES
from metasam.train.supervised import DATASETS, OPTIMIZER_PARAMS, OPTIMIZERS, SHARPNESS_PARAMS, SupervisedConfig, train_supervised
from metasam.train.precision import TF32_HELP


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "supervised",
        help="supervised training with a sharpness-aware optimizer (label-noise experiment)",
        description="Train a classifier; symmetric label noise on the training labels only, clean test labels. "
        "Prints the final result as JSON.",
    )
    p.add_argument("--dataset", choices=DATASETS, default="digits", help="digits is offline (scikit-learn's bundled set)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    p.add_argument("--label-noise", type=float, default=0.0, help="fraction of training labels flipped, 0..0.8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--val-batch-size", type=int, default=16, help="size of Agnostic-SAM's validation batch B_V (from the training set)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--rho1", "--rho", dest="rho1", type=float, default=None,
                   help="SAM/ASAM radius rho, Agnostic-SAM's rho1 (default 0.05; 0.5 for the adaptive variants)")
    p.add_argument("--rho2", type=float, default=None, help="Agnostic-SAM's descent radius rho2 (default rho1/2)")
    p.add_argument("--beta", type=float, default=None, help="momentum of Agnostic-SAM's validation gradient (default 0.9)")
    p.add_argument("--eta", type=float, default=None, help="ASAM's eta in T = |theta| + eta (default 0.01)")
    p.add_argument("--asam-scope", choices=ASAM_SCOPES, default=None,
                   help="the tensors ASAM's T scales: all (default, the ASAM paper) or weights (the ASAM authors' code)")
    p.add_argument("--alignment-every", type=int, default=0, metavar="N",
                   help="every N steps log cos(g_S, g_V) before and after the update (two to four more passes "
                   "per logged step); 0 logs none (default). `metasam plot --alignment` draws them")
    p.add_argument("--data-root", default="data", help="folder holding CIFAR (digits needs none)")
    p.add_argument("--download", action="store_true", help="download CIFAR (needs a network)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tf32", action="store_true", help=TF32_HELP)
    p.add_argument("--out", default=None, help="folder for config.json, metrics.jsonl and result.json")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    given = {name: getattr(args, name) for name in SHARPNESS_PARAMS if getattr(args, name) is not None}
    unused = sorted(set(given) - set(OPTIMIZER_PARAMS[args.optimizer]))
    if unused:
        flags = ", ".join("--" + name.replace("_", "-") for name in unused)
        takes = ", ".join("--" + name.replace("_", "-") for name in OPTIMIZER_PARAMS[args.optimizer]) or "none of them"
        raise ConfigError(f"--optimizer {args.optimizer} does not use {flags} (it takes {takes}); drop them or choose "
                          "the optimizer that uses them")
    cfg = SupervisedConfig(
        dataset=args.dataset, optimizer=args.optimizer, label_noise=args.label_noise, seed=args.seed,
        epochs=args.epochs, batch_size=args.batch_size, val_batch_size=args.val_batch_size, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, alignment_every=args.alignment_every,
        data_root=args.data_root, download=args.download, device=args.device, tf32=args.tf32, **given,
    )
    result = train_supervised(cfg, out_dir=args.out, progress=not args.no_progress)
    summary = {k: v for k, v in result.items() if k not in ("history", "alignment")}
    print(json.dumps(summary, indent=2))
    return 0
