"""The standard-settings tables of docs/meta.md and docs/algorithms.md are what ``metasam train`` uses when a
setting is not given: each row against the configuration built with that dataset and ways alone."""

import re
from pathlib import Path

import pytest

from metasam.train.config import MetaTrainConfig

ROOT = Path(__file__).resolve().parents[1]
DATASETS = {"Omniglot": ("omniglot",), "Omniglot / glyphs": ("omniglot", "glyphs"), "MiniImageNet": ("miniimagenet",)}


def table_rows(page: str, header: str) -> list[list[str]]:
    """The rows of the table whose header line starts with ``header``."""
    lines = (ROOT / "docs" / page).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def meta_batches(cell: str) -> dict[int, int]:
    """{shots: meta-batch} of a cell such as "32" or "4 (1-shot), 2 (5-shot)"."""
    if cell.isdigit():
        return {1: int(cell), 5: int(cell)}
    return {int(shots): int(batch) for batch, shots in re.findall(r"(\d+) \((\d+)-shot\)", cell)}


CASES = [("meta.md", "| setting | inner α |", 1, 2, 3), ("algorithms.md", "| setting | image |", 2, 3, 4)]


@pytest.mark.parametrize("page,header,lr_col,steps_col,batch_col", CASES)
def test_a_standard_settings_table_is_what_train_uses(page, header, lr_col, steps_col, batch_col):
    rows = table_rows(page, header)
    assert len(rows) == 3
    for row in rows:
        name, ways = re.fullmatch(r"(.+) (\d+)-way", row[0]).groups()
        train_steps, test_steps = (int(s) for s in row[steps_col].split(" / "))
        for dataset in DATASETS[name]:
            for shots, batch in meta_batches(row[batch_col]).items():
                cfg = MetaTrainConfig(dataset=dataset, ways=int(ways), shots=shots)
                got = (cfg.inner_lr, cfg.inner_steps, cfg.test_inner_steps, cfg.meta_batch)
                assert got == (float(row[lr_col]), train_steps, test_steps, batch), f"{page}: {row}"


@pytest.mark.parametrize("dataset,ways,like", [("omniglot", 10, 20), ("glyphs", 3, 5), ("omniglot", 6, 20),
                                               ("miniimagenet", 20, 5)])
def test_other_ways_take_the_nearest_row(dataset, ways, like):
    """As the pages say: Omniglot and glyphs above 5 ways the 20-way row, at 5 or fewer the 5-way one;
    MiniImageNet its 5-way row at any ways."""
    cfg, row = MetaTrainConfig(dataset=dataset, ways=ways), MetaTrainConfig(dataset=dataset, ways=like)
    assert (cfg.inner_lr, cfg.inner_steps, cfg.test_inner_steps, cfg.meta_batch) == (
        row.inner_lr, row.inner_steps, row.test_inner_steps, row.meta_batch)
