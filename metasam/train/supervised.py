"""Supervised training with SGD, SAM, ASAM, Agnostic-SAM or Agnostic-ASAM, with optional label noise.

This is the seed paper's label-noise experiment: symmetric noise on the training labels only, a clean
test set, and for Agnostic-SAM a validation batch B_V drawn from the same (noisy) training set
(S_V = S: no data is held out for it).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from metasam.analysis.alignment import gradient_cosine
from metasam.atomic_write import save_atomic, write_text_atomic
from metasam.checkpoint import content_digest
from metasam.core import ASAM_ETA, check_nonnegative
from metasam.data.label_noise import symmetric_label_noise
from metasam.data.supervised import SupervisedSplits, load_cifar_splits, load_digits_splits
from metasam.errors import ConfigError
from metasam.models import DigitsCNN, resnet18_cifar
from metasam.optim import SAM, AgnosticSAM
from metasam.optim.base import ASAM_SCOPES
from metasam.train.precision import use_tf32

OPTIMIZERS = ("sgd", "sam", "asam", "agnostic-sam", "agnostic-asam")
DATASETS = ("digits", "cifar10", "cifar100")
DEFAULT_RHO1 = {"sgd": 0.0, "sam": 0.05, "asam": 0.5, "agnostic-sam": 0.05, "agnostic-asam": 0.5}
SHARPNESS_PARAMS = ("rho1", "rho2", "beta", "eta", "asam_scope")
OPTIMIZER_PARAMS = {
    "sgd": (),
    "sam": ("rho1",),
    "asam": ("rho1", "eta", "asam_scope"),
    "agnostic-sam": ("rho1", "rho2", "beta"),
    "agnostic-asam": SHARPNESS_PARAMS,
}
"""The sharpness hyperparameters (fields of :class:`SupervisedConfig`) each optimizer uses; the CLI refuses the others."""


@dataclass
class SupervisedConfig:
    """Everything that defines a supervised run; saved as config.json beside its results.

    ``rho1`` is ρ of SAM/ASAM and ρ1 of Agnostic-SAM/ASAM (None: 0.05, or 0.5 for the adaptive
    variants); ``rho2`` is Agnostic-SAM's ρ2 (None: ρ1 / 2). ``val_batch_size`` is the size of B_V.
    ``asam_scope``: the tensors ASAM's T = |θ| + η scales ("all", or "weights" as the ASAM authors' code).
    ``alignment_every``: every that many steps, log cos(g_S, g_V) before and after the update on the
    step's own batches (B_V drawn as Agnostic-SAM draws it, for every optimizer); 0 logs none.
    """

    dataset: str = "digits"
    optimizer: str = "sgd"
    label_noise: float = 0.0
    seed: int = 0
    epochs: int = 30
    batch_size: int = 64
    val_batch_size: int = 16
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    rho1: float | None = None
    rho2: float | None = None
    beta: float = 0.9
    eta: float = ASAM_ETA
    asam_scope: str = "all"
    alignment_every: int = 0
    data_root: str = "data"
    download: bool = False
    device: str = "cpu"
    tf32: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        if not 0.0 <= self.label_noise <= 0.8 + 1e-12:
            raise ConfigError(f"--label-noise must lie in [0, 0.8], got {self.label_noise}")
        for name in ("epochs", "batch_size", "val_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.alignment_every < 0:
            raise ConfigError(f"--alignment-every must be >= 0 (0: no alignment log), got {self.alignment_every}")
        if self.asam_scope not in ASAM_SCOPES:
            raise ConfigError(f"--asam-scope must be one of {', '.join(ASAM_SCOPES)}, got {self.asam_scope!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a finite number > 0, got {self.lr}")
        check_nonnegative(self.weight_decay, "--weight-decay")
        check_nonnegative(self.eta, "--eta")
        for name in ("momentum", "beta"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.rho1 is None:
            self.rho1 = DEFAULT_RHO1[self.optimizer]
        if self.rho2 is None:
            self.rho2 = self.rho1 / 2
        check_nonnegative(self.rho1, "--rho1")
        check_nonnegative(self.rho2, "--rho2")


def make_optimizer(cfg: SupervisedConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names, over SGD with momentum and weight decay."""
    base = dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    adaptive = cfg.optimizer.endswith("asam")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), **base)
    sharpness = dict(adaptive=adaptive, eta=cfg.eta, asam_scope=cfg.asam_scope, model=model, **base)
    if cfg.optimizer in ("sam", "asam"):
        return SAM(model.parameters(), torch.optim.SGD, rho=cfg.rho1, **sharpness)
    return AgnosticSAM(model.parameters(), torch.optim.SGD, rho1=cfg.rho1, rho2=cfg.rho2, beta=cfg.beta, **sharpness)


def load_splits(cfg: SupervisedConfig) -> SupervisedSplits:
    if cfg.dataset == "digits":
        return load_digits_splits(seed=cfg.seed)
    return load_cifar_splits(cfg.data_root, num_classes=int(cfg.dataset[5:]), download=cfg.download, seed=cfg.seed)


def make_model(cfg: SupervisedConfig, num_classes: int) -> nn.Module:
    return DigitsCNN(num_classes) if cfg.dataset == "digits" else resnet18_cifar(num_classes)


def _batches(n: int, size: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Endless shuffled index batches (a new permutation each pass); the last short batch is dropped
    when a full one exists, so BatchNorm never sees a batch of one."""
    while True:
        perm = torch.randperm(n, generator=gen)
        stop = n - n % size if n >= size else n
        for start in range(0, stop, size):
            yield perm[start : start + size]


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """CIFAR's standard augmentation, drawn per image: reflect-pad 4, a random h×w crop (offsets dy, dx in
    0 … 8), a horizontal flip with probability 1/2."""
    n, c, h, w = x.shape
    padded = nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    dy, dx = torch.randint(0, 9, (2, n), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (n, 1, h, 1): image i's rows dy_i … dy_i + h − 1
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in evaluation mode (BatchNorm running statistics)."""
    model.eval()
    correct = sum(
        (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item() for i in range(0, len(x), batch_size)
    )
    model.train()
    return correct / len(x)


def train_supervised(
    cfg: SupervisedConfig,
    out_dir: str | Path | None = None,
    progress: bool = True,
    splits: SupervisedSplits | None = None,
) -> dict[str, Any]:
    """Train ``cfg``'s model and return the result (test accuracy on clean labels, history, timings).

    With ``out_dir``: writes config.json, metrics.jsonl (one line per epoch, and with ``alignment_every``
    one per aligned step: ``step``, ``cos_before``, ``cos_after``), model.pt (final weights, a plain
    state_dict) and result.json (with ``model_sha256``, model.pt's content hash), each atomically.
    ``splits`` lets a caller (a benchmark) reuse loaded data across runs.
    """
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        if (out / "result.json").exists() or (out / "metrics.jsonl").exists():
            raise ConfigError(f"{out} already holds a run (result.json / metrics.jsonl); choose another --out folder")
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(asdict(cfg), indent=2), out / "config.json")
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    use_tf32(cfg.tf32)
    splits = splits or load_splits(cfg)
    (x, y_clean), (xv, yv_clean), (xt, yt) = splits.train, splits.val, splits.test
    y = symmetric_label_noise(y_clean, cfg.label_noise, splits.num_classes, seed=cfg.seed + 1)
    yv = symmetric_label_noise(yv_clean, cfg.label_noise, splits.num_classes, seed=cfg.seed + 2)
    x, y, xv, yv, xt, yt = (t.to(device) for t in (x, y, xv, yv, xt, yt))
    model = make_model(cfg, splits.num_classes).to(device)
    opt = make_optimizer(cfg, model)
    steps_per_epoch = max(1, len(x) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_batches = _batches(len(x), cfg.batch_size, gen)
    val_batches = _batches(len(x), cfg.val_batch_size, torch.Generator().manual_seed(cfg.seed + 3))
    diagnostic_gen = torch.Generator().manual_seed(cfg.seed + 4)
    augment = cfg.dataset != "digits"

    def loss_on(idx: Tensor, augment_gen: torch.Generator) -> Callable[[], Tensor]:
        """The loss of batch ``idx`` (augmented once, here: every call sees the same inputs)."""
        inputs = _augment(x[idx], augment_gen) if augment else x[idx]
        return lambda: nn.functional.cross_entropy(model(inputs), y[idx])

    def closure_of(loss_fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
        def closure() -> Tensor:
            loss = loss_fn()
            loss.backward()
            return loss

        return closure

    history, alignment, step_seconds = [], [], 0.0
    bar = tqdm(range(cfg.epochs), desc=f"{cfg.optimizer} noise={cfg.label_noise}", disable=not progress, unit="epoch")
    for epoch in bar:
        losses, cosines, aligned = [], [], []
        for step in range(epoch * steps_per_epoch + 1, (epoch + 1) * steps_per_epoch + 1):
            train_loss = loss_on(next(train_batches), gen)
            closure = closure_of(train_loss)
            aligned_step = cfg.alignment_every > 0 and step % cfg.alignment_every == 0
            val_loss = None
            if isinstance(opt, AgnosticSAM):
                val_loss = loss_on(next(val_batches), gen)
            elif aligned_step:  # B_V for the diagnostic alone: its own random streams, so training runs as without it
                val_loss = loss_on(next(val_batches), diagnostic_gen)
            cos_before = gradient_cosine(model, train_loss, val_loss) if aligned_step else None
            start = time.perf_counter()
            if isinstance(opt, AgnosticSAM):
                loss = opt.step(closure, closure_of(val_loss))
                cosines.append(opt.last_stats["cos_train_val"].item())
            elif isinstance(opt, SAM):
                loss = opt.step(closure)
            else:
                opt.zero_grad()
                loss = closure()
                if not torch.isfinite(loss):
                    raise ConfigError(f"epoch {epoch}: the loss is not finite; lower --lr")
                opt.step()
            sched.step()
            step_seconds += time.perf_counter() - start
            losses.append(loss.item())
            if cos_before is not None:
                aligned.append({"step": step, "cos_before": cos_before, "cos_after": gradient_cosine(model, train_loss, val_loss)})
        record = {
            "epoch": epoch + 1,
            "train_loss": sum(losses) / len(losses),
            "val_acc": accuracy(model, xv, yv),
            "test_acc": accuracy(model, xt, yt),
        }
        if cosines:
            record["cos_train_val"] = sum(cosines) / len(cosines)
        history.append(record)
        alignment.extend(aligned)
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", test=f"{record['test_acc']:.3f}")
        if out is not None:
            with open(out / "metrics.jsonl", "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in [*aligned, record]))
    steps = cfg.epochs * steps_per_epoch
    result = {
        "config": asdict(cfg),
        "test_acc": history[-1]["test_acc"],
        "val_acc": history[-1]["val_acc"],
        "train_loss": history[-1]["train_loss"],
        "seconds_per_step": step_seconds / steps,
        "steps": steps,
        "history": history,
        "alignment": alignment,
    }
    if not math.isfinite(result["train_loss"]):
        raise ConfigError("training ended with a non-finite loss; lower --lr or --rho1")
    if out is not None:
        state = model.state_dict()
        result["model_sha256"] = content_digest(state)  # model.pt stays a plain state_dict; analyze checks it
        save_atomic(state, out / "model.pt")
        write_text_atomic(json.dumps(result, indent=2), out / "result.json")
    return result
