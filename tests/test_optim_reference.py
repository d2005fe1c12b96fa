"""SAM, ASAM, Agnostic-SAM and Agnostic-ASAM as torch.optim wrappers, against the independent float64
reference (tests/reference.py), on a network of several tensors over several steps.

Several tensors make a per-tensor norm visible; three steps with β = 0.7 make a momentum that is not
carried, or β wired as 1 − β, visible; SGD with momentum and weight decay as the base checks that the
base optimizer is fed g* and keeps its own state. Also: a refused step changes nothing, and the
validation momentum is kept per parameter when the set of parameters with gradients changes.
"""

import copy

import pytest
import torch
from torch import nn

import reference as ref
from metasam import SAM, AgnosticSAM, ConfigError, NonFiniteError

D = torch.float64
LR, MU, WD, BETA, ETA = 0.2, 0.9, 1e-3, 0.7, 0.05
RTOL = 1e-12


class Net(nn.Module):
    """ref.mlp_logits with named parameters gain, layers.0.weight, layers.0.bias, layers.1.weight,
    layers.1.bias (a module's own parameters come first): logits · (1 + gain), where a closure may leave
    the scalar ``gain`` out."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(4, 5), nn.Linear(5, 3)]).double()
        self.gain = nn.Parameter(torch.tensor(0.3, dtype=D))

    def forward(self, x, use_gain=True):
        logits = ref.mlp_logits([p for layer in self.layers for p in layer.parameters()], x)
        return logits * (1 + self.gain) if use_gain else logits


def loss_with(w, x, y, use_gain=True):
    logits = ref.mlp_logits(w[1:], x)
    return nn.functional.cross_entropy(logits * (1 + w[0]) if use_gain else logits, y)


def batch(seed, n):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=gen)
    return torch.randn(n, 4, generator=gen, dtype=D) + y[:, None].to(D), y


def closure(model, x, y, use_gain=True):
    def run():
        loss = nn.functional.cross_entropy(model(x, use_gain), y)
        loss.backward()
        return loss

    return run


def assert_close(got, expected, what):
    diff = ref.norm([g - e for g, e in zip(got, expected)])
    assert diff <= RTOL * ref.norm(expected), f"{what}: relative difference {float(diff / ref.norm(expected)):.2e}"


class Reference:
    """The optimizers' steps from the equations, over parameters ``active`` (those with a gradient) only."""

    def __init__(self, theta, kind, rho, adaptive, scaled=None, clip=None):
        """``clip``: the training gradients g_S and g* are clipped to that global norm (torch's
        clip_grad_norm_: g · min(1, c / (‖g‖ + 1e-6))), as a closure that clips after its backward does."""
        self.theta, self.kind, self.rho, self.adaptive, self.scaled = theta, kind, rho, adaptive, scaled
        self.clip = clip
        self.m = [None] * len(theta)
        self.buf = [None] * len(theta)

    def step(self, train, val, active, val_gain=None):
        """``val_gain=False``: the validation loss leaves ``gain`` out while the training loss uses it, so
        gain's g_V is 0 (the documented rule for a parameter with no validation gradient)."""
        idx = [i for i, a in enumerate(active) if a]
        at = [self.theta[i] for i in idx]
        scaled = None if self.scaled is None else [self.scaled[i] for i in idx]

        def loss_fn(data, use_gain=active[0]):
            def f(w):
                full = list(self.theta)
                for i, wi in zip(idx, w):
                    full[i] = wi
                return loss_with(full, *data, use_gain=use_gain)

            return f

        g_s = self.clipped(ref.grad(loss_fn(train), at, create_graph=False))
        if self.kind == "sam":
            eps = ref.ascent(at, g_s, self.rho[0], self.adaptive, ETA, scaled)
        else:
            g_v = grad_or_zero(loss_fn(val, active[0] if val_gain is None else val_gain), at)
            m = [g if self.m[i] is None else BETA * self.m[i] + (1 - BETA) * g for i, g in zip(idx, g_v)]
            for i, mi in zip(idx, m):
                self.m[i] = mi
            eps = ref.agnostic_eps(at, g_s, m, *self.rho, self.adaptive, ETA, scaled)
        g_star = self.clipped(ref.grad(loss_fn(train), [a + e for a, e in zip(at, eps)], create_graph=False))
        new, buf = ref.sgd(at, g_star, [self.buf[i] for i in idx], LR, MU, WD)
        for i, t, b in zip(idx, new, buf):
            self.theta[i], self.buf[i] = t.detach(), b.detach()


    def clipped(self, g):
        if self.clip is None:
            return g
        return [gi * min(1.0, self.clip / (float(ref.norm(g)) + 1e-6)) for gi in g]


def grad_or_zero(loss_fn, at):
    """∇ loss_fn at ``at``, 0 for a tensor the loss does not use."""
    at = [a.detach().requires_grad_() for a in at]
    grads = torch.autograd.grad(loss_fn(at), at, allow_unused=True)
    return [torch.zeros_like(a) if g is None else g for a, g in zip(at, grads)]


CASES = {  # name: (kind, radii, adaptive, asam_scope)
    "sam": ("sam", (0.1,), False, "all"),
    "asam": ("sam", (0.5,), True, "all"),
    "asam-weights-only": ("sam", (0.5,), True, "weights"),
    "agnostic-sam": ("agnostic", (0.1, 0.04), False, "all"),
    "agnostic-asam": ("agnostic", (0.5, 0.2), True, "all"),
    "agnostic-asam-weights-only": ("agnostic", (0.5, 0.2), True, "weights"),
}


def make(model, kind, radii, adaptive, scope, **extra):
    base = dict(lr=LR, momentum=MU, weight_decay=WD, adaptive=adaptive, eta=ETA, asam_scope=scope, model=model, **extra)
    if kind == "sam":
        return SAM(model.parameters(), torch.optim.SGD, rho=radii[0], **base)
    return AgnosticSAM(model.parameters(), torch.optim.SGD, rho1=radii[0], rho2=radii[1], beta=BETA, **base)


def run_and_compare(case, gain_used):
    kind, radii, adaptive, scope = CASES[case]
    model = Net()
    opt = make(model, kind, radii, adaptive, scope)
    names = [n for n, _ in model.named_parameters()]
    scaled = None if scope == "all" else ["weight" in n for n in names]
    reference = Reference([p.detach().clone() for p in model.parameters()], kind, radii, adaptive, scaled)
    for step, use_gain in enumerate(gain_used):
        train, val = batch(10 + step, 12), batch(20 + step, 6)
        if kind == "sam":
            opt.step(closure(model, *train, use_gain))
        else:
            opt.step(closure(model, *train, use_gain), closure(model, *val, use_gain))
        reference.step(train, val, [use_gain] + [True] * 4)
        assert_close([p.detach() for p in model.parameters()], reference.theta, f"{case}, step {step + 1}")
    return opt, reference


@pytest.mark.parametrize("case", list(CASES))
def test_three_steps_on_a_network_of_several_tensors_equal_the_reference(case):
    run_and_compare(case, [True, True, True])


def test_asam_weights_only_leaves_the_biases_unscaled():
    """asam_scope="weights" scales 0.weight, 1.weight and not the biases or the gain (the ASAM authors' code)."""
    model = Net()
    opt = make(model, "sam", (0.5,), True, "weights")
    assert [opt._scaled_of[p] for p in model.parameters()] == [False, True, False, True, False]
    with pytest.raises(ConfigError, match="pass model="):
        SAM(model.parameters(), torch.optim.SGD, adaptive=True, asam_scope="weights", lr=0.1)


@pytest.mark.parametrize("case", ["agnostic-sam", "agnostic-asam"])
def test_the_validation_momentum_is_kept_per_parameter_when_a_parameter_has_no_gradient(case):
    """Step 2 leaves ``gain`` out of the loss: its m, its SGD buffer and its value stay as they were, the other
    parameters' m carry on, and at step 3 gain's m continues from step 1."""
    opt, reference = run_and_compare(case, [True, False, True, True])
    params = list(opt.model.parameters())
    assert_close([opt.momentum[p] for p in params], reference.m, f"{case}: m after four steps")


@pytest.mark.parametrize("case", ["agnostic-sam", "agnostic-asam"])
def test_a_parameter_with_a_training_gradient_and_no_validation_gradient_takes_g_v_zero(case):
    """Step 2's validation loss leaves ``gain`` out (its training loss uses it): gain's m becomes β·m, the
    other parameters' m carry on, and every step equals the reference built on g_V = 0 for gain."""
    kind, radii, adaptive, scope = CASES[case]
    model = Net()
    opt = make(model, kind, radii, adaptive, scope)
    reference = Reference([p.detach().clone() for p in model.parameters()], kind, radii, adaptive)
    for step, val_gain in enumerate([True, False, True]):
        train, val = batch(10 + step, 12), batch(20 + step, 6)
        m_gain = None if step == 0 else opt.momentum[model.gain].clone()
        opt.step(closure(model, *train), closure(model, *val, val_gain))
        reference.step(train, val, [True] * 5, val_gain=val_gain)
        assert_close([p.detach() for p in model.parameters()], reference.theta, f"{case}, step {step + 1}")
        if not val_gain:
            assert torch.equal(opt.momentum[model.gain], BETA * m_gain)
    assert_close([opt.momentum[p] for p in model.parameters()], reference.m, f"{case}: m after three steps")


def state_of(opt, model):
    return copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "step_count": opt.step_count})


def assert_identical(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("where", ["training", "validation", "perturbed"])
def test_a_refused_step_leaves_parameters_base_state_and_momentum_bit_identical(where):
    """A NaN in g_S, in g_V, or only at θ + ε: the step raises and the optimizer's whole state (parameters,
    SGD momentum buffers, m, step count) is what it was; the next finite step equals the reference."""
    model = Net()
    opt = make(model, "agnostic", (0.1, 0.04), False, "all")
    for step in range(2):
        train, val = batch(30 + step, 12), batch(40 + step, 6)
        opt.step(closure(model, *train), closure(model, *val))
    before = state_of(opt, model)
    train, val = batch(50, 12), batch(51, 6)
    calls = []

    def poisoned(x, y, when):
        def run():
            calls.append(when)
            loss = nn.functional.cross_entropy(model(x), y)
            if when == where and (where != "perturbed" or calls.count("perturbed") == 2):
                loss = loss * float("nan")
            loss.backward()
            return loss

        return run

    train_when = "training" if where == "training" else "perturbed"
    with pytest.raises(NonFiniteError, match=where):
        opt.step(poisoned(*train, train_when), poisoned(*val, "validation"))
    assert_identical(state_of(opt, model), before)
    opt.step(closure(model, *train), closure(model, *val))  # and the optimizer goes on as if nothing happened
    fresh = Net()
    fresh_opt = make(fresh, "agnostic", (0.1, 0.04), False, "all")
    for step in range(2):
        fresh_opt.step(closure(fresh, *batch(30 + step, 12)), closure(fresh, *batch(40 + step, 6)))
    fresh_opt.step(closure(fresh, *train), closure(fresh, *val))
    assert_identical(state_of(opt, model), state_of(fresh_opt, fresh))
