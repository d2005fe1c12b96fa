"""A user's own data: one subfolder per class."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from metasam.data._cache import load_or_build
from metasam.data._checks import check_int
from metasam.data._decode import to_array
from metasam.data._files import decode_items, item_files, scan_class_folders
from metasam.data.base import FewShotDataset
from metasam.errors import ConfigError

MODES = ("RGB", "L")


def check_size_and_mode(dataset: str, image_size: int | None, mode: str) -> None:
    if image_size is not None:
        check_int(f"{dataset}: image_size", image_size)
    if not isinstance(mode, str) or mode not in MODES:
        raise ConfigError(f"{dataset}: mode must be one of {MODES}, got {mode!r}")


def load_class_folders(root: Path, dataset: str, kind: str, image_size: int | None, mode: str, cache_dir):
    """(images, metadata) of a ``root/<class>/<image>`` tree, decoded as ``mode`` and resized (bilinear)."""
    items = scan_class_folders(root, dataset)

    def convert(img: Image.Image):
        return to_array(img, mode, image_size, Image.Resampling.BILINEAR)

    return load_or_build(kind, {"image_size": image_size, "mode": mode}, item_files(items),
                         lambda: decode_items(items, convert, dataset), cache_dir)


class ImageFolderClasses(FewShotDataset):
    """Classes from the subfolders of ``root`` (``root/<class>/<image>``), for a user's own data.

    Images are converted to ``mode`` ("RGB" or "L") and resized to ``image_size``×``image_size`` with
    Pillow's antialiased BILINEAR filter (``None`` keeps sizes, which must then all agree). Class names are
    the folder names; file ids are ``<class>/<file name>``. Decoded images are cached (see ``cache_dir``
    in :class:`~metasam.data.Omniglot`).
    """

    def __init__(self, root: str | os.PathLike, *, image_size: int | None = 84, mode: str = "RGB",
                 cache_dir: str | os.PathLike | None | bool = None) -> None:
        check_size_and_mode("ImageFolderClasses", image_size, mode)
        root = Path(root).expanduser()
        images, meta = load_class_folders(root, "ImageFolderClasses", "folder", image_size, mode, cache_dir)
        self._set_data(images, meta["targets"], meta["classes"], meta["file_ids"], name=f"folder:{root.name}")
