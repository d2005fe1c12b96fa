"""The Python the docs show runs: every metasam block of docs/coming_from.md (the other libraries' blocks are
shown, not run) and the README's example run whole; the fragments of the other pages (which use a model or data
defined in prose) at least import only names that exist; every metasam name quoted in code exists, every
signature written out is the code's, and every test the docs give as evidence exists."""

import ast
import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch

import metasam
import metasam.core
from metasam.train.config import MetaTrainConfig

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "coming_from.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
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


def resolve(dotted: str) -> bool | None:
    """Whether ``metasam.a.b``, ``Name.attr`` (Name exported by metasam) or ``learner.attr`` (of a
    ``MetaLearner``) exists; None for anything else (a file name, another library's name)."""
    first, *rest = dotted.split(".")
    if first == "learner":  # an instance: its attributes set in __init__ count too
        obj, path = metasam.MetaLearner(torch.nn.Linear(2, 2)), "learner"
    elif first == "metasam":
        obj, path = metasam, "metasam"
    elif hasattr(metasam, first) and not inspect.ismodule(getattr(metasam, first)):
        obj, path, rest = getattr(metasam, first), first, rest
    else:
        return None
    for part in rest:
        path += "." + part
        if not hasattr(obj, part):
            try:
                obj = importlib.import_module(path) if inspect.ismodule(obj) else None
            except ModuleNotFoundError:
                return False
            if obj is None:
                return False
        else:
            obj = getattr(obj, part)
    return True


def test_every_metasam_name_the_docs_quote_exists():
    """A function, class, method or module quoted in code (`metasam.meta.rules`, `MetaLearner.load`,
    `learner.meta_step(...)`) exists under that name."""
    quoted = {}
    for page in PAGES:
        for span in re.findall(r"`([^`\n]+)`", page.read_text()):
            if match := re.fullmatch(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(\(.*\))?", span):
                if not re.search(r"\.(json|jsonl|md|pt|py|png|csv|txt|sh)$", match[1]):
                    quoted.setdefault(match[1], str(page.relative_to(ROOT)))
    found = {name: resolve(name) for name in quoted}
    assert sum(r is True for r in found.values()) >= 40
    assert [f"{quoted[n]}: {n}" for n, r in found.items() if r is False] == []


def documented_signatures() -> list[tuple[str, ast.FunctionDef]]:
    """The signatures the docs' Python blocks write out (``name(a, b=1, **kw) -> T``, continued over lines), for
    names metasam exports."""
    found = []
    for page, block in FRAGMENTS:
        text = re.sub(r"#.*", "", block)
        for match in re.finditer(r"^([A-Za-z_]\w*)\((?:[^()]|\([^()]*\))*\)(?: -> [^\n]+)?$", text, flags=re.M):
            try:
                tree = ast.parse(f"def {match[0]}: ...")
            except SyntaxError:
                continue  # a call with arguments, not a signature
            if hasattr(metasam.core, match[1]) or hasattr(metasam, match[1]):
                found.append((page, tree.body[0]))
    return found


def test_the_signatures_the_docs_write_out_match_the_code():
    """Same parameters in the same order, the same defaults."""
    signatures = documented_signatures()
    assert {f.name for _, f in signatures} >= {"sam_perturbation", "agnostic_perturbation", "SAM", "AgnosticSAM"}
    for page, doc in signatures:
        code = inspect.signature(getattr(metasam.core, doc.name, None) or getattr(metasam, doc.name))
        args = doc.args
        written = [a.arg for a in args.args] + ([f"**{args.kwarg.arg}"] if args.kwarg else [])
        actual = [("**" if p.kind is p.VAR_KEYWORD else "") + p.name for p in code.parameters.values()]
        assert written == actual, f"{page}: {doc.name}({', '.join(written)}) but the code has ({', '.join(actual)})"
        defaults = dict(zip([a.arg for a in args.args][len(args.args) - len(args.defaults):],
                            (ast.literal_eval(d) for d in args.defaults)))
        for name, value in defaults.items():
            assert code.parameters[name].default == value, f"{page}: {doc.name}'s {name} defaults to {value}"


def test_every_test_the_docs_name_exists():
    """The docs give tests as evidence (`test_core.py::test_sam_perturbation_by_hand`, `tests/test_cuda.py`): each
    named test function exists (in the file named with it), and each named test file exists. A setting whose
    name starts with test_ (`test_inner_steps`) is not a test."""
    settings = {f.name for f in dataclasses.fields(MetaTrainConfig)} | set(inspect.signature(metasam.MetaLearner).parameters)
    defined: dict[str, set[str]] = {}
    for file in (ROOT / "tests").rglob("*.py"):
        for name in re.findall(r"^\s*def (test_\w+)", file.read_text(), flags=re.M):
            defined.setdefault(name, set()).add(file.relative_to(ROOT / "tests").as_posix())
    reference = re.compile(r"(?:(?<![\w/.])((?:tests/)?[\w/]+\.py)::)?(?<![\w/.])(test_\w+)(?![\w.=(])")
    named, wrong = 0, []
    for page in PAGES:
        text, where = page.read_text(), page.relative_to(ROOT)
        wrong += [f"{where}: {f}" for f in re.findall(r"\btests/[\w/]+\.py", text) if not (ROOT / f).is_file()]
        for span in re.findall(r"`([^`\n]+)`", text):
            for file, name in reference.findall(span):
                if name in settings:
                    continue
                named += 1
                places = defined.get(name, set())
                file = file.removeprefix("tests/")
                if not places or (file and not any(p == file or p.endswith("/" + file) for p in places)):
                    wrong.append(f"{where}: {file + '::' if file else ''}{name}")
    assert named >= 60 and wrong == []
