"""--val-view in a run: saved with the configuration, refused where it cannot apply, wired into the run's learner
and its test evaluation, and an agnostic inner step of a run with a view other than the support set is the
equation of metasam/data/val_views.py (which it would not be if the view were ignored)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metasam.cli.main import main
from metasam.data.val_views import ShiftView, SplitView
from metasam.errors import ConfigError
from metasam.meta import MetaLearner
from metasam.meta.functional import forward
from metasam.train import evaluation
from metasam.train.config import MetaTrainConfig
from metasam.train.meta import build_learner

RHO1, RHO2, ALPHA = 0.3, 0.1, 0.4


def test_the_view_is_saved_with_the_run_and_refused_where_it_cannot_apply(tmp_path, capsys):
    cfg = MetaTrainConfig(algo="agnostic-sam", shots=2, val_view="split", seed=5)
    assert MetaTrainConfig.from_dict(cfg.to_dict()).val_view == "split"
    assert MetaTrainConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "val_view"}).val_view == "support"
    with pytest.raises(ConfigError, match=r"--val-view split changes the agnostic inner rule's validation view, and "
                                          r"sharp-maml-low's inner rule is 'sam'; drop --val-view"):
        MetaTrainConfig(algo="sharp-maml-low", shots=2, val_view="split")
    args = ["train", "--algo", "agnostic-sam", "--val-view", "split", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == ("metasam train: error: --val-view split takes half of each class's support "
                                               "images, which needs --shots 2 or more (got 1); at 1 shot use --val-view augment")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind, view", [("support", type(None)), ("split", SplitView), ("augment", ShiftView)])
def test_the_runs_learner_gets_the_view_of_its_configuration(kind, view):
    cfg = MetaTrainConfig(algo="agnostic-sam", ways=3, shots=4, val_view=kind, seed=11)
    learner = build_learner(cfg, channels=1)
    assert type(learner.val_view) is view
    if kind == "split":
        assert learner.val_view.positions == SplitView(3, 4, seed=11).positions
    # a checkpoint records the view as plain data, and loading rebuilds the same view (not the support set)
    rebuilt = MetaLearner(learner.model, "agnostic-sam", **{k: v for k, v in learner.hparams.items() if k != "algo"})
    assert type(rebuilt.val_view) is view and repr(rebuilt.val_view) == repr(learner.val_view)


def test_a_view_of_ones_own_is_named_in_the_checkpoint_and_asked_for_on_load():
    learner = MetaLearner(torch.nn.Linear(4, 3), "agnostic-sam", val_view=lambda x, y: (x[:1], y[:1]))
    assert learner.hparams["val_view"]["custom"].endswith("<lambda>")
    with pytest.raises(ConfigError, match="custom val_view.*pass val_view="):
        MetaLearner(torch.nn.Linear(4, 3), **learner.hparams)


def loss(model, params, x, y):
    return F.cross_entropy(forward(model, params, x), y)


def unit(tensors):
    norm = torch.sqrt(sum((t * t).sum() for t in tensors))
    return [t / (norm + 1e-12) for t in tensors]


@pytest.mark.parametrize("kind", ["split", "augment"])
def test_an_agnostic_inner_step_of_a_run_takes_the_validation_gradient_on_the_view(kind):
    """φ1 = θ − α ∇L_S(θ + ε), ε = ρ1 unit(∇L_S(θ)) − ρ2 unit(∇L_V(θ)): S all of the support set, V its view."""
    cfg = MetaTrainConfig(algo="agnostic-sam", ways=3, shots=2, inner_steps=1, test_inner_steps=1, inner_lr=ALPHA,
                          inner_rule={"kind": "agnostic", "params": {"rho1": RHO1, "rho2": RHO2}}, val_view=kind)
    learner = build_learner(cfg, channels=1)
    gen = torch.Generator().manual_seed(0)
    sx, sy = torch.rand(6, 1, 28, 28, generator=gen), torch.arange(3).repeat_interleave(2)
    model, names = learner.model, learner.names
    theta = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
    vx, vy = learner.val_view(sx, sy)
    assert not torch.equal(vx, sx)
    g_s = torch.autograd.grad(loss(model, theta, sx, sy), list(theta.values()))
    g_v = torch.autograd.grad(loss(model, theta, vx, vy), list(theta.values()))
    eps = [RHO1 * a - RHO2 * b for a, b in zip(unit(g_s), unit(g_v))]
    moved = {n: (t + e).detach().requires_grad_() for (n, t), e in zip(theta.items(), eps)}
    d = torch.autograd.grad(loss(model, moved, sx, sy), list(moved.values()))
    expected = [t.detach() - ALPHA * g for t, g in zip(theta.values(), d)]
    got = learner.adapt(sx, sy)
    for n, e in zip(names, expected):
        torch.testing.assert_close(got[n].detach(), e, rtol=1e-5, atol=1e-6)
    duplicate = build_learner(MetaTrainConfig(**{**cfg.to_dict(), "val_view": "support"}), channels=1).adapt(sx, sy)
    assert max(float((got[n] - duplicate[n]).detach().abs().max()) for n in names) > 1e-4  # the view changed the step


def test_evaluation_adapts_with_the_runs_view(tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", "--algo", "agnostic-sam", "--ways", "3", "--shots", "2", "--queries", "2", "--meta-batch", "2",
                 "--iterations", "2", "--val-every", "2", "--val-tasks", "3", "--val-view", "split", "--seed", "4",
                 "--out", str(run), "--no-progress"]) == 0
    built = []
    real = MetaLearner.from_checkpoint.__func__

    def spy(cls, ckpt, source, **overrides):
        built.append(overrides)
        return real(cls, ckpt, source, **overrides)

    monkeypatch.setattr(MetaLearner, "from_checkpoint", classmethod(spy))
    evaluation.evaluate_run(run, episodes=3, progress=False)
    assert type(built[0]["val_view"]) is SplitView and built[0]["val_view"].positions == SplitView(3, 2, 4).positions
