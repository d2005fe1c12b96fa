"""The functional layer as docs/meta.md shows it: functions of a parameter dict, with no learner."""

import pytest
import torch
from test_meta_gradients import mlp, tasks

from metasam import ConfigError
from metasam.meta import AgnosticRule, MetaLearner
from metasam.meta.functional import InnerLoop, adapt, forward, meta_gradient_loop, meta_gradient_vmap, task_loss


def test_the_documented_functional_calls_give_the_learners_numbers():
    model, batch = mlp(), tasks()
    inner = InnerLoop(inner_lr=0.4, steps=2, rule=AgnosticRule(rho1=0.05, rho2=0.025))
    params = dict(model.named_parameters())
    task = [t[0] for t in batch]
    phi = adapt(model, params, task[0], task[1], inner)
    loss, output = task_loss(model, params, task, inner)
    assert torch.equal(output, forward(model, phi, task[2]))
    assert torch.equal(loss, torch.nn.functional.cross_entropy(output, task[3]))
    (grad_w,) = torch.autograd.grad(loss, [params["0.weight"]])  # differentiable in θ through the adaptation
    assert grad_w.abs().sum() > 0
    result = meta_gradient_loop(model, params, batch, inner)
    vmapped = meta_gradient_vmap(model, params, batch, inner)
    learner = MetaLearner(model, "agnostic-sam", inner_lr=0.4, inner_steps=2, inner_rho1=0.05, inner_rho2=0.025,
                          task_threads=1)  # the plain loop, which meta_gradient_loop is
    expected = learner.meta_gradient(batch)
    for name in params:
        assert torch.equal(result.grads[name], expected[name]), name
        assert torch.allclose(vmapped.grads[name], expected[name], rtol=1e-10, atol=1e-12), name
    assert 0 <= float(result.accuracy) <= 1 and torch.allclose(result.loss, vmapped.loss)
    summed = meta_gradient_loop(model, params, batch, inner, reduction="sum")
    assert torch.allclose(summed.loss, result.loss * batch.support_x.shape[0])


def test_task_threads_give_the_loops_meta_gradient_and_leave_the_thread_count_as_it_was():
    batch = tasks(n=5)
    before = torch.get_num_threads()
    alone = MetaLearner(mlp(), "sharp-maml-low", inner_lr=0.3, inner_steps=2, task_threads=1)
    threaded = MetaLearner(mlp(), "sharp-maml-low", inner_lr=0.3, inner_steps=2, task_threads=3)
    expected, got = alone.meta_gradient(batch), threaded.meta_gradient(batch)
    assert torch.get_num_threads() == before
    for name in expected:  # float64: one intra-op thread per task changes rounding at most
        assert torch.allclose(got[name], expected[name], rtol=1e-12, atol=1e-14), name
    a, b = alone.meta_step(batch), threaded.meta_step(batch)
    assert a["query_loss"] == pytest.approx(b["query_loss"], rel=1e-12)
    for p, q in zip(alone.model.parameters(), threaded.model.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)
    with pytest.raises(ConfigError, match="task_threads=2 shares the tasks of the loop path"):
        MetaLearner(mlp("metasam"), "maml", path="vmap", task_threads=2)


def test_auto_task_threads_use_torchs_threads_on_the_cpu_and_one_where_order_or_the_path_forbids():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert MetaLearner(mlp()).task_threads == 3  # the default is "auto"
        assert MetaLearner(mlp(), path="loop", task_threads="auto").task_threads == 3
        assert MetaLearner(mlp("metasam"), path="vmap").task_threads == 1  # vmap runs the tasks together
        dropout = torch.nn.Sequential(mlp(), torch.nn.Dropout(0.1))  # its draws would come in no fixed order
        assert MetaLearner(dropout).task_threads == 1
        torch.set_num_threads(1)
        assert MetaLearner(mlp()).task_threads == 1
    finally:
        torch.set_num_threads(threads)
    for bad in (0, "two", True, 1.5):
        with pytest.raises(ConfigError, match="task_threads must be 'auto' or an int >= 1"):
            MetaLearner(mlp(), task_threads=bad)


class Noisy(torch.nn.Module):
    """Gaussian noise on the input in training (torch.randn, not a dropout layer)."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        return self.net(x + 0.1 * torch.randn_like(x) if self.training else x)


def test_auto_turns_to_one_thread_with_the_plain_loops_numbers_when_the_model_draws_random_numbers():
    batch = tasks(n=4)
    plain = MetaLearner(Noisy(), task_threads=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        auto = MetaLearner(Noisy())
    finally:
        torch.set_num_threads(threads)
    assert auto.task_threads == 2
    torch.manual_seed(5)
    with pytest.warns(UserWarning, match="draws random numbers, so its tasks run one at a time"):
        got = auto.meta_gradient(batch)
    after = torch.rand(1)
    torch.manual_seed(5)
    expected = plain.meta_gradient(batch)
    assert auto.task_threads == 1 and torch.equal(after, torch.rand(1))  # the generator is where the loop leaves it
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_task_threads_see_the_model_as_it_is_at_each_call():
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.scale = mlp(), 1.0

        def forward(self, x):
            return self.scale * self.net(x)

    batch = tasks(n=4)
    model = Scaled()
    learner = MetaLearner(model, task_threads=2)
    assert any(g.abs().sum() > 0 for g in learner.meta_gradient(batch).values())
    model.scale = 0.0  # an attribute changed between steps reaches the threads' copies
    calls = []
    model.net[0].register_forward_hook(lambda *_: calls.append(1))  # and so does a hook added later
    assert all(g.abs().sum() == 0 for g in learner.meta_gradient(batch).values())
    assert calls


def test_fewer_tasks_than_threads_make_only_as_many_copies_as_tasks(monkeypatch):
    import metasam.meta.learner as learner_module

    made = []
    copies = learner_module.thread_copies
    monkeypatch.setattr(learner_module, "thread_copies", lambda model, n: made.append(n) or copies(model, n))
    learner = MetaLearner(mlp(), "maml", inner_lr=0.3, task_threads=4)
    alone = MetaLearner(mlp(), "maml", inner_lr=0.3, task_threads=1)
    batch = tasks(n=2)
    got, expected = learner.meta_gradient(batch), alone.meta_gradient(batch)
    assert made == [2]
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-12, atol=1e-14), name


def test_a_thread_slowed_by_one_task_leaves_the_remaining_tasks_to_the_others():
    import time

    batch = tasks(n=6)
    ran = []  # (copy, task) for every forward pass

    class SlowOnTask0(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            task = next(i for i in range(6) if torch.equal(x, batch.support_x[i]) or torch.equal(x, batch.query_x[i]))
            ran.append((id(self), task))
            if task == 0:
                time.sleep(0.2)  # as a core taken by another process would slow it
            return self.net(x)

    got = MetaLearner(SlowOnTask0(), "maml", inner_lr=0.3, task_threads=2).meta_gradient(batch)
    by_copy: dict[int, set[int]] = {}
    for copy, task in ran:
        by_copy.setdefault(copy, set()).add(task)
    assert {1, 2, 3, 4, 5} in by_copy.values()  # one thread took all the tasks while the other ran task 0
    expected = MetaLearner(mlp(), "maml", inner_lr=0.3, task_threads=1).meta_gradient(batch)
    for name in expected:  # the sum is still taken in task order
        assert torch.allclose(got[f"net.{name}"], expected[name], rtol=1e-12, atol=1e-14), name


def test_task_threads_of_a_warm_pool_run_with_one_intra_op_thread_each():
    from concurrent.futures import ThreadPoolExecutor

    from metasam.meta import SAMRule
    from metasam.meta.functional import meta_gradient_threads, thread_copies

    threads = torch.get_num_threads()
    seen = []

    def loss(output, target):
        seen.append(torch.get_num_threads())
        return torch.nn.functional.cross_entropy(output, target)

    try:
        torch.set_num_threads(2)
        with ThreadPoolExecutor(2) as pool:
            assert set(pool.map(lambda _: torch.get_num_threads(), range(8))) == {2}  # threads started at 2
            model = mlp()
            inner = InnerLoop(inner_lr=0.1, steps=1, rule=SAMRule(rho=0.0), loss_fn=loss)
            meta_gradient_threads(thread_copies(model, 2), dict(model.named_parameters()), tasks(n=4), inner, pool=pool)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


class Uncopyable(torch.nn.Linear):
    def __deepcopy__(self, memo):
        raise TypeError("cannot pickle '_thread.lock' object")


def uncopyable() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(Uncopyable(4, 3)).double()


def test_a_model_that_cannot_be_copied_for_task_threads_is_refused_naming_task_threads_1():
    learner = MetaLearner(uncopyable(), task_threads=2)
    with pytest.raises(ConfigError, match=r"copy.deepcopy fails on it \(TypeError: cannot pickle.*pass task_threads=1"):
        learner.meta_gradient(tasks())
    plain = MetaLearner(uncopyable(), task_threads=1).meta_gradient(tasks())
    auto = MetaLearner(uncopyable())  # "auto": the plain loop, with a warning
    auto.task_threads = 2  # as "auto" resolves on a 2-core machine
    with pytest.warns(UserWarning, match="cannot be copied, so its tasks run one at a time"):
        got = auto.meta_gradient(tasks())
    assert auto.task_threads == 1 and all(torch.equal(got[n], plain[n]) for n in plain)


def test_an_error_inside_a_threaded_task_is_raised_as_it_is_and_keeps_the_threads():
    import threading
    import warnings

    def loss(output, target):  # fails in the task threads only, after the learner's own checks
        if threading.current_thread() is not threading.main_thread():
            raise ConfigError("this loss refuses the batch")
        return torch.nn.functional.cross_entropy(output, target)

    learner = MetaLearner(mlp(), loss_fn=loss)
    learner.task_threads = 2  # as "auto" resolves on a 2-core machine
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "cannot be copied" warning
        with pytest.raises(ConfigError, match="this loss refuses the batch"):
            learner.meta_gradient(tasks(n=4))
    assert learner.task_threads == 2
