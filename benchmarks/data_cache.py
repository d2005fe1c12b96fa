"""First load (decode + write the cache) versus cached load (memory-mapped tensor file) of each dataset, and the
rate at which a cache file's content hash (checked on every load) is computed.

    PYTHONPATH=. python benchmarks/data_cache.py [--omniglot FOLDER] [--repeats 3]

Uses a fresh temporary cache folder, so it never touches ~/.cache/metasam. Omniglot is skipped when its
files are not found (default: $METASAM_DATA, else ./data; the folder holding omniglot/ with the two small subsets).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from metasam.checkpoint import content_digest
from metasam.data import Glyphs, Omniglot
from metasam.errors import DatasetError

SMALL = ["images_background_small1", "images_background_small2"]


def timed(make, repeats: int) -> tuple[float, float, str]:
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        ds = make(cache)
        first = time.perf_counter() - t
        cached = []
        for _ in range(repeats):
            t = time.perf_counter()
            make(cache)
            cached.append(time.perf_counter() - t)
    return first, statistics.median(cached), repr(ds)


def hash_seconds_per_gb(repeats: int, megabytes: int = 256) -> float:
    """The median time of :func:`~metasam.checkpoint.content_digest` over ``megabytes`` MB of pixels, per GB."""
    pixels = {"images": torch.randint(0, 256, (megabytes * 2**20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))}
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        content_digest(pixels)
        times.append(time.perf_counter() - t)
    return statistics.median(times) / (megabytes / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = Path(os.environ.get("METASAM_DATA", "data"))
    parser.add_argument("--omniglot", type=Path, default=default)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cases = {
        "Glyphs()": lambda cache: Glyphs(cache_dir=cache),
        "Omniglot(small1+small2)": lambda cache: Omniglot(args.omniglot, subset=SMALL, cache_dir=cache),
    }
    print(f"{'dataset':28s} {'first load':>11s} {'cached load':>12s} {'ratio':>8s}")
    for name, make in cases.items():
        try:
            first, cached, desc = timed(make, args.repeats)
        except DatasetError as exc:
            print(f"{name:28s} skipped: {exc}")
            continue
        print(f"{name:28s} {first:10.3f}s {cached:11.3f}s {first / cached:7.0f}x   {desc}")
    seconds = hash_seconds_per_gb(args.repeats)
    print(f"content hash checked on every cached load: {seconds:.2f} s per GB ({1 / seconds:.2f} GB/s), median of {args.repeats}")


if __name__ == "__main__":
    main()
