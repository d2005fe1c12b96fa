"""Glyphs: the synthetic, offline Omniglot stand-in is large enough, deterministic, varied and labelled."""

from __future__ import annotations

import pytest
import torch

from metasam.data import EpisodeSampler, Glyphs
from metasam.errors import ConfigError


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory):
    return Glyphs(cache_dir=tmp_path_factory.mktemp("glyph-cache"))


def test_size_scripts_and_labels(glyphs):
    assert len(glyphs.classes) >= 500
    assert len(glyphs.alphabets) >= 10 and {"Latin", "Greek", "Cyrillic", "Hebrew", "Armenian"} <= set(glyphs.alphabets)
    assert set(glyphs.class_sizes()) == {20}
    assert glyphs.image_shape == (1, 28, 28)
    assert glyphs.synthetic and "SYNTHETIC" in repr(glyphs) and "SYNTHETIC" in Glyphs.__doc__
    assert glyphs.classes[0] == "Latin/U+0041"


def test_strokes_on_background_and_drawers_differ(glyphs):
    x = glyphs.stack(glyphs.images_of(glyphs.classes.index("Latin/U+0041")))
    assert (x[:, 0, 0, 0] == 0).all() and (x.amax(dim=(1, 2, 3)) > 0.75).all()  # thin (eroded) strokes blur a little
    flat = x.flatten(1)
    assert len({tuple(r.tolist()) for r in (flat * 255).round().to(torch.uint8)}) == 20, "each drawer draws differently"
    # but a character's drawings resemble each other more than another character's
    other = glyphs.stack(glyphs.images_of(glyphs.classes.index("Latin/U+0053"))).flatten(1)
    within = torch.cdist(flat, flat).sum() / (20 * 19)
    across = torch.cdist(flat, other).mean()
    assert within < across


def test_no_two_classes_have_identical_drawings(glyphs):
    means = torch.stack([glyphs.stack(glyphs.images_of(c)).mean(0).flatten() for c in range(len(glyphs.classes))])
    d = torch.cdist(means, means) + torch.eye(len(means)) * 1e9
    assert d.min() > 0.1


def test_rendering_is_deterministic_and_seeded(glyphs):
    hebrew = Glyphs(scripts=["Latin", "Hebrew"], cache_dir=False)
    again = Glyphs(scripts=["Latin", "Hebrew"], cache_dir=False)
    assert torch.equal(hebrew.images, again.images) and hebrew.classes == again.classes
    # the same classes as in the full set, drawn identically (drawers are keyed by code point)
    full = glyphs.subset(hebrew.classes)
    assert full.classes == hebrew.classes and torch.equal(full.images, hebrew.images)
    other_seed = Glyphs(scripts=["Hebrew"], seed=1, drawers=3, cache_dir=False)
    assert not torch.equal(other_seed.images, Glyphs(scripts=["Hebrew"], drawers=3, cache_dir=False).images)


def test_a_second_load_comes_from_the_cache_without_rendering(glyphs, tmp_path, monkeypatch):
    first = Glyphs(scripts=["Greek"], cache_dir=tmp_path)
    import metasam.data.glyphs as module

    monkeypatch.setattr(module, "_render", lambda *a: pytest.fail("rendered again despite a cache"))
    again = Glyphs(scripts=["Greek"], cache_dir=tmp_path)
    assert torch.equal(first.images, again.images) and first.classes == again.classes


def test_works_with_the_sampler_and_rotations(glyphs):
    task = EpisodeSampler(glyphs, 20, 5, 15, seed=0)[0]
    assert task.support_x.shape == (100, 1, 28, 28) and task.query_x.shape == (300, 1, 28, 28)
    rot = Glyphs(scripts=["Ogham"], drawers=2, rotations=True, cache_dir=False)
    assert len(rot.classes) == 4 * 26 and rot.classes[1].endswith("/rot090")


@pytest.mark.parametrize("kwargs, message", [(dict(scripts=["Klingon"]), "unknown script"), (dict(drawers=0), "drawers"),
                                             (dict(image_size=2.5), "image_size"), (dict(seed=-3), "seed")])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Glyphs(cache_dir=False, **kwargs)
