"""Meta-gradients against finite differences and against computations written out in the test."""

import io

import pytest
import torch
from torch import nn

from metasam import ConfigError
from metasam.core import global_norm
from metasam.meta import MetaLearner, TaskBatch
from metasam.meta.functional import meta_gradient_loop, meta_gradient_vmap
from metasam.models import BatchNorm

D = torch.float64


def mlp(bn: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    norm = {"metasam": BatchNorm(6), "torch": nn.BatchNorm1d(6, track_running_stats=False), None: nn.Identity()}[bn]
    return nn.Sequential(nn.Linear(4, 6), norm, nn.Tanh(), nn.Linear(6, 3)).double()


def tasks(n=2, shots=2, queries=3, seed=1) -> TaskBatch:
    gen = torch.Generator().manual_seed(seed)
    sy = torch.arange(3).repeat_interleave(shots).repeat(n, 1)
    qy = torch.arange(3).repeat_interleave(queries).repeat(n, 1)
    return TaskBatch(
        torch.randn(n, 3 * shots, 4, generator=gen, dtype=D) + sy[..., None].to(D),
        sy,
        torch.randn(n, 3 * queries, 4, generator=gen, dtype=D) + qy[..., None].to(D),
        qy,
    )


def meta_loss(learner: MetaLearner, values, batch) -> float:
    compute = meta_gradient_vmap if learner.path == "vmap" else meta_gradient_loop
    return float(compute(learner.model, dict(zip(learner.names, values)), batch, learner.inner).loss)


def directional_fd(learner, batch, direction, h=1e-5) -> float:
    theta = [learner.params[n].detach() for n in learner.names]
    plus = [t + h * d for t, d in zip(theta, direction)]
    minus = [t - h * d for t, d in zip(theta, direction)]
    return (meta_loss(learner, plus, batch) - meta_loss(learner, minus, batch)) / (2 * h)


CASES = [
    ("maml", {}, 2),
    ("sharp-maml-low", {"inner_rho": 0.05}, 2),
    ("agnostic-sam", {"inner_rho1": 0.08, "inner_rho2": 0.03, "inner_beta": 0.5}, 3),
]


@pytest.mark.parametrize("algo,params,steps", CASES)
@pytest.mark.parametrize("path,bn", [("loop", None), ("loop", "torch"), ("vmap", "metasam")])
def test_second_order_meta_gradient_matches_central_finite_differences(algo, params, steps, path, bn):
    learner = MetaLearner(mlp(bn), algo, inner_lr=0.3, inner_steps=steps, path=path, **params)
    batch = tasks()
    g = learner.meta_gradient(batch)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        direction = [torch.randn(learner.params[n].shape, generator=gen, dtype=D) for n in learner.names]
        analytic = sum(float((g[n] * d).sum()) for n, d in zip(learner.names, direction))
        assert analytic == pytest.approx(directional_fd(learner, batch, direction), rel=1e-6, abs=1e-9)


def test_first_order_equals_maml_with_inner_gradients_detached_written_out():
    model, batch, alpha = mlp(), tasks(), 0.3
    learner = MetaLearner(model, "fomaml", inner_lr=alpha, inner_steps=2)
    theta = list(model.parameters())
    expected = [torch.zeros_like(p) for p in theta]
    for t in range(2):
        phi = theta
        for _ in range(2):
            loss = nn.functional.cross_entropy(torch.func.functional_call(model, dict(zip(learner.names, phi)), (batch.support_x[t],)), batch.support_y[t])
            grads = torch.autograd.grad(loss, phi)
            phi = [p - alpha * g.detach() for p, g in zip(phi, grads)]
        q = nn.functional.cross_entropy(torch.func.functional_call(model, dict(zip(learner.names, phi)), (batch.query_x[t],)), batch.query_y[t])
        for e, g in zip(expected, torch.autograd.grad(q, theta)):
            e += g / 2
    got = learner.meta_gradient(batch)
    for n, e in zip(learner.names, expected):
        assert torch.allclose(got[n], e, rtol=1e-10, atol=1e-12)
    second = MetaLearner(mlp(), "maml", inner_lr=alpha, inner_steps=2).meta_gradient(batch)
    assert not all(torch.allclose(got[n], second[n]) for n in learner.names)  # the check can fail


def support_loss(model, names, values, x, y):
    return nn.functional.cross_entropy(torch.func.functional_call(model, dict(zip(names, values)), (x,)), y)


def test_sharp_maml_low_inner_step_equals_two_pass_computation():
    model, batch, alpha, rho = mlp(), tasks(), 0.3, 0.07
    learner = MetaLearner(model, "sharp-maml-low", inner_lr=alpha, inner_steps=1, inner_rho=rho)
    theta = [p.detach() for p in model.parameters()]
    x, y = batch.support_x[0], batch.support_y[0]
    w = [p.clone().requires_grad_() for p in theta]
    g = torch.autograd.grad(support_loss(model, learner.names, w, x, y), w)
    norm = torch.sqrt(sum((gi**2).sum() for gi in g))
    perturbed = [(p + rho * gi / norm).requires_grad_() for p, gi in zip(theta, g)]
    d = torch.autograd.grad(support_loss(model, learner.names, perturbed, x, y), perturbed)
    expected = [p - alpha * di for p, di in zip(theta, d)]
    got = learner.adapt(x, y, steps=1)
    for n, e in zip(learner.names, expected):
        assert torch.allclose(got[n], e, rtol=1e-12)


def test_agnostic_one_step_equals_sharp_maml_low_with_rho1_minus_rho2_and_differs_after():
    batch = tasks()
    x, y = batch.support_x[0], batch.support_y[0]

    def adapt(algo, steps, **kw):
        return MetaLearner(mlp(), algo, inner_lr=0.3, inner_steps=steps, **kw).adapt(x, y)

    agn1 = adapt("agnostic-sam", 1, inner_rho1=0.1, inner_rho2=0.04, inner_beta=0.6)
    sam1 = adapt("sharp-maml-low", 1, inner_rho=0.06)
    for n in agn1:
        assert torch.allclose(agn1[n], sam1[n], rtol=1e-12)
    agn2 = adapt("agnostic-sam", 2, inner_rho1=0.1, inner_rho2=0.04, inner_beta=0.6)
    sam2 = adapt("sharp-maml-low", 2, inner_rho=0.06)
    assert max((agn2[n] - sam2[n]).abs().max().item() for n in agn2) > 1e-6


def test_vmap_and_loop_meta_gradients_agree_for_every_preset():
    batch = tasks(n=3)
    for algo in ("maml", "fomaml", "sharp-maml-low", "sharp-maml-up", "agnostic-sam", "agnostic-sam-both"):
        loop = MetaLearner(mlp("metasam"), algo, inner_lr=0.3, inner_steps=2, path="loop").meta_gradient(batch, batch)
        vmapped = MetaLearner(mlp("metasam"), algo, inner_lr=0.3, inner_steps=2, path="vmap").meta_gradient(batch, batch)
        for n in loop:
            assert torch.allclose(loop[n], vmapped[n], rtol=1e-9, atol=1e-12), (algo, n)


def test_vmap_refuses_torch_batchnorm():
    with pytest.raises(ConfigError, match="BatchNorm"):
        MetaLearner(mlp("torch"), "maml", path="vmap")


def test_outer_sam_rule_is_maml_meta_gradient_at_the_perturbed_weights():
    """Sharp-MAML-up's direction is maml's meta-gradient at θ + ρ g/‖g‖: a consistency check of the outer rule
    against the learner's own maml; the independent float64 check is in test_reference_gradients.py."""
    batch, rho = tasks(), 0.2
    plain = MetaLearner(mlp(), "maml", inner_lr=0.3)
    g = plain.meta_gradient(batch)
    norm = global_norm(list(g.values()))
    shifted = mlp()
    with torch.no_grad():
        for n, p in shifted.named_parameters():
            p += rho * g[n] / norm
    expected = MetaLearner(shifted, "maml", inner_lr=0.3).meta_gradient(batch)
    got = MetaLearner(mlp(), "sharp-maml-up", inner_lr=0.3, outer_rho=rho).meta_gradient(batch)
    for n in got:
        assert torch.allclose(got[n], expected[n], rtol=1e-10)


def test_outer_agnostic_rule_is_maml_meta_gradient_at_the_perturbed_weights_and_starts_its_momentum():
    """Agnostic-SAM-up's direction is maml's meta-gradient at θ + ρ1 unit(g_S) − ρ2 unit(g_V), and its momentum
    starts as g_V: a consistency check against the learner's own maml; the momentum over several outer steps
    is checked against the independent float64 reference in test_reference_gradients.py."""
    batch, val, rho1, rho2, beta = tasks(seed=1), tasks(seed=2), 0.2, 0.1, 0.7
    plain = MetaLearner(mlp(), "maml", inner_lr=0.3)
    g_s, g_v = plain.meta_gradient(batch), plain.meta_gradient(val)
    ns, nv = global_norm(list(g_s.values())), global_norm(list(g_v.values()))
    shifted = mlp()
    with torch.no_grad():
        for n, p in shifted.named_parameters():
            p += rho1 * g_s[n] / ns - rho2 * g_v[n] / nv
    expected = MetaLearner(shifted, "maml", inner_lr=0.3).meta_gradient(batch)
    learner = MetaLearner(mlp(), "agnostic-sam-up", inner_lr=0.3, outer_rho1=rho1, outer_rho2=rho2, outer_beta=beta)
    got = learner.meta_gradient(batch, val)
    for n in got:
        assert torch.allclose(got[n], expected[n], rtol=1e-10)
    metrics = learner.meta_step(batch, val)
    for m, n in zip(learner.outer_momentum, learner.names):
        assert torch.allclose(m, g_v[n], rtol=1e-10)  # m starts as the validation meta-gradient
    assert metrics["outer_cos_train_val"] == pytest.approx(
        float(sum((g_s[n] * g_v[n]).sum() for n in g_s) / (ns * nv)), rel=1e-9
    )
    with pytest.raises(ConfigError, match="validation meta-batch"):
        learner.meta_step(batch)


def test_adaptation_never_writes_model_buffers():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learner = MetaLearner(model, "maml", inner_lr=0.3, allow_running_stats=True)  # refused by default: see test_library
    learner.meta_gradient(tasks())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_state_dict_round_trip_gives_identical_next_step():
    batch, val = tasks(seed=3), tasks(seed=4)
    kw = dict(algo="agnostic-sam-both", inner_lr=0.3, inner_steps=2, outer_lr=0.01)
    a = MetaLearner(mlp(), **kw)
    for _ in range(2):
        a.meta_step(batch, val)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = MetaLearner(mlp(), **kw)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    a.meta_step(batch, val)
    b.meta_step(batch, val)
    for (n, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), n


def test_bad_learner_arguments():
    with pytest.raises(ConfigError, match="unknown algo"):
        MetaLearner(mlp(), "reptile")
    with pytest.raises(ConfigError, match="does not use"):
        MetaLearner(mlp(), "maml", inner_rho=0.1)
    with pytest.warns(UserWarning, match="rho1 > rho2"):
        MetaLearner(mlp(), "agnostic-sam", inner_rho1=0.01, inner_rho2=0.02)
    with pytest.raises(ConfigError, match="leading task dimension"):
        MetaLearner(mlp(), "maml").meta_gradient((torch.zeros(6, 4), torch.zeros(6), torch.zeros(9, 4), torch.zeros(9)))


def test_resnet12_shapes_and_vmap_loop_agreement():
    from metasam.models import ResNet12

    torch.manual_seed(0)
    model = ResNet12(ways=3, in_channels=3, widths=(4, 6, 8, 8)).double()
    assert model(torch.randn(2, 3, 20, 20, dtype=D)).shape == (2, 3)
    gen = torch.Generator().manual_seed(0)
    batch = TaskBatch(torch.randn(2, 3, 3, 16, 16, generator=gen, dtype=D), torch.arange(3).repeat(2, 1),
                      torch.randn(2, 6, 3, 16, 16, generator=gen, dtype=D), torch.arange(3).repeat_interleave(2).repeat(2, 1))
    loop = MetaLearner(model, "maml", inner_lr=0.1, path="loop").meta_gradient(batch)
    vmapped = MetaLearner(model, "maml", inner_lr=0.1, path="vmap").meta_gradient(batch)
    for n in loop:
        assert torch.allclose(loop[n], vmapped[n], rtol=1e-8, atol=1e-11), n


def test_fused_batchnorm_and_metasams_agree_in_value_and_second_order_gradient_and_metasams_is_exact_under_vmap():
    """metasam's BatchNorm (mean, biased variance, rsqrt, affine) against torch's fused kernel outside vmap, in
    value and second order; under vmap, where the fused kernel's batched backward is off in second order, it
    gives what a loop over the batch gives."""
    torch.manual_seed(0)
    bn = BatchNorm(3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, 3, 5, 5, dtype=D, requires_grad=True)
    fused = lambda x, w, b: nn.functional.batch_norm(x, None, None, w, b, training=True, eps=bn.eps)  # noqa: E731

    def hessian_vector(norm):
        y = norm(x, bn.weight, bn.bias)
        (g,) = torch.autograd.grad((y**3).sum(), x, create_graph=True)
        (hv,) = torch.autograd.grad((g * torch.ones_like(g)).sum(), bn.weight)
        return y, hv

    ours = lambda x, w, b: torch.func.functional_call(bn, {"weight": w, "bias": b}, (x,))  # noqa: E731
    (y_fused, hv_fused), (y_ours, hv_ours) = hessian_vector(fused), hessian_vector(ours)
    assert torch.allclose(y_fused, y_ours, rtol=1e-10, atol=1e-12)
    assert torch.allclose(hv_fused, hv_ours, rtol=1e-9, atol=1e-11)
    mean = y_ours.mean(dim=(0, 2, 3))
    assert torch.allclose(mean, bn.bias, atol=1e-10)  # batch statistics: normalised mean is β

    # under vmap: a MAML-like second-order gradient (through the input's dependence on a parameter ahead of the
    # norm, where the fused kernel's batched backward goes wrong) summed over a batch, against a loop
    xs = torch.randn(3, 4, 3, 5, 5, dtype=D)
    params = {"scale": torch.rand(3, dtype=D) + 0.5, "weight": bn.weight.detach(), "bias": bn.bias.detach()}

    def second_order(p, x):
        def inner(q):
            z = torch.tanh(x * q["scale"].view(1, -1, 1, 1))
            return (torch.func.functional_call(bn, {"weight": q["weight"], "bias": q["bias"]}, (z,)) ** 3).sum()
        return sum((g**2).sum() for g in torch.func.grad(inner)(p).values())

    batched = torch.func.grad(lambda p: torch.func.vmap(second_order, in_dims=(None, 0))(p, xs).sum())(params)
    looped = torch.func.grad(lambda p: sum(second_order(p, x) for x in xs))(params)
    for name in params:
        torch.testing.assert_close(batched[name], looped[name], rtol=1e-10, atol=1e-12, msg=name)


def test_pre_adaptation_metrics_are_optional_and_do_not_change_the_step():
    batch = tasks(seed=5)
    a, b = MetaLearner(mlp(), "maml", inner_lr=0.3), MetaLearner(mlp(), "maml", inner_lr=0.3)
    with_before = a.meta_step(batch, pre_adaptation=True)
    without = b.meta_step(batch)  # off by default: a library user pays for no extra forward pass
    assert "query_loss_before" not in without and "query_acc_before" not in without
    # the query loss at θ, computed by hand with the model before the step
    model = mlp()
    with torch.no_grad():
        expected = sum(float(nn.functional.cross_entropy(model(batch.query_x[t]), batch.query_y[t])) for t in range(2)) / 2
    assert with_before["query_loss_before"] == pytest.approx(expected, rel=1e-12)
    for x, y in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(x, y)


def test_custom_rules_are_saved_and_rebuilt_by_load(tmp_path):
    from dataclasses import dataclass

    from metasam import SAMRule
    from metasam.meta.rules import Rule

    batch = tasks(seed=6)
    custom = dict(algo="maml", inner_lr=0.3, inner_rule=SAMRule(rho=0.07), outer_rule=SAMRule(rho=0.02))
    learner = MetaLearner(mlp(), **custom)
    learner.meta_step(batch)
    torch.save({"model": {"name": "_test_mlp", "kwargs": {}}, "hparams": learner.hparams, "learner": learner.state_dict()},
               tmp_path / "best.pt")
    from metasam.models import MODELS

    MODELS["_test_mlp"] = mlp
    try:
        loaded = MetaLearner.load(tmp_path)
        assert loaded.inner_rule == SAMRule(rho=0.07) and loaded.outer_rule == SAMRule(rho=0.02)
        expected = learner.meta_gradient(batch)
        for n, g in loaded.meta_gradient(batch).items():
            assert torch.equal(g, expected[n]), n

        @dataclass(frozen=True)
        class Mine(Rule):
            name = "gd"

        mine = MetaLearner(mlp(), "maml", inner_lr=0.3, inner_rule=Mine())
        torch.save({"model": {"name": "_test_mlp", "kwargs": {}}, "hparams": mine.hparams, "learner": mine.state_dict()},
                   tmp_path / "best.pt")
        with pytest.raises(ConfigError, match="custom inner rule.*Mine.*pass inner_rule="):
            MetaLearner.load(tmp_path)
        assert isinstance(MetaLearner.load(tmp_path, inner_rule=Mine()).inner_rule, Mine)
    finally:
        del MODELS["_test_mlp"]
