"""``metasam bench``: an experiment runner. Seeds, hyperparameter grids chosen on validation only, the
controls that tell a training effect from an effective-radius or an adaptation effect, intervals over seeds
and paired differences, resumable cell by cell and shared between processes as shards or workers (docs/bench.md).

- :mod:`~metasam.train.bench.grid`: ``--grid`` specs, grid points, their folders and edges;
- :mod:`~metasam.train.bench.plan`: the cells of a bench, their run configurations, the controls;
- :mod:`~metasam.train.bench.results`: selection on validation, test evaluation, the numbers of the table;
- :mod:`~metasam.train.bench.report`: results.md and results.png;
- :mod:`~metasam.train.bench.runner`: training, shards, workers, merge, OUT/bench.json;
- :mod:`~metasam.train.bench.export`: a bench's evidence copied without its checkpoints.
"""

from metasam.train.bench.plan import BenchPlan, parse_seeds, parse_settings, parse_shard
from metasam.train.bench.results import SELECTION_RULE
from metasam.train.bench.runner import load_plan, merge, run_bench, run_worker

__all__ = ["BenchPlan", "SELECTION_RULE", "load_plan", "merge", "parse_seeds", "parse_settings", "parse_shard", "run_bench",
           "run_worker"]
