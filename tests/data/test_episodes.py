"""EpisodeSampler: task i is a pure function of (seed, i); batching; DataLoader workers; validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils.data import DataLoader

from conftest import tiny_dataset
from metasam.data import EpisodeSampler, TaskBatch, collate_tasks
from metasam.data._rng import StableRandom
from metasam.errors import ConfigError, DatasetError


def assert_same_task(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_task_is_a_pure_function_of_seed_and_index():
    ds = tiny_dataset(10, 7)
    forward = [EpisodeSampler(ds, 4, 2, 3, seed=7)[i] for i in range(6)]
    fresh = EpisodeSampler(ds, 4, 2, 3, seed=7)
    backward = {i: fresh[i] for i in reversed(range(6))}
    for i in range(6):
        assert_same_task(forward[i], backward[i])
    other = EpisodeSampler(ds, 4, 2, 3, seed=8)
    assert any(not torch.equal(other[i].support_x, forward[i].support_x) for i in range(6))
    assert EpisodeSampler(ds, 4, 2, 3, seed=7).spec(10**9) == EpisodeSampler(ds, 4, 2, 3, seed=7).spec(10**9)


def test_task_structure():
    ds = tiny_dataset(12, 9)
    sampler = EpisodeSampler(ds, 5, 3, 4, seed=1)
    for i in range(20):
        spec, task = sampler.spec(i), sampler[i]
        assert len(set(spec.classes)) == 5, "classes without replacement"
        for label, c in enumerate(spec.classes):
            imgs = spec.support[label] + spec.query[label]
            assert len(set(imgs)) == 7, "distinct images per class"
            assert all(int(ds.targets[j]) == c for j in imgs), "images belong to their class"
            # the pixels at this label's rows are the images of this class
            assert torch.equal(task.support_x[label * 3:(label + 1) * 3], ds.stack(spec.support[label]))
            assert torch.equal(task.query_x[label * 4:(label + 1) * 4], ds.stack(spec.query[label]))
        assert task.support_y.tolist() == [label for label in range(5) for _ in range(3)]
        assert task.query_y.tolist() == [label for label in range(5) for _ in range(4)]
        assert task.support_y.dtype == torch.int64


def test_labels_are_remapped_in_random_order():
    ds = tiny_dataset(5, 4)  # ways == all classes: only the label order varies between tasks
    sampler = EpisodeSampler(ds, 5, 1, 1, seed=0)
    orders = {sampler.spec(i).classes for i in range(50)}
    assert len(orders) > 10, "label assignment should vary between tasks"
    assert all(sorted(o) == list(range(5)) for o in orders)


def test_draws_are_roughly_uniform():
    ds = tiny_dataset(6, 5)
    sampler = EpisodeSampler(ds, 2, 1, 1, seed=3)
    counts = torch.zeros(6)
    for i in range(3000):
        for c in sampler.spec(i).classes:
            counts[c] += 1
    assert (counts / 6000 - 1 / 6).abs().max() < 0.03


def test_batch_and_iteration():
    ds = tiny_dataset(8, 6, shape=(3, 5, 5))
    sampler = EpisodeSampler(ds, 3, 2, 1, seed=0, num_tasks=4)
    batch = sampler.batch([0, 1, 2])
    assert isinstance(batch, TaskBatch)
    assert batch.support_x.shape == (3, 6, 3, 5, 5) and batch.query_x.shape == (3, 3, 3, 5, 5)
    assert batch.support_y.shape == (3, 6) and batch.query_y.shape == (3, 3)
    assert torch.equal(batch.support_x[2], sampler[2].support_x)
    tasks = list(sampler)
    assert len(tasks) == 4 and len(sampler) == 4
    assert_same_task(tasks[3], sampler[3])


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_workers_give_identical_tasks(workers):
    ds = tiny_dataset(10, 6)
    sampler = EpisodeSampler(ds, 4, 1, 2, seed=5, num_tasks=12)
    loader = DataLoader(sampler, batch_size=4, collate_fn=collate_tasks, num_workers=workers)
    batches = list(loader)
    assert len(batches) == 3
    expected = [sampler.batch(range(k, k + 4)) for k in (0, 4, 8)]
    for got, want in zip(batches, expected):
        assert_same_task(got, want)


def test_too_few_classes_for_ways():
    with pytest.raises(DatasetError, match=r"3 classes, fewer than ways=5"):
        EpisodeSampler(tiny_dataset(3, 10), 5, 1, 1)


def test_too_few_images_names_the_class():
    ds = tiny_dataset(sizes=[10, 10, 3, 10])
    with pytest.raises(DatasetError, match=r"class 'class2' .* 3 images, fewer than shots \+ queries = 6"):
        EpisodeSampler(ds, 2, 1, 5)


@pytest.mark.parametrize("kwargs", [dict(ways=0), dict(shots=0), dict(queries=-1), dict(ways=2.0), dict(seed=-1), dict(shots=True)])
def test_bad_episode_arguments(kwargs):
    args = dict(ways=2, shots=1, queries=1, seed=0) | kwargs
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        EpisodeSampler(tiny_dataset(4, 4), **args)


def test_sampler_rejects_overlapping_splits():
    ds = tiny_dataset(6, 4)
    train, test = ds.subset(["class0", "class1", "class2"]), ds.subset(["class2", "class3", "class4"])
    test.name = "test-split"
    with pytest.raises(DatasetError, match=r"'class2' is in both"):
        EpisodeSampler(test, 2, 1, 1, disjoint_from=[train])
    EpisodeSampler(ds.subset(["class3", "class4"]), 2, 1, 1, disjoint_from=[train])  # disjoint: fine


def test_negative_task_index():
    with pytest.raises(IndexError):
        EpisodeSampler(tiny_dataset(4, 4), 2, 1, 1)[-1]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 200), data=st.data(), words=st.lists(st.integers(0, 2**63), min_size=1, max_size=4))
def test_stable_random_sample_is_distinct_and_in_range(n, data, words):
    k = data.draw(st.integers(0, n))
    a = StableRandom(*words).sample(n, k)
    assert len(a) == k and len(set(a)) == k and all(0 <= x < n for x in a)
    assert a == StableRandom(*words).sample(n, k)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(2, 9), min_size=2, max_size=12), seed=st.integers(0, 2**32), i=st.integers(0, 10**6), data=st.data())
def test_any_valid_shape_gives_a_well_formed_task(sizes, seed, i, data):
    ds = tiny_dataset(sizes=sizes, shape=(1, 2, 2))
    ways = data.draw(st.integers(1, len(sizes)))
    shots = data.draw(st.integers(1, min(sizes) - 1))
    queries = data.draw(st.integers(0, min(sizes) - shots))
    spec = EpisodeSampler(ds, ways, shots, queries, seed).spec(i)
    assert len(set(spec.classes)) == ways
    for c, sup, qry in zip(spec.classes, spec.support, spec.query):
        assert len(sup) == shots and len(qry) == queries and len(set(sup + qry)) == shots + queries
        assert {int(ds.targets[j]) for j in sup + qry} <= {c}
