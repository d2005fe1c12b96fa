"""Two processes sharing a meta-batch over gloo compute what one process computes on the whole meta-batch.

This file is also the program each process runs: the test starts it under ``torch.distributed.run``
(loopback, 2 processes), every process writes what it computed, and the test compares that with a single
process's results computed here, without any reducer. T = 5 tasks, so the shares (3 and 2) are uneven:
a mean of per-process means would differ from the mean over tasks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from metasam import ConfigError
from metasam.meta import MetaLearner, TaskBatch

T, WAYS, SHOTS, QUERIES, DIM = 5, 3, 2, 3, 4
AGNOSTIC_BOTH = {"inner_rho1": 0.08, "inner_rho2": 0.03, "inner_beta": 0.7, "outer_rho1": 0.3, "outer_rho2": 0.1,
                 "outer_beta": 0.7}
CASES = {  # name: (algo, path, learner settings); the outer rules are where reductions can go wrong
    "maml": ("maml", "loop", {}),
    "maml-vmap": ("maml", "vmap", {}),
    "sharp-maml-up": ("sharp-maml-up", "loop", {"outer_rho": 0.3}),
    "agnostic-sam-both": ("agnostic-sam-both", "loop", AGNOSTIC_BOTH),
    "agnostic-sam-both-meta-sgd": ("agnostic-sam-both", "loop", {**AGNOSTIC_BOTH, "learn_inner_lr": True}),  # α reduced too
}
STEPS = 3


def episodes(seed: int, n: int = T) -> TaskBatch:
    """n fixed random 3-way tasks in float64 whose classes are shifted Gaussians."""
    gen = torch.Generator().manual_seed(seed)

    def part(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(WAYS).repeat_interleave(per_class).repeat(n, 1)
        return torch.randn(n, WAYS * per_class, DIM, generator=gen, dtype=torch.float64) + y[..., None], y

    return TaskBatch(*part(SHOTS), *part(QUERIES))


def make_learner(case: str, reducer=None) -> MetaLearner:
    algo, path, params = CASES[case]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM, 8), nn.Tanh(), nn.Linear(8, WAYS)).double()
    return MetaLearner(model, algo, inner_lr=0.3, inner_steps=2, outer_lr=0.01, path=path, reducer=reducer, **params)


def eval_items() -> list:
    """Four single tasks and one batch of two: the items evaluation shares between processes."""
    batch = episodes(99, n=6)
    return [tuple(t[i] for t in batch) for i in range(4)] + [tuple(t[4:6] for t in batch)]


def take(batch: TaskBatch, tasks: list[int]) -> TaskBatch:
    return TaskBatch(*(t[tasks] for t in batch))


def run_case(case: str, reducer=None) -> dict:
    """The meta-gradient at θ_0, then 3 outer steps, each on this process's share of fixed meta-batches."""
    learner = make_learner(case, reducer)
    mine = list(range(T)) if reducer is None else list(reducer.share(range(T)))
    val = learner.outer_rule.name == "agnostic"
    grad = learner.meta_gradient(take(episodes(0), mine), take(episodes(100), mine) if val else None)
    metrics = [learner.meta_step(take(episodes(s), mine), take(episodes(100 + s), mine) if val else None) for s in range(STEPS)]
    accs = learner.task_accuracies(eval_items())
    learner.reducer = None  # the same weights, evaluated by this process alone
    return {
        "tasks": mine, "grad": grad, "metrics": metrics, "accs": accs, "accs_alone": learner.task_accuracies(eval_items()),
        "weights": {n: p.detach().clone() for n, p in learner.meta_params.items()}, "momentum": learner.outer_momentum,
        "adam": [{k: v.clone() for k, v in state.items()} for state in learner.outer_optimizer.state.values()],
    }


def worker(out: Path) -> None:
    import torch.distributed as dist

    from metasam.meta.distributed import ProcessGroupReducer

    dist.init_process_group("gloo")
    reducer = ProcessGroupReducer()
    torch.save({case: run_case(case, reducer) for case in CASES}, out / f"rank{reducer.rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("distributed-meta")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_take_the_outer_steps_of_one_process_on_the_whole_meta_batch(two_processes, case):
    ranks = [r[case] for r in two_processes]
    single = run_case(case)
    # the shares are disjoint, uneven, and together the whole meta-batch
    assert ranks[0]["tasks"] == [0, 2, 4] and ranks[1]["tasks"] == [1, 3]
    for r in ranks:
        for name, g in single["grad"].items():
            assert torch.allclose(r["grad"][name], g, rtol=1e-10, atol=1e-13), name
    # the check can fail: rank 0's tasks alone give another meta-gradient
    learner = make_learner(case)
    val = take(episodes(100), [0, 2, 4]) if learner.outer_rule.name == "agnostic" else None
    alone = learner.meta_gradient(take(episodes(0), [0, 2, 4]), val)
    assert not all(torch.allclose(alone[n], g, rtol=1e-6) for n, g in single["grad"].items())
    for name, w in single["weights"].items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name  # every rank took the same steps
        assert torch.allclose(ranks[0]["weights"][name], w, rtol=1e-10, atol=1e-13), name
    # Adam's moments and step count too: the same on every rank, bit for bit, and those of one process
    assert len(ranks[0]["adam"]) == len(single["adam"]) == len(single["weights"])
    for mine, other, one in zip(ranks[0]["adam"], ranks[1]["adam"], single["adam"]):
        assert mine.keys() == one.keys() == {"step", "exp_avg", "exp_avg_sq"}
        for key in one:
            assert torch.equal(mine[key], other[key]), key
            assert torch.allclose(mine[key], one[key], rtol=1e-9, atol=1e-13), key
    if single["momentum"] is not None:  # the agnostic outer rule's momentum of validation meta-gradients
        for a, b in zip(ranks[0]["momentum"], single["momentum"]):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
    for r in ranks:  # logged metrics are those of the whole meta-batch, not of one share
        for got, want in zip(r["metrics"], single["metrics"]):
            assert got.keys() == want.keys()
            for key, value in want.items():
                rel = 1e-6 if "acc" in key else 1e-9  # accuracies are float32 means
                assert got[key] == pytest.approx(value, rel=rel, abs=1e-12), key


@pytest.mark.slow
def test_evaluation_shared_between_processes_returns_the_single_process_accuracies_in_order(two_processes):
    for case in CASES:
        r0, r1 = (r[case] for r in two_processes)
        assert len(r0["accs"]) == 6 and len(set(r0["accs_alone"])) > 1  # the order is checkable
        assert r0["accs"] == r1["accs"] == r0["accs_alone"]


def test_a_process_without_tasks_is_told_to_use_a_larger_meta_batch():
    with pytest.raises(ConfigError, match="at least as many tasks as processes"):
        make_learner("maml").meta_gradient(take(episodes(0), []))


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
