"""The Python the docs show runs: every metasam block of docs/coming_from.md (the other libraries' blocks are
shown, not run) and the README's example run whole; the fragments of the other pages (which use a model or data
defined in prose) at least import only names that exist."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "coming_from.md"
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
METASAM = [b for b in BLOCKS if b.startswith("# metasam\n")]
README = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
FRAGMENTS = [
    (str(page.relative_to(ROOT)), block)
    for page in sorted((ROOT / "docs").rglob("*.md"))
    if page != PAGE
    for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
]


def test_the_page_has_metasam_blocks_beside_the_other_libraries():
    others = {b.splitlines()[0] for b in BLOCKS if not b.startswith("# metasam\n")}
    assert len(METASAM) >= 5 and others == {"# davda54/sam", "# higher", "# learn2learn", "# torchmeta"}


@pytest.mark.parametrize("index", range(len(METASAM)))
def test_metasam_block_runs(index):
    exec(compile(METASAM[index], f"{PAGE.name}:block{index}", "exec"), {})


@pytest.mark.parametrize("index", range(len(README)))
def test_readme_block_runs(index):
    assert README, "the README shows no Python"
    exec(compile(README[index], f"README.md:block{index}", "exec"), {})


def test_the_imports_of_every_docs_fragment_resolve():
    imports = [(page, line) for page, block in FRAGMENTS for line in block.splitlines()
               if re.match(r"(from \S+ import |import )\S", line)]
    assert len(imports) >= 6
    for page, line in imports:
        exec(compile(line.split("#")[0], page, "exec"), {})
