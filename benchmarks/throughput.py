"""Meta-training throughput: metasam against the libraries researchers use, in the same process.

Every implementation trains the same Conv4 function (same initial weights) on the same pre-loaded
episodes of Omniglot's small subset ``images_background_small1`` (in ``--data-root``/omniglot, default
``$METASAM_DATA``, else ``./data``; ``--dataset glyphs`` runs offline anywhere):

* metasam: maml, fomaml, sharp-maml-low, agnostic-sam, sharp-maml-up, agnostic-sam-both at the first
  setting (the overhead of each rule; agnostic-sam-both also with a validation meta-batch of a quarter
  of the tasks, the seed paper's setting, ``--outer-val-tasks``), maml at the others
  (``MetaLearner.meta_step``, without the optional pre-adaptation metrics), on metasam's Conv4 as
  ``metasam train`` builds it: ``metasam.models.CPUConv4`` on the CPU outside the vmap path, ``Conv4``
  elsewhere;
* baselines, second-order MAML on the textbook Conv4 written with torch's layers, as their users write
  it (``Conv4(ways, norm=textbook_norm)``: ``nn.BatchNorm2d`` with batch statistics, ReLU before the
  max-pool): ``higher.innerloop_ctx``; learn2learn's
  ``MAML.clone().adapt()`` where it imports (its release on the package index does not build on
  Python 3.11: it is then skipped, and the table says so); a hand-written per-task
  ``torch.autograd.grad(create_graph=True)`` loop, the style of the papers' own scripts;
* for attribution, not a baseline: the hand-written loop on metasam's Conv4, which separates what the
  model's implementation gains from what the learner gains.

Before timing, the second-order MAML meta-gradient of metasam, of each baseline and of the attribution
row on the same task batch from the same weights is compared with metasam's and with the truth: the
hand-written loop on the textbook Conv4 in float64 (the other presets' meta-gradients are checked by
the test suite, against finite differences and their definitions).
The float32 implementations differ by rounding (``CPUConv4`` computes its blocks in another
order, ``metasam.models.cpu_conv4.first_block`` and ``conv_block``); the run stops if metasam's is further from the float64
truth than ``MAX_RELATIVE_ERROR`` or twice the closest baseline's distance, whichever is larger. Timing
interleaves the implementations (rotating their order every repeat) and reports the median tasks/s
with the slowest and fastest repeat;
peak memory is measured in a fresh subprocess per implementation (on CPU the kernel's high-water mark
of its RSS, restarted once the model is built, minus the RSS then; ``getrusage`` would report at least
the size of this process, which forked it; ``torch.cuda.max_memory_allocated`` on a GPU). FLOPs are
counted with ``torch.utils.flop_counter`` on the hand-written loop over the textbook Conv4 (metasam's
blocks do the same multiply-adds in another order, plus a 9×9 patch covariance in the first and
float64 batch statistics) and reported as
achieved GFLOP/s against the best float32 matrix-multiply rate measured on this machine in the same
process (before the first setting and after each one), for whole steps and for the query passes alone
(each task's query forward+backward at fixed weights, metasam's Conv4 against the textbook one).
``--compare-paths`` adds metasam's maml on the other path over tasks (vmap where ``auto`` takes the
loop, the loop where it takes vmap), checked against the float64 truth and timed like the rest: how
the path is chosen per device. ``--task-threads N`` adds metasam's maml with ``task_threads=N`` on both
models; ``--learn-inner-lr`` adds metasam's maml with learned inner step sizes (Meta-SGD, ``learn_inner_lr=True``:
one more tensor per parameter in the inner step and the meta-gradient), ``--anil`` metasam's maml adapting the
head alone (``adapt=model.head``, ``metasam train --adapt head``); ``--one-thread`` times the hand-written loop on the textbook Conv4 with one intra-op thread: its rate
times the threads is what that loop would give side by side on every core, the yardstick for task threads.

    PYTHONPATH=. python benchmarks/throughput.py                  # writes docs/results/throughput.md
    PYTHONPATH=. python benchmarks/throughput.py --quick --out /tmp/t.md
    PYTHONPATH=. python benchmarks/throughput.py --device cuda --compare-paths --out docs/results/throughput-cuda.md
    PYTHONPATH=. python benchmarks/throughput.py --retain-freed-memory   # as `metasam train` runs on a CPU
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from metasam.atomic_write import write_text_atomic
from metasam.data import EpisodeSampler, TaskBatch, collate_tasks
from metasam.meta import MetaLearner
from metasam.models import Conv4, CPUConv4
from metasam.train.memory import retain_freed_memory
from metasam.train.precision import use_tf32
from metasam.train.splits import load_split

PRESETS = ["maml", "fomaml", "sharp-maml-low", "agnostic-sam", "sharp-maml-up", "agnostic-sam-both"]
RULES = {  # the radii of the Omniglot runs (docs/results/omniglot_small.md); cost does not depend on them
    "sharp-maml-low": {"inner_rho": 0.05},
    "agnostic-sam": {"inner_rho1": 0.05, "inner_rho2": 0.025},
    "sharp-maml-up": {"outer_rho": 0.05},
    "agnostic-sam-both": {"inner_rho1": 0.05, "inner_rho2": 0.025, "outer_rho1": 0.05, "outer_rho2": 0.025},
}
INNER_LR = {5: 0.4, 20: 0.1}  # the standard settings of docs/algorithms.md §3
MAX_RELATIVE_ERROR = 1e-3  # float32 rounding gives 2e-5 (5-way) to 5e-4 (20-way, meta-batch 16) here, baselines alike


# -- implementations ---------------------------------------------------------------------------------
class Impl:
    """One way of running an outer step: ``meta_grad(batch)`` (no step) and ``step(batch, val_batch)``."""

    name = ""
    second_order = True

    def meta_grad(self, batch: TaskBatch) -> list[Tensor]:
        raise NotImplementedError

    def step(self, batch: TaskBatch, val_batch: TaskBatch) -> None:
        raise NotImplementedError


class Metasam(Impl):
    """A metasam preset; ``val_fraction`` < 1 shrinks the validation meta-batch (``--outer-val-tasks``)."""

    def __init__(self, model: nn.Module, algo: str, inner_lr: float, steps: int, path: str, val_fraction: float = 1.0,
                 **options) -> None:
        self.second_order = algo != "fomaml"
        self.learner = MetaLearner(model, algo, inner_lr=inner_lr, inner_steps=steps, path=path, **RULES.get(algo, {}),
                                   **options)
        self.val_fraction = val_fraction
        self.name = f"metasam {algo} ({self.learner.path})"
        if val_fraction < 1:
            self.name += f", validation meta-batch × {val_fraction:g}"

    def meta_grad(self, batch):
        return list(self.learner.meta_gradient(batch).values())

    def step(self, batch, val_batch):
        keep = max(1, round(val_batch.support_x.shape[0] * self.val_fraction))
        self.learner.meta_step(batch, TaskBatch(*(t[:keep] for t in val_batch)), pre_adaptation=False)


class TorchBaseline(Impl):
    """Second-order MAML written by hand with torch.autograd, one task at a time (the papers' style)."""

    name = "torch.autograd loop (hand-written)"

    def __init__(self, model: nn.Module, inner_lr: float, steps: int) -> None:
        self.model, self.inner_lr, self.steps = model, inner_lr, steps
        self.params = dict(model.named_parameters())
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def _loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.cross_entropy(functional_call(self.model, params, (x,)), y)

    def meta_grad(self, batch):
        tasks = batch.support_x.shape[0]
        total = [torch.zeros_like(p) for p in self.params.values()]
        for t in range(tasks):
            fast = self.params
            for _ in range(self.steps):
                grads = torch.autograd.grad(self._loss(fast, batch.support_x[t], batch.support_y[t]),
                                            list(fast.values()), create_graph=True)
                fast = {n: p - self.inner_lr * g for (n, p), g in zip(fast.items(), grads)}
            query = self._loss(fast, batch.query_x[t], batch.query_y[t]) / tasks
            for acc, g in zip(total, torch.autograd.grad(query, list(self.params.values()))):
                acc += g
        return total

    def step(self, batch, val_batch):
        for p, g in zip(self.params.values(), self.meta_grad(batch)):
            p.grad = g
        self.opt.step()


class AccumulatingBaseline(Impl):
    """A library baseline that accumulates the meta-gradient into ``.grad`` by ``backward()``."""

    module: nn.Module

    def _accumulate(self, batch: TaskBatch) -> None:
        raise NotImplementedError

    def meta_grad(self, batch):
        self.module.zero_grad(set_to_none=True)
        self._accumulate(batch)
        return [p.grad.clone() for p in self.module.parameters()]

    def step(self, batch, val_batch):
        self.opt.zero_grad(set_to_none=True)
        self._accumulate(batch)
        self.opt.step()


class HigherBaseline(AccumulatingBaseline):
    """Second-order MAML with ``higher.innerloop_ctx`` (its documented MAML example)."""

    name = "higher innerloop_ctx"

    def __init__(self, model: nn.Module, inner_lr: float, steps: int) -> None:
        import higher

        self.higher, self.module, self.steps = higher, model, steps
        self.inner_opt = torch.optim.SGD(model.parameters(), lr=inner_lr)
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def _accumulate(self, batch: TaskBatch) -> None:
        tasks = batch.support_x.shape[0]
        for t in range(tasks):
            with self.higher.innerloop_ctx(self.module, self.inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(self.steps):
                    diffopt.step(nn.functional.cross_entropy(fmodel(batch.support_x[t]), batch.support_y[t]))
                (nn.functional.cross_entropy(fmodel(batch.query_x[t]), batch.query_y[t]) / tasks).backward()


class Learn2LearnBaseline(AccumulatingBaseline):
    """Second-order MAML with learn2learn's ``MAML(model, lr).clone().adapt(loss)``."""

    name = "learn2learn MAML"

    def __init__(self, model: nn.Module, inner_lr: float, steps: int) -> None:
        import learn2learn

        self.steps = steps
        self.module = learn2learn.algorithms.MAML(model, lr=inner_lr, first_order=False)
        self.opt = torch.optim.Adam(self.module.parameters(), lr=1e-3)

    def _accumulate(self, batch: TaskBatch) -> None:
        tasks = batch.support_x.shape[0]
        for t in range(tasks):
            learner = self.module.clone()
            for _ in range(self.steps):
                learner.adapt(nn.functional.cross_entropy(learner(batch.support_x[t]), batch.support_y[t]))
            (nn.functional.cross_entropy(learner(batch.query_x[t]), batch.query_y[t]) / tasks).backward()


class OneThread(Impl):
    """``impl`` with one intra-op thread: N × its rate is what N copies of that loop side by side on N cores
    would give, the yardstick for sharing tasks among N threads (not a baseline)."""

    def __init__(self, impl: Impl) -> None:
        self.impl, self.name = impl, f"{impl.name}, one intra-op thread (a yardstick, not a baseline)"

    def meta_grad(self, batch):
        return self._one_thread(self.impl.meta_grad, batch)

    def step(self, batch, val_batch):
        self._one_thread(self.impl.step, batch, val_batch)

    @staticmethod
    def _one_thread(call, *args):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return call(*args)
        finally:
            torch.set_num_threads(threads)


BASELINES: dict[str, Callable[[nn.Module, float, int], Impl]] = {
    "higher": HigherBaseline, "learn2learn": Learn2LearnBaseline, "torch": TorchBaseline,
}
ATTRIBUTION = "torch on metasam Conv4"  # the hand-written loop on metasam's model: not a baseline
ONE_THREAD = "torch one thread"  # the hand-written loop on the textbook Conv4 at one intra-op thread: a yardstick


def textbook_norm(channels: int) -> nn.Module:
    """The batch norm of Conv4 as learn2learn's and higher's users write it: torch's, with batch statistics.
    ``Conv4(ways, norm=textbook_norm)`` is their textbook Conv4, with metasam's parameter names."""
    return nn.BatchNorm2d(channels, track_running_stats=False)


def metasam_conv4(ways: int, device: str, path: str) -> nn.Module:
    """metasam's Conv4 as ``metasam train`` builds it: CPUConv4 on the CPU outside the vmap path, else Conv4."""
    cpu_blocks = torch.device(device).type == "cpu" and path != "vmap"
    return (CPUConv4 if cpu_blocks else Conv4)(ways).to(device)


def build(key: str, ways: int, device: str, path: str, steps: int = 1) -> Impl:
    """A fresh implementation ``key`` ("metasam:<preset>[:val4][:loop|:vmap][:textbook][:threadsN][:lrs][:anil]", a BASELINES
    key, ATTRIBUTION or ONE_THREAD) with the seeded Conv4's weights and ``steps`` inner steps; a path token overrides
    ``path``; ``textbook`` runs metasam on the baselines' textbook Conv4 (a model of the user's own, as a library
    user brings it); ``threadsN`` passes ``task_threads=N`` to the MetaLearner; ``lrs`` passes ``learn_inner_lr=True``; ``anil``
    passes ``adapt=`` the model's head."""
    if key.startswith("metasam:"):
        path = next((o for o in key.split(":") if o in ("loop", "vmap")), path)
    torch.manual_seed(0)
    model = metasam_conv4(ways, device, path)
    textbook = Conv4(ways, norm=textbook_norm).to(device)
    textbook.load_state_dict(model.state_dict())
    if key.startswith("metasam:"):
        _, algo, *options = key.split(":")
        threads = next((int(o[len("threads"):]) for o in options if o.startswith("threads")), None)
        impl = Metasam(textbook if "textbook" in options else model, algo, INNER_LR[ways], steps, path,
                       val_fraction=0.25 if "val4" in options else 1.0, **({"task_threads": threads} if threads else {}),
                       **({"learn_inner_lr": True} if "lrs" in options else {}),
                       **({"adapt": model.head} if "anil" in options else {}))
        if "lrs" in options:
            impl.name += ", learned inner step sizes (Meta-SGD)"
        if "anil" in options:
            impl.name += ", the head alone adapts (ANIL)"
        if "textbook" in options:
            impl.name += (" on the textbook Conv4 (a model of your own, MetaLearner's defaults)" if threads is None else
                          f" on the textbook Conv4 (a model of your own), task_threads={threads}")
        elif threads is not None:
            impl.name += f", task_threads={threads}"
        return impl
    if key == ATTRIBUTION:
        impl = TorchBaseline(model, INNER_LR[ways], steps)
        impl.name = "torch.autograd loop (hand-written) on metasam's Conv4 (attribution, not a baseline)"
        return impl
    if key == ONE_THREAD:
        return OneThread(TorchBaseline(textbook, INNER_LR[ways], steps))
    return BASELINES[key](textbook, INNER_LR[ways], steps)


def available_baselines() -> tuple[list[str], dict[str, str]]:
    """Baselines that import here, and why the others were skipped."""
    ok, skipped = [], {}
    for key, module in (("higher", "higher"), ("learn2learn", "learn2learn")):
        try:
            __import__(module)
            ok.append(key)
        except Exception as exc:  # learn2learn's PyPI release fails to build/import on Python 3.11
            skipped[key] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return ok + ["torch"], skipped


# -- measurements ------------------------------------------------------------------------------------
def episodes(dataset: str, root: str | None, ways: int, tasks: int, count: int, queries: int, device: str):
    """``count`` (meta-batch, validation meta-batch) pairs of ``tasks`` tasks each, pre-loaded on ``device``."""
    ds = load_split(dataset, root, "images_background_small1" if dataset == "omniglot" else "train", 28)
    sampler = EpisodeSampler(ds, ways, 1, queries, seed=0)
    val = EpisodeSampler(ds, ways, 1, queries, seed=1)
    to = lambda b: TaskBatch(*(t.to(device) for t in b))  # noqa: E731
    return ds, [(to(sampler.batch(range(i * tasks, (i + 1) * tasks))), to(val.batch(range(i * tasks, (i + 1) * tasks))))
                for i in range(count)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(impl: Impl, batches, device: str) -> float:
    """Tasks per second over one pass of ``batches``."""
    sync(device)
    start = time.perf_counter()
    for batch, val in batches:
        impl.step(batch, val)
    sync(device)
    return sum(b.support_x.shape[0] for b, _ in batches) / (time.perf_counter() - start)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> None:
    """Restart the kernel's high-water mark of this process's RSS (Linux ≥ 4.0).

    Needed because ``getrusage``'s ``ru_maxrss`` carries over the parent's RSS at the fork that precedes
    the spawned child's exec: every child would report at least the (large) benchmark process's size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """VmHWM: the peak RSS since the last :func:`reset_peak_rss`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory needs Linux")


def _peak_memory_child(key: str, ways: int, device: str, path: str, steps: int, batches, queue, retain: bool, tf32: bool) -> None:
    torch.set_num_threads(int(os.environ.get("METASAM_BENCH_THREADS", torch.get_num_threads())))
    if retain:
        retain_freed_memory()
    use_tf32(tf32)
    impl = build(key, ways, device, path, steps)
    batches = [(TaskBatch(*(t.to(device) for t in b)), TaskBatch(*(t.to(device) for t in v))) for b, v in batches]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for batch, val in batches:
            impl.step(batch, val)
        queue.put(torch.cuda.max_memory_allocated() - base)
        return
    base = rss_bytes()
    reset_peak_rss()
    for batch, val in batches:
        impl.step(batch, val)
    queue.put(peak_rss_bytes() - base)


def peak_memory(key: str, ways: int, device: str, path: str, steps: int, batches, retain: bool, tf32: bool) -> int:
    """Peak memory of two outer steps above the baseline of a fresh process (spawned, so nothing leaks
    in from the measurements before it)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    cpu = [(TaskBatch(*(t.cpu() for t in b)), TaskBatch(*(t.cpu() for t in v))) for b, v in batches[:2]]  # the child moves them
    os.environ["METASAM_BENCH_THREADS"] = str(torch.get_num_threads())
    proc = ctx.Process(target=_peak_memory_child, args=(key, ways, device, path, steps, cpu, queue, retain, tf32))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def count_flops(ways: int, device: str, batch: TaskBatch, steps: int = 1) -> tuple[float, float]:
    """(FLOPs of one second-order MAML outer step per task, FLOPs of its query forward+backward per task)."""
    impl = build("torch", ways, device, "loop", steps)
    with FlopCounterMode(display=False) as counter:
        impl.meta_grad(batch)
    total = counter.get_total_flops()
    model = impl.model
    with FlopCounterMode(display=False) as counter:
        for t in range(batch.query_x.shape[0]):
            nn.functional.cross_entropy(model(batch.query_x[t]), batch.query_y[t]).backward()
    tasks = batch.support_x.shape[0]
    return total / tasks, counter.get_total_flops() / tasks


def query_pass_rates(ways: int, device: str, batch: TaskBatch, repeats: int) -> dict[str, float]:
    """Median tasks/s of the query forward+backward alone, at fixed weights (the target's "FLOP/s in the
    query passes"): ∇ of each task's query loss in the weights, for metasam's Conv4 and the textbook Conv4
    with the same weights, interleaved. A meta-training step runs the same pass at φ instead of θ."""
    torch.manual_seed(0)
    models = {"metasam": metasam_conv4(ways, device, "loop"), "textbook": Conv4(ways, norm=textbook_norm).to(device)}
    models["textbook"].load_state_dict(models["metasam"].state_dict())
    tasks = batch.query_x.shape[0]

    def one_pass(model: nn.Module) -> float:
        params = list(model.parameters())
        sync(device)
        start = time.perf_counter()
        for t in range(tasks):
            torch.autograd.grad(nn.functional.cross_entropy(model(batch.query_x[t]), batch.query_y[t]), params)
        sync(device)
        return tasks / (time.perf_counter() - start)

    rates: dict[str, list[float]] = {k: [] for k in models}
    for k in models:  # warm-up
        one_pass(models[k])
    for r in range(repeats):
        for k in (list(models) if r % 2 == 0 else list(models)[::-1]):
            rates[k].append(one_pass(models[k]))
    return {k: statistics.median(v) for k, v in rates.items()}


def matmul_peak(device: str, size: int = 2048, repeats: int = 5) -> float:
    """Best float32 matrix-multiply rate (GFLOP/s) measured here: the machine's practical peak."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    best = 0.0
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


def max_difference(a: list[Tensor], b: list[Tensor], compared: list[int]) -> tuple[float, float]:
    """(max |a − b|, max ‖a − b‖ / ‖b‖) over the tensors numbered ``compared``."""
    absolute = max(float((a[i].double() - b[i].double()).abs().max()) for i in compared)
    relative = max(float((a[i].double() - b[i].double()).norm() / b[i].double().norm()) for i in compared)
    return absolute, relative


def nonzero_tensors(truth: list[Tensor]) -> list[int]:
    """Tensors whose float64 meta-gradient is not zero up to rounding. The conv biases' are (batch norm
    subtracts the bias): any float32 value of theirs is rounding noise, meaningless as a relative error."""
    largest = max(float(t.norm()) for t in truth)
    return [i for i, t in enumerate(truth) if float(t.norm()) > 1e-9 * largest]


def float64_truth(ways: int, device: str, batch: TaskBatch, steps: int = 1) -> list[Tensor]:
    """The meta-gradient of the hand-written loop on the textbook Conv4 in float64, from the same weights."""
    impl = build("torch", ways, device, "loop", steps)
    impl.model.double()
    return impl.meta_grad(TaskBatch(batch.support_x.double(), batch.support_y, batch.query_x.double(), batch.query_y))


def data_rate(ds, ways: int, queries: int, tasks: int, workers: int, batches: int = 20) -> float:
    """Episodes per second a DataLoader over the cached dataset delivers with ``workers`` workers."""
    loader = DataLoader(EpisodeSampler(ds, ways, 1, queries, seed=5, num_tasks=tasks * batches),
                        batch_size=tasks, collate_fn=collate_tasks, num_workers=workers)
    start = time.perf_counter()
    n = sum(b.support_x.shape[0] for b in loader)
    return n / (time.perf_counter() - start)


# -- one setting -------------------------------------------------------------------------------------
def run_setting(args, ways: int, tasks: int, steps: int, presets: list[str], baselines: list[str]) -> dict:
    print(f"\n== {ways}-way 1-shot, meta-batch {tasks}, {steps} inner step(s), {args.queries} queries/class, device {args.device} ==", flush=True)
    ds, batches = episodes(args.dataset, args.data_root, ways, tasks, args.batches, args.queries, args.device)
    keys = [f"metasam:{p}" for p in presets] + baselines + [ATTRIBUTION]
    if "agnostic-sam-both" in presets:
        keys.insert(keys.index("metasam:agnostic-sam-both") + 1, "metasam:agnostic-sam-both:val4")
    impls = {k: build(k, ways, args.device, args.path, steps) for k in keys}
    checked = ["metasam:maml"]
    if args.textbook:  # metasam as a library user runs it: on the textbook Conv4
        keys.insert(1, "metasam:maml:textbook")
        checked.append("metasam:maml:textbook")
        impls["metasam:maml:textbook"] = build("metasam:maml:textbook", ways, args.device, args.path, steps)
    for n in args.task_threads:  # the textbook Conv4 with the tasks shared among n threads
        key = f"metasam:maml:textbook:threads{n}"
        keys.insert(keys.index("metasam:maml:textbook") + 1 if args.textbook else 1, key)
        checked.append(key)
        impls[key] = build(key, ways, args.device, args.path, steps)
        own = f"metasam:maml:threads{n}"  # and metasam's own Conv4, as `metasam train` builds it
        keys.insert(keys.index("metasam:maml") + 1, own)
        checked.append(own)
        impls[own] = build(own, ways, args.device, args.path, steps)
    if args.learn_inner_lr:  # timed only: its meta-gradient is checked by tests/meta/test_meta_sgd.py
        keys.insert(keys.index("metasam:maml") + 1, "metasam:maml:lrs")
        impls["metasam:maml:lrs"] = build("metasam:maml:lrs", ways, args.device, args.path, steps)
    if args.anil:  # timed only: ANIL's meta-gradient is checked by tests/meta/test_library.py
        keys.insert(keys.index("metasam:maml") + 1, "metasam:maml:anil")
        impls["metasam:maml:anil"] = build("metasam:maml:anil", ways, args.device, args.path, steps)
    if args.one_thread:
        keys.append(ONE_THREAD)
        impls[ONE_THREAD] = build(ONE_THREAD, ways, args.device, args.path, steps)
    if args.compare_paths:  # maml on the path that "auto" did not take, checked and timed like the rest
        other = "vmap" if impls["metasam:maml"].learner.path == "loop" else "loop"
        checked.append(f"metasam:maml:{other}")
        keys.insert(1, checked[-1])
        impls[checked[-1]] = build(checked[-1], ways, args.device, args.path, steps)

    truth = float64_truth(ways, args.device, batches[0][0], steps)
    compared = nonzero_tensors(truth)
    reference = impls["metasam:maml"].meta_grad(batches[0][0])
    agreement, error = {}, {}
    for k in checked + baselines + [ATTRIBUTION]:
        grad = reference if k == "metasam:maml" else impls[k].meta_grad(batches[0][0])
        error[k] = max_difference(grad, truth, compared)[1]
        if k != "metasam:maml":
            agreement[k] = max_difference(grad, reference, compared)
        print(f"meta-gradient of {impls[k].name}: relative difference from the float64 truth {error[k]:.1e}"
              + ("" if k == "metasam:maml" else f"; from metasam maml max abs {agreement[k][0]:.1e}, max rel {agreement[k][1]:.1e}"),
              flush=True)
    bound = max(MAX_RELATIVE_ERROR, 2 * min(error[k] for k in baselines))
    wrong = {impls[k].name: e for k, e in error.items() if k not in baselines and not e <= bound}
    if wrong:
        raise SystemExit(f"metasam's meta-gradient is further than {bound:.1e} from the float64 truth (the bound: "
                         f"{MAX_RELATIVE_ERROR:g} or twice the closest baseline's distance): {wrong}; nothing was timed")

    for impl in impls.values():  # warm-up: allocator, kernels, lazy imports
        impl.step(*batches[0])
    rates: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(args.repeats):
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        for k in order:
            rates[k].append(time_steps(impls[k], batches, args.device))
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k.split(':')[-1]} {rates[k][-1]:.2f}" for k in keys), flush=True)
    median = {k: statistics.median(v) for k, v in rates.items()}
    memory = ({k: peak_memory(k, ways, args.device, args.path, steps, batches, args.retain_freed_memory, args.tf32) for k in keys}
              if args.memory else {})
    flops_task, flops_query = count_flops(ways, args.device, batches[0][0], steps)
    query = query_pass_rates(ways, args.device, batches[0][0], args.repeats)
    data = {w: data_rate(ds, ways, args.queries, tasks, w) for w in (0, 2)} if args.device == "cpu" else {}
    return {"ways": ways, "tasks": tasks, "steps": steps, "names": {k: impls[k].name for k in keys}, "rates": rates, "median": median,
            "memory": memory, "agreement": agreement, "error": error, "flops_task": flops_task, "flops_query": flops_query,
            "query": query, "data": data, "threads": torch.get_num_threads(), "second_order": {k: impls[k].second_order for k in keys}}


# -- report ------------------------------------------------------------------------------------------
def render(results: list[dict], args, peak: float, skipped: dict[str, str], command: str) -> str:
    lines = ["# Meta-training throughput: metasam against higher and learn2learn", ""]
    lines += [f"Measured {datetime.date.today().isoformat()} on {machine(args.device)}; torch {torch.__version__}, "
              f"Python {platform.python_version()}, {torch.get_num_threads()} threads, device {args.device}. "
              f"Best float32 matmul measured here: {peak:.1f} GFLOP/s (the practical peak the GFLOP/s column is "
              f"compared with). " + (f"Float32 convolutions and matrix products {'in TF32 (`--tf32`)' if args.tf32 else 'in full float32 (TF32 off, as metasam runs)'}."
                                   if args.device.startswith("cuda") else
                                   f"Freed memory {'kept in the process (`--retain-freed-memory`, as `metasam train` runs)' if args.retain_freed_memory else 'returned to the OS (glibc defaults)'}."), ""]
    lines += [f"Command: `{command}`", ""]
    lines += [("Conv4 (64 filters, batch-statistics BatchNorm), Omniglot 28×28 from `images_background_small1`"
               if args.dataset == "omniglot" else "Conv4 (64 filters) on the synthetic glyph set") +
              " (metasam rows: `metasam.models.CPUConv4` on the CPU outside the vmap path, as `metasam train` builds it, "
              "`Conv4` elsewhere; baselines: the textbook Conv4 of torch layers with the same weights)" +
              f", 1-shot, {args.queries} queries per class, α = 0.4 at 5-way and 0.1 at 20-way, Adam outer "
              f"step; tasks/s: the median of {args.repeats} interleaved repeats over {args.batches} meta-batches each, "
              "with the slowest and fastest repeat. Seeds: initial weights 0, training tasks 0, validation tasks 1 "
              "(the same for every implementation).", ""]
    for key, why in skipped.items():
        lines += [f"- **{key} skipped**: it does not import here ({why}).", ""]
    for res in results:
        names, median = res["names"], res["median"]
        best_key = max((k for k in median if k in BASELINES), key=median.get)
        best = median[best_key]
        lines += [f"## {res['ways']}-way 1-shot, meta-batch {res['tasks']}, {res['steps']} inner step{'s' if res['steps'] > 1 else ''}", ""]
        lines += ["| implementation | tasks/s (min – max) | × best baseline | × metasam maml | GFLOP/s | % of matmul peak | peak memory (MB) | meta-gradient vs float64 truth (rel) | vs metasam maml (max abs / max rel) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for k, rate in median.items():
            gflops = rate * res["flops_task"] / 1e9 if res["second_order"][k] else float("nan")
            mem = f"{res['memory'][k] / 2**20:.0f}" if k in res["memory"] else "–"
            agree = "(reference)" if k == "metasam:maml" else (
                "{:.1e} / {:.1e}".format(*res["agreement"][k]) if k in res["agreement"] else "–")
            g = "–" if gflops != gflops else f"{gflops:.1f}"
            pct = "–" if gflops != gflops else f"{100 * gflops / peak:.0f} %"
            truth = f"{res['error'][k]:.1e}" if k in res["error"] else "–"
            spread = f"{min(res['rates'][k]):.2f} – {max(res['rates'][k]):.2f}"
            lines.append(f"| {names[k]} | {rate:.2f} ({spread}) | {rate / best:.2f} | {rate / median['metasam:maml']:.2f} | {g} | {pct} | {mem} | {truth} | {agree} |")
        lines += ["", f"Best baseline: {names[best_key]}. FLOPs per task of a second-order step: "
                  f"{res['flops_task'] / 1e9:.2f} GFLOP, of which the query forward+backward is "
                  f"{res['flops_query'] / 1e9:.2f} GFLOP ({100 * res['flops_query'] / res['flops_task']:.0f} %). "
                  "GFLOP/s is left out for first-order rows (they do less arithmetic). The float64 truth is the "
                  "hand-written loop on the textbook Conv4 in float64; relative differences are the largest per-tensor "
                  "‖a − b‖ / ‖b‖, leaving out the conv biases, whose meta-gradient is zero up to rounding "
                  "(batch norm subtracts them)."]
        lines += ["", "Query passes alone (each task's query forward+backward at fixed weights, interleaved, median of "
                  f"{args.repeats}): " + ", ".join(
                      f"{name} {rate * res['flops_query'] / 1e9:.1f} GFLOP/s ({100 * rate * res['flops_query'] / 1e9 / peak:.0f} % of matmul peak)"
                      for name, rate in (("metasam's Conv4", res["query"]["metasam"]), ("the textbook Conv4", res["query"]["textbook"])))
                  + f"; {res['query']['metasam'] / res['query']['textbook']:.2f}× the textbook's rate."]
        if ONE_THREAD in median:
            threads = res["threads"]
            side_by_side = threads * median[ONE_THREAD]
            lines += ["", f"Yardstick for task threads on the textbook Conv4: {threads} × {median[ONE_THREAD]:.2f} "
                      f"tasks/s (the hand-written loop with one intra-op thread) = {side_by_side:.2f} tasks/s, "
                      f"{side_by_side / best:.2f}× the best baseline: {threads} such loops side by side, one per core, "
                      "if they did not slow each other down (they share caches and memory bandwidth; a loop with "
                      "less overhead per operation can pass it)."]
        if res["data"]:
            train = median["metasam:maml"]
            lines += ["", "Episodes per second from the cached dataset (DataLoader over EpisodeSampler): " + ", ".join(
                f"{w} workers {r:.0f} ({r / train:.0f}× metasam maml's training rate)" for w, r in res["data"].items()) + "."]
        lines.append("")
    return "\n".join(lines + LIMITS)


LIMITS = ["## What these numbers do not show", "",
          "- One run on one machine. Another run can differ by more than the spread within this one (the min – max "
          "column); on this project's shared 2-core CPU virtual machine one run's ratio to the best baseline moved "
          "by up to ±0.15 from another's (docs/performance.md).",
          "- The speed of meta-gradient steps on tasks already in memory, from the same weights for every "
          "implementation: not accuracy (nothing is trained to convergence; the meta-gradient columns show that the "
          "implementations compute the same step), not start-up, and not data loading (its rate is given apart).",
          "- Peak memory, where shown, is the peak of two outer steps above the start of a fresh process per row.", ""]
"""The closing section of every page: what a throughput page cannot tell."""


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores ({torch.backends.cpu.get_cpu_capability()})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_root = os.environ.get("METASAM_DATA", "data")
    parser.add_argument("--dataset", choices=("omniglot", "glyphs"), default="omniglot")
    parser.add_argument("--data-root", default=default_root)
    parser.add_argument("--settings", default="5:16,5:32,20:16",
                        help="ways:meta-batch[:inner steps] (default 1 step), comma separated; e.g. 5:16,20:16:5")
    parser.add_argument("--task-threads", default="", help="comma list of N: add metasam maml with "
                        "MetaLearner(task_threads=N) on metasam's Conv4 and on the textbook Conv4, "
                        "checked and timed like the rest")
    parser.add_argument("--one-thread", action="store_true",
                        help="also time the hand-written loop on the textbook Conv4 with one intra-op thread (threads × its "
                             "rate: that loop side by side on every core, the yardstick for task threads)")
    parser.add_argument("--learn-inner-lr", action="store_true",
                        help="add metasam's maml with learned inner step sizes (Meta-SGD), timed beside plain maml")
    parser.add_argument("--anil", action="store_true",
                        help="add metasam's maml adapting the head alone (ANIL), timed beside plain maml")
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--presets", default=",".join(PRESETS),
                        help="metasam presets timed at the first setting (the overhead table); later settings time maml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=2, help="meta-batches per timed pass")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--path", choices=("loop", "vmap", "auto"), default="auto", help="metasam's path over tasks")
    parser.add_argument("--compare-paths", action="store_true",
                        help="also time metasam maml on the path over tasks that --path did not take (with auto: vmap on "
                             "CPU, the loop on CUDA)")
    parser.add_argument("--tf32", action="store_true",
                        help="let CUDA convolutions and matrix products use TF32, for every implementation in the process "
                             "(default: full float32, as metasam's commands run)")
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--textbook", action="store_true",
                        help="add metasam maml on the baselines' textbook Conv4 (MetaLearner's defaults, a user's own model)")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="keep freed memory in the process (glibc), as every `metasam` command does; it applies to "
                             "every implementation in the process")
    parser.add_argument("--quick", action="store_true", help="5:4 only, 1 repeat, 1 batch, presets maml and sharp-maml-low")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "results" / "throughput.md"))
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists (refused otherwise)")
    args = parser.parse_args()
    if Path(args.out).exists() and not args.overwrite:
        parser.error(f"--out {args.out} exists: choose another --out, or pass --overwrite to replace it")
    if args.quick:
        args.settings, args.repeats, args.batches, args.presets = "5:4", 1, 1, "maml,sharp-maml-low"
    args.presets = [p.strip() for p in args.presets.split(",")]
    args.task_threads = [int(n) for n in args.task_threads.split(",") if n.strip()]
    if args.retain_freed_memory:
        retain_freed_memory()
    use_tf32(args.tf32)
    if "maml" not in args.presets:
        parser.error("--presets must include maml (the reference for the meta-gradient check)")
    baselines, skipped = available_baselines()
    for key, why in skipped.items():
        print(f"{key} skipped: it does not import here ({why})", flush=True)
    peak = matmul_peak(args.device)
    print(f"best float32 matmul here: {peak:.1f} GFLOP/s", flush=True)
    results = []
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "METASAM_BENCH_THREADS") if k in os.environ]
    command = shlex.join(["python", "benchmarks/throughput.py", *sys.argv[1:]])
    command = " ".join([*env, command])
    for i, item in enumerate(args.settings.split(",")):
        ways, tasks, *steps = (int(v) for v in item.split(":"))
        results.append(run_setting(args, ways, tasks, steps[0] if steps else 1, args.presets if i == 0 else ["maml"], baselines))
        peak = max(peak, matmul_peak(args.device))  # the best of several moments: a shared machine is noisy
        text = render(results, args, peak, skipped, command)
        write_text_atomic(text, args.out)  # after every setting: a run cut short keeps what it measured
    print("\n" + text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
