"""Every preset's meta-gradient and outer steps against an independent float64 reference (tests/reference.py).

The reference is written from the equations with plain torch.autograd and imports nothing from metasam, so
these tests catch a wrong equation, not only a change: β wired as 1 − β, an inner or outer validation
momentum that is not carried, a per-tensor instead of a global norm, first order ignored on one path, a
perturbation that is not detached. K = 3 inner steps and β = 0.7 throughout, so that every step of the
momentum and the difference between β and 1 − β show in the result.
"""

import pytest
import torch
from torch import nn

import reference as ref
from metasam.meta import MetaLearner, TaskBatch

D = torch.float64
ALPHA, STEPS, BETA = 0.3, 3, 0.7
RTOL = 1e-12

INNER = {
    "gd": ref.Level("gd"),
    "sam": ref.Level("sam", rho=0.08),
    "agnostic": ref.Level("agnostic", rho1=0.09, rho2=0.04, beta=BETA),
}
OUTER = {
    "plain": ref.Level("plain"),
    "sam": ref.Level("sam", rho=0.06),
    "agnostic": ref.Level("agnostic", rho1=0.07, rho2=0.03, beta=BETA),
}
PRESETS = {  # algo: (inner, outer, first order), as the preset table defines them
    "maml": ("gd", "plain", False),
    "fomaml": ("gd", "plain", True),
    "sharp-maml-low": ("sam", "plain", False),
    "sharp-maml-up": ("gd", "sam", False),
    "sharp-maml-both": ("sam", "sam", False),
    "agnostic-sam": ("agnostic", "plain", False),
    "agnostic-sam-up": ("gd", "agnostic", False),
    "agnostic-sam-both": ("agnostic", "agnostic", False),
}


def rule_params(level: ref.Level) -> dict:
    """The fields of metasam's rule for the reference rule ``level``."""
    names = {"gd": (), "plain": (), "sam": ("rho",), "agnostic": ("rho1", "rho2", "beta")}[level.kind]
    params = {n: getattr(level, n) for n in names}
    if names:
        params.update(adaptive=level.adaptive, eta=level.eta, detach_perturbation=level.detach)
    return params


def rule_kwargs(level: ref.Level, prefix: str) -> dict:
    """metasam's preset keyword arguments (inner_rho1=...) for ``level`` at ``prefix`` (inner / outer)."""
    return {f"{prefix}_{k}": v for k, v in rule_params(level).items()}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()  # W1, b1, W2, b2: ref.mlp_logits


def tasks(seed: int, n: int = 2, shots: int = 2, queries: int = 3) -> TaskBatch:
    gen = torch.Generator().manual_seed(seed)
    sy = torch.arange(3).repeat_interleave(shots).repeat(n, 1)
    qy = torch.arange(3).repeat_interleave(queries).repeat(n, 1)
    return TaskBatch(
        torch.randn(n, 3 * shots, 4, generator=gen, dtype=D) + sy[..., None].to(D), sy,
        torch.randn(n, 3 * queries, 4, generator=gen, dtype=D) + qy[..., None].to(D), qy,
    )


def assert_close(got, expected, what):
    """‖got − expected‖ ≤ RTOL ‖expected‖ over all tensors together (float64 rounding)."""
    diff = ref.norm([g - e for g, e in zip(got, expected)])
    assert diff <= RTOL * ref.norm(expected), f"{what}: relative difference {float(diff / ref.norm(expected)):.2e}"


PATHS = {  # the three ways the learner runs a meta-batch, named explicitly (task_threads="auto" depends on the cores)
    "loop": {"path": "loop", "task_threads": 1},
    "loop-threads": {"path": "loop", "task_threads": 2},
    "vmap": {"path": "vmap", "task_threads": 1},
}


def learner_for(inner, outer, first_order, path, lr=1e-3, val_view=None, inner_steps=STEPS, **kwargs):
    return MetaLearner(
        mlp(), "maml", inner_lr=ALPHA, inner_steps=inner_steps, first_order=first_order, **PATHS[path], **kwargs,
        outer_optimizer=torch.optim.SGD, outer_lr=lr, val_view=val_view,
        inner_rule={"kind": inner.kind, "params": rule_params(inner)},
        outer_rule={"kind": outer.kind, "params": rule_params(outer)},
    )


def reference_direction(learner, inner, outer, first_order, batch, val_batch, m=None, val_view=None):
    theta = [p.detach() for p in learner.model.parameters()]
    return ref.outer_direction(theta, batch, val_batch, inner, outer, STEPS, ALPHA, first_order, m, val_view)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("algo", list(PRESETS))
def test_every_presets_meta_gradient_equals_the_reference(algo, path):
    inner_kind, outer_kind, first_order = PRESETS[algo]
    inner, outer = INNER[inner_kind], OUTER[outer_kind]
    learner = MetaLearner(mlp(), algo, inner_lr=ALPHA, inner_steps=STEPS, **PATHS[path],
                          **rule_kwargs(inner, "inner"), **rule_kwargs(outer, "outer"))
    batch, val = tasks(1), tasks(2)
    got = learner.meta_gradient(batch, val if outer_kind == "agnostic" else None)
    expected, _ = reference_direction(learner, inner, outer, first_order, batch, val)
    assert_close([got[n] for n in learner.names], expected, algo)


VARIANTS = {  # inner rules beyond the presets' defaults, each with first order on and off
    "sam-asam": ref.Level("sam", rho=0.3, adaptive=True, eta=0.05),
    "agnostic-asam": ref.Level("agnostic", rho1=0.3, rho2=0.12, beta=BETA, adaptive=True, eta=0.05),
    "sam-detached": ref.Level("sam", rho=0.08, detach=True),
    "agnostic-detached": ref.Level("agnostic", rho1=0.09, rho2=0.04, beta=BETA, detach=True),
    "agnostic-asam-detached": ref.Level("agnostic", rho1=0.3, rho2=0.12, beta=BETA, adaptive=True, eta=0.05, detach=True),
    "agnostic-beta0": ref.Level("agnostic", rho1=0.09, rho2=0.04, beta=0.0),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_inner_rule_variants_equal_the_reference(variant, first_order, path):
    inner, outer = VARIANTS[variant], OUTER["plain"]
    learner = learner_for(inner, outer, first_order, path)
    batch = tasks(3)
    got = learner.meta_gradient(batch)
    expected, _ = reference_direction(learner, inner, outer, first_order, batch, None)
    assert_close([got[n] for n in learner.names], expected, variant)


def flipped_view(x, y):
    """A validation view that differs from the support set: the examples in reverse order, scaled by 0.8."""
    return 0.8 * x.flip(0), y.flip(0)


@pytest.mark.parametrize("path", list(PATHS))
def test_agnostic_inner_rule_with_its_own_validation_view_equals_the_reference(path):
    inner, outer = INNER["agnostic"], OUTER["plain"]
    learner = learner_for(inner, outer, False, path, val_view=flipped_view)
    batch = tasks(4)
    got = learner.meta_gradient(batch)
    expected, _ = reference_direction(learner, inner, outer, False, batch, None, val_view=flipped_view)
    assert_close([got[n] for n in learner.names], expected, "val_view")


def test_adaptation_with_the_agnostic_rule_equals_the_reference_fast_weights():
    """adapt() (the test-time path) gives φ_K of the reference, step by step of the inner momentum."""
    inner = INNER["agnostic"]
    learner = learner_for(inner, OUTER["plain"], False, "loop")
    batch = tasks(5)
    theta = [p.detach() for p in learner.model.parameters()]
    got = learner.adapt(batch.support_x[0], batch.support_y[0])
    expected = ref.adapt(theta, batch.support_x[0], batch.support_y[0], inner, STEPS, ALPHA, first_order=False)
    assert_close([got[n] for n in learner.names], expected, "adapt")


@pytest.mark.parametrize("test_rule", ["same", "gd"])
def test_meta_test_adapts_with_the_test_rule_and_test_steps_of_the_reference(test_rule):
    """What every reported accuracy rests on: trained with K = 1 inner step, adapted at test with
    test_inner_steps = 3 by the test rule (the agnostic rule, whose momentum acts from the second step, or
    plain gradient descent); adapt() and task_losses() against the reference's φ_3 and its query loss."""
    inner = INNER["agnostic"]
    learner = learner_for(inner, OUTER["plain"], False, "loop", inner_steps=1, test_inner_steps=STEPS, test_rule=test_rule)
    assert (learner.inner_steps, learner.test_inner_steps) == (1, STEPS)
    sx, sy, qx, qy = tasks(6)
    theta = [p.detach() for p in learner.model.parameters()]
    rule = {"same": inner, "gd": INNER["gd"]}

    def reference_losses(level, steps):
        return [float(ref.ce(ref.adapt(theta, sx[t], sy[t], level, steps, ALPHA, first_order=True), qx[t], qy[t]))
                for t in range(len(sx))]

    for t in range(len(sx)):
        got = learner.adapt(sx[t], sy[t])
        expected = ref.adapt(theta, sx[t], sy[t], rule[test_rule], STEPS, ALPHA, first_order=False)
        assert_close([got[n] for n in learner.names], expected, f"φ_3 of task {t}")
    expected = reference_losses(rule[test_rule], STEPS)
    assert learner.task_losses(tasks(6)) == pytest.approx(expected, rel=1e-12)
    # the check can tell the training step count and the other rule from the test's own
    other = rule["gd" if test_rule == "same" else "same"]
    for wrong in (reference_losses(rule[test_rule], 1), reference_losses(other, STEPS)):
        assert all(abs(w - e) > 1e-6 * abs(e) for w, e in zip(wrong, expected))


OUTER_CASES = {  # (inner, outer): the outer rules whose momentum or perturbation spans outer steps
    "sharp-maml-up": (INNER["gd"], OUTER["sam"]),
    "sharp-maml-up-asam": (INNER["gd"], ref.Level("sam", rho=0.2, adaptive=True, eta=0.05)),
    "agnostic-sam-up": (INNER["gd"], OUTER["agnostic"]),
    "agnostic-sam-both": (INNER["agnostic"], OUTER["agnostic"]),
    "agnostic-asam-both": (ref.Level("agnostic", rho1=0.3, rho2=0.12, beta=BETA, adaptive=True, eta=0.05),
                           ref.Level("agnostic", rho1=0.2, rho2=0.08, beta=BETA, adaptive=True, eta=0.05)),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", list(OUTER_CASES))
def test_three_outer_sgd_steps_equal_the_reference_and_carry_the_outer_momentum(case, path):
    """θ_{t+1} = θ_t − lr · d_t with SGD as the outer optimizer, so each step is checkable by hand; the outer
    validation momentum m_t = β m_{t−1} + (1 − β) ∇L_meta^val(θ_t) runs over a new validation meta-batch at
    every step."""
    inner, outer = OUTER_CASES[case]
    lr = 0.5
    learner = learner_for(inner, outer, False, path, lr=lr)
    theta, m = [p.detach().clone() for p in learner.model.parameters()], None
    for step in range(3):
        batch, val = tasks(10 + step), tasks(20 + step)
        d, m = ref.outer_direction(theta, batch, val, inner, outer, STEPS, ALPHA, False, m)
        theta = [t - lr * di for t, di in zip(theta, d)]
        learner.meta_step(batch, val if outer.kind == "agnostic" else None, pre_adaptation=False)
        assert_close([p.detach() for p in learner.model.parameters()], theta, f"{case} after outer step {step + 1}")
        if m is not None:
            assert_close(learner.outer_momentum, m, f"{case}: outer momentum after step {step + 1}")


def cos(a, b):
    return float(sum((x * y).sum() for x, y in zip(a, b)) / (ref.norm(a) * ref.norm(b) + ref.EPS))


@pytest.mark.parametrize("algo", ["maml", "agnostic-sam-both"])
def test_alignment_before_and_after_the_update_equals_the_reference(algo):
    """meta_step(alignment=True): the outer cos(∇L_meta(B), ∇L_meta(B_V)) at θ_t and at θ_{t+1}, and the inner
    cos(∇L_s, ∇L_q) at φ_{k−1} and at φ_k averaged over steps and tasks, all on the step's own batches."""
    inner_kind, outer_kind, _ = PRESETS[algo]
    inner, outer = INNER[inner_kind], OUTER[outer_kind]
    lr = 0.5
    learner = learner_for(inner, outer, False, "loop", lr=lr)
    batch, val = tasks(30), tasks(31)
    theta = [p.detach().clone() for p in learner.model.parameters()]

    def outer_cos(at):
        g = [ref.grad(lambda w, b=b: ref.meta_loss(w, b, inner, STEPS, ALPHA, False), at, False) for b in (batch, val)]
        return cos(*g)

    before, after = [], []
    for t in range(2):
        phi, m = theta, None
        sx, sy, qx, qy = (x[t] for x in batch)
        for _ in range(STEPS):
            cos_at = lambda w: cos(ref.grad(lambda v: ref.ce(v, sx, sy), w, False), ref.grad(lambda v: ref.ce(v, qx, qy), w, False))  # noqa: E731
            before.append(cos_at(phi))
            d, m = ref.rule_direction(inner, lambda v: ref.ce(v, sx, sy), None, phi, m, create_graph=False)
            phi = [p - ALPHA * di for p, di in zip(phi, d)]
            after.append(cos_at(phi))
    expected_before = outer_cos(theta)
    d, _ = ref.outer_direction(theta, batch, val, inner, outer, STEPS, ALPHA, False, None)
    expected_after = outer_cos([t - lr * di for t, di in zip(theta, d)])

    metrics = learner.meta_step(batch, val, pre_adaptation=False, alignment=True)
    assert metrics["outer_cos_before"] == pytest.approx(expected_before, rel=1e-12)
    assert metrics["outer_cos_after"] == pytest.approx(expected_after, rel=1e-12)
    assert metrics["inner_cos_before"] == pytest.approx(sum(before) / len(before), rel=1e-12)
    assert metrics["inner_cos_after"] == pytest.approx(sum(after) / len(after), rel=1e-12)
    assert abs(expected_after - expected_before) > 1e-3 and abs(sum(after) - sum(before)) > 1e-3  # the test can tell them apart
