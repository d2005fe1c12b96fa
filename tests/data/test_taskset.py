"""TaskSet: sampled, saved as JSON (names, not pixels), loaded back identically or refused."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_dataset
from metasam.data import EpisodeSampler, TaskSet
from metasam.errors import DatasetError


def test_save_load_gives_identical_tasks(tmp_path):
    ds = tiny_dataset(9, 6, shape=(1, 3, 3))
    ts = TaskSet.sample(ds, 7, ways=3, shots=2, queries=2, seed=4)
    sampler = EpisodeSampler(ds, 3, 2, 2, seed=4)
    for i in range(7):  # the same tasks as the sampler's first 7
        assert ts.specs[i] == sampler.spec(i)
    path = tmp_path / "tasks.json"
    ts.save(path)
    doc = json.loads(path.read_text())
    assert doc["tasks"][0]["classes"][0].startswith("class") and "c" in doc["tasks"][0]["support"][0][0]
    assert "pixels" not in path.read_text() and path.stat().st_size < 20_000
    loaded = TaskSet.load(path, ds)
    assert len(loaded) == 7 and (loaded.ways, loaded.shots, loaded.queries) == (3, 2, 2)
    for a, b in zip(ts, loaded):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert torch.equal(ts.batch([0, 1]).query_x, loaded.batch([0, 1]).query_x)


def test_load_by_names_survives_a_reordered_dataset(tmp_path):
    ds = tiny_dataset(6, 5)
    ts = TaskSet.sample(ds, 3, 2, 1, 2, seed=0)
    ts.save(tmp_path / "t.json")
    # the same images listed in reverse order
    rev = torch.arange(len(ds) - 1, -1, -1)
    other = type(ds)(ds.images[rev], ds.targets[rev], ds.classes, [ds.file_ids[i] for i in rev.tolist()], name="rev")
    for a, b in zip(ts, TaskSet.load(tmp_path / "t.json", other)):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_load_refuses_a_dataset_without_the_classes(tmp_path):
    ds = tiny_dataset(6, 5)
    TaskSet.sample(ds, 3, 4, 1, 1, seed=0).save(tmp_path / "t.json")
    with pytest.raises(DatasetError, match=r"uses class 'class\d'"):
        TaskSet.load(tmp_path / "t.json", ds.subset(["class0", "class1"]))


def test_load_refuses_missing_image_and_bad_files(tmp_path):
    ds = tiny_dataset(4, 5)
    TaskSet.sample(ds, 2, 2, 1, 1, seed=0).save(tmp_path / "t.json")
    doc = json.loads((tmp_path / "t.json").read_text())
    doc["tasks"][1]["query"][0][0] = "c0/missing.png"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match="c0/missing.png"):
        TaskSet.load(tmp_path / "bad.json", ds)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        TaskSet.load(tmp_path / "junk.json", ds)
    with pytest.raises(DatasetError, match="does not exist"):
        TaskSet.load(tmp_path / "absent.json", ds)
    (tmp_path / "other.json").write_text(json.dumps({"format": "something"}))
    with pytest.raises(DatasetError, match="not a metasam task set"):
        TaskSet.load(tmp_path / "other.json", ds)
