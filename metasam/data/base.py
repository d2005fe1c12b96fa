"""The protocol every metasam few-shot dataset follows, implemented once.

A dataset holds all its images decoded in memory as one uint8 tensor ``images`` [N, C, H, W] with
``targets`` [N] (class indices into ``classes``) and ``file_ids`` [N] (a name for each image that is
stable across machines, used by :class:`~metasam.data.TaskSet` files). Indexing gives
``(float image [C, H, W] in [0, 1], label)``; :meth:`stack` is the fast path that gathers many images
at once, and :meth:`images_of` lists the images of one class.

:func:`as_few_shot` turns any indexable dataset of ``(x, y)`` pairs with integer labels (a
``TensorDataset``, feature vectors, images of any dtype) into one; examples that are not uint8 images
are returned as they are, uint8 ones scaled to [0, 1] as everywhere else.
"""

from __future__ import annotations

import copy
import operator
from typing import Sequence

import torch
from torch.utils.data import Dataset

from metasam.errors import DatasetError

ROTATIONS = (0, 90, 180, 270)


class FewShotDataset(Dataset):
    """Images grouped into classes, all decoded in memory.

    Attributes:
        classes: class names, e.g. ``"Greek/character01/rot090"``.
        source_classes: for each class, the source class it derives from (the name without its
            rotation); splits are disjoint on these, so no character leaks across splits by rotation.
        images: uint8 tensor [N, C, H, W].
        targets: int64 tensor [N].
        file_ids: list of N strings naming each image (unique within its class).
        synthetic: True for procedurally generated data.
    """

    synthetic = False

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        classes: Sequence[str],
        file_ids: Sequence[str],
        *,
        name: str = "dataset",
        source_classes: Sequence[str] | None = None,
    ) -> None:
        self._set_data(images, targets, classes, file_ids, name=name, source_classes=source_classes)

    def _set_data(self, images, targets, classes, file_ids, *, name, source_classes=None) -> None:
        if images.ndim < 2:
            raise DatasetError(f"{name}: examples must be a tensor [N, ...] of one example per row, got {tuple(images.shape)}")
        targets = torch.as_tensor(targets, dtype=torch.int64)
        if len(targets) != len(images) or len(file_ids) != len(images):
            raise DatasetError(f"{name}: {len(images)} images but {len(targets)} targets and {len(file_ids)} file ids")
        self.name = name
        self.images = images
        self.targets = targets
        self.classes = list(classes)
        self.source_classes = list(source_classes) if source_classes is not None else list(self.classes)
        self.file_ids = list(file_ids)
        order = torch.argsort(targets, stable=True)
        counts = torch.bincount(targets, minlength=len(self.classes)).tolist()
        self._per_class = list(torch.split(order, counts))

    # --- the protocol -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return _as_input(self.images[index]), int(self.targets[index])

    def images_of(self, class_index: int) -> torch.Tensor:
        """Indices (int64, ascending) of the images of class ``class_index``."""
        return self._per_class[class_index]

    def stack(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Float images [len(indices), C, H, W] in [0, 1], gathered in one indexing operation."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return _as_input(self.images[idx])

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    @property
    def alphabets(self) -> list[str]:
        """The first path component of the class names (Omniglot's alphabets, Glyphs' scripts)."""
        return sorted({c.split("/")[0] for c in self.source_classes})

    def class_sizes(self) -> list[int]:
        return [len(ix) for ix in self._per_class]

    # --- selections ---------------------------------------------------------------------------
    def subset(self, class_names: Sequence[str]) -> "FewShotDataset":
        """A copy restricted to ``class_names`` (kept in the dataset's class order; the selected pixels are copied)."""
        wanted = set(class_names)
        unknown = sorted(wanted - set(self.classes))
        if unknown:
            raise DatasetError(f"{self.name}: unknown classes {unknown[:5]}{' …' if len(unknown) > 5 else ''}")
        out = copy.copy(self)
        out._restrict([c in wanted for c in self.classes])
        out.name = f"{self.name}[{len(out.classes)} classes]"
        return out

    def _restrict(self, keep: Sequence[bool]) -> None:
        """Keep only the classes whose flag is true, renumbering targets."""
        keep_t = torch.as_tensor(list(keep), dtype=torch.bool)
        new_index = torch.cumsum(keep_t.long(), 0) - 1
        items = keep_t[self.targets].nonzero().flatten()
        self._set_data(
            self.images[items],
            new_index[self.targets[items]],
            [c for c, k in zip(self.classes, keep) if k],
            [self.file_ids[i] for i in items.tolist()],
            name=self.name,
            source_classes=[c for c, k in zip(self.source_classes, keep) if k],
        )

    def _expand_rotations(self) -> None:
        """Make the four 90° rotations (counter-clockwise, ``torch.rot90`` with k = 0..3) distinct classes.

        Class c becomes classes 4c..4c+3 named ``<name>/rot000`` … ``<name>/rot270``; their source class
        stays ``<name>``.
        """
        k = len(ROTATIONS)
        blocks = [torch.rot90(self.images, r, dims=(-2, -1)) for r in range(k)]
        # item order: all images of rotation 0, then rotation 1, …; targets interleave as 4c + r
        images = torch.cat(blocks)
        targets = torch.cat([self.targets * k + r for r in range(k)])
        classes = [f"{c}/rot{deg:03d}" for c in self.classes for deg in ROTATIONS]
        sources = [s for s in self.source_classes for _ in ROTATIONS]
        self._set_data(images, targets, classes, self.file_ids * k, name=self.name, source_classes=sources)

    def __repr__(self) -> str:
        c, h, w = self.image_shape if len(self.images) else (0, 0, 0)
        tag = " SYNTHETIC" if self.synthetic else ""
        return f"{type(self).__name__}({self.name!r}{tag}: {len(self.classes)} classes, {len(self)} images of {c}×{h}×{w})"


def check_disjoint(*datasets: FewShotDataset) -> None:
    """Raise :class:`DatasetError` if two datasets share a source class (e.g. a character in two splits)."""
    owner: dict[str, int] = {}
    for i, ds in enumerate(datasets):
        for src in sorted(set(ds.source_classes)):
            j = owner.setdefault(src, i)
            if j != i:
                raise DatasetError(
                    f"class {src!r} is in both {datasets[j].name!r} and {ds.name!r}: splits must be class-disjoint; "
                    "build them from the same split definition (same seed and sizes, or non-overlapping alphabet lists)"
                )


def _as_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 images as float in [0, 1] (a new tensor); any other example as it is stored."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def as_few_shot(dataset: Dataset, name: str | None = None) -> FewShotDataset:
    """``dataset`` itself if it is a :class:`FewShotDataset`; else its examples, read once into memory, as one.

    ``dataset`` is any map-style dataset of ``(x, y)`` pairs with integer labels ``y`` (a
    ``TensorDataset(x, y)`` is read without a loop). Classes are the distinct labels, named by their value;
    example ``i`` gets the file id ``str(i)``.
    """
    if isinstance(dataset, FewShotDataset):
        return dataset
    name = name or type(dataset).__name__
    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, tuple) and len(tensors) == 2:
        xs, ys = tensors
    else:
        try:
            pairs = [dataset[i] for i in range(len(dataset))]
            xs = torch.stack([torch.as_tensor(x) for x, _ in pairs])
            ys = torch.as_tensor([operator.index(y) for _, y in pairs])  # an int, never a rounded float
        except (TypeError, ValueError, RuntimeError) as exc:
            raise DatasetError(f"{name}: labels must be integers and examples tensors of one shape, in an indexable "
                               f"dataset of (x, y) pairs; reading it failed: {exc}") from exc
    if ys.dtype.is_floating_point or ys.dtype == torch.bool or ys.dim() != 1 or len(ys) != len(xs):
        raise DatasetError(f"{name}: labels must be integers, one per example; got {ys.dtype} {tuple(ys.shape)} for "
                           f"{len(xs)} examples")
    labels = torch.unique(ys)
    targets = torch.searchsorted(labels, ys)
    return FewShotDataset(xs, targets, [str(v) for v in labels.tolist()], [str(i) for i in range(len(xs))], name=name)
