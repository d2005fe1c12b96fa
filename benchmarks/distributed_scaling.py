"""Meta-training throughput (tasks/s) of one process versus W processes under torchrun, on this machine.

    PYTHONPATH=. python benchmarks/distributed_scaling.py [--dataset glyphs] [--algo maml] [--meta-batch 16]
        [--iterations 12] [--layouts 1x1,1x2,2x1] [--device cpu]

A layout PxN is P processes of N threads each (OMP_NUM_THREADS=N). Since 2026-12-01 ``metasam train`` shares
a process's tasks among N task threads on a CPU (``MetaLearner(task_threads="auto")``), so 1xN is N task
threads, not one task at a time on N intra-op threads as before (docs/distributed.md gives both). Each layout runs ``metasam train`` in a
fresh temporary folder (P > 1 through ``python -m torch.distributed.run --standalone``) and reports the
median of the ``tasks_per_s`` that rank 0 logs per outer step (global tasks of the meta-batch divided by the
step's time, waits for the other ranks included), skipping the first two steps, plus the load average
before and after, since other jobs on a shared machine change the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(layout: str, args: argparse.Namespace, env: dict[str, str] | None = None) -> dict:
    """One ``metasam train`` in layout PxN (with extra environment ``env``): its median step rate, and the
    page faults and system CPU seconds of its processes."""
    procs, threads = (int(x) for x in layout.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        train = ["train", "--dataset", args.dataset, "--ways", str(args.ways), "--shots", str(args.shots),
                 "--algo", args.algo, "--meta-batch", str(args.meta_batch), "--iterations", str(args.iterations),
                 "--val-every", str(args.iterations), "--val-tasks", "2", "--device", args.device,
                 "--out", str(out), "--no-progress"]
        for flag in ("data_root", "train_split", "test_split"):
            if getattr(args, flag):
                train += ["--" + flag.replace("_", "-"), getattr(args, flag)]
        launcher = ["-m", "metasam"] if procs == 1 else \
            ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), "-m", "metasam"]
        load_before = os.getloadavg()[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, *launcher, *train], env={**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})},
                       check=True, capture_output=True, text=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tasks_per_s"] for r in lines if "tasks_per_s" in r][2:]
    return {"layout": layout, "tasks_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
            "load_before": load_before, "load_after": os.getloadavg()[0],
            "page_faults": after.ru_minflt - before.ru_minflt, "system_s": after.ru_stime - before.ru_stime}


def add_train_arguments(parser: argparse.ArgumentParser, iterations: int) -> None:
    """The ``metasam train`` settings that :func:`run` passes on."""
    parser.add_argument("--dataset", default="glyphs")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--train-split", default=None, help="e.g. images_background_small1, one of Omniglot's small background subsets")
    parser.add_argument("--test-split", default=None)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--algo", default="maml")
    parser.add_argument("--meta-batch", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=iterations)
    parser.add_argument("--device", default="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser, iterations=12)
    parser.add_argument("--layouts", default="1x1,1x2,2x1", help="PxN: P processes of N threads each")
    args = parser.parse_args()
    print(f"{args.dataset} {args.ways}-way {args.shots}-shot, {args.algo}, meta-batch {args.meta_batch}, "
          f"{os.cpu_count()} CPUs visible")
    print("| processes × threads | tasks/s (median) | min – max | load average before → after |")
    print("| --- | --- | --- | --- |")
    for layout in args.layouts.split(","):
        r = run(layout, args)
        print(f"| {layout.replace('x', ' × ')} | {r['tasks_per_s']:.1f} | {r['min']:.1f} – {r['max']:.1f} | "
              f"{r['load_before']:.1f} → {r['load_after']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
