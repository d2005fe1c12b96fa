"""What keeping freed memory in the process (``metasam.train.memory.retain_freed_memory``) is worth.

The setting is process-wide, so the two arms cannot share a process: each round runs ``metasam train``
twice, with ``METASAM_RETAIN_FREED_MEMORY=0`` (glibc's defaults) and ``=1`` (the CLI's default: freed
memory kept), in alternating order, and reports the median step rate each arm reaches (the trainer's
``tasks_per_s``, first two steps skipped), their ratio per round, and the page faults and system CPU
time of each process per task trained.

    python benchmarks/allocator.py --dataset omniglot --data-root DATA \
        --train-split images_background_small1 \
        --test-split "images_background_small2:Japanese_(katakana),Sanskrit,Tagalog" [--rounds 3]
    python benchmarks/allocator.py          # the synthetic glyph set, offline
"""

from __future__ import annotations

import argparse
import os
import statistics

from distributed_scaling import add_train_arguments, run  # beside this script, on its sys.path

ARMS = {"glibc defaults": {"METASAM_RETAIN_FREED_MEMORY": "0"}, "freed memory kept": {"METASAM_RETAIN_FREED_MEMORY": "1"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser, iterations=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    layout = f"1x{args.threads}"
    tasks = args.iterations * args.meta_batch
    print(f"{args.dataset} {args.ways}-way {args.shots}-shot, {args.algo}, meta-batch {args.meta_batch}, "
          f"{args.iterations} steps, {args.threads} thread(s), {os.cpu_count()} CPUs visible", flush=True)
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for r in range(args.rounds):
        order = list(ARMS) if r % 2 == 0 else list(reversed(ARMS))
        for arm in order:
            results[arm].append(run(layout, args, env=ARMS[arm]))
        base, kept = (results[a][-1]["tasks_per_s"] for a in ARMS)
        print(f"round {r + 1}: {base:.2f} vs {kept:.2f} tasks/s ({kept / base:.2f}×)", flush=True)
    print("\n| arm | tasks/s (median of rounds) | page faults per task | system CPU ms per task |")
    print("| --- | --- | --- | --- |")
    for arm, rows in results.items():
        print(f"| {arm} | {statistics.median(x['tasks_per_s'] for x in rows):.2f} | "
              f"{statistics.median(x['page_faults'] for x in rows) / tasks:.0f} | "
              f"{1e3 * statistics.median(x['system_s'] for x in rows) / tasks:.1f} |")
    ratios = [k["tasks_per_s"] / b["tasks_per_s"] for b, k in zip(*results.values())]
    print(f"\nkept / defaults per round: {', '.join(f'{x:.2f}' for x in ratios)}; median {statistics.median(ratios):.2f}×")


if __name__ == "__main__":
    main()
