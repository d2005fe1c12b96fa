"""The protocol every metasam few-shot dataset follows, implemented once.

A dataset holds all its images decoded in memory as one uint8 tensor ``images`` [N, C, H, W] with
``targets`` [N] (class indices into ``classes``) and ``file_ids`` [N] (a name for each image that is
stable across machines, used by :class:`~metasam.data.TaskSet` files). Indexing gives
``(float image [C, H, W] in [0, 1], label)``; :meth:`stack` is the fast path that gathers many images
at once, and :meth:`images_of` lists the images of one class.
"""

from __future__ import annotations

import copy
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
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DatasetError(f"{name}: images must be a uint8 tensor [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
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
        return self.images[index].float().div_(255.0), int(self.targets[index])

    def images_of(self, class_index: int) -> torch.Tensor:
        """Indices (int64, ascending) of the images of class ``class_index``."""
        return self._per_class[class_index]

    def stack(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Float images [len(indices), C, H, W] in [0, 1], gathered in one indexing operation."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return self.images[idx].float().div_(255.0)

    @property
    def image_shape(self) -> tuple[int, int, int]:
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
