"""``metasam bench --non-transductive``: the table's test numbers come from each query predicted with the support
set alone, in evaluation files of their own, and the evaluations a bench stored before the flag existed still
count as transductive ones."""

import json

import pytest

from metasam.cli.main import main
from metasam.errors import CheckpointError
from metasam.train.bench.plan import BenchPlan, Cell
from metasam.train.bench import results as bench_results
from metasam.train.bench.results import stored_test

pytestmark = pytest.mark.slow

ARGS = ["bench", "--dataset", "glyphs", "--settings", "3w1s", "--queries", "2", "--meta-batch", "2", "--iterations", "2",
        "--val-every", "2", "--val-tasks", "3", "--test-inner-steps", "1", "--episodes", "12", "--seeds", "0,1",
        "--algos", "maml,sharp-maml-low", "--reference", "maml", "--no-progress"]


def test_a_non_transductive_bench_tests_each_query_alone_and_says_so(tmp_path):
    out = tmp_path / "bench"
    assert main([*ARGS, "--non-transductive", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert "--non-transductive" in results["command"] and results["plan"]["transductive"] is False
    assert "**Non-transductive test.**" in (out / "results.md").read_text()
    for row in results["settings"][0]["methods"]:
        for run, accuracy in zip(row["runs"], row["test_acc"]):
            stored = json.loads((out / run / "eval_best_12_seed1234_nontransductive.json").read_text())
            assert stored["transductive"] is False and stored["accuracy"] == accuracy
            assert not (out / run / "eval_best_12_seed1234.json").exists()


def test_an_evaluation_stored_before_the_flag_existed_counts_as_transductive(tmp_path):
    out = tmp_path / "bench"
    assert main([*ARGS, "--out", str(out)]) == 0
    plan = BenchPlan.from_json(json.loads((out / "bench.json").read_text())["plan"])
    cell = Cell(3, 1, "maml", (), 0)
    path = out / cell.folder / "eval_best_12_seed1234.json"
    old = {k: v for k, v in json.loads(path.read_text()).items() if k != "transductive"}
    path.write_text(json.dumps(old))
    assert stored_test(plan, out, cell, None) == old
    plan.transductive = False
    assert stored_test(plan, out, cell, None) is None  # its own file, _nontransductive, is not there
    path.rename(path.with_name("eval_best_12_seed1234_nontransductive.json"))
    assert stored_test(plan, out, cell, None) is None  # nor does a transductive one under that name stand for it
    (out / cell.folder / "best.pt").unlink()  # a run kept without its checkpoints cannot be tested anew
    for _ in range(2):  # with the transductive file under the non-transductive name, and with none
        with pytest.raises(CheckpointError, match="--non-transductive or not"):
            bench_results.test_result(plan, out, cell, None, progress=False)  # (imported so, pytest would collect it)
        path.with_name("eval_best_12_seed1234_nontransductive.json").unlink(missing_ok=True)
