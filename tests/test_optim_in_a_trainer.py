"""SAM and Agnostic-SAM in the loops researchers write around them: gradient accumulation over micro-batches,
gradient clipping and bfloat16 autocast inside the closure (docs/optimizer.md, "In your training loop").

Each is checked against the float64 reference of test_optim_reference (written from the equations), over three
steps of a network of several tensors, so that what the docs promise is what the optimizers do.
"""

import pytest
import torch
from torch import nn

from metasam import SAM
from test_optim_reference import CASES, Net, Reference, assert_close, batch, loss_with, make

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


def test_bfloat16_autocast_inside_the_closure_steps_like_float32():
    """The closure's forward under CPU bfloat16 autocast: the parameters and the optimizer's state stay float32,
    and each of three steps moves θ as the float32 step does to within 2⁻⁵ of the step's size (measured: 0.3 %,
    about bfloat16's 2⁻⁸ rounding), with no loss scaling (bfloat16 has float32's exponent range)."""
    steps = []
    for autocast in (False, True):
        model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
        model.load_state_dict(_fixed_weights())
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.2, momentum=0.9)
        moved = []
        for step in range(3):
            x, y = (t.float() if t.is_floating_point() else t for t in batch(10 + step, 12))

            def run():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss

            before = [p.detach().clone() for p in model.parameters()]
            opt.step(run)
            moved.append([p.detach() - b for p, b in zip(model.parameters(), before)])
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
        steps.append(moved)
    for step, (plain, mixed) in enumerate(zip(*steps)):
        diff = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(plain, mixed)))
        size = torch.sqrt(sum((a**2).sum() for a in plain))
        assert diff <= 2**-5 * size, f"step {step + 1}: the bfloat16 step differs by {float(diff / size):.1%}"
        assert diff > 0, "autocast changed nothing: the test would not see a step that ignores it"


def _fixed_weights():
    gen = torch.Generator().manual_seed(3)
    return {"0.weight": torch.randn(16, 4, generator=gen) / 2, "0.bias": torch.randn(16, generator=gen) / 4,
            "2.weight": torch.randn(3, 16, generator=gen) / 4, "2.bias": torch.randn(3, generator=gen) / 4}
