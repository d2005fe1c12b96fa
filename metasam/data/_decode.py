"""Decoding one image file into a uint8 array, with errors that name the file."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from metasam.errors import DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def open_image(source: bytes | str | os.PathLike, name: str) -> Image.Image:
    """Open and fully decode an image from bytes or a path; ``name`` is what an error reports."""
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source))
        img.load()
        return img
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(
            f"cannot decode image file {name}: {exc}. Replace or delete the file (it is corrupt or not an image)."
        ) from exc


def to_array(img: Image.Image, mode: str, size: int | None, resample: Image.Resampling) -> np.ndarray:
    """Convert to ``mode`` ("L" or "RGB"), resize to size×size (antialiased), return uint8 [C, H, W].

    With ``size=None`` the image keeps its size. Pillow's resize filters other than NEAREST widen their
    support when shrinking, so every filter used here is antialiased.
    """
    img = img.convert(mode)
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), resample=resample)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def is_special(path: Path) -> bool:
    """A FIFO, socket or device (neither a regular file nor a folder): reading one can block forever, so
    the datasets skip them."""
    return path.exists() and not path.is_file() and not path.is_dir()
