"""The settings of a meta-training run: :class:`MetaTrainConfig`, its standard values, and checks of the
settings that need no data (types, ranges, the device), so that a bad one fails before anything loads."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import torch

from metasam.data.val_views import VAL_VIEWS, ValView, check_val_view, make_val_view
from metasam.errors import CheckpointError, ConfigError
from metasam.meta import PRESETS
from metasam.meta.arguments import check_hparams, check_task_threads
from metasam.meta.presets import preset_rules
from metasam.meta.rules import RULES, Rule, rule_from_spec, rule_spec
from metasam.models.conv4 import MIN_IMAGE_SIZE
from metasam.train.precision import TF32_HELP

# the standard settings of docs/algorithms.md §3: (inner_lr, inner_steps, test_inner_steps, meta_batch)
STANDARD = {
    ("omniglot", 5): (0.4, 1, 3, 32),
    ("omniglot", 20): (0.1, 5, 5, 16),
    ("miniimagenet", 5): (0.01, 5, 10, 4),
}
DEFAULT_SPLITS = {
    "omniglot": ("background", None, "evaluation"),
    "miniimagenet": ("train", "val", "test"),
    "glyphs": ("train", "val", "test"),
    "folder": ("train", "val", "test"),
}
FAMILY = {"glyphs": "omniglot", "folder": "miniimagenet"}
"""The dataset whose standard settings (STANDARD, image size, filters) a dataset without its own takes."""
RESUME_OVERRIDES = ("skip_nonfinite", "iterations", "task_threads")
"""Settings ``--resume`` may change: what happens on a failure, how long the run goes on (meta-batch i
is the same for any number of iterations) and how a step's tasks are spread over threads (rounding only),
not what a step computes."""
STANDARD_HELP = "default: the standard setting of the dataset and ways, docs/algorithms.md"


def threads_or_auto(text: str) -> int | str:
    """``--task-threads``'s value: "auto" or a number of threads."""
    return text if text == "auto" else int(text)


def option(default: Any, help: str, **flag: Any) -> Any:
    """A run setting with its command-line help and argparse extras (``choices``, ``metavar``): ``metasam train``
    and ``metasam bench`` generate the flag ``--<name>`` from the field (metasam/cli/flags.py), so a setting has
    one name, type, default and help text everywhere. Fields without help have no flag."""
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass
class MetaTrainConfig:
    """Everything that defines a meta-training run. None fields take the standard setting of the
    dataset and ways (docs/algorithms.md §3). ``inner_rule`` / ``outer_rule`` are the preset's rules
    themselves (:class:`~metasam.meta.rules.SAMRule`, :class:`~metasam.meta.rules.AgnosticRule`, ...), or
    their plain-data spec as config.json stores it; None: the rule with its defaults. ``val_view``: the agnostic
    inner rule's validation view (:mod:`metasam.data.val_views`; "support" is the seed paper's). A field with
    help text is also a flag of ``metasam train`` and ``metasam bench`` (:func:`option`)."""

    dataset: str = option("glyphs", "glyphs is synthetic and offline (rendered from fonts); folder is your own images, "
                          "DATA_ROOT/<split>/<class>/<image> (RGB, 84², MiniImageNet's standard settings; docs/data.md)",
                          choices=tuple(DEFAULT_SPLITS))
    data_root: str | None = option(None, "folder holding the dataset (default: $METASAM_DATA)")
    ways: int = option(5, "classes per task (N)")
    shots: int = option(1, "support images per class (K)")
    queries: int = option(15, "query images per class")
    algo: str = option("maml", "the inner and outer rules (docs/algorithms.md)", choices=tuple(PRESETS))
    iterations: int = option(1000, "outer steps (the papers train 60,000); with train --resume: continue the run to N")
    meta_batch: int | None = option(None, f"tasks per outer step ({STANDARD_HELP})")
    inner_lr: float | None = option(None, f"α, the inner step size ({STANDARD_HELP})")
    learn_inner_lr: bool = option(
        False, "Meta-SGD (Li et al. 2017): learn α per parameter entry, starting at --inner-lr, beside θ, and adapt "
        "with it at training and test (docs/meta.md)")
    adapt: str = option(
        "all", "the parameters the inner loop adapts: all (MAML), or head, the last linear layer alone (ANIL, Raghu "
        "et al. 2020: the body is meta-learned through the query loss but not adapted)", choices=("all", "head"))
    inner_steps: int | None = option(None, f"inner steps while training ({STANDARD_HELP})")
    test_inner_steps: int | None = option(None, f"inner steps at validation and test ({STANDARD_HELP})")
    first_order: bool | None = option(
        None, "drop second-order terms of the meta-gradient (default: the algorithm's; fomaml is first order)")
    outer_lr: float = option(1e-3, "Adam's step size for θ")
    test_rule: str = option("same", "inner rule at validation and meta-test time, so it also decides which checkpoint "
                            "becomes best.pt", choices=("same", "gd"))
    train_split: str | None = option(None, "meta-training split (default: background / train; see docs/data.md)")
    val_split: str | None = option(None, "validation split (default: val, or a seeded tenth of the training classes)")
    test_split: str | None = option(None, "split `metasam evaluate` uses (default: evaluation / test)")
    val_every: int = option(100, "iterations between validations (and checkpoints)")
    val_tasks: int = option(100, "tasks of the fixed validation set")
    image_size: int | None = option(
        None, "images resized to N×N (default: 28 for Omniglot and glyphs, 84 for MiniImageNet and folder)", metavar="N")
    hidden: int | None = option(None, "Conv-4's filters per layer (default: 64 for Omniglot and glyphs, 32 for "
                                "MiniImageNet and folder; ResNet-12's widths are fixed)", metavar="N")
    model: str = option("conv4", "resnet12 is meant for GPUs", choices=("conv4", "resnet12"))
    seed: int = option(0, "seeds the model, the tasks and the validation set")
    device: str = option("cpu", "cpu, cuda, cuda:N or mps")
    path: str = option("auto", "how tasks of a meta-batch are run", choices=("auto", "loop", "vmap"))
    task_threads: int | str = option(
        "auto", "threads that share the tasks of a meta-batch on the loop path, each running its tasks with one "
        "intra-op thread: N, or auto (torch's thread count on a CPU; 1 on a GPU, on the vmap path and for models "
        "that draw random numbers); 1 runs one task at a time. Also allowed with train --resume (it changes "
        "rounding only); docs/performance.md", type=threads_or_auto, metavar="N|auto")
    inner_rule: Rule | None = None
    outer_rule: Rule | None = None
    skip_nonfinite: int = option(
        0, "skip up to N steps whose loss or gradient is NaN/Inf (θ unchanged, counted in metrics.jsonl) before "
        "stopping. Also allowed with train --resume", metavar="N")
    outer_val_tasks: int | None = option(
        None, "tasks in each validation meta-batch of the agnostic outer rule and of --alignment-every (default: "
        "--meta-batch; the seed paper's validation batches are a quarter of the training batch)", metavar="V")
    alignment_every: int = option(
        0, "every N iterations log cos(g_S, g_V) before and after the update at the outer level (meta-batch vs "
        "validation meta-batch) and the inner level (support vs query), four more meta-gradients plus the inner "
        "gradients of every task and inner step per logged iteration; 0 logs none. `metasam plot --alignment` "
        "draws them", metavar="N")
    tf32: bool = option(False, TF32_HELP)
    val_view: str = option(
        "support", "the agnostic inner rule's validation view of a support set: support (the seed paper's: the "
        "support set itself), split (NOT the paper's; K >= 2: half of each class's shots) or augment (NOT the "
        "paper's: the support images shifted by a few pixels); docs/bench.md", choices=VAL_VIEWS)

    def __post_init__(self) -> None:
        for level in ("inner_rule", "outer_rule"):  # config.json's form of a rule: its spec
            if isinstance(getattr(self, level), dict):
                setattr(self, level, rule_from_spec(getattr(self, level), level.removesuffix("_rule")))
        check_types(self)
        if self.dataset not in DEFAULT_SPLITS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DEFAULT_SPLITS)}")
        if self.algo not in PRESETS:
            raise ConfigError(f"unknown --algo {self.algo!r}; choose one of {', '.join(PRESETS)}")
        for name in ("ways", "shots", "queries", "iterations", "val_every", "val_tasks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.model not in ("conv4", "resnet12"):
            raise ConfigError(f"unknown --model {self.model!r}; choose conv4 or resnet12")
        if self.ways < 2:
            raise ConfigError(f"--ways must be >= 2, got {self.ways}")
        self._check_rules()
        check_val_view(self.val_view, self.shots)
        if self.val_view != "support" and PRESETS[self.algo].inner != "agnostic":
            raise ConfigError(f"--val-view {self.val_view} changes the agnostic inner rule's validation view, and {self.algo}'s "
                              f"inner rule is {PRESETS[self.algo].inner!r}; drop --val-view, or use agnostic-sam(-both)")
        family = FAMILY.get(self.dataset, self.dataset)
        # the nearest standard setting: Omniglot's 20-way one above 5 ways, MiniImageNet's 5-way one
        lr, steps, test_steps, batch = STANDARD[(family, 20 if family == "omniglot" and self.ways > 5 else 5)]
        if family == "miniimagenet" and self.shots >= 5:
            batch = 2
        self.inner_lr = lr if self.inner_lr is None else self.inner_lr
        self.inner_steps = steps if self.inner_steps is None else self.inner_steps
        self.test_inner_steps = test_steps if self.test_inner_steps is None else self.test_inner_steps
        self.meta_batch = batch if self.meta_batch is None else self.meta_batch
        self.outer_val_tasks = self.meta_batch if self.outer_val_tasks is None else self.outer_val_tasks
        self.image_size = (84 if family == "miniimagenet" else 28) if self.image_size is None else self.image_size
        standard_hidden = 32 if family == "miniimagenet" else 64
        if self.model == "resnet12" and self.hidden not in (None, standard_hidden):
            raise ConfigError(f"--hidden sets Conv-4's filters and ResNet-12's widths are fixed (64-160-320-640); "
                              f"drop --hidden {self.hidden}, or use --model conv4")
        self.hidden = standard_hidden if self.hidden is None else self.hidden
        train, val, test = DEFAULT_SPLITS[self.dataset]
        self.train_split = self.train_split or train
        self.val_split = self.val_split if self.val_split is not None else val
        self.test_split = self.test_split if self.test_split is not None else test
        for name, low in (("meta_batch", 1), ("outer_val_tasks", 1), ("seed", 0), ("skip_nonfinite", 0), ("alignment_every", 0),
                          ("image_size", MIN_IMAGE_SIZE), ("hidden", 1)):
            check_int(name, getattr(self, name), low)
        check_task_threads(self.task_threads, "--task-threads")
        check_hparams(self.algo, self.inner_lr, self.inner_steps, self.test_inner_steps, self.outer_lr,
                      self.test_rule, self.path)

    def _check_rules(self) -> None:
        """Fill unset rules with the preset's defaults; refuse a rule of another kind than the preset's."""
        default_inner, default_outer = preset_rules(self.algo)
        preset = PRESETS[self.algo]
        for level, kind, default in (("inner", preset.inner, default_inner), ("outer", preset.outer, default_outer)):
            rule = getattr(self, f"{level}_rule")
            if rule is None:
                setattr(self, f"{level}_rule", default)
            elif type(rule) is not RULES[kind]:
                raise ConfigError(f"{self.algo} does not use a {type(rule).__name__} as its {level} rule: it takes a "
                                  f"{RULES[kind].__name__} ({kind!r}); choose the algo whose rules you mean")

    def validation_view(self) -> ValView | None:
        """The agnostic inner rule's validation view that ``val_view`` names, seeded by the run's seed (None: the
        support set itself, the seed paper's choice); :func:`metasam.data.val_views.make_val_view`."""
        return make_val_view(self.val_view, self.ways, self.shots, self.seed)

    def to_dict(self) -> dict[str, Any]:
        """The settings as config.json holds them (the rules as their specs); ``MetaTrainConfig(**d)`` reads them."""
        return {**asdict(self), "inner_rule": rule_spec(self.inner_rule), "outer_rule": rule_spec(self.outer_rule)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MetaTrainConfig":
        """:meth:`to_dict`'s output back, also in the form of metasam 0.1's runs (their rule settings in one
        ``rule`` dict of ``inner_rho1``-style keys)."""
        data = dict(data)
        legacy = data.pop("rule", None)
        if legacy:
            preset = PRESETS.get(data.get("algo", "maml"))
            if preset is None:
                raise ConfigError(f"unknown algo {data.get('algo')!r}; choose one of {', '.join(PRESETS)}")
            for level, kind in (("inner", preset.inner), ("outer", preset.outer)):
                params = {k.partition("_")[2]: v for k, v in legacy.items() if k.startswith(level + "_")}
                data[f"{level}_rule"] = {"kind": kind, "params": params}
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "MetaTrainConfig":
        """Read a run's config.json (or a run folder) back."""
        path = Path(path)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise CheckpointError(f"{path} does not exist: not a metasam run folder")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path} is not valid JSON ({exc}); restore it from a copy of the run folder") from exc
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} does not hold a metasam configuration (a JSON object)")
        unknown = sorted(set(data) - {f.name for f in fields(cls)} - {"rule"})
        if unknown:
            raise CheckpointError(f"{path} has settings this metasam does not know: {unknown}; was it written by a newer version?")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:  # the file's keys (meta_batch), not the flags that set them (--meta-batch)
            raise CheckpointError(f"{path}: {as_keys(str(exc))}; correct it there") from exc


def as_flags(text: str) -> str:
    """``text`` with the settings it names (inner_lr, outer_rho1, ...) spelled as ``metasam train``'s flags
    (--inner-lr, --outer-rho1): the library names a setting as its argument, the command line as its flag."""
    return re.sub(r"\b(test_inner_steps|test_rule|(?:inner|outer)_[a-z0-9_]+)\b", lambda m: "--" + m[1].replace("_", "-"), text)


def as_keys(text: str) -> str:
    """``text`` with the flags it names (--meta-batch, --inner-lr) spelled as the settings' keys in config.json
    (meta_batch, inner_lr): the inverse of :func:`as_flags`."""
    return re.sub(r"--([a-z0-9-]+)", lambda m: m[1].replace("-", "_"), text)


def check_int(name: str, value: Any, low: int = 1) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an int ≥ ``low``; ``name`` is the setting (``meta_batch``
    is reported as ``--meta-batch``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"--{name.replace('_', '-')} must be an int >= {low}, got {value!r}")


def check_types(cfg: Any) -> None:
    """Raise :class:`ConfigError` naming the first field of dataclass ``cfg`` whose value does not have the
    field's declared type (``float`` fields take ints too; no field takes a bool for a number)."""
    hints = get_type_hints(type(cfg))
    for f in fields(cfg):
        value, allowed = getattr(cfg, f.name), _types_of(hints[f.name])
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed if t is not int or float not in allowed)
            raise ConfigError(f"{f.name} must be {names}, got {value!r} ({type(value).__name__})")


def _types_of(hint: Any) -> tuple[type, ...]:
    """The runtime types a field annotation admits: ``float | None`` → (float, int, NoneType)."""
    if get_origin(hint) in (Union, UnionType):
        return tuple(t for arg in get_args(hint) for t in _types_of(arg))
    hint = get_origin(hint) or hint
    return (float, int) if hint is float else (hint,)


CHANNELS = {"omniglot": 1, "glyphs": 1, "miniimagenet": 3, "folder": 3}


def check_meta_batch_memory(cfg: MetaTrainConfig, memory: int | None = None) -> None:
    """Refuse a meta-batch whose float32 images alone would fill more than half of ``memory`` bytes (default:
    this machine's physical memory); the activations of a step need many times more."""
    memory = memory or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    images = cfg.meta_batch * cfg.ways * (cfg.shots + cfg.queries) * CHANNELS[cfg.dataset] * cfg.image_size ** 2 * 4
    if images > memory / 2:
        raise ConfigError(
            f"--meta-batch {cfg.meta_batch}: the images of one meta-batch alone take {images / 2**30:.1f} GiB, more than "
            f"half of this machine's {memory / 2**30:.1f} GiB of memory; lower --meta-batch")


DEVICES = ("cpu", "cuda", "mps")


def check_device(device: str) -> None:
    """Refuse a device string torch cannot parse, a kind of device metasam does not run on, or one that
    this PyTorch cannot reach (before any data is loaded)."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N") from exc
    if kind not in DEVICES:
        raise ConfigError(f"--device {device}: metasam runs on {', '.join(DEVICES)}; use --device cpu or cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} but this PyTorch sees no CUDA device; use --device cpu")
    if kind == "cuda" and torch.device(device).index is not None and torch.device(device).index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                          f"use cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device} but this PyTorch sees no MPS (Apple GPU) device; use --device cpu")
