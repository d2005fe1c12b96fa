"""Every metasam code block of docs/coming_from.md runs (the other libraries' blocks are shown, not run)."""

import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "coming_from.md"
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
METASAM = [b for b in BLOCKS if b.startswith("# metasam\n")]


def test_the_page_has_metasam_blocks_beside_the_other_libraries():
    others = {b.splitlines()[0] for b in BLOCKS if not b.startswith("# metasam\n")}
    assert len(METASAM) >= 5 and others == {"# davda54/sam", "# higher", "# learn2learn", "# torchmeta"}


@pytest.mark.parametrize("index", range(len(METASAM)))
def test_metasam_block_runs(index):
    exec(compile(METASAM[index], f"{PAGE.name}:block{index}", "exec"), {})
