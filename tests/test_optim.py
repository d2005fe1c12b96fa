"""The torch.optim wrappers: closed forms, BatchNorm, state round trips, schedulers, errors."""

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from metasam import SAM, AgnosticSAM, ConfigError, NonFiniteError

D = torch.float64


class Quadratic(nn.Module):
    """θ ∈ R²; the 'batch' is (A, b) and the loss ½ θᵀAθ − bᵀθ, so ∇L = Aθ − b."""

    def __init__(self, theta):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta, dtype=D))

    def loss(self, a, b):
        return 0.5 * self.theta @ a @ self.theta - b @ self.theta


def closure_for(model, a, b):
    def closure():
        loss = model.loss(torch.tensor(a, dtype=D), torch.tensor(b, dtype=D))
        loss.backward()
        return loss

    return closure


A_S, B_S = np.array([[3.0, 0.5], [0.5, 1.0]]), np.array([1.0, -2.0])
A_V, B_V = np.array([[1.0, -0.3], [-0.3, 2.0]]), np.array([0.5, 0.5])


def unit(v):
    return v / np.linalg.norm(v)


def test_agnostic_sam_two_steps_on_quadratic_equal_closed_form():
    lr, rho1, rho2, beta = 0.1, 0.2, 0.08, 0.7
    model = Quadratic([1.0, 1.0])
    opt = AgnosticSAM(model.parameters(), torch.optim.SGD, rho1=rho1, rho2=rho2, beta=beta, lr=lr)
    theta, m = np.array([1.0, 1.0]), None
    for _ in range(2):
        g_s, g_v = A_S @ theta - B_S, A_V @ theta - B_V
        m = g_v if m is None else beta * m + (1 - beta) * g_v
        eps = rho1 * unit(g_s) - rho2 * unit(m)
        g_star = A_S @ (theta + eps) - B_S
        expected_loss = 0.5 * theta @ A_S @ theta - B_S @ theta
        theta = theta - lr * g_star
        loss = opt.step(closure_for(model, A_S, B_S), closure_for(model, A_V, B_V))
        assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
        np.testing.assert_allclose(model.theta.detach().numpy(), theta, rtol=1e-12)
    cos = g_s @ g_v / (np.linalg.norm(g_s) * np.linalg.norm(g_v))
    assert opt.last_stats["cos_train_val"].item() == pytest.approx(cos, rel=1e-10)
    assert opt.last_stats["val_grad_norm"].item() == pytest.approx(np.linalg.norm(g_v), rel=1e-12)


def test_agnostic_asam_step_on_quadratic_equals_closed_form():
    lr, rho1, rho2, eta = 0.05, 0.5, 0.2, 0.01
    model = Quadratic([1.5, -0.5])
    opt = AgnosticSAM(model.parameters(), torch.optim.SGD, rho1=rho1, rho2=rho2, beta=0.9, adaptive=True, eta=eta, lr=lr)
    theta = np.array([1.5, -0.5])
    g_s, g_v = A_S @ theta - B_S, A_V @ theta - B_V
    scale = np.abs(theta) + eta
    eps = rho1 * scale**2 * g_s / np.linalg.norm(scale * g_s) - rho2 * scale**2 * g_v / np.linalg.norm(scale * g_v)
    expected = theta - lr * (A_S @ (theta + eps) - B_S)
    opt.step(closure_for(model, A_S, B_S), closure_for(model, A_V, B_V))
    np.testing.assert_allclose(model.theta.detach().numpy(), expected, rtol=1e-12)


def test_sam_on_linear_model_equals_two_pass_computation_with_sgd_momentum():
    torch.manual_seed(0)
    x, y = torch.randn(20, 3, dtype=D), torch.randn(20, 1, dtype=D)
    model = nn.Linear(3, 1).double()
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9)

    def closure():
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    # two passes written out: MSE gradients of a linear model are 2/n Xᵀ(Xw + b − y)
    def grads(w, b):
        r = x @ w.T + b - y
        return 2 / len(x) * r.T @ x, 2 / len(x) * r.sum(0)

    gw, gb = grads(w0, b0)
    norm = torch.sqrt((gw**2).sum() + (gb**2).sum())
    gw_star, gb_star = grads(w0 + 0.1 * gw / norm, b0 + 0.1 * gb / norm)
    w1, b1 = w0 - 0.05 * gw_star, b0 - 0.05 * gb_star  # SGD momentum buffer starts as the gradient
    opt.step(closure)
    assert torch.allclose(model.weight, w1, rtol=1e-12) and torch.allclose(model.bias, b1, rtol=1e-12)
    assert opt.last_stats["grad_norm"].item() == pytest.approx(norm.item(), rel=1e-12)
    buf = opt.state[model.weight]["momentum_buffer"]  # the base optimizer's state is visible
    assert torch.allclose(buf, gw_star)


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("momentum", [0.1, None])
def test_bn_running_stats_after_sam_step_equal_one_plain_forward(momentum):
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    reference, model = bn_model(), bn_model()
    for m in (reference, model):
        m[1].momentum = momentum
    reference(x)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, model=model)
    opt.step(lambda: nn.functional.cross_entropy(model(x), y).backward())
    for (k, v), ref in zip(bn_buffers(model).items(), bn_buffers(reference).values()):
        assert torch.equal(v, ref), k
    # without model= the perturbed pass moves them a second time: the check above can fail
    unprotected = bn_model()
    unprotected[1].momentum = momentum
    SAM(unprotected.parameters(), torch.optim.SGD, rho=0.5, lr=0.1).step(
        lambda: nn.functional.cross_entropy(unprotected(x), y).backward()
    )
    assert not torch.equal(unprotected[1].num_batches_tracked, reference[1].num_batches_tracked)


def test_bn_running_stats_after_agnostic_step_equal_one_plain_forward_on_train_batch():
    x, y, xv, yv = torch.randn(32, 4), torch.randint(0, 3, (32,)), torch.randn(8, 4) + 3, torch.randint(0, 3, (8,))
    reference, model = bn_model(), bn_model()
    reference(x)
    opt = AgnosticSAM(model.parameters(), torch.optim.SGD, lr=0.1, model=model)
    opt.step(
        lambda: nn.functional.cross_entropy(model(x), y).backward(),
        lambda: nn.functional.cross_entropy(model(xv), yv).backward(),
    )
    for (k, v), ref in zip(bn_buffers(model).items(), bn_buffers(reference).values()):
        assert torch.equal(v, ref), k


def train_steps(opt_factory, model, batches):
    opt = opt_factory(model)
    for (x, y), (xv, yv) in batches:
        def closure():
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        def val_closure():
            loss = nn.functional.cross_entropy(model(xv), yv)
            loss.backward()
            return loss

        if isinstance(opt, AgnosticSAM):
            opt.step(closure, val_closure)
        else:
            opt.step(closure)
    return opt


FACTORIES = {
    "sam-sgd": lambda m: SAM(m.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, model=m),
    "asam-adamw": lambda m: SAM(m.parameters(), torch.optim.AdamW, rho=1.0, adaptive=True, eta=0.01, lr=1e-2, model=m),
    "agnostic-sgd": lambda m: AgnosticSAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, beta=0.9, model=m),
    "agnostic-asam-adamw": lambda m: AgnosticSAM(
        m.parameters(), torch.optim.AdamW, rho1=1.0, rho2=0.5, adaptive=True, eta=0.01, lr=1e-2, model=m
    ),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_save_and_load_mid_run_gives_bit_identical_next_step(name):
    gen = torch.Generator().manual_seed(3)
    batches = [
        ((torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen)),
         (torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)))
        for _ in range(4)
    ]
    model = bn_model()
    opt = train_steps(FACTORIES[name], model, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train_steps(lambda m: opt, model, batches[3:])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = bn_model()
    resumed.load_state_dict(saved["model"])
    opt2 = FACTORIES[name](resumed)
    opt2.load_state_dict(saved["opt"])
    assert opt2.step_count == 3
    if isinstance(opt2, AgnosticSAM):
        assert len(opt2.momentum) == len(list(resumed.parameters()))
    train_steps(lambda m: opt2, resumed, batches[3:])
    for (k, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_losing_the_validation_momentum_changes_the_next_step():
    """The round trip above can fail: an optimizer that forgot m takes a different step."""
    gen = torch.Generator().manual_seed(4)
    batches = [
        ((torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen)),
         (torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)))
        for _ in range(3)
    ]
    a, b = bn_model(), bn_model()
    opt_a = train_steps(FACTORIES["agnostic-sgd"], a, batches[:2])
    opt_b = train_steps(FACTORIES["agnostic-sgd"], b, batches[:2])
    opt_b.momentum = {}
    train_steps(lambda m: opt_a, a, batches[2:])
    train_steps(lambda m: opt_b, b, batches[2:])
    assert not torch.equal(a[0].weight, b[0].weight)


def test_lr_scheduler_drives_the_wrapper():
    model = Quadratic([1.0, 1.0])
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    before = model.theta.detach().clone()
    opt.step(closure_for(model, np.eye(2), np.zeros(2)))  # ∇ = θ, rho 0: θ ← θ − lr θ
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5
    assert torch.allclose(model.theta, before * 0.0)
    model.theta.data.fill_(2.0)
    opt.step(closure_for(model, np.eye(2), np.zeros(2)))
    assert torch.allclose(model.theta, torch.full((2,), 1.0, dtype=D))


def test_nan_gradient_raises_with_step_number_and_keeps_parameters():
    model = Quadratic([1.0, 1.0])
    opt = AgnosticSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    opt.step(closure_for(model, A_S, B_S), closure_for(model, A_V, B_V))
    before = model.theta.detach().clone()
    with pytest.raises(NonFiniteError, match="step 1: the training gradient") as info:
        opt.step(closure_for(model, A_S, np.array([np.nan, 0.0])), closure_for(model, A_V, B_V))
    assert "rho" in str(info.value)
    assert torch.equal(model.theta.detach(), before)


def test_nan_only_at_perturbed_point_restores_parameters():
    model = Quadratic([1.0, 1.0])
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=0.1)
    calls = []

    def closure():
        calls.append(1)
        loss = model.loss(torch.tensor(A_S), torch.tensor(B_S))
        if len(calls) == 2:
            loss = loss * float("nan")
        loss.backward()
        return loss

    before = model.theta.detach().clone()
    with pytest.raises(NonFiniteError, match="perturbed"):
        opt.step(closure)
    assert torch.equal(model.theta.detach(), before)


def test_bad_arguments_give_clear_errors():
    params = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ConfigError, match="closure"):
        SAM(params, torch.optim.SGD, lr=0.1).step()
    with pytest.raises(ConfigError, match="val_closure"):
        AgnosticSAM(params, torch.optim.SGD, lr=0.1).step(lambda: None)
    with pytest.raises(ConfigError, match="rho"):
        SAM(params, torch.optim.SGD, rho=-1.0, lr=0.1)
    with pytest.raises(ConfigError, match="rho2"):
        AgnosticSAM(params, torch.optim.SGD, rho2=-0.1, lr=0.1)
    with pytest.raises(ConfigError, match="class"):
        SAM(params, torch.optim.SGD(params, lr=0.1))
    with pytest.raises(ConfigError, match="beta"):
        AgnosticSAM(params, torch.optim.SGD, beta=1.0, lr=0.1)
    with pytest.warns(UserWarning, match="rho1 > rho2"):
        AgnosticSAM(params, torch.optim.SGD, rho1=0.01, rho2=0.05, lr=0.1)
    with pytest.raises(ConfigError, match="backward"):
        SAM(params, torch.optim.SGD, lr=0.1).step(lambda: torch.tensor(0.0))


def test_explicit_first_and_second_step_match_step():
    torch.manual_seed(0)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    a, b = bn_model(), bn_model()
    opt_a = SAM(a.parameters(), torch.optim.SGD, lr=0.1, model=a)
    opt_b = SAM(b.parameters(), torch.optim.SGD, lr=0.1)
    opt_a.step(lambda: nn.functional.cross_entropy(a(x), y).backward())
    nn.functional.cross_entropy(b(x), y).backward()
    eps = opt_b.first_step(zero_grad=True)
    assert math.isclose(float(torch.sqrt(sum((e**2).sum() for e in eps))), 0.05, rel_tol=1e-6)
    from metasam import preserve_bn_stats

    with preserve_bn_stats(b):
        nn.functional.cross_entropy(b(x), y).backward()
    opt_b.second_step()
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)


def test_val_batches_given_at_construction_equal_the_two_closure_step_for_step():
    """A trainer that only calls step(closure) (Lightning, Accelerate-style): B_V comes from val_batches, cycling
    through a DataLoader when it ends; the run is bit-identical to passing the same batches as val_closure."""
    gen = torch.Generator().manual_seed(5)
    train = [(torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(5)]
    val_set = torch.utils.data.TensorDataset(torch.randn(24, 4, generator=gen), torch.randint(0, 3, (24,), generator=gen))
    loader = torch.utils.data.DataLoader(val_set, batch_size=8)  # 3 batches: the 4th and 5th steps start it again
    val = [batch for _ in range(2) for batch in loader][:5]

    def loss_of(model):
        return lambda batch: nn.functional.cross_entropy(model(batch[0]), batch[1])

    a, b = bn_model(), bn_model()
    opt_a = AgnosticSAM(a.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=a, val_batches=loader, val_loss=loss_of(a))
    opt_b = AgnosticSAM(b.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=b)

    def closure_of(model, batch):
        def closure():
            loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
            loss.backward()
            return loss

        return closure

    for (x, y), vb in zip(train, val):
        opt_a.step(closure_of(a, (x, y)))
        opt_b.step(closure_of(b, (x, y)), closure_of(b, vb))
        for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(pa, pb), k
    with pytest.raises(ConfigError, match="val_batches= and val_loss= go together"):
        AgnosticSAM(a.parameters(), torch.optim.SGD, lr=0.1, val_batches=loader)
    with pytest.raises(ConfigError, match="holds no batch"):
        AgnosticSAM(a.parameters(), torch.optim.SGD, lr=0.1, val_batches=[], val_loss=loss_of(a)).step(closure_of(a, train[0]))
