"""A NaN/Inf step names the iteration and the tensor and changes nothing; foreign checkpoints name the mismatch."""

import copy

import pytest
import torch
from test_meta_gradients import mlp, tasks
from torch import nn

from metasam import CheckpointError, ConfigError, NonFiniteError
from metasam.meta import AgnosticRule, MetaLearner, SAMRule
from metasam.meta.learner import check_hparams

AGNOSTIC = {"algo": "agnostic-sam-both", "inner_lr": 0.3, "outer_lr": 0.01, "inner_rho1": 0.05, "inner_rho2": 0.02,
            "outer_rho1": 0.04, "outer_rho2": 0.01}


def snapshot(learner):
    return copy.deepcopy(learner.state_dict())


def assert_same_state(a, b):
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, state in a["outer_optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["outer_optimizer"]["state"][i][key]), (i, key)
    assert (a["outer_momentum"] is None) == (b["outer_momentum"] is None)
    assert all(torch.equal(x, y) for x, y in zip(a["outer_momentum"] or [], b["outer_momentum"] or []))
    assert a["iteration"] == b["iteration"]


def test_nan_query_loss_is_named_with_the_iteration_and_changes_nothing():
    learner = MetaLearner(mlp(), **AGNOSTIC)
    learner.meta_step(tasks(seed=1), tasks(seed=2))
    learner.meta_step(tasks(seed=3), tasks(seed=4))
    before = snapshot(learner)
    bad = tasks(seed=5)
    bad.query_x[1, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError) as info:
        learner.meta_step(bad, tasks(seed=6))
    message = str(info.value)
    assert message.startswith("iteration 3: the query loss is NaN;")
    assert "inner_lr (now 0.3)" in message and "inner_rho1 (now 0.05)" in message and "outer_rho1 (now 0.04)" in message
    assert (info.value.iteration, info.value.tensor) == (3, "query loss")
    assert_same_state(before, snapshot(learner))


def test_an_infinite_gradient_names_its_parameter():
    learner = MetaLearner(mlp(), "maml", inner_lr=0.3)
    compute = learner._outer_direction

    def poisoned(*args):
        direction, state, metrics = compute(*args)
        direction[2] = direction[2] + float("inf")  # the loss stays finite: only this gradient overflows
        return direction, state, metrics

    learner._outer_direction = poisoned
    before = snapshot(learner)
    with pytest.raises(NonFiniteError, match=r"^iteration 1: the meta-gradient of 3.weight is Inf") as info:
        learner.meta_step(tasks())
    assert info.value.tensor == "meta-gradient of 3.weight"
    assert all(torch.equal(v, before["model"][k]) for k, v in learner.model.state_dict().items())
    assert learner.iteration == 0 and learner.outer_optimizer.state_dict()["state"] == {}


def test_loading_another_models_state_names_the_differing_tensors():
    small = MetaLearner(mlp(), "maml")
    torch.manual_seed(0)
    wide = MetaLearner(nn.Sequential(nn.Linear(4, 9), nn.Identity(), nn.Tanh(), nn.Linear(9, 3)).double(), "maml")
    keep = snapshot(small)
    with pytest.raises(CheckpointError, match=r"run/last.pt was written for another model: shapes differ: "
                                              r"0.weight \(9, 4\) in the checkpoint vs \(6, 4\) here"):
        small.load_state_dict(wide.state_dict(), "run/last.pt")
    assert_same_state(keep, snapshot(small))  # nothing half-loaded
    with pytest.raises(CheckpointError, match=r"holds no learner state \(missing \['outer_optimizer'"):
        small.load_state_dict({"model": small.model.state_dict()})
    with pytest.raises(CheckpointError, match="not a metasam meta-learning checkpoint"):
        MetaLearner.from_checkpoint({"weights": 1}, "x.pt")
    saved = {"model": None, "hparams": small.hparams, "learner": small.state_dict()}
    with pytest.raises(TypeError, match="momentum"):  # the caller's override, not the checkpoint, is wrong
        MetaLearner.from_checkpoint(saved, "x.pt", model=mlp(), outer_kwargs={"momentum": 0.9})


@pytest.mark.parametrize("kwargs, message", [
    ({"inner_lr": float("inf")}, "inner_lr must be a finite number > 0"),
    ({"outer_lr": -1.0}, "outer_lr must be a finite number > 0"),
    ({"test_inner_steps": 0}, "test_inner_steps must be an int >= 1"),
    ({"algo": "sharp-maml-up", "outer_rho": float("inf")}, "^outer_rho must be a finite number >= 0"),
    ({"algo": "agnostic-sam", "inner_eta": -0.1}, "^inner_eta must be a finite number >= 0"),
    ({"algo": "agnostic-sam", "inner_beta": 1.0}, "^inner_beta must lie in"),
])
def test_hyperparameters_are_checked_without_a_model(kwargs, message):
    args = {"algo": "maml", "inner_lr": 0.4, "inner_steps": 1, **kwargs}
    with pytest.raises(ConfigError, match=message):
        check_hparams(**args)
    with pytest.raises(ConfigError, match=message):
        MetaLearner(mlp(), **args)


def test_a_rule_setting_at_a_level_whose_rule_is_given_is_refused_not_dropped():
    """inner_rho1= sets the preset's inner rule; with inner_rule= given it would silently do nothing."""
    with pytest.raises(ConfigError, match=r"inner_rho1 set the preset's inner rule, which inner_rule= replaces"):
        MetaLearner(mlp(), "agnostic-sam", inner_rule=AgnosticRule(rho1=0.2), inner_rho1=0.1)
    with pytest.raises(ConfigError, match=r"outer_rho set the preset's outer rule, which outer_rule= replaces"):
        MetaLearner(mlp(), "sharp-maml-up", outer_rule=SAMRule(rho=0.2), outer_rho=0.1)
    learner = MetaLearner(mlp(), "sharp-maml-both", inner_rule=SAMRule(rho=0.2), outer_rho=0.1)
    assert (learner.inner_rule.rho, learner.outer_rule.rho) == (0.2, 0.1)  # the other level's shorthand still applies
