"""Meta-SGD (learn_inner_lr=True): α per parameter entry, meta-learned beside θ, against the float64 reference.

The reference (tests/reference.py) steps φ ← φ − α ⊙ d with α a tensor per parameter and differentiates the
meta-loss in θ and α with plain torch.autograd, importing nothing from metasam. α is set to distinct values per
entry first, so that a scalar α, an α taken for the wrong tensor or a detached α shows in the result.
"""

import pytest
import torch
from torch import nn

import reference as ref
from metasam.analysis.meta_loss import meta_loss_fn
from metasam.errors import CheckpointError
from metasam.meta import MetaLearner
from metasam.meta.functional import learned_lr_key
from test_reference_gradients import ALPHA, BETA, PATHS, STEPS, assert_close, mlp, rule_params, tasks

INNER = {
    "gd": ref.Level("gd"),
    "sam": ref.Level("sam", rho=0.08),
    "agnostic": ref.Level("agnostic", rho1=0.09, rho2=0.04, beta=BETA),
}


def meta_sgd(inner, first_order, path, outer=ref.Level("plain"), lr=1e-3, **kwargs):
    """A learner with learned step sizes set to ALPHA · (0.5 .. 1.5), different in every entry."""
    learner = MetaLearner(
        mlp(), "maml", inner_lr=ALPHA, learn_inner_lr=True, inner_steps=STEPS, first_order=first_order, **PATHS[path],
        outer_optimizer=torch.optim.SGD, outer_lr=lr, inner_rule={"kind": inner.kind, "params": rule_params(inner)},
        outer_rule={"kind": outer.kind, "params": rule_params(outer)}, **kwargs,
    )
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for a in learner.inner_lrs.values():
            a.copy_(ALPHA * (0.5 + torch.rand(a.shape, generator=gen, dtype=a.dtype)))
    return learner


def reference(learner, inner, first_order, batch, outer=ref.Level("plain"), adapted=None):
    """The outer rule's direction over [θ..., α...] from the equations: L_meta(θ, α) differentiated in both."""
    theta = [p.detach() for p in learner.model.parameters()]
    alphas = [a.detach() for a in learner.inner_lrs.values()]

    def loss(w):
        return ref.meta_loss(w[:len(theta)], batch, inner, STEPS, w[len(theta):], first_order, adapted=adapted)

    level = ref.Level() if outer.kind == "plain" else outer
    d, _ = ref.rule_direction(level, loss, None, [*theta, *alphas], None, create_graph=False)
    return [x.detach() for x in d]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("inner", list(INNER))
def test_meta_gradient_in_theta_and_alpha_equals_the_reference(inner, first_order, path):
    learner = meta_sgd(INNER[inner], first_order, path)
    batch = tasks(1)
    got = learner.meta_gradient(batch)
    assert list(got) == [*learner.names, *(learned_lr_key(n) for n in learner.names)]
    expected = reference(learner, INNER[inner], first_order, batch)
    assert_close(list(got.values()), expected, f"{inner}, first order {first_order}")
    assert all(float(g.abs().max()) > 0 for g in expected[len(learner.names):])  # α really is learned


@pytest.mark.parametrize("path", list(PATHS))
def test_an_outer_sam_radius_perturbs_theta_and_alpha_under_one_norm(path):
    outer = ref.Level("sam", rho=0.06)
    learner = meta_sgd(INNER["sam"], False, path, outer=outer)
    batch = tasks(2)
    assert_close(list(learner.meta_gradient(batch).values()), reference(learner, INNER["sam"], False, batch, outer),
                 "outer sam over θ and α")


def test_only_the_adapted_parameters_get_a_step_size():
    learner = meta_sgd(INNER["gd"], False, "loop", adapt=["2.weight", "2.bias"])  # ANIL: the head adapts
    assert list(learner.inner_lrs) == ["2.weight", "2.bias"]
    batch = tasks(3)
    got = learner.meta_gradient(batch)
    assert_close(list(got.values()), reference(learner, INNER["gd"], False, batch, adapted=[2, 3]), "ANIL + Meta-SGD")


def test_a_meta_step_moves_alpha_by_its_meta_gradient():
    lr = 0.05
    learner = meta_sgd(INNER["agnostic"], False, "loop", lr=lr)
    before = [a.detach().clone() for a in learner.inner_lrs.values()]
    batch = tasks(4)
    step = reference(learner, INNER["agnostic"], False, batch)[len(learner.names):]
    learner.meta_step(batch)
    assert_close(list(learner.inner_lrs.values()), [a - lr * g for a, g in zip(before, step)], "α after one SGD step")


def test_adaptation_at_test_uses_the_learned_step_sizes():
    learner = meta_sgd(INNER["gd"], False, "loop")
    sx, sy, qx, qy = (t[0] for t in tasks(5))
    theta = [p.detach() for p in learner.model.parameters()]
    alphas = [a.detach() for a in learner.inner_lrs.values()]
    expected = ref.adapt(theta, sx, sy, INNER["gd"], STEPS, alphas, first_order=True)
    got = learner.adapt(sx, sy)
    assert list(got) == learner.names
    assert_close(list(got.values()), expected, "fast weights")
    [loss] = learner.task_losses([(sx, sy, qx, qy)])  # the evaluation path, apart from adapt()
    assert loss == pytest.approx(float(ref.ce(expected, qx, qy)), rel=1e-12)


def test_state_dict_round_trip_and_refusals_name_the_setting():
    learner = meta_sgd(INNER["gd"], False, "loop")
    learner.meta_step(tasks(6))
    state = learner.state_dict()
    again = MetaLearner(mlp(), "maml", inner_lr=ALPHA, learn_inner_lr=True, inner_steps=STEPS,
                        outer_optimizer=torch.optim.SGD)
    again.load_state_dict(state)
    for n in learner.names:
        assert torch.equal(again.inner_lrs[n], learner.inner_lrs[n])
    plain = MetaLearner(mlp(), "maml", inner_lr=ALPHA, inner_steps=STEPS, outer_optimizer=torch.optim.SGD)
    with pytest.raises(CheckpointError, match="learn_inner_lr="):
        plain.load_state_dict(state)
    with pytest.raises(CheckpointError, match="learn_inner_lr="):
        again.load_state_dict(plain.state_dict())
    old = {k: v for k, v in plain.state_dict().items() if k != "inner_lrs"}  # written before learn_inner_lr existed
    plain.load_state_dict(old)


def test_a_model_parameter_named_like_a_step_size_is_refused():
    model = nn.Linear(2, 2)
    model.register_parameter(learned_lr_key("x"), nn.Parameter(torch.zeros(2)))
    with pytest.raises(Exception, match="rename it"):
        MetaLearner(model, "maml", learn_inner_lr=True)


def test_the_meta_loss_of_the_landscape_holds_the_learned_step_sizes_fixed():
    learner = meta_sgd(INNER["gd"], False, "loop")
    batch = tasks(7)
    theta = {n: p.detach() for n, p in learner.params.items()}
    alphas = [a.detach() for a in learner.inner_lrs.values()]
    expected = ref.meta_loss(list(theta.values()), batch, INNER["gd"], STEPS, alphas, first_order=False)
    assert float(meta_loss_fn(learner, [batch])(theta)) == pytest.approx(float(expected), rel=1e-12)
