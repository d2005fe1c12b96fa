"""Omniglot (Lake et al. 2015) from the authors' zips or their extracted folders."""

from __future__ import annotations

import hashlib
import os
import urllib.request
import zipfile
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from metasam.atomic_write import replace_atomically
from metasam.data._cache import load_or_build
from metasam.data._checks import check_flag, check_int, names
from metasam.data._decode import is_image_name, is_special, to_array
from metasam.data._files import Item, decode_items
from metasam.data._rng import StableRandom
from metasam.data._roots import find_root
from metasam.data.base import FewShotDataset
from metasam.errors import ConfigError, DatasetError

SUBSETS = ("images_background", "images_evaluation", "images_background_small1", "images_background_small2")
SMALL = ("images_background_small1", "images_background_small2")
URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{}.zip"
MD5 = {
    # published by torchvision for the authors' zips
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
    # computed from copies of the authors' small zips
    "images_background_small1": "e704a628b5459e08445c13499850abc4",
    "images_background_small2": "b75a71a51d3b13f821f212756fe481fd",
}
MAX_ENTRY_BYTES = 64 * 2**20
"""An Omniglot drawing is about 1 KB; a zip entry beyond this is refused before it is read into memory."""
VINYALS_SIZES = {"train": 1200, "test": None}  # Vinyals et al. 2016: 1200 training characters, the rest (423) test
_SPLIT_TAG = 0x53504C54  # domain separation: split streams never coincide with episode streams


class Omniglot(FewShotDataset):
    """Omniglot characters as few-shot classes; strokes are 1.0 on a 0.0 background.

    Args:
        root: folder holding ``<subset>.zip`` files or extracted ``<subset>/`` folders (directly or in an
            ``omniglot/`` subfolder); ``None`` uses ``$METASAM_DATA``.
        subset: one of :data:`SUBSETS` or a list of them. Characters present in several subsets (Greek and
            Latin are in both small subsets) are kept once, from the first subset listed.
            ``"images_background"`` / ``"images_evaluation"`` are the authors' background/evaluation split.
        rotations: make the four 90° rotations distinct classes (the MAML protocol).
        image_size: side in pixels; each 105×105 drawing is converted to grayscale, inverted, then resized
            with Pillow's LANCZOS filter (antialiased).
        alphabets: keep only these alphabets (a split by alphabet).
        split, split_sizes, split_seed: a seeded character split. The sorted characters (after the
            ``alphabets`` filter) are shuffled by ``split_seed`` and cut into consecutive blocks of
            ``split_sizes`` (a mapping name → count, in order; one count may be ``None`` for "the rest");
            ``split`` picks the block. Default sizes: Vinyals' ``{"train": 1200, "test": None}``.
            All rotations of a character go to the same block, so the blocks are class-disjoint.
        download: fetch missing zips from the authors' GitHub repository and verify their MD5.
        cache_dir: where decoded images are cached (``None``: ``$METASAM_CACHE`` or ``~/.cache/metasam``;
            ``False``: no cache).
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        subset: str | Sequence[str] = "images_background",
        *,
        rotations: bool = True,
        image_size: int = 28,
        alphabets: Sequence[str] | None = None,
        split: str | None = None,
        split_sizes: Mapping[str, int | None] | None = None,
        split_seed: int = 0,
        download: bool = False,
        cache_dir: str | os.PathLike | None | bool = None,
    ) -> None:
        subsets = [subset] if isinstance(subset, str) else names("Omniglot: subset", subset)
        unknown = [s for s in subsets if s not in SUBSETS]
        if not subsets or unknown:
            raise ConfigError(f"Omniglot: unknown subset {unknown or subsets}; choose among {list(SUBSETS)}")
        check_int("Omniglot: image_size", image_size)
        for flag, value in (("rotations", rotations), ("download", download)):
            check_flag(f"Omniglot: {flag}", value)
        alphabets = None if alphabets is None else names("Omniglot: alphabets", alphabets)
        if split is not None and not isinstance(split, str):
            raise ConfigError(f"Omniglot: split must be a split name (a string) or None, got {split!r}")
        folder = _locate(root, subsets, download)
        sources = [_source(folder, s) for s in subsets]
        files = [p for src in sources for p in ([src] if src.is_file() else src.rglob("*")) if p.is_file()]
        images, meta = load_or_build(
            "omniglot", {"subsets": subsets, "image_size": image_size}, files,
            lambda: _decode(sources, image_size), cache_dir,
        )
        name = "omniglot:" + "+".join(subsets)
        self._set_data(images, meta["targets"], meta["classes"], meta["file_ids"], name=name)
        if alphabets is not None:
            self._keep_alphabets(alphabets)
        if split is not None:
            self._keep_split(split, dict(split_sizes or VINYALS_SIZES), split_seed)
            self.name += f":{split}"
        if rotations:
            self._expand_rotations()

    def _keep_alphabets(self, alphabets: list[str]) -> None:
        missing = sorted(set(alphabets) - set(self.alphabets))
        if missing:
            raise DatasetError(f"{self.name}: no alphabet {missing}; available: {self.alphabets}")
        self._restrict([c.split("/")[0] in alphabets for c in self.classes])
        self.name += ":" + ",".join(sorted(alphabets))

    def _keep_split(self, split: str, sizes: dict[str, int | None], seed: int) -> None:
        blocks = character_split(self.classes, sizes, seed)
        if split not in blocks:
            raise ConfigError(f"Omniglot: unknown split {split!r}; the split sizes define {list(blocks)}")
        chosen = set(blocks[split])
        self._restrict([c in chosen for c in self.classes])


def character_split(characters: Sequence[str], sizes: Mapping[str, int | None], seed: int) -> dict[str, list[str]]:
    """Cut the sorted ``characters``, shuffled by ``seed``, into blocks of ``sizes`` (see :class:`Omniglot`)."""
    names = list(sizes)
    counts = list(sizes.values())
    if not names or sum(c is None for c in counts) > 1 or any(c is not None and (not isinstance(c, int) or c < 0) for c in counts):
        raise ConfigError(f"split_sizes must map split names to non-negative ints, at most one None; got {dict(sizes)}")
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"split_seed must be a non-negative int, got {seed!r}")
    total = sum(c for c in counts if c is not None)
    n = len(characters)
    if total > n:
        raise ConfigError(
            f"split_sizes {dict(sizes)} need {total} characters but the data has {n}; "
            f"pass smaller split_sizes, e.g. {{'train': {n * 6 // 10}, 'val': {n // 10}, 'test': None}}"
        )
    counts = [n - total if c is None else c for c in counts]
    order = StableRandom(seed, _SPLIT_TAG).permutation(sorted(characters))
    out, start = {}, 0
    for name, count in zip(names, counts):
        out[name] = order[start:start + count]
        start += count
    return out


def _locate(root, subsets: list[str], download: bool) -> Path:
    candidates = find_root(root, "omniglot", "Omniglot")
    for folder in candidates:
        if all(_source(folder, s) is not None for s in subsets):
            return folder
    target = candidates[0] if candidates[0].is_dir() else candidates[1]
    missing = [s for s in subsets if _source(target, s) is None]
    if download:
        for s in missing:
            _download(target, s)
        return target
    raise DatasetError(
        f"Omniglot: missing {', '.join(m + '.zip' for m in missing)} in {target}. Put the zip(s) (or their "
        f"extracted folders) there; they are at {URL.format('<name>')}, or pass download=True on a machine "
        "with network access."
    )


def _source(folder: Path, subset: str) -> Path | None:
    """The extracted folder ``<subset>/`` if present, else ``<subset>.zip``, else None."""
    if (folder / subset).is_dir():
        return folder / subset
    if (folder / f"{subset}.zip").is_file():
        return folder / f"{subset}.zip"
    return None


def _download(folder: Path, subset: str) -> None:
    url, dest = URL.format(subset), folder / f"{subset}.zip"
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except OSError as exc:
        raise DatasetError(
            f"Omniglot: could not download {url} ({exc}). Offline? Put {subset}.zip in {folder} by hand."
        ) from exc
    digest = hashlib.md5(data).hexdigest()
    if digest != MD5[subset]:
        raise DatasetError(
            f"Omniglot: {url} has MD5 {digest}, expected {MD5[subset]}; the download is corrupt or the file changed. "
            f"Fetch {subset}.zip by hand into {folder}."
        )
    replace_atomically(dest, lambda f: f.write(data))


def _items(sources: list[Path]) -> list[Item]:
    """Every drawing of the subsets, each character once (from the first subset that has it)."""
    owner: dict[tuple[str, str], str] = {}
    items = []
    for source in sources:
        for alpha, char, fname, data in _entries(source):
            if owner.setdefault((alpha, char), source.name) != source.name:
                continue  # the same character from an earlier subset (Greek and Latin are in both small ones)
            items.append(Item(f"{alpha}/{char}", f"{alpha}/{char}/{fname}", data, f"{source}/{alpha}/{char}/{fname}"))
    return items


def _entries(source: Path) -> Iterator[tuple[str, str, str, object]]:
    """(alphabet, character, drawing file name, bytes or path) for every drawing of one subset.

    Raises on an empty character folder or a non-image file, naming it.
    """
    if source.is_dir():
        for alpha in sorted(p for p in source.iterdir() if p.is_dir()):
            for char in sorted(p for p in alpha.iterdir() if p.is_dir()):
                files = sorted(f for f in char.iterdir() if not f.name.startswith(".") and not is_special(f))
                yield from _check_char(alpha.name, char.name, [(f.name, f) for f in files], str(char))
        return
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"Omniglot: {source} is not a readable zip ({exc}); download it again") from exc
    with archive:
        chars: dict[tuple[str, str], list] = {}
        for info in archive.infolist():
            parts = info.filename.rstrip("/").split("/")
            if parts[0] == source.stem:
                parts = parts[1:]
            if len(parts) == 2 and info.is_dir():
                chars.setdefault((parts[0], parts[1]), [])
            elif len(parts) == 3 and not info.is_dir() and not parts[2].startswith("."):
                chars.setdefault((parts[0], parts[1]), []).append((parts[2], info))
        for (alpha, char), files in sorted(chars.items()):
            files = [(n, _read_entry(archive, i, source)) for n, i in sorted(files, key=lambda t: t[0])]
            yield from _check_char(alpha, char, files, f"{source}:{alpha}/{char}")


def _read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, source: Path) -> bytes:
    """The bytes of one drawing; a damaged entry or one too large for an image names itself."""
    if info.file_size > MAX_ENTRY_BYTES:
        raise DatasetError(f"Omniglot: {source}:{info.filename} is {info.file_size / 2**20:.0f} MiB uncompressed, more "
                           f"than the {MAX_ENTRY_BYTES // 2**20} MiB a drawing may have; remove it from the zip")
    try:
        return archive.read(info)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise DatasetError(f"Omniglot: {source}:{info.filename} is damaged ({exc}); download {source.name} again") from exc


def _check_char(alpha, char, files, where):
    if not files:
        raise DatasetError(f"Omniglot: character folder {where} is empty; restore its drawings or delete it")
    for name, data in files:
        if not is_image_name(name):
            raise DatasetError(f"Omniglot: unexpected non-image file {where}/{name}; remove it")
        yield alpha, char, name, data


def _decode(sources: list[Path], image_size: int) -> tuple[torch.Tensor, dict]:
    return decode_items(_items(sources), lambda img: decode_drawing(img, image_size), "Omniglot")


def decode_drawing(img: Image.Image, image_size: int) -> np.ndarray:
    """One drawing → uint8 [1, S, S]: grayscale, inverted (strokes 255), LANCZOS resize to S×S."""
    return to_array(ImageOps.invert(img.convert("L")), "L", image_size, Image.Resampling.LANCZOS)
