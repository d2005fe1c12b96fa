"""Task batches from torchmeta-style dict batches and learn2learn-style single tasks."""

import pytest
import torch

from metasam import ConfigError
from metasam.data.adapters import from_support_query_dict, split_task


def test_dict_batch_maps_train_to_support_and_test_to_query():
    sx, sy, qx, qy = torch.randn(2, 5, 3), torch.arange(5).repeat(2, 1), torch.randn(2, 10, 3), torch.arange(5).repeat(2, 2)
    batch = from_support_query_dict({"train": (sx, sy), "test": (qx, qy)})
    assert all(a is b for a, b in zip(batch, (sx, sy, qx, qy)))
    assert from_support_query_dict({"s": (sx, sy), "q": (qx, qy)}, support="s", query="q").query_x is qx
    with pytest.raises(ConfigError, match=r"no \['test'\] entry.*support= and query="):
        from_support_query_dict({"train": (sx, sy)})
    with pytest.raises(ConfigError, match="leading task dimension"):
        from_support_query_dict({"train": (sx[0], sy[0]), "test": (qx[0], qy[0])})


def test_split_task_takes_the_first_shots_of_each_label_as_support_and_the_rest_as_query():
    y = torch.tensor([2, 0, 1, 0, 2, 1, 1, 0, 2])
    x = torch.arange(9.0)[:, None] * 10  # x identifies the example
    batch = split_task(x, y, shots=1)
    assert batch.support_y.tolist() == [[0, 1, 2]] and batch.support_x[0, :, 0].tolist() == [10, 20, 0]
    assert batch.query_y.tolist() == [[0, 0, 1, 1, 2, 2]] and batch.query_x[0, :, 0].tolist() == [30, 70, 50, 60, 40, 80]
    with pytest.raises(ConfigError, match="leave none for its query set"):
        split_task(x, y, shots=3)
    with pytest.raises(ConfigError, match="integer labels"):
        split_task(x, y.float(), shots=1)


def test_episode_sampler_over_a_tensor_dataset_of_feature_vectors():
    from torch.utils.data import TensorDataset

    from metasam import EpisodeSampler
    from metasam.meta import MetaLearner

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(7).repeat_interleave(6) * 10  # 7 classes with labels 0, 10, ..., 60; 6 examples each
    features = torch.randn(42, 12, generator=gen, dtype=torch.float64)
    features[:, 0] = labels.double()  # the first feature names the class
    sampler = EpisodeSampler(TensorDataset(features, labels), ways=3, shots=2, queries=4, seed=1)
    task = sampler[5]
    assert task.support_x.shape == (6, 12) and task.query_x.shape == (12, 12) and task.support_x.dtype == torch.float64
    assert task.support_y.tolist() == [0, 0, 1, 1, 2, 2]
    for x, y in ((task.support_x, task.support_y), (task.query_x, task.query_y)):
        for label in range(3):  # one original class per episode label, values unchanged (no scaling)
            assert len(set(x[y == label, 0].tolist())) == 1
    rows = {tuple(r.tolist()) for r in features}
    assert all(tuple(r.tolist()) in rows for r in task.query_x)
    model = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()
    assert "query_acc" in MetaLearner(model, inner_lr=0.1).meta_step(sampler.batch(range(4)))


def test_episode_sampler_over_a_list_of_pairs_and_uint8_images():
    from metasam import DatasetError, EpisodeSampler

    images = torch.randint(0, 256, (20, 1, 5, 5), dtype=torch.uint8)
    pairs = [(images[i], i % 4) for i in range(20)]
    task = EpisodeSampler(pairs, ways=2, shots=1, queries=2, seed=0)[0]
    assert task.support_x.dtype == torch.float32 and task.support_x.max() <= 1.0  # uint8 scaled as everywhere
    with pytest.raises(DatasetError, match="labels must be integers"):
        EpisodeSampler([(images[i], float(i % 4) + 0.5) for i in range(20)], ways=2, shots=1, queries=2)
