"""The agnostic inner rule's validation views (metasam/data/val_views.py): which images each one shows, seeded,
refused where it cannot apply, and usable under vmap; the agnostic meta-gradient with the split view equals the
float64 reference (tests/reference.py) given the same view, on the loop and vmap paths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reference as ref
from metasam.data.val_views import ShiftView, SplitView, make_val_view
from metasam.errors import ConfigError
from metasam.meta import MetaLearner, TaskBatch


def support(ways: int, shots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose pixels name their row (image i is all i), labels in EpisodeSampler's order."""
    x = torch.arange(ways * shots, dtype=torch.float32)[:, None, None, None].expand(-1, 1, 6, 6).clone()
    return x, torch.arange(ways).repeat_interleave(shots)


def test_split_shows_half_of_each_classes_shots_at_seeded_positions():
    x, y = support(ways=3, shots=5)
    view = SplitView(3, 5, seed=7)
    vx, vy = view(x, y)
    rows = vx[:, 0, 0, 0].long().tolist()
    assert len(view.positions) == 2 and vy.tolist() == [0, 0, 1, 1, 2, 2]
    assert rows == [c * 5 + j for c in range(3) for j in view.positions]  # the same positions in every class
    assert all(y[r] == label for r, label in zip(rows, vy.tolist()))
    assert SplitView(3, 5, seed=7).positions == view.positions
    assert {tuple(SplitView(3, 5, seed=s).positions) for s in range(20)} != {tuple(view.positions)}  # seeded


def test_augment_shifts_every_image_and_keeps_the_labels():
    x = torch.zeros(6, 1, 8, 8)
    x[:, 0, 4, 4] = 1.0  # one lit pixel per image: where it moves is the shift
    y = torch.arange(3).repeat_interleave(2)
    view = ShiftView(3, 2, seed=0)
    vx, vy = view(x, y)
    assert torch.equal(vy, y) and vx.shape == x.shape
    for i, (dy, dx) in enumerate(view.shifts):
        assert (dy, dx) != (0, 0) and max(abs(dy), abs(dx)) <= 2
        assert vx[i, 0, 4 + dy, 4 + dx] == 1.0 and vx[i].sum() == 1.0
    assert ShiftView(3, 2, seed=0).shifts == view.shifts and ShiftView(3, 2, seed=1).shifts != view.shifts


def test_support_is_no_view_and_split_is_refused_at_one_shot():
    assert make_val_view("support", 5, 1, 0) is None
    with pytest.raises(ConfigError, match=r"--val-view split .* needs --shots 2 or more \(got 1\); at 1 shot use --val-view augment"):
        make_val_view("split", 5, 1, 0)
    with pytest.raises(ConfigError, match="unknown --val-view 'query'; choose one of support, split, augment"):
        make_val_view("query", 5, 2, 0)
    with pytest.raises(ConfigError, match="made for 3-way 2-shot support sets of 6 images, got 4"):
        SplitView(3, 2, 0)(*support(2, 2))


@pytest.mark.parametrize("kind", ["split", "augment"])
def test_a_view_runs_under_vmap_as_it_runs_per_task(kind):
    view = make_val_view(kind, 3, 2, seed=3)
    xs = torch.randn(4, 6, 1, 6, 6)
    ys = torch.arange(3).repeat_interleave(2).repeat(4, 1)
    batched_x, batched_y = torch.func.vmap(view)(xs, ys)
    for t in range(4):
        x, y = view(xs[t], ys[t])
        assert torch.equal(batched_x[t], x) and torch.equal(batched_y[t], y)


@pytest.mark.parametrize("path", ["loop", "vmap"])
def test_the_agnostic_meta_gradient_with_the_split_view_equals_the_reference(path):
    """K = 3 inner steps, β = 0.7: the momentum of ∇L_V over the held half carries across steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()  # ref.mlp_logits' W1, b1, W2, b2
    inner = ref.Level("agnostic", rho1=0.09, rho2=0.04, beta=0.7)
    view = SplitView(3, 4, seed=1)
    learner = MetaLearner(model, "agnostic-sam", inner_lr=0.3, inner_steps=3, path=path, val_view=view,
                          inner_rho1=inner.rho1, inner_rho2=inner.rho2, inner_beta=inner.beta)
    gen = torch.Generator().manual_seed(2)
    sy, qy = torch.arange(3).repeat_interleave(4).repeat(2, 1), torch.arange(3).repeat_interleave(3).repeat(2, 1)
    batch = TaskBatch(torch.randn(2, 12, 4, generator=gen, dtype=torch.float64) + sy[..., None], sy,
                      torch.randn(2, 9, 4, generator=gen, dtype=torch.float64) + qy[..., None], qy)
    got = learner.meta_gradient(batch)
    theta = [p.detach() for p in model.parameters()]
    expected, _ = ref.outer_direction(theta, batch, None, inner, ref.Level("plain"), 3, 0.3, False, None, view)
    without_view, _ = ref.outer_direction(theta, batch, None, inner, ref.Level("plain"), 3, 0.3, False, None)
    got = [got[n] for n in learner.names]
    assert ref.norm([g - e for g, e in zip(got, expected)]) <= 1e-12 * ref.norm(expected)
    assert ref.norm([g - e for g, e in zip(got, without_view)]) > 1e-3 * ref.norm(without_view)  # the view matters
