"""The episode stream for seed 0 on the real small Omniglot data is pinned; pixels are checked against PIL."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metasam.data import EpisodeSampler

GOLDEN = json.loads((Path(__file__).parent / "golden" / "omniglot_small_seed0.json").read_text())
ROTATE = {"rot000": None, "rot090": Image.Transpose.ROTATE_90, "rot180": Image.Transpose.ROTATE_180,
          "rot270": Image.Transpose.ROTATE_270}  # PIL's ROTATE_* turn counter-clockwise


def reference_pixels(folder: Path, subsets, file_id: str, rotation: str, size: int) -> np.ndarray:
    """Decode one drawing as docs/data.md documents, without metasam: L, invert, LANCZOS, rotate."""
    for subset in subsets:  # the first subset holding the character wins (de-duplication rule)
        zip_path = folder / f"{subset}.zip"
        with zipfile.ZipFile(zip_path) as z:
            name = f"{subset}/{file_id}"
            if name in z.namelist():
                img = Image.open(io.BytesIO(z.read(name))).convert("L")
                break
    else:
        raise AssertionError(f"{file_id} not found in {subsets}")
    img = Image.fromarray(255 - np.asarray(img)).resize((size, size), Image.Resampling.LANCZOS)
    if ROTATE[rotation] is not None:
        img = img.transpose(ROTATE[rotation])
    return np.asarray(img)


@pytest.fixture(scope="module")
def golden_sampler(small_omniglot):
    cfg = GOLDEN["config"]
    return EpisodeSampler(small_omniglot, cfg["ways"], cfg["shots"], cfg["queries"], cfg["seed"])


def test_pinned_tasks_match_golden_file(golden_sampler):
    ds = golden_sampler.dataset
    for i, want in enumerate(GOLDEN["tasks"]):
        spec = golden_sampler.spec(i)
        assert [ds.classes[c] for c in spec.classes] == want["classes"], f"task {i}: classes changed"
        assert [[ds.file_ids[j] for j in ix] for ix in spec.support] == want["support"], f"task {i}: support changed"
        assert [[ds.file_ids[j] for j in ix] for ix in spec.query] == want["query"], f"task {i}: query changed"


@pytest.mark.parametrize("i", range(len(GOLDEN["tasks"])))
def test_pinned_task_properties_and_pixels(golden_sampler, omniglot_dir, i):
    cfg, want = GOLDEN["config"], GOLDEN["tasks"][i]
    ways, shots, queries = cfg["ways"], cfg["shots"], cfg["queries"]
    task = golden_sampler[i]
    # classes: distinct, and distinct characters even across rotations is not required, classes are
    assert len(set(want["classes"])) == ways
    # counts and shapes
    assert task.support_x.shape == (ways * shots, 1, 28, 28) and task.query_x.shape == (ways * queries, 1, 28, 28)
    # label remapping: label l is class want["classes"][l]; each label appears shots / queries times
    assert task.support_y.tolist() == [label for label in range(ways) for _ in range(shots)]
    assert task.query_y.tolist() == [label for label in range(ways) for _ in range(queries)]
    for label, cls in enumerate(want["classes"]):
        files = want["support"][label] + want["query"][label]
        assert len(set(files)) == shots + queries, "images within a class must be distinct"
        assert all(f.startswith(cls.rsplit("/", 1)[0] + "/") for f in files), "image from the wrong class"
    # pixels equal the PNG decoded independently
    rows = [(x, f, c) for x, f, c in _flatten(task.support_x, want["support"], want["classes"])]
    rows += [(x, f, c) for x, f, c in _flatten(task.query_x, want["query"], want["classes"])]
    for x, file_id, cls in rows:
        ref = reference_pixels(omniglot_dir, cfg["subset"], file_id, cls.rsplit("/", 1)[1], cfg["image_size"])
        got = (x[0].numpy() * 255).round().astype(np.uint8)
        np.testing.assert_array_equal(got, ref, err_msg=f"pixels of {file_id} ({cls})")
        assert x.min() >= 0 and x.max() <= 1


def _flatten(x, files_by_label, classes):
    k = 0
    for label, files in enumerate(files_by_label):
        for f in files:
            yield x[k], f, classes[label]
            k += 1


def test_background_is_zero_and_strokes_are_one(golden_sampler):
    x = golden_sampler[0].support_x
    corners = x[:, 0, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 0).all(), "background should be 0.0"
    assert (x.amax(dim=(1, 2, 3)) > 0.9).all(), "strokes should reach ~1.0"
    assert x.mean() < 0.3, "most of a drawing is background"
