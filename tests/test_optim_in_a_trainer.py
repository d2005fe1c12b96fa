"""SAM and Agnostic-SAM in the loops researchers write around them: gradient accumulation over micro-batches,
gradient clipping, bfloat16 autocast, and float16 autocast with a GradScaler (``grad_scaler=``), inside the closure
(docs/optimizer.md, "In your training loop").

Each is checked against the float64 reference of test_optim_reference (written from the equations), over three
steps of a network of several tensors, so that what the docs promise is what the optimizers do.
"""

import pytest
import torch
from torch import nn

import reference as ref

from metasam import SAM, ConfigError, NonFiniteError
from test_optim_reference import (CASES, Net, Reference, assert_close, assert_identical, batch, loss_with, make,
                                  state_of)

MICRO = (5, 4, 3)  # a batch of 12 as three micro-batches of unequal sizes


def accumulating(model, x, y, sizes=MICRO):
    """A closure that runs backward once per micro-batch, each loss weighted by its share of the batch, so that
    the gradients it leaves in ``p.grad`` sum to the gradient of the whole batch's mean loss."""

    def run():
        total = 0.0
        for xs, ys in zip(x.split(sizes), y.split(sizes)):
            loss = nn.functional.cross_entropy(model(xs), ys) * (len(ys) / len(y))
            loss.backward()
            total += loss.detach()
        return total

    return run


def clipping(model, x, y, max_norm):
    """A closure that clips the gradient of its batch to ``max_norm`` after its backward."""

    def run():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return loss

    return run


@pytest.mark.parametrize("case", ["sam", "agnostic-sam"])
def test_a_closure_that_accumulates_micro_batches_takes_the_whole_batch_step(case):
    """Every pass (g_S at θ, g_V, g* at θ + ε) is the sum of the closure's backward calls: three steps equal the
    reference on the whole batches. Fails if the optimizer kept the gradient of one pass in the next."""
    kind, radii, adaptive, scope = CASES[case]
    model = Net()
    opt = make(model, kind, radii, adaptive, scope)
    reference = Reference([p.detach().clone() for p in model.parameters()], kind, radii, adaptive)
    for step in range(3):
        train, val = batch(10 + step, 12), batch(20 + step, 6)
        if kind == "sam":
            loss = opt.step(accumulating(model, *train))
        else:
            loss = opt.step(accumulating(model, *train), accumulating(model, *val, sizes=(2, 4)))
        before = list(reference.theta)
        reference.step(train, val, [True] * 5)
        assert_close([p.detach() for p in model.parameters()], reference.theta, f"{case}, step {step + 1}")
        assert torch.allclose(loss, loss_with(before, *train), rtol=1e-12, atol=0)  # the whole batch's loss at θ


@pytest.mark.parametrize("case", ["sam", "asam", "agnostic-sam"])
def test_clipping_inside_the_closure_clips_the_gradient_of_the_step(case):
    """Clipping after each backward of the training closure clips g_S (which leaves SAM's and ASAM's ε unchanged:
    they use g_S's direction) and g*, the gradient the base optimizer steps with: three steps equal the
    reference built on clipped g_S and g*. The validation closure does not clip (clipping g_V would reweight
    the steps that make up Agnostic-SAM's m)."""
    kind, radii, adaptive, scope = CASES[case]
    model = Net()
    opt = make(model, kind, radii, adaptive, scope)
    reference = Reference([p.detach().clone() for p in model.parameters()], kind, radii, adaptive, clip=0.05)
    clipped = 0
    for step in range(3):
        train, val = batch(10 + step, 12), batch(20 + step, 6)
        if kind == "sam":
            opt.step(clipping(model, *train, 0.05))
        else:
            opt.step(clipping(model, *train, 0.05), accumulating(model, *val, sizes=(6,)))
        clipped += float(opt.last_stats["perturbed_grad_norm"]) < 0.05 + 1e-9
        reference.step(train, val, [True] * 5)
        assert_close([p.detach() for p in model.parameters()], reference.theta, f"{case}, step {step + 1}")
    assert clipped == 3, "max_norm 0.05 must clip every g* of these batches, or the test checks nothing"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_inside_the_closure_steps_like_float32(dtype):
    """The closure's forward under CPU autocast: bfloat16 without loss scaling (it has float32's exponent range),
    float16 through a GradScaler (grad_scaler=, the closure's backward through scaler.scale(loss)). The
    parameters and the optimizer's state stay float32, and each of three steps moves θ as the float32 step does
    to within 2⁻⁵ of the step's size (measured: 0.3 % with bfloat16, about its 2⁻⁸ rounding)."""
    steps = []
    for autocast in (False, True):
        model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
        model.load_state_dict(_fixed_weights())
        scaler = torch.amp.GradScaler("cpu", enabled=autocast and dtype == torch.float16)
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.2, momentum=0.9, grad_scaler=scaler)
        moved = []
        for step in range(3):
            x, y = (t.float() if t.is_floating_point() else t for t in batch(10 + step, 12))

            def run():
                with torch.autocast("cpu", dtype=dtype, enabled=autocast):
                    loss = nn.functional.cross_entropy(model(x), y)
                scaler.scale(loss).backward()
                return loss

            before = [p.detach().clone() for p in model.parameters()]
            opt.step(run)
            scaler.update()
            moved.append([p.detach() - b for p, b in zip(model.parameters(), before)])
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
        assert opt.step_count == 3
        steps.append(moved)
    for step, (plain, mixed) in enumerate(zip(*steps)):
        diff = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(plain, mixed)))
        size = torch.sqrt(sum((a**2).sum() for a in plain))
        assert diff <= 2**-5 * size, f"step {step + 1}: the {dtype} step differs by {float(diff / size):.1%}"
        assert diff > 0, "autocast changed nothing: the test would not see a step that ignores it"


def _fixed_weights():
    gen = torch.Generator().manual_seed(3)
    return {"0.weight": torch.randn(16, 4, generator=gen) / 2, "0.bias": torch.randn(16, generator=gen) / 4,
            "2.weight": torch.randn(3, 16, generator=gen) / 4, "2.bias": torch.randn(3, generator=gen) / 4}


def scaled(model, x, y, scaler, poison=None):
    """A closure for float16 loss scaling: backward through ``scaler.scale(loss)``; ``poison`` (a list of pass
    numbers, counted over the calls of this closure) multiplies the loss by 1e308 there, so that its scaled
    gradient overflows to Inf as a float16 one would."""
    calls = []

    def run():
        calls.append(1)
        loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss * 1e308 if poison and len(calls) in poison else loss).backward()
        return loss

    return run


def scaler_of(growth_interval):
    return torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=growth_interval)


@pytest.mark.parametrize("case", ["sam", "asam", "agnostic-sam"])
def test_with_a_grad_scaler_each_step_is_the_unscaled_step_while_the_scale_grows(case):
    """grad_scaler=: the closures backward through scaler.scale(loss), the scale doubles at every step
    (growth_interval 1), and three steps equal the reference on unscaled gradients (powers of two scale exactly).
    Fails if a pass's gradient is used scaled: Agnostic-SAM's m would mix g_V at scales 2⁸, 2⁹, 2¹⁰."""
    kind, radii, adaptive, scope = CASES[case]
    model, scaler = Net(), scaler_of(1)
    opt = make(model, kind, radii, adaptive, scope, grad_scaler=scaler)
    reference = Reference([p.detach().clone() for p in model.parameters()], kind, radii, adaptive)
    for step in range(3):
        train, val = batch(10 + step, 12), batch(20 + step, 6)
        if kind == "sam":
            opt.step(scaled(model, *train, scaler))
        else:
            opt.step(scaled(model, *train, scaler), scaled(model, *val, scaler))
        scaler.update()
        g_s = ref.grad(lambda w, train=train: loss_with(w, *train), reference.theta, create_graph=False)
        assert torch.allclose(opt.last_stats["grad_norm"], ref.norm(g_s), rtol=1e-12, atol=0)  # ‖g_S‖, unscaled
        reference.step(train, val, [True] * 5)
        assert_close([p.detach() for p in model.parameters()], reference.theta, f"{case}, step {step + 1}")
    assert scaler.get_scale() == 2.0**11 and opt.skipped_steps == 0 and opt.step_count == 3


@pytest.mark.parametrize(("case", "where"), [("sam", "training"), ("sam", "perturbed"), ("agnostic-sam", "training"),
                                             ("agnostic-sam", "validation"), ("agnostic-sam", "perturbed")])
def test_an_overflow_skips_the_step_lowers_the_scale_and_changes_nothing(case, where):
    """An Inf in the scaled g_S, g_V or g* is an overflow, not an error: the step is skipped as GradScaler
    skips one (no NonFiniteError), the parameters, SGD buffers, m and the step count stay bit for bit, the
    scaler halves its scale on update(), and the next step equals the reference's."""
    kind, radii, adaptive, scope = CASES[case]
    model, scaler = Net(), scaler_of(1000)
    opt = make(model, kind, radii, adaptive, scope, grad_scaler=scaler)
    reference = Reference([p.detach().clone() for p in model.parameters()], kind, radii, adaptive)

    def step(n, poison_train=None, poison_val=None):
        train, val = batch(10 + n, 12), batch(20 + n, 6)
        if kind == "sam":
            opt.step(scaled(model, *train, scaler, poison_train))
        else:
            opt.step(scaled(model, *train, scaler, poison_train), scaled(model, *val, scaler, poison_val))
        scaler.update()
        return train, val

    reference.step(*step(0), [True] * 5)
    before = state_of(opt, model)
    step(1, poison_train={"training": [1], "perturbed": [2]}.get(where), poison_val=[1] if where == "validation" else None)
    assert_identical(state_of(opt, model), before)
    assert scaler.get_scale() == 2.0**7 and opt.skipped_steps == 1 and opt.last_stats == {}
    reference.step(*step(2), [True] * 5)
    assert_close([p.detach() for p in model.parameters()], reference.theta, f"{case}, the step after the skipped one")
    assert opt.step_count == 2


def test_the_validation_batches_given_at_construction_are_scaled_too():
    """AgnosticSAM(val_batches=, val_loss=) with grad_scaler=: the optimizer's own validation closure
    backpropagates the scaled loss, so g_V (unscaled) and m are the reference's while the scale doubles."""
    kind, radii, adaptive, scope = CASES["agnostic-sam"]
    model, scaler = Net(), scaler_of(1)
    vals = [batch(20 + step, 6) for step in range(3)]
    opt = make(model, kind, radii, adaptive, scope, grad_scaler=scaler, val_batches=vals,
               val_loss=lambda b: nn.functional.cross_entropy(model(b[0]), b[1]))
    reference = Reference([p.detach().clone() for p in model.parameters()], kind, radii, adaptive)
    for step in range(3):
        train = batch(10 + step, 12)
        opt.step(scaled(model, *train, scaler))
        scaler.update()
        reference.step(train, vals[step], [True] * 5)
        assert_close([p.detach() for p in model.parameters()], reference.theta, f"step {step + 1}")


def test_clipping_scaled_gradients_at_the_scaled_norm_clips_as_without_a_scaler():
    """With grad_scaler= the closure's gradients are scaled by s: clipping them at max_norm · s is the reference
    step clipped at max_norm, to within the 1e-6 clip_grad_norm_ adds to the norm (1e-6 / s instead)."""
    kind, radii, adaptive, scope = CASES["sam"]
    model, scaler = Net(), scaler_of(1)
    opt = make(model, kind, radii, adaptive, scope, grad_scaler=scaler)
    reference = Reference([p.detach().clone() for p in model.parameters()], kind, radii, adaptive, clip=0.05)

    def run(x, y):
        def closure():
            loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.05 * scaler.get_scale())
            return loss

        return closure

    for step in range(3):
        train = batch(10 + step, 12)
        opt.step(run(*train))
        scaler.update()
        reference.step(train, None, [True] * 5)
        diff = ref.norm([p.detach() - t for p, t in zip(model.parameters(), reference.theta)])
        assert diff <= 1e-7 * ref.norm(reference.theta), f"step {step + 1}: {float(diff):.1e}"
    assert float(opt.last_stats["perturbed_grad_norm"]) == pytest.approx(0.05, rel=1e-6)  # g* clipped, unscaled


def test_a_grad_scaler_is_refused_where_it_cannot_work():
    model = Net()
    with pytest.raises(ConfigError, match="grad_scaler must be a torch.amp.GradScaler"):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, grad_scaler=2.0**16)
    scaler = scaler_of(1)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, grad_scaler=scaler)
    x, y = batch(0, 4)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    with pytest.raises(ConfigError, match="in the explicit form"):
        opt.first_step()
    with pytest.raises(ConfigError, match="in the explicit form"):
        opt.second_step()
    with pytest.raises(ConfigError, match=r"call opt.step\(closure\) then scaler.update\(\), not scaler.step\(opt\)"):
        scaler.step(opt)  # GradScaler's own protocol calls step() without a closure


def test_a_disabled_grad_scaler_is_no_scaler_and_a_nan_stays_an_error():
    """GradScaler(enabled=False), the usual enabled=use_amp: no overflow is recorded, so a NaN must not be
    skipped in silence; the explicit form works as without a scaler."""
    model = Net()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, grad_scaler=scaler)
    x, y = batch(0, 4)

    def poisoned():
        loss = nn.functional.cross_entropy(model(x), y) * float("nan")
        scaler.scale(loss).backward()
        return loss

    with pytest.raises(NonFiniteError, match="training"):
        opt.step(poisoned)
    assert opt.skipped_steps == 0
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
