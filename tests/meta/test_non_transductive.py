"""Non-transductive evaluation (Nichol et al. 2018): each query image predicted in a batch of its own with the
support set, so that BatchNorm's batch statistics carry nothing from one query to another; against a float64
forward written here from the definition, and through ``task_accuracies`` and ``metasam evaluate``."""

import json

import pytest
import torch
from torch import nn

from metasam import ConfigError
from metasam.cli.main import main
from metasam.meta import MetaLearner
from metasam.meta.functional import forward, forward_each

D = torch.float64
EPS = 1e-5


class BNNet(nn.Module):
    """Linear → BatchNorm (batch statistics) → tanh → Linear, float64."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 5).double()
        self.norm = nn.BatchNorm1d(5, track_running_stats=False, eps=EPS).double()
        self.head = nn.Linear(5, 3).double()
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.body(x))))


def by_hand(w, x):
    """BNNet's logits of the rows of ``x``, batch statistics over those rows (biased variance), from the equations."""
    w1, b1, gamma, beta, w2, b2 = w
    h = x @ w1.T + b1
    mean = h.mean(0)
    var = ((h - mean) ** 2).mean(0)
    return torch.tanh((h - mean) / torch.sqrt(var + EPS) * gamma + beta) @ w2.T + b2


def task(seed, queries=9):
    gen = torch.Generator().manual_seed(seed)
    sy, qy = torch.arange(3).repeat_interleave(2), torch.arange(3).repeat_interleave(queries // 3)
    return (torch.randn(6, 4, generator=gen, dtype=D) + sy[:, None], sy,
            torch.randn(queries, 4, generator=gen, dtype=D) + qy[:, None], qy)


def test_each_query_is_predicted_with_the_support_set_alone():
    """Row i of forward_each is the last row of the network on [support; x_i]; the transductive forward (batch
    statistics over the query set) gives other logits, so the test tells the two apart."""
    model = BNNet()
    sx, _, qx, _ = task(0)
    params = dict(model.named_parameters())
    w = [p.detach() for p in params.values()]
    expected = torch.stack([by_hand(w, torch.cat([sx, x[None]]))[-1] for x in qx])
    got = forward_each(model, params, sx, qx)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(forward(model, params, qx), expected, rtol=1e-3, atol=1e-3)


def test_a_non_transductive_prediction_does_not_depend_on_the_other_queries():
    """After adaptation (maml, 2 steps), replacing every query but the first by other images leaves the first one's
    logits bit for bit with forward_each, and moves them with the transductive forward."""
    learner = MetaLearner(BNNet(), "maml", inner_lr=0.3, inner_steps=2)
    sx, sy, qx, _ = task(1)
    other = qx.clone()
    other[1:] = 10 * torch.randn_like(other[1:])
    phi = learner.adapt(sx, sy)
    assert torch.equal(forward_each(learner.model, phi, sx, qx)[0], forward_each(learner.model, phi, sx, other)[0])
    assert not torch.allclose(learner.predict(phi, qx)[0], learner.predict(phi, other)[0])


def test_task_accuracies_count_the_one_by_one_predictions():
    learner = MetaLearner(BNNet(), "maml", inner_lr=0.3, inner_steps=2)
    tasks = [task(seed, queries=30) for seed in range(6)]
    expected = []
    for sx, sy, qx, qy in tasks:
        phi = learner.adapt(sx, sy)
        expected.append(float((forward_each(learner.model, phi, sx, qx).argmax(-1) == qy).float().mean()))
    assert learner.task_accuracies(tasks, transductive=False) == expected
    assert learner.task_accuracies(tasks) != expected  # transductive, the default: other numbers on these tasks


def test_evaluate_non_transductive_writes_its_own_file_and_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "glyphs", "--ways", "3", "--queries", "2", "--meta-batch", "2", "--iterations", "2",
                 "--val-every", "2", "--val-tasks", "3", "--out", str(run), "--no-progress"]) == 0
    assert main(["evaluate", str(run), "--episodes", "20", "--no-progress"]) == 0
    assert main(["evaluate", str(run), "--episodes", "20", "--non-transductive", "--no-progress"]) == 0
    assert "queries one by one (non-transductive)" in capsys.readouterr().out
    default = json.loads((run / "eval_best_20_seed1234.json").read_text())
    one_by_one = json.loads((run / "eval_best_20_seed1234_nontransductive.json").read_text())
    assert default["transductive"] is True and one_by_one["transductive"] is False
    assert one_by_one["task_accuracies"] != default["task_accuracies"]


def test_forward_each_takes_one_task_and_no_queries():
    model = BNNet()
    params = dict(model.named_parameters())
    sx, _, qx, _ = task(2)
    assert forward_each(model, params, sx, qx[:0]).shape == (0, 3)
    with pytest.raises(ConfigError, match="for a task batch, call it per task"):
        forward_each(model, params, sx[None], qx[None])
