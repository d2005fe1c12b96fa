"""metasam's second-order MAML meta-gradient against independent implementations on a Conv4 with
batch-statistics BatchNorm: a hand-written torch.autograd loop, and ``higher`` where it is installed
(``pip install -e ".[bench]"``). benchmarks/throughput.py runs the same check before it times anything.

The references run the textbook Conv4 built from torch's own layers (``Conv4`` with ``nn.BatchNorm2d``,
ReLU before the max-pool), loaded with the same weights, so the check covers metasam's models (``Conv4``
with its own BatchNorm, and ``CPUConv4``'s re-associated blocks) as well as its learner. The images are binary, like Omniglot's: constant regions give exactly tied maxima in the
pooling windows, where the two layer orders must still route the gradient identically."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metasam.meta import MetaLearner, TaskBatch
from metasam.models import MODELS, Conv4

ALPHA = 0.4
MODEL_NAMES = ["Conv4", "CPUConv4"]


def conv4(name: str = "Conv4") -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name](5, hidden=8).double()


def textbook() -> nn.Module:
    """Finn et al.'s Conv4 as a user writes it with torch layers (conv, BatchNorm2d, ReLU, max-pool), holding
    exactly conv4()'s weights."""
    model = Conv4(5, hidden=8, norm=lambda c: nn.BatchNorm2d(c, track_running_stats=False)).double()
    model.load_state_dict(conv4().state_dict())
    return model


def batch(tasks=3) -> TaskBatch:
    gen = torch.Generator().manual_seed(3)
    sy = torch.arange(5).repeat(tasks, 1)
    qy = torch.arange(5).repeat_interleave(3).repeat(tasks, 1)
    strokes = lambda n: (torch.rand(tasks, n, 1, 28, 28, generator=gen) > 0.8).double()  # noqa: E731
    return TaskBatch(strokes(5), sy, strokes(15), qy)


def hand_written(model: nn.Module, b: TaskBatch, steps: int) -> list[torch.Tensor]:
    params = dict(model.named_parameters())
    total = [torch.zeros_like(p) for p in params.values()]
    tasks = b.support_x.shape[0]
    for t in range(tasks):
        fast = params
        for _ in range(steps):
            loss = nn.functional.cross_entropy(functional_call(model, fast, (b.support_x[t],)), b.support_y[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: p - ALPHA * g for (n, p), g in zip(fast.items(), grads)}
        query = nn.functional.cross_entropy(functional_call(model, fast, (b.query_x[t],)), b.query_y[t]) / tasks
        for acc, g in zip(total, torch.autograd.grad(query, list(params.values()))):
            acc += g
    return total


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("steps", [1, 2])
def test_maml_meta_gradient_equals_a_hand_written_autograd_loop(steps, name):
    b = batch()
    ours = MetaLearner(conv4(name), "maml", inner_lr=ALPHA, inner_steps=steps).meta_gradient(b)
    theirs = hand_written(textbook(), b, steps)
    for (name, g), h in zip(ours.items(), theirs):
        assert torch.allclose(g, h, rtol=1e-9, atol=1e-12), name


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_maml_meta_gradient_equals_higher(name):
    higher = pytest.importorskip("higher", reason="higher is not installed (pip install -e '.[bench]')")
    b, model = batch(), textbook()
    inner_opt = torch.optim.SGD(model.parameters(), lr=ALPHA)
    for t in range(3):
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
            diffopt.step(nn.functional.cross_entropy(fmodel(b.support_x[t]), b.support_y[t]))
            (nn.functional.cross_entropy(fmodel(b.query_x[t]), b.query_y[t]) / 3).backward()
    ours = MetaLearner(conv4(name), "maml", inner_lr=ALPHA).meta_gradient(b)
    for (tensor, g), p in zip(ours.items(), model.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-9, atol=1e-12), tensor


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_conv4_computes_the_textbook_function_with_tied_pooling_windows(name):
    b = batch()
    x = torch.cat([b.support_x.flatten(0, 1), b.query_x.flatten(0, 1)])
    ours, theirs = conv4(name), textbook()
    pre_pool = theirs.features[:3](x)  # conv, batch norm, ReLU of the first block
    windows = pre_pool.unfold(2, 2, 2).unfold(3, 2, 2).flatten(-2)
    top2 = windows.topk(2, dim=-1).values
    assert ((top2[..., 0] == top2[..., 1]) & (top2[..., 0] > 0)).sum() > 100  # the data really has positive ties
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)  # rounding: CPUConv4's first block
