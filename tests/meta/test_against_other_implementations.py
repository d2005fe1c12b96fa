"""metasam's second-order MAML meta-gradient against independent implementations on a Conv4 with
batch-statistics BatchNorm: a hand-written torch.autograd loop, and ``higher`` where it is installed
(``pip install -e ".[bench]"``). benchmarks/throughput.py runs the same check before it times anything."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metasam.meta import MetaLearner, TaskBatch
from metasam.models import Conv4

ALPHA = 0.4


def conv4() -> nn.Module:
    torch.manual_seed(0)
    return Conv4(5, hidden=8).double()


def batch(tasks=3) -> TaskBatch:
    gen = torch.Generator().manual_seed(3)
    sy = torch.arange(5).repeat(tasks, 1)
    qy = torch.arange(5).repeat_interleave(3).repeat(tasks, 1)
    return TaskBatch(torch.rand(tasks, 5, 1, 28, 28, generator=gen, dtype=torch.float64), sy,
                     torch.rand(tasks, 15, 1, 28, 28, generator=gen, dtype=torch.float64), qy)


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


@pytest.mark.parametrize("steps", [1, 2])
def test_maml_meta_gradient_equals_a_hand_written_autograd_loop(steps):
    b = batch()
    ours = MetaLearner(conv4(), "maml", inner_lr=ALPHA, inner_steps=steps).meta_gradient(b)
    theirs = hand_written(conv4(), b, steps)
    for (name, g), h in zip(ours.items(), theirs):
        assert torch.allclose(g, h, rtol=1e-9, atol=1e-12), name


def test_maml_meta_gradient_equals_higher():
    higher = pytest.importorskip("higher", reason="higher is not installed (pip install -e '.[bench]')")
    b, model = batch(), conv4()
    inner_opt = torch.optim.SGD(model.parameters(), lr=ALPHA)
    for t in range(3):
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
            diffopt.step(nn.functional.cross_entropy(fmodel(b.support_x[t]), b.support_y[t]))
            (nn.functional.cross_entropy(fmodel(b.query_x[t]), b.query_y[t]) / 3).backward()
    ours = MetaLearner(conv4(), "maml", inner_lr=ALPHA).meta_gradient(b)
    for (name, g), p in zip(ours.items(), model.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-9, atol=1e-12), name
