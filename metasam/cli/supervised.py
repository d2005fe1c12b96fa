"""``metasam supervised``: train a classifier with SGD / SAM / ASAM / Agnostic-SAM / Agnostic-ASAM under label noise."""

from __future__ import annotations

import argparse
import json

from metasam.cli.flags import add
from metasam.errors import ConfigError
from metasam.optim.base import ASAM_SCOPES
from metasam.train.supervised import DATASETS, OPTIMIZER_PARAMS, OPTIMIZERS, SHARPNESS_PARAMS, SupervisedConfig, train_supervised
from metasam.train.precision import TF32_HELP


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "supervised",
        help="supervised training with a sharpness-aware optimizer (label-noise experiment)",
        description="Train a classifier; symmetric label noise on the training labels only, clean test labels. "
        "Prints the final result as JSON.",
    )
    add(p, "--dataset", choices=DATASETS, default="digits", help="digits is offline (scikit-learn's bundled set)")
    add(p, "--optimizer", choices=OPTIMIZERS, default="sgd", help="the optimizer, over SGD with momentum")
    add(p, "--label-noise", type=float, default=0.0, help="fraction of training labels flipped, 0..0.8")
    add(p, "--seed", type=int, default=0, help="seeds the split, the noisy labels, the weights and the batches")
    add(p, "--epochs", type=int, default=30, help="passes over the training set")
    add(p, "--batch-size", type=int, default=64, help="size of the training batch B_S")
    add(p, "--val-batch-size", type=int, default=16, help="size of Agnostic-SAM's validation batch B_V (from the training set)")
    add(p, "--lr", type=float, default=0.05, help="learning rate of SGD (cosine schedule over all steps)")
    add(p, "--momentum", type=float, default=0.9, help="SGD momentum")
    add(p, "--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    add(p, "--rho1", "--rho", dest="rho1", type=float, default=None,
                   help="SAM/ASAM radius rho, Agnostic-SAM's rho1 (default 0.05; 0.5 for the adaptive variants)")
    add(p, "--rho2", type=float, default=None, help="Agnostic-SAM's descent radius rho2 (default rho1/2)")
    add(p, "--beta", type=float, default=None, help="momentum of Agnostic-SAM's validation gradient (default 0.9)")
    add(p, "--eta", type=float, default=None, help="ASAM's eta in T = |theta| + eta (default 0.01)")
    add(p, "--asam-scope", choices=ASAM_SCOPES, default=None,
                   help="the tensors ASAM's T scales: all (default, the ASAM paper) or weights (the ASAM authors' code)")
    add(p, "--alignment-every", type=int, default=0, metavar="N",
                   help="every N steps log cos(g_S, g_V) before and after the update (four more "
                   "forward-backward passes per logged step); 0 logs none (default). `metasam plot --alignment` draws them")
    add(p, "--data-root", default="data", help="folder holding CIFAR (digits needs none)")
    add(p, "--download", action="store_true", help="download CIFAR (needs a network)")
    add(p, "--device", default="cpu", help="cpu, cuda or cuda:N")
    add(p, "--tf32", action="store_true", help=TF32_HELP)
    add(p, "--out", default=None, help="folder for config.json, metrics.jsonl, model.pt and result.json (default: none, print only)")
    add(p, "--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    result = train_supervised(config_of(args), out_dir=args.out, progress=not args.no_progress)
    summary = {k: v for k, v in result.items() if k not in ("history", "alignment")}
    print(json.dumps(summary, indent=2))
    return 0


def config_of(args: argparse.Namespace) -> SupervisedConfig:
    """The run the flags describe (checked: see :class:`SupervisedConfig`); a sharpness flag the optimizer does
    not use is refused."""
    given = {name: getattr(args, name) for name in SHARPNESS_PARAMS if getattr(args, name) is not None}
    unused = sorted(set(given) - set(OPTIMIZER_PARAMS[args.optimizer]))
    if unused:
        flags = ", ".join("--" + name.replace("_", "-") for name in unused)
        takes = ", ".join("--" + name.replace("_", "-") for name in OPTIMIZER_PARAMS[args.optimizer]) or "none of them"
        raise ConfigError(f"--optimizer {args.optimizer} does not use {flags} (it takes {takes}); drop them or choose "
                          "the optimizer that uses them")
    return SupervisedConfig(
        dataset=args.dataset, optimizer=args.optimizer, label_noise=args.label_noise, seed=args.seed,
        epochs=args.epochs, batch_size=args.batch_size, val_batch_size=args.val_batch_size, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, alignment_every=args.alignment_every,
        data_root=args.data_root, download=args.download, device=args.device, tf32=args.tf32, **given,
    )
