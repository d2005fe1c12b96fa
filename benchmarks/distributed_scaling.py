"""Meta-training throughput (tasks/s) of one process versus W processes under torchrun, on this machine.

    PYTHONPATH=. python benchmarks/distributed_scaling.py [--dataset glyphs] [--algo maml] [--meta-batch 16]
        [--iterations 12] [--layouts 1x1,1x2,2x1] [--device cpu]

A layout PxN is P processes of N threads each (OMP_NUM_THREADS=N). Each layout runs ``metasam train`` in a
fresh temporary folder (P > 1 through ``python -m torch.distributed.run --standalone``) and reports the
median of the ``tasks_per_s`` that rank 0 logs per outer step (global tasks of the meta-batch divided by the
step's time, waits for the other ranks included), skipping the first two steps, plus the load average
before and after, since other jobs on a shared machine change the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(layout: str, args: argparse.Namespace) -> dict:
    procs, threads = (int(x) for x in layout.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        train = ["train", "--dataset", args.dataset, "--ways", str(args.ways), "--shots", str(args.shots),
                 "--algo", args.algo, "--meta-batch", str(args.meta_batch), "--iterations", str(args.iterations),
                 "--val-every", str(args.iterations), "--val-tasks", "2", "--device", args.device,
                 "--out", str(out), "--no-progress"]
        if args.data_root:
            train += ["--data-root", args.data_root]
        launcher = ["-m", "metasam"] if procs == 1 else \
            ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), "-m", "metasam"]
        load_before = os.getloadavg()[0]
        subprocess.run([sys.executable, *launcher, *train], env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                       check=True, capture_output=True, text=True)
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tasks_per_s"] for r in lines if "tasks_per_s" in r][2:]
    return {"layout": layout, "tasks_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
            "load_before": load_before, "load_after": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="glyphs")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--algo", default="maml")
    parser.add_argument("--meta-batch", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--layouts", default="1x1,1x2,2x1", help="PxN: P processes of N threads each")
    parser.add_argument("--device", default="cpu")
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
