"""The throughput benchmark runs end to end, and its correctness gate stops a wrong meta-gradient.

The benchmark is the command a GPU owner runs (docs/performance.md, "On a GPU"), and CI has no GPU, so it
must not rot unseen. These tests run it on the offline glyph set with tiny settings (timings are
meaningless here and not asserted): its meta-gradient check must pass on both paths over tasks against
the float64 truth of an independent hand-written loop, and must refuse to time anything when metasam's
meta-gradient is wrong.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "glyphs", "--settings", "5:2", "--presets", "maml", "--repeats", "1", "--batches", "1",
        "--no-memory"]


def _row(table: str, name: str) -> list[str]:
    rows = [line for line in table.splitlines() if line.startswith(f"| {name} |")]
    assert len(rows) == 1, f"no single row {name!r} in:\n{table}"
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def test_throughput_benchmark_checks_both_paths_and_reports(tmp_path):
    out = tmp_path / "throughput.md"
    run = subprocess.run([sys.executable, "benchmarks/throughput.py", *TINY, "--compare-paths", "--learn-inner-lr", "--anil",
                          "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = out.read_text()
    for name in ("metasam maml (loop)", "metasam maml (vmap)"):
        cells = _row(table, name)
        median, low, high = map(float, re.fullmatch(r"([\d.]+) \(([\d.]+) – ([\d.]+)\)", cells[1]).groups())
        assert 0 < low <= median <= high  # tasks/s: the median of the repeats, with the slowest and the fastest
        assert float(cells[7]) <= 1e-3, f"{name}: meta-gradient {cells[7]} from the float64 truth"
    for name in ("metasam maml (loop), learned inner step sizes (Meta-SGD)", "metasam maml (loop), the head alone adapts (ANIL)"):
        assert float(_row(table, name)[1].split()[0]) > 0
    baseline = _row(table, "torch.autograd loop (hand-written)")
    assert float(baseline[7]) <= 1e-3
    query = re.search(r"Query passes alone .*?metasam's Conv4 ([\d.]+) GFLOP/s .*?the textbook Conv4 ([\d.]+) GFLOP/s", table)
    assert query and float(query.group(1)) > 0 and float(query.group(2)) > 0, table
    assert "Command: `OMP_NUM_THREADS=1 python benchmarks/throughput.py " in table  # the environment it ran in
    assert table.rindex("\n## ") == table.index("\n## What these numbers do not show\n")  # the last section


def test_throughput_benchmark_refuses_to_time_a_wrong_meta_gradient(tmp_path, monkeypatch, capsys):
    """A meta-gradient 1 % off (scaled by 1.01) is 10× the gate's 1e-3: the run stops before timing."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    throughput = importlib.import_module("throughput")
    right = throughput.Metasam.meta_grad
    monkeypatch.setattr(throughput.Metasam, "meta_grad", lambda self, batch: [1.01 * g for g in right(self, batch)])
    monkeypatch.setattr(sys, "argv", ["throughput.py", *TINY, "--out", str(tmp_path / "t.md")])
    with pytest.raises(SystemExit, match="further than .* from the float64 truth.*nothing was timed"):
        throughput.main()
    assert "repeat 1/1" not in capsys.readouterr().out
    assert not (tmp_path / "t.md").exists()


def test_op_profile_counts_the_same_operators_for_metasam_and_the_hand_written_loop():
    run = subprocess.run([sys.executable, "benchmarks/op_profile.py", "--dataset", "glyphs", "--ways", "5", "--steps",
                          "2", "--tasks", "2", "--rows", "8"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in run.stdout.splitlines() if line.startswith("| `")]
    assert len(rows) == 8
    convolution = next(r for r in rows if r[0] == "`aten::convolution_backward`")
    assert convolution[1] == convolution[-2] != "0"  # metasam's calls == the hand-written loop's (last column pair)


def test_benchmarks_refuse_to_replace_earlier_results_unless_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    throughput, noisy_labels = (importlib.import_module(name) for name in ("throughput", "noisy_labels"))
    page = tmp_path / "t.md"
    page.write_text("an earlier page")
    monkeypatch.setattr(sys, "argv", ["throughput.py", *TINY, "--out", str(page)])
    with pytest.raises(SystemExit) as stop:
        throughput.main()
    assert stop.value.code == 2 and f"--out {page} exists: choose another --out, or pass --overwrite" in capsys.readouterr().err
    results = tmp_path / "noisy.json"
    results.write_text('{"accuracy": {"chosen": {}}}')
    for only in ([], ["--only", "accuracy"]):
        with pytest.raises(SystemExit) as stop:
            noisy_labels.main(["--results", str(results), "--out", str(tmp_path / "n.md"), *only])
        assert stop.value.code == 2 and "already holds the accuracy results" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # a new --results would render a page over one it did not make
        noisy_labels.main(["--results", str(tmp_path / "new.json"), "--out", str(page)])
    assert stop.value.code == 2 and "was not rendered from --results" in capsys.readouterr().err
    assert page.read_text() == "an earlier page" and results.read_text() == '{"accuracy": {"chosen": {}}}'


def test_optimizer_overhead_benchmark_runs_and_refuses_to_time_steps_that_differ(tmp_path, monkeypatch):
    """A smoke run writes the page with both ratios; a hand-written SAM that is not SAM (one pass) is refused."""
    out = tmp_path / "o.md"
    run = subprocess.run([sys.executable, "benchmarks/optimizer_overhead.py", "--rounds", "2", "--steps", "1", "--out",
                          str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert len(re.findall(r"\| metasam (?:SAM|Agnostic-SAM) \| [\d.]+ \| [\d.]+ \[", out.read_text())) == 6
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    overhead = importlib.import_module("optimizer_overhead")
    monkeypatch.setitem(overhead.METHODS, "SAM by hand", (overhead.sgd_step, overhead.METHODS["SAM by hand"][1]))
    with pytest.raises(SystemExit, match="metasam SAM and SAM by hand differ by .* not the same step; nothing timed"):
        overhead.check_same_steps(overhead.mlp, 8)


def test_data_cache_benchmark_times_both_loads_and_the_hash_check(tmp_path):
    run = subprocess.run([sys.executable, "benchmarks/data_cache.py", "--omniglot", str(tmp_path / "absent"), "--repeats", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    glyphs = re.search(r"^Glyphs\(\) +([\d.]+)s +([\d.]+)s +(\d+)x", run.stdout, flags=re.M)
    assert glyphs and float(glyphs.group(1)) > float(glyphs.group(2)) > 0, run.stdout
    assert re.search(r"^Omniglot\(small1\+small2\) +skipped: ", run.stdout, flags=re.M), run.stdout
    assert re.search(r"content hash checked on every cached load: [\d.]+ s per GB", run.stdout), run.stdout
