"""Turn the CLI's split names into class-disjoint few-shot datasets.

Split grammar (``--train-split`` / ``--val-split`` / ``--test-split``):
- omniglot: ``background`` | ``evaluation`` | a subset name (``images_background_small1``, ...), optionally
  followed by ``:ALPHABET,ALPHABET`` to keep only those alphabets; or a bare comma list of alphabets,
  looked up in every subset present under the data root.
- miniimagenet: ``train`` | ``val`` | ``test`` (Ravi & Larochelle).
- glyphs (synthetic): ``train`` | ``val`` | ``test``, a seeded 70 / 10 / 20 % split of its characters, or a
  comma list of scripts.
- folder (your own images): a folder under the data root, ``<root>/<split>/<class>/<image>`` (default ``train``,
  ``val``, ``test``), or an absolute path, read as RGB.
Without a validation split a seeded tenth of the training classes (by source class, so all rotations
of a character together) is held out, so checkpoints are never chosen on the test split.
"""

from __future__ import annotations

from pathlib import Path

from metasam.data import FewShotDataset, Glyphs, ImageFolderClasses, MiniImageNet, Omniglot, character_split, check_disjoint
from metasam.data.omniglot import SUBSETS
from metasam.data._roots import find_root
from metasam.errors import ConfigError, DatasetError

OMNIGLOT_ALIASES = {"background": "images_background", "evaluation": "images_evaluation"}
GLYPH_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}
SPLIT_SEED = 0


def _omniglot(root: str | None, spec: str, image_size: int) -> FewShotDataset:
    subset_part, _, alphabet_part = spec.partition(":")
    subset_part = OMNIGLOT_ALIASES.get(subset_part, subset_part)
    if subset_part in SUBSETS:
        subsets, alphabets = [subset_part], alphabet_part or None
    elif not alphabet_part:
        folders = find_root(root, "omniglot", "Omniglot")
        subsets = [s for s in SUBSETS if any((f / s).is_dir() or (f / f"{s}.zip").is_file() for f in folders)]
        alphabets = subset_part
        if not subsets:
            raise DatasetError(f"Omniglot: no subset ({', '.join(SUBSETS)}) found under {folders[0]}; put the zips there")
    else:
        raise ConfigError(f"unknown Omniglot subset {subset_part!r}; choose background, evaluation or one of {SUBSETS}")
    names = [a.strip() for a in alphabets.split(",") if a.strip()] if alphabets else None
    return Omniglot(root, subset=subsets, image_size=image_size, alphabets=names)


def _glyphs(spec: str, image_size: int) -> FewShotDataset:
    if spec in GLYPH_FRACTIONS:
        full = Glyphs(image_size=image_size)
        chars = sorted(set(full.source_classes))
        sizes = {k: round(v * len(chars)) for k, v in GLYPH_FRACTIONS.items()}
        sizes["test"] = None
        keep = set(character_split(chars, sizes, SPLIT_SEED)[spec])
        return full.subset([c for c, s in zip(full.classes, full.source_classes) if s in keep])
    return Glyphs(image_size=image_size, scripts=[s.strip() for s in spec.split(",")])


def load_split(dataset: str, root: str | None, spec: str, image_size: int) -> FewShotDataset:
    """The dataset that split name ``spec`` denotes (see the module docstring)."""
    if dataset == "omniglot":
        return _omniglot(root, spec, image_size)
    if dataset == "miniimagenet":
        return MiniImageNet(root, split=spec, image_size=image_size)
    if dataset == "glyphs":
        return _glyphs(spec, image_size)
    if dataset == "folder":
        folder = Path(spec).expanduser() if Path(spec).expanduser().is_absolute() else find_root(root, spec, "folder")[0]
        return ImageFolderClasses(folder, image_size=image_size, mode="RGB")
    raise ConfigError(f"unknown dataset {dataset!r}; choose omniglot, miniimagenet, glyphs or folder")


def _load_role(role: str, dataset: str, root: str | None, spec: str, image_size: int) -> FewShotDataset:
    try:
        return load_split(dataset, root, spec, image_size)
    except (DatasetError, ConfigError) as exc:  # a missing file, or a split name the dataset does not have
        raise type(exc)(f"--{role}-split {spec}: {exc} (or choose another split with --{role}-split)") from exc


def hold_out(train: FewShotDataset, fraction: float = 0.1, seed: int = SPLIT_SEED) -> tuple[FewShotDataset, FewShotDataset]:
    """(train without the held-out classes, the held-out classes): a seeded ``fraction`` of source classes."""
    sources = sorted(set(train.source_classes))
    cut = character_split(sources, {"val": max(1, round(fraction * len(sources))), "train": None}, seed)
    val = set(cut["val"])
    in_val = [s in val for s in train.source_classes]
    return (
        train.subset([c for c, v in zip(train.classes, in_val) if not v]),
        train.subset([c for c, v in zip(train.classes, in_val) if v]),
    )


def load_splits(
    dataset: str, root: str | None, train_spec: str, val_spec: str | None, test_spec: str | None, image_size: int
) -> tuple[FewShotDataset, FewShotDataset, FewShotDataset | None]:
    """(train, val, test or None), checked class-disjoint. An error loading a split names its flag."""
    train = _load_role("train", dataset, root, train_spec, image_size)
    if val_spec:
        val = _load_role("val", dataset, root, val_spec, image_size)
    else:
        train, val = hold_out(train)
    test = _load_role("test", dataset, root, test_spec, image_size) if test_spec else None
    check_disjoint(*(d for d in (train, val, test) if d is not None))
    return train, val, test
