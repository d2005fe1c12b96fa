"""Property: the dataset constructors, samplers and task sets given random (mostly bad) arguments either work or
raise one of metasam's own exceptions, never a bare TypeError/ValueError/IndexError from deep inside."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
from conftest import fake_omniglot, tiny_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metasam.data import (
    EpisodeSampler,
    Glyphs,
    ImageFolderClasses,
    MiniImageNet,
    Omniglot,
    TaskSet,
)
from metasam.errors import MetaSAMError

anything = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 40), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.text(max_size=6), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(-2, 9), max_size=3),
)
small_int = st.one_of(st.integers(-3, 12), st.booleans(), st.floats(-2, 12), st.none(), st.text(max_size=3))
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad-arguments")
    fake_omniglot(base / "omniglot", chars=2, drawings=3)
    rng = np.random.default_rng(0)
    (base / "mini").mkdir()
    with open(base / "mini" / "mini-imagenet-cache-train.pkl", "wb") as f:
        pickle.dump({"image_data": rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8),
                     "class_dict": {"a": [0, 1, 2], "b": [3, 4, 5]}}, f)
    (base / "a-file").write_text("not a folder")
    return {"omniglot": base / "omniglot", "mini": base / "mini", "file": base / "a-file", "missing": base / "absent",
            "cache": base / "cache"}


def only_ours(build):
    """build()'s result, or None where it raised one of our exceptions; anything else fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return build()
        except MetaSAMError:
            return None


def positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@SETTINGS
@given(root=st.sampled_from(["omniglot", "file", "missing"]), subset=anything, image_size=small_int,
       alphabets=anything, split=anything, split_sizes=anything, split_seed=small_int, rotations=anything)
def test_omniglot(roots, root, subset, image_size, alphabets, split, split_sizes, split_seed, rotations):
    ds = only_ours(lambda: Omniglot(roots[root], subset if subset is not None else "images_background",
                                    image_size=image_size, alphabets=alphabets, split=split, split_sizes=split_sizes,
                                    split_seed=split_seed, rotations=rotations, cache_dir=roots["cache"]))
    if ds is not None:  # accepted: then the size was a real size
        assert positive_int(image_size) and ds.image_shape == (1, image_size, image_size)


@SETTINGS
@given(root=st.sampled_from(["mini", "file", "missing"]), split=st.one_of(st.sampled_from(["train", "val"]), anything),
       image_size=small_int, cache_dir=st.sampled_from([None, False, 3.5, "cache"]))
def test_miniimagenet_and_folders(roots, root, split, image_size, cache_dir):
    cache = roots["cache"] if cache_dir in (None, "cache") else cache_dir
    for ds in (only_ours(lambda: MiniImageNet(roots[root], split, image_size=image_size, cache_dir=cache)),
               only_ours(lambda: ImageFolderClasses(roots[root], image_size=image_size, mode=split, cache_dir=cache))):
        if ds is not None:  # accepted: a real size, or None for the images' native size (8×8 here)
            side = 8 if image_size is None else image_size
            assert (image_size is None or positive_int(image_size)) and ds.image_shape[1:] == (side, side)


@SETTINGS
@given(ways=small_int, shots=small_int, queries=small_int, seed=small_int, num_tasks=small_int, n=small_int)
def test_samplers_and_task_sets(ways, shots, queries, seed, num_tasks, n):
    ds = tiny_dataset(n_classes=5, per_class=6)
    task = only_ours(lambda: EpisodeSampler(ds, ways, shots, queries, seed, num_tasks=num_tasks)[0])
    if task is not None:
        assert positive_int(ways) and positive_int(shots) and task.support_y.shape == (ways * shots,)
        assert ways <= 5 and shots + queries <= 6
    tasks = only_ours(lambda: TaskSet.sample(ds, n, ways, shots, queries, seed=seed))
    if tasks is not None:
        assert positive_int(n) and len(tasks) == n


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawers=small_int, image_size=small_int, scripts=anything, max_per_script=small_int, seed=small_int)
def test_glyphs(roots, drawers, image_size, scripts, max_per_script, seed):
    # a valid draw renders: keep it small (one small script, few drawers)
    ds = only_ours(lambda: Glyphs(drawers=drawers if not isinstance(drawers, int) or drawers < 4 else 2, image_size=image_size,
                             scripts=scripts if scripts is not None else ["Ogham"], seed=seed,
                             max_per_script=max_per_script if not isinstance(max_per_script, int) else min(max_per_script, 3),
                             cache_dir=roots["cache"]))
    if ds is not None:
        assert positive_int(image_size) and ds.image_shape == (1, image_size, image_size)
