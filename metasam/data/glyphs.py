"""Glyphs: a SYNTHETIC, Omniglot-like few-shot set rendered offline from the DejaVu fonts in matplotlib.

Not real handwriting. It exists so that quick starts and smoke tests run on any machine without a
download; report no benchmark numbers on it as if it were Omniglot.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
import PIL
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, features

from metasam.data._cache import load_or_build
from metasam.data._checks import check_flag, check_int, names
from metasam.data._rng import StableRandom
from metasam.data.base import FewShotDataset
from metasam.errors import ConfigError, DatasetError

FONT = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
CANVAS = 64  # glyphs are drawn and distorted at 64×64, then area-downsampled to image_size
_TAG = 0x474C5950  # domain separation from episode and split streams

# one "alphabet" per script: inclusive code point ranges (only the code points the font covers are used)
SCRIPTS: dict[str, tuple[tuple[int, int], ...]] = {
    "Latin": ((0x41, 0x5A), (0x61, 0x7A)),
    "Greek": ((0x391, 0x3A9), (0x3B1, 0x3C9)),
    "Cyrillic": ((0x410, 0x44F),),
    "Armenian": ((0x531, 0x556), (0x561, 0x586)),
    "Hebrew": ((0x5D0, 0x5EA),),
    "Arabic": ((0x621, 0x64A),),
    "NKo": ((0x7CA, 0x7EA),),
    "Lao": ((0xE81, 0xEAE),),
    "Georgian": ((0x10D0, 0x10FA),),
    "Canadian_Syllabics": ((0x1401, 0x167F),),
    "Ogham": ((0x1681, 0x169A),),
    "Tifinagh": ((0x2D30, 0x2D67),),
    "Lisu": ((0xA4D0, 0xA4F7),),
}


class Glyphs(FewShotDataset):
    """SYNTHETIC Omniglot-like classes: Unicode characters of many scripts, each drawn by seeded "drawers".

    Each class is one character (``<script>/U+XXXX``) of :data:`SCRIPTS` that DejaVu Sans covers, rendered
    at 64×64 and centred, its ink box scaled to 70% of the canvas. Characters whose rendering is empty
    or identical to an earlier one (Latin A, Greek Alpha, Cyrillic A …) are dropped; at most
    ``max_per_script`` characters per script are kept (the first in code point order). A drawer ``d`` of
    character ``u`` draws with parameters from ``StableRandom(seed, u, d)``: rotation ±0.25 rad, scale
    0.8–1.1 per axis, shear ±0.25, shift ±8%, a smooth elastic displacement (4×4 random control grid,
    amplitude up to 5% of the canvas, bicubic upsampled) and a stroke width change (erode 1 px, keep, or
    dilate 1–2 px). The result is area-downsampled to ``image_size``; strokes are 1.0 on 0.0.

    Rendering is deterministic for a given font file, Pillow/FreeType and PyTorch build (all arithmetic
    is float64); it is cached like the other datasets. With the defaults: 13 scripts, 530 classes.
    """

    synthetic = True

    def __init__(self, *, drawers: int = 20, image_size: int = 28, scripts: Sequence[str] | None = None,
                 max_per_script: int = 80, rotations: bool = False, seed: int = 0,
                 cache_dir: str | os.PathLike | None | bool = None) -> None:
        scripts = list(SCRIPTS) if scripts is None else names("Glyphs: scripts", scripts)
        unknown = [s for s in scripts if s not in SCRIPTS]
        if unknown or not scripts:
            raise ConfigError(f"Glyphs: unknown script(s) {unknown or scripts}; choose among {list(SCRIPTS)}")
        for name, value in (("drawers", drawers), ("image_size", image_size), ("max_per_script", max_per_script)):
            check_int(f"Glyphs: {name}", value)
        check_int("Glyphs: seed", seed, 0)
        check_flag("Glyphs: rotations", rotations)
        if not FONT.is_file():
            raise DatasetError(f"Glyphs: font {FONT} not found; it ships with matplotlib, reinstall matplotlib")
        options = {"drawers": drawers, "image_size": image_size, "scripts": scripts, "max_per_script": max_per_script,
                   "seed": seed, "pillow": PIL.__version__, "freetype": features.version("freetype2"),
                   "torch": torch.__version__.split("+")[0]}
        images, meta = load_or_build("glyphs", options, [FONT],
                                     lambda: _render(scripts, drawers, image_size, max_per_script, seed), cache_dir)
        self._set_data(images, meta["targets"], meta["classes"], meta["file_ids"], name=f"glyphs(seed={seed})")
        if rotations:
            self._expand_rotations()


def characters(scripts: Sequence[str], max_per_script: int) -> list[tuple[str, int, np.ndarray]]:
    """(script, code point, 64×64 float64 ink mask) of each class, after coverage and de-duplication."""
    from matplotlib.ft2font import FT2Font

    covered = FT2Font(str(FONT)).get_charmap()
    font = ImageFont.truetype(str(FONT), 48)
    seen: set[bytes] = set()
    out = []
    for script in scripts:
        kept = 0
        for lo, hi in SCRIPTS[script]:
            for cp in range(lo, hi + 1):
                if kept >= max_per_script:
                    break
                if cp not in covered:
                    continue
                mask = _centred(font, chr(cp))
                if mask is None:
                    continue
                key = (mask > 0.5).tobytes()
                if key in seen:
                    continue
                seen.add(key)
                out.append((script, cp, mask))
                kept += 1
    return out


def _centred(font: ImageFont.FreeTypeFont, char: str) -> np.ndarray | None:
    img = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(img).text((64, 64), char, fill=255, font=font, anchor="mm")
    box = img.getbbox()
    if box is None or (np.asarray(img) > 127).sum() < 20:
        return None  # blank or a tiny mark
    ink = img.crop(box)
    w, h = ink.size
    scale = 0.7 * CANVAS / max(w, h)
    ink = ink.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    canvas.paste(ink, ((CANVAS - ink.size[0]) // 2, (CANVAS - ink.size[1]) // 2))
    return np.asarray(canvas, dtype=np.float64) / 255.0


def _drawer_grids(seed: int, cp: int, drawers: int) -> tuple[torch.Tensor, list[int]]:
    """Sampling grids [D, 64, 64, 2] and stroke changes (−1 erode … +2 dilate) of each drawer."""
    thetas, fields, strokes = [], [], []
    for d in range(drawers):
        rng = StableRandom(seed, cp, d, _TAG)
        angle, shear = rng.uniform(-0.25, 0.25), rng.uniform(-0.25, 0.25)
        sx, sy = rng.uniform(0.8, 1.1), rng.uniform(0.8, 1.1)
        tx, ty = rng.uniform(-0.08, 0.08), rng.uniform(-0.08, 0.08)
        c, s = np.cos(angle), np.sin(angle)
        a = np.array([[c, -s], [s, c]]) @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([1 / sx, 1 / sy])
        thetas.append(np.concatenate([a, [[tx], [ty]]], axis=1))
        amp = rng.uniform(0.0, 0.1)  # grid coordinates span 2, so 0.1 is 5% of the canvas
        fields.append([[rng.uniform(-amp, amp) for _ in range(16)] for _ in range(2)])
        strokes.append(rng.below(4) - 1)
    theta = torch.tensor(np.array(thetas), dtype=torch.float64)
    grid = F.affine_grid(theta, [drawers, 1, CANVAS, CANVAS], align_corners=False)
    coarse = torch.tensor(fields, dtype=torch.float64).view(drawers, 2, 4, 4)
    elastic = F.interpolate(coarse, size=(CANVAS, CANVAS), mode="bicubic", align_corners=True)
    return grid + elastic.permute(0, 2, 3, 1), strokes


def _render(scripts, drawers, image_size, max_per_script, seed) -> tuple[torch.Tensor, dict]:
    # the tensors here are tiny: thread start-up costs 10-20x the work, so render on one thread
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _render_all(characters(scripts, max_per_script), drawers, image_size, seed)
    finally:
        torch.set_num_threads(threads)


def _render_all(chars, drawers, image_size, seed) -> tuple[torch.Tensor, dict]:
    blocks, classes, file_ids = [], [], []
    for script, cp, mask in chars:
        grid, strokes = _drawer_grids(seed, cp, drawers)
        base = torch.from_numpy(mask).view(1, 1, CANVAS, CANVAS).expand(drawers, 1, CANVAS, CANVAS)
        warped = F.grid_sample(base, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = torch.empty_like(warped)
        for k in sorted(set(strokes)):
            rows = [i for i, v in enumerate(strokes) if v == k]
            x = warped[rows]
            for _ in range(abs(k)):
                x = F.max_pool2d(x, 3, 1, 1) if k > 0 else -F.max_pool2d(-x, 3, 1, 1)
            out[rows] = x
        small = F.adaptive_avg_pool2d(out, image_size) if image_size != CANVAS else out
        blocks.append((small.clamp(0, 1) * 255).round().to(torch.uint8))
        name = f"{script}/U+{cp:04X}"
        classes.append(name)
        file_ids += [f"{name}/drawer{d:02d}" for d in range(drawers)]
    targets = [c for c in range(len(classes)) for _ in range(drawers)]
    return torch.cat(blocks), {"classes": classes, "targets": targets, "file_ids": file_ids}
