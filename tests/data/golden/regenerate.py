"""Writes omniglot_small_seed0.json: the first tasks for seed 0 on the two small Omniglot subsets.

Run once (``PYTHONPATH=. python tests/data/golden/regenerate.py [omniglot folder]``) and review the diff:
the golden file pins the episode stream, so it must only change with a deliberate, documented break of
the determinism contract.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import SMALL, omniglot_folder  # noqa: E402

from metasam.data import EpisodeSampler, Omniglot  # noqa: E402

CONFIG = {"subset": SMALL, "rotations": True, "image_size": 28, "ways": 5, "shots": 1, "queries": 5, "seed": 0, "tasks": 5}

if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else omniglot_folder()
    ds = Omniglot(folder, subset=SMALL, rotations=True, image_size=28, cache_dir=False)
    sampler = EpisodeSampler(ds, CONFIG["ways"], CONFIG["shots"], CONFIG["queries"], CONFIG["seed"])
    tasks = []
    for i in range(CONFIG["tasks"]):
        spec = sampler.spec(i)
        tasks.append({
            "classes": [ds.classes[c] for c in spec.classes],
            "support": [[ds.file_ids[j] for j in ix] for ix in spec.support],
            "query": [[ds.file_ids[j] for j in ix] for ix in spec.query],
        })
    out = Path(__file__).with_name("omniglot_small_seed0.json")
    out.write_text(json.dumps({"config": CONFIG, "tasks": tasks}, indent=1) + "\n")
    print("wrote", out)
