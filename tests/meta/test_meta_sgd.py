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
from metasam.errors import CheckpointError, ConfigError
from metasam.meta import MetaLearner
from metasam.meta.arguments import nonfinite_step_error
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


def reference(learner, inner, first_order, batch, outer=ref.Level("plain"), adapted=None, val_batch=None):
    """The outer rule's direction over [θ..., α...] from the equations: L_meta(θ, α) differentiated in both
    (the agnostic outer rule's validation meta-loss on ``val_batch``, its momentum starting afresh)."""
    theta = [p.detach() for p in learner.model.parameters()]
    alphas = [a.detach() for a in learner.inner_lrs.values()]

    def loss_on(tasks):
        return lambda w: ref.meta_loss(w[:len(theta)], tasks, inner, STEPS, w[len(theta):], first_order, adapted=adapted)

    level = ref.Level() if outer.kind == "plain" else outer
    val_loss = None if val_batch is None else loss_on(val_batch)
    d, _ = ref.rule_direction(level, loss_on(batch), val_loss, [*theta, *alphas], None, create_graph=False)
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


OUTER = {"sam": ref.Level("sam", rho=0.06), "agnostic": ref.Level("agnostic", rho1=0.07, rho2=0.03, beta=BETA)}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("outer", list(OUTER))
def test_an_outer_radius_perturbs_theta_and_alpha_under_one_norm(outer, path):
    learner = meta_sgd(INNER["sam"], False, path, outer=OUTER[outer])
    batch, val = tasks(2), (tasks(8) if outer == "agnostic" else None)
    assert_close(list(learner.meta_gradient(batch, val).values()),
                 reference(learner, INNER["sam"], False, batch, OUTER[outer], val_batch=val), f"outer {outer} over θ and α")


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
    metrics = learner.meta_step(batch)
    after = [a - lr * g for a, g in zip(before, step)]
    assert_close(list(learner.inner_lrs.values()), after, "α after one SGD step")
    every = torch.cat([a.flatten() for a in after])
    assert metrics["inner_lr_mean"] == pytest.approx(float(every.mean()), rel=1e-12)
    assert (metrics["inner_lr_min"], metrics["inner_lr_max"]) == pytest.approx((float(every.min()), float(every.max())))


@pytest.mark.parametrize("test_rule", ["same", "gd"])
def test_adaptation_at_test_uses_the_learned_step_sizes_with_either_test_rule(test_rule):
    learner = meta_sgd(INNER["agnostic"], False, "loop", test_rule=test_rule, test_inner_steps=STEPS + 2)
    sx, sy, qx, qy = (t[0] for t in tasks(5))
    theta = [p.detach() for p in learner.model.parameters()]
    alphas = [a.detach() for a in learner.inner_lrs.values()]
    rule = INNER["agnostic"] if test_rule == "same" else INNER["gd"]
    expected = ref.adapt(theta, sx, sy, rule, STEPS + 2, alphas, first_order=True)
    got = learner.adapt(sx, sy)
    assert list(got) == learner.names
    assert_close(list(got.values()), expected, "fast weights")
    [loss] = learner.task_losses([(sx, sy, qx, qy)])  # the evaluation path, apart from adapt()
    assert loss == pytest.approx(float(ref.ce(expected, qx, qy)), rel=1e-12)
    given = {**learner.params, **{learned_lr_key(n): 2 * a for n, a in zip(learner.names, alphas)}}  # the caller's α
    expected = ref.adapt(theta, sx, sy, rule, STEPS + 2, [2 * a for a in alphas], first_order=True)
    assert_close(list(learner.adapt(sx, sy, params=given).values()), expected, "fast weights with the caller's α")


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


def test_weight_decay_of_the_outer_optimizer_leaves_alpha_alone():
    batch = tasks(9)
    decayed, plain = (meta_sgd(INNER["gd"], False, "loop", outer_kwargs={"weight_decay": wd}) for wd in (0.5, 0.0))
    decayed.meta_step(batch)
    plain.meta_step(batch)
    assert all(torch.equal(decayed.inner_lrs[n], plain.inner_lrs[n]) for n in plain.names)
    assert not torch.equal(decayed.params["0.weight"], plain.params["0.weight"])  # θ's decay is on


@pytest.mark.parametrize("learn", [True, False])
def test_a_model_parameter_named_like_a_step_size_is_refused(learn):
    model = nn.Linear(2, 2)
    model.register_parameter(learned_lr_key("x"), nn.Parameter(torch.zeros(2)))
    with pytest.raises(ConfigError, match="rename it"):
        MetaLearner(model, "maml", learn_inner_lr=learn)


def test_a_non_finite_meta_gradient_of_a_step_size_is_named_as_one():
    direction = {"2.bias": torch.zeros(3), learned_lr_key("2.bias"): torch.tensor([0.0, float("nan"), 0.0])}
    error = nonfinite_step_error(4, torch.tensor(1.0), direction, {"inner_lr": 0.3})
    assert "meta-gradient of the learned step size of 2.bias is NaN" in str(error)


def test_the_meta_loss_of_the_landscape_holds_the_learned_step_sizes_fixed():
    learner = meta_sgd(INNER["gd"], False, "loop")
    batch = tasks(7)
    theta = {n: p.detach() for n, p in learner.params.items()}
    alphas = [a.detach() for a in learner.inner_lrs.values()]
    expected = ref.meta_loss(list(theta.values()), batch, INNER["gd"], STEPS, alphas, first_order=False)
    assert float(meta_loss_fn(learner, [batch])(theta).detach()) == pytest.approx(float(expected.detach()), rel=1e-12)
