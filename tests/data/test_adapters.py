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
