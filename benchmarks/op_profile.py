"""Where a second-order meta-gradient's time goes, operator by operator, for metasam and the baselines.

Profiles one meta-gradient per implementation (after one warm-up) with ``torch.profiler`` on the same
pre-loaded Omniglot tasks and the same weights as ``benchmarks/throughput.py`` (whose ``build`` and
``episodes`` it uses), and prints a markdown table of the operators with the most self time: calls and
self-CPU milliseconds per implementation. Equal call counts mean the implementations run the same
operations; the times of one profiled pass are not a speed measurement (``throughput.py`` is).

    python benchmarks/op_profile.py --data-root DATA --ways 20 --steps 5 --tasks 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import available_baselines, build, episodes  # noqa: E402

TEXTBOOK = "metasam:maml:textbook:threads1"  # MetaLearner on the textbook Conv4, one task at a time
LABELS = {TEXTBOOK: "MetaLearner (task_threads=1)", "higher": "higher", "learn2learn": "learn2learn",
          "torch": "hand-written loop"}


def op_table(dataset: str, root: str | None, ways: int, steps: int, tasks: int, rows: int) -> str:
    """The markdown table: one column pair (calls, self ms) per implementation, the ``rows`` operators with the
    most self time in metasam's pass first, and a last row with each pass's total self time."""
    _, batches = episodes(dataset, root, ways, tasks, 1, 15, "cpu")
    batch = batches[0][0]
    keys = [TEXTBOOK, *(k for k in available_baselines()[0])]
    stats, totals = {}, {}
    for key in keys:
        impl = build(key, ways, "cpu", "loop", steps)
        impl.meta_grad(batch)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            impl.meta_grad(batch)
        stats[key] = {e.key: (e.count, e.self_cpu_time_total / 1e3) for e in prof.key_averages()}
        totals[key] = sum(ms for _, ms in stats[key].values())
    names = sorted(set().union(*stats.values()), key=lambda op: -stats[TEXTBOOK].get(op, (0, 0.0))[1])[:rows]
    head = ["operator", *(f"{LABELS[k]}: calls | self ms" for k in keys)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * (1 + 2 * len(keys))]
    for op in names:
        cells = [f"{stats[k].get(op, (0, 0.0))[0]} | {stats[k].get(op, (0, 0.0))[1]:.1f}" for k in keys]
        lines.append(f"| `{op}` | " + " | ".join(cells) + " |")
    lines.append("| all operators | " + " | ".join(f"– | {totals[k]:.0f}" for k in keys) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("omniglot", "glyphs"), default="omniglot")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--ways", type=int, default=20)
    parser.add_argument("--steps", type=int, default=5, help="inner steps")
    parser.add_argument("--tasks", type=int, default=4, help="tasks in the profiled meta-batch")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.ways}-way 1-shot, 15 queries, {args.steps} inner steps, {args.tasks} tasks, "
          f"{args.threads} intra-op thread(s), torch {torch.__version__}\n")
    print(op_table(args.dataset, args.data_root, args.ways, args.steps, args.tasks, args.rows))


if __name__ == "__main__":
    main()
