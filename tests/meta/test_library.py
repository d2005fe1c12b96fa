"""MetaLearner on a researcher's own work: their loss, the parameters that adapt, their outer optimizer and
scheduler, BatchNorm with running statistics, and the two examples (sinusoid regression, ANIL)."""

import io
import runpy
from pathlib import Path

import pytest
import torch
from torch import nn

import reference as ref
from metasam import CheckpointError, ConfigError
from metasam.meta import MetaLearner, TaskBatch
from metasam.models import MODELS

D = torch.float64
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class Net(nn.Module):
    """ref.mlp_logits as a body (Linear + tanh) and a head (Linear): parameters body.weight, body.bias,
    head.weight, head.bias."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 5).double()
        self.head = nn.Linear(5, 3).double()

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def tasks(seed: int, n: int = 2) -> TaskBatch:
    gen = torch.Generator().manual_seed(seed)
    sy, qy = torch.arange(3).repeat_interleave(2).repeat(n, 1), torch.arange(3).repeat_interleave(3).repeat(n, 1)
    return TaskBatch(torch.randn(n, 6, 4, generator=gen, dtype=D) + sy[..., None].to(D), sy,
                     torch.randn(n, 9, 4, generator=gen, dtype=D) + qy[..., None].to(D), qy)


@pytest.mark.parametrize("path", ["loop", "vmap"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("algo, inner, params", [
    ("maml", ref.Level("gd"), {}),
    ("agnostic-sam", ref.Level("agnostic", rho1=0.09, rho2=0.04, beta=0.7), {"inner_rho1": 0.09, "inner_rho2": 0.04, "inner_beta": 0.7}),
])
def test_anil_adapts_only_the_head_and_its_meta_gradient_equals_the_reference(algo, inner, params, first_order, path):
    """adapt= as a module, a list of names and a predicate: the body's fast weights are θ's, bit for bit; the
    meta-gradient (body included, through the features the head adapts on) equals the reference's."""
    batch = tasks(1)
    selections = [lambda m: m.head, lambda m: ["head.weight", "head.bias"], lambda m: (lambda name, p: name.startswith("head"))]
    grads = []
    for select in selections:
        model = Net()
        learner = MetaLearner(model, algo, inner_lr=0.3, inner_steps=3, first_order=first_order, adapt=select(model),
                              path=path, **params)
        fast = learner.adapt(batch.support_x[0], batch.support_y[0])
        assert torch.equal(fast["body.weight"], model.body.weight) and torch.equal(fast["body.bias"], model.body.bias)
        assert not torch.equal(fast["head.weight"], model.head.weight)
        grads.append(learner.meta_gradient(batch))
    theta = [p.detach() for p in Net().parameters()]
    expected = ref.grad(lambda w: ref.meta_loss(w, batch, inner, 3, 0.3, first_order, adapted=[2, 3]), theta, False)
    for got in grads:
        got = list(got.values())
        assert ref.norm([g - e for g, e in zip(got, expected)]) <= 1e-12 * ref.norm(expected)
    assert ref.norm(expected[:2]) > 1e-3  # the body is meta-learned: it has a meta-gradient


def test_bad_adapt_selections_are_refused():
    model = Net()
    with pytest.raises(ConfigError, match="not trainable parameters"):
        MetaLearner(model, adapt=["head.weight", "neck.weight"])
    with pytest.raises(ConfigError, match="selects no parameter"):
        MetaLearner(model, adapt=lambda name, p: False)


def test_torch_batchnorm_with_running_statistics_is_refused_with_the_fix_named():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    with pytest.raises(ConfigError, match=r"\['1'\].*track_running_stats=False.*metasam.models.BatchNorm.*allow_running_stats"):
        MetaLearner(model)
    MetaLearner(model, allow_running_stats=True)
    MetaLearner(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.Linear(5, 3)))


def test_lazy_layers_not_built_yet_are_refused_and_a_built_lazy_batchnorm_is_checked():
    model = nn.Sequential(nn.Linear(4, 5), nn.LazyBatchNorm1d(), nn.ReLU(), nn.LazyLinear(3))
    with pytest.raises(ConfigError, match=r"lazy layers not built yet \(uninitialised 1.weight, 1.bias, 3.weight, …\)"
                                          r": run one forward pass"):
        MetaLearner(model)
    model(torch.randn(2, 4))  # built: a BatchNorm1d that keeps running statistics, refused as any other
    with pytest.raises(ConfigError, match="keep running statistics"):
        MetaLearner(model)
    MetaLearner(model, allow_running_stats=True)


def make_learner(scheduler=True):
    return MetaLearner(Net(), "maml", inner_lr=0.3, outer_optimizer="SGD", outer_lr=0.1,
                       outer_kwargs={"momentum": 0.9, "weight_decay": 1e-3},
                       outer_scheduler=(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)) if scheduler else None)


def test_outer_optimizer_arguments_and_scheduler_survive_a_checkpoint():
    learner = make_learner()
    assert learner.hparams["outer_optimizer"] == "SGD" and learner.hparams["outer_kwargs"]["momentum"] == 0.9
    for seed in (1, 2):
        learner.meta_step(tasks(seed))
    assert learner.outer_optimizer.param_groups[0]["lr"] == pytest.approx(0.025)  # halved after each step
    buffer = io.BytesIO()
    torch.save(learner.state_dict(), buffer)
    buffer.seek(0)
    resumed = make_learner()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for seed in (3, 4):
        learner.meta_step(tasks(seed))
        resumed.meta_step(tasks(seed))
    for a, b in zip(learner.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    buffer.seek(0)
    with pytest.raises(CheckpointError, match="outer_scheduler="):
        make_learner(scheduler=False).load_state_dict(torch.load(buffer, weights_only=True))
    with pytest.raises(ConfigError, match="outer_lr="):
        MetaLearner(Net(), outer_kwargs={"lr": 0.1})
    with pytest.raises(ConfigError, match="torch.optim.Optimizer class or the name of one"):
        MetaLearner(Net(), outer_optimizer="Adamm")


def test_a_learner_saved_by_hand_loads_back_with_its_rules_optimizer_and_state(tmp_path):
    """docs/meta.md's recipe for a learner of your own: torch.save its hparams and state, MetaLearner.load(path,
    model=...) gives the same rules, outer optimizer and weights, and the next steps of both agree bit for bit."""
    learner = MetaLearner(Net(), "agnostic-sam", inner_lr=0.3, inner_rho1=0.05, inner_rho2=0.02,
                          outer_optimizer="AdamW", outer_kwargs={"weight_decay": 1e-4})
    learner.meta_step(tasks(1))
    torch.save({"hparams": learner.hparams, "learner": learner.state_dict()}, tmp_path / "mine.pt")
    loaded = MetaLearner.load(tmp_path / "mine.pt", model=Net())
    assert loaded.inner_rule == learner.inner_rule and type(loaded.outer_optimizer) is torch.optim.AdamW
    assert loaded.outer_optimizer.param_groups[0]["weight_decay"] == 1e-4 and loaded.iteration == 1
    learner.meta_step(tasks(2))
    loaded.meta_step(tasks(2))
    for a, b in zip(learner.model.parameters(), loaded.model.parameters()):
        assert torch.equal(a, b)


def smoothed_cross_entropy(output, target):
    return nn.functional.cross_entropy(output, target, label_smoothing=0.1)


def test_a_loss_of_your_own_is_asked_for_again_on_load(tmp_path):
    learner = MetaLearner(Net(), "maml", inner_lr=0.3, loss_fn=smoothed_cross_entropy, accuracy=True)
    metrics = learner.meta_step(tasks(1))
    assert "query_acc" in metrics
    torch.save({"model": {"name": "_library_net", "kwargs": {}}, "hparams": learner.hparams, "learner": learner.state_dict()},
               tmp_path / "best.pt")
    MODELS["_library_net"] = Net
    try:
        with pytest.raises(ConfigError, match="custom loss_fn.*smoothed_cross_entropy.*pass loss_fn="):
            MetaLearner.load(tmp_path)
        loaded = MetaLearner.load(tmp_path, loss_fn=smoothed_cross_entropy)
        assert torch.equal(loaded.meta_gradient(tasks(2))["head.bias"], learner.meta_gradient(tasks(2))["head.bias"])
    finally:
        del MODELS["_library_net"]


def test_sinusoid_regression_example_learns_with_mse():
    """The MAML paper's sinusoid task through MetaLearner(loss_fn=mse_loss): after meta-training, one adaptation
    step takes the query error of held-out tasks well below what the initialisation gives."""
    result = runpy.run_path(str(EXAMPLES / "sinusoid.py"))["main"](iterations=300, meta_batch=10, inner_lr=0.05, outer_lr=3e-3)
    assert result["query_mse_after"] < 0.7 * result["query_mse_before"], result


def test_regression_learner_reports_no_accuracy():
    sinusoid = runpy.run_path(str(EXAMPLES / "sinusoid.py"))
    learner = MetaLearner(nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1)), loss_fn=nn.functional.mse_loss)
    batch = sinusoid["sinusoid_tasks"](4, 5, torch.Generator().manual_seed(0))
    metrics = learner.meta_step(batch, pre_adaptation=True)
    assert "query_acc" not in metrics and "query_acc_before" not in metrics and metrics["query_loss_before"] > 0
    with pytest.raises(ConfigError, match="task_losses"):
        learner.task_accuracies([batch])
    assert len(learner.task_losses([batch])) == 4


@pytest.mark.slow
def test_anil_example_learns_above_chance():
    result = runpy.run_path(str(EXAMPLES / "anil.py"))["main"](iterations=30, meta_batch=4, episodes=20)
    assert result["accuracy"] > 0.3, result  # chance is 0.2


def test_a_model_with_fewer_outputs_than_the_tasks_have_ways_is_named():
    """Conv4(ways=5) on 20-way tasks: one line naming both numbers, not an IndexError from inside the loss."""
    from metasam.models import Conv4

    learner = MetaLearner(Conv4(ways=5, hidden=4), "maml", inner_lr=0.4)
    y = torch.arange(20).repeat(2, 1)
    batch = TaskBatch(torch.rand(2, 20, 1, 28, 28), y, torch.rand(2, 20, 1, 28, 28), y)
    for call in (lambda: learner.meta_step(batch), lambda: learner.meta_gradient(batch), lambda: learner.evaluate([batch])):
        with pytest.raises(ConfigError, match=r"labels up to 19 \(20 ways\) but the model gives 5 outputs.*Conv4\(ways=20\)"):
            call()
