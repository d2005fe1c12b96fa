"""SAM and Agnostic-SAM on a DistributedDataParallel model (docs/optimizer.md, "Several processes"): 2 gloo
processes on loopback, each with half of every batch, against the float64 reference of test_optim_reference.

- ``step(closure)``: DDP averages the gradient of every backward, so ε comes from the whole batch's g_S and the
  step equals one process on the whole batch ("global" SAM).
- the explicit form with the first backward under ``no_sync()``: each process perturbs along its own half's
  gradient and g* is the mean over processes of ∇L_half(θ + ε_half) ("local" SAM, as the SAM paper trained
  across accelerators).

This file is also the program the two processes run (``__main__`` at the end).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import reference as ref
from test_optim_reference import LR, MU, WD, Net, Reference, assert_close, batch, loss_with, make

pytestmark = pytest.mark.slow  # a torchrun of two processes

STEPS = 3
SCENARIOS = {"sam": ("sam", (0.1,)), "agnostic-sam": ("agnostic", (0.1, 0.04)), "local-sam": ("sam", (0.1,))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The parameters each scenario reached on rank 0 after STEPS steps, one file per scenario."""
    out = tmp_path_factory.mktemp("ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                                                os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.mark.parametrize("scenario", ["sam", "agnostic-sam"])
def test_step_with_a_closure_on_a_ddp_model_equals_one_process_on_the_whole_batch(trained, scenario):
    kind, radii = SCENARIOS[scenario]
    reference = Reference([p.detach().clone() for p in Net().parameters()], kind, radii, False)
    for step in range(STEPS):
        reference.step(batch(10 + step, 12), batch(20 + step, 6), [True] * 5)
    assert_close(torch.load(trained / f"{scenario}.pt"), reference.theta, f"{scenario} under DDP")


def test_first_backward_under_no_sync_perturbs_each_process_along_its_own_gradient(trained):
    """ε_r = ρ · unit(g_r) from process r's half; θ ← SGD(θ, mean_r ∇L_r(θ + ε_r)). Fails if the first
    backward's gradients were averaged (that is the global step above) or if a process's ε leaked into the
    other's g*."""
    theta, buf = [p.detach().clone() for p in Net().parameters()], [None] * 5
    for step in range(STEPS):
        g_star = []
        for x, y in halves(*batch(10 + step, 12)):
            def loss(w, x=x, y=y):
                return loss_with(w, x, y)

            eps = ref.ascent(theta, ref.grad(loss, theta, create_graph=False), 0.1)
            g_star.append(ref.grad(loss, [t + e for t, e in zip(theta, eps)], create_graph=False))
        theta, buf = ref.sgd(theta, [(a + b) / 2 for a, b in zip(*g_star)], buf, LR, MU, WD)
    assert_close(torch.load(trained / "local-sam.pt"), theta, "local SAM under DDP")
    global_step = Reference([p.detach().clone() for p in Net().parameters()], "sam", (0.1,), False)
    for step in range(STEPS):
        global_step.step(batch(10 + step, 12), None, [True] * 5)
    assert ref.norm([a - b for a, b in zip(theta, global_step.theta)]) > 1e-6, "local and global SAM must differ here"


def halves(x, y):
    return [(x[:len(y) // 2], y[:len(y) // 2]), (x[len(y) // 2:], y[len(y) // 2:])]


def closure(model, x, y):
    def run():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return run


def train(scenario: str, rank: int) -> list[torch.Tensor]:
    """STEPS steps of ``scenario`` on this process's half of each batch."""
    kind, radii = SCENARIOS[scenario]
    net = Net()
    model = DistributedDataParallel(net)
    opt = make(net, kind, radii, False, "all")
    for step in range(STEPS):
        train_half = halves(*batch(10 + step, 12))[rank]
        if scenario == "local-sam":
            opt.zero_grad()  # the explicit form leaves g* in p.grad after second_step()
            with model.no_sync():
                closure(model, *train_half)()
            opt.first_step(zero_grad=True)
            closure(model, *train_half)()
            opt.second_step()
        elif kind == "sam":
            opt.step(closure(model, *train_half))
        else:
            opt.step(closure(model, *train_half), closure(model, *halves(*batch(20 + step, 6))[rank]))
    return [p.detach() for p in net.parameters()]


if __name__ == "__main__":
    dist.init_process_group("gloo")
    for name in SCENARIOS:
        params = train(name, dist.get_rank())
        if dist.get_rank() == 0:
            torch.save(params, Path(sys.argv[1]) / f"{name}.pt")
    dist.barrier()
    dist.destroy_process_group()
