"""Random bytes where metasam expects a checkpoint, a cache file, a zip or a config.json (hypothesis): always a
one-line error naming the file (or, for a cache, a warning and a rebuild), never a traceback."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import warnings
import zipfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metasam.cli.main import main
from metasam.data import Omniglot
from metasam.errors import DatasetError

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CLI = ["train", "--dataset", "glyphs", "--ways", "3", "--queries", "2", "--meta-batch", "2", "--iterations", "1",
       "--val-every", "1", "--val-tasks", "2", "--no-progress"]
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108000000003a7e9b55"
    "0000000a49444154789c63f80f00010101001b29b7be0000000049454e44ae426082")
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=6)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = tmp_path_factory.mktemp("fuzz") / "run"
    assert main([*CLI, "--out", str(run)]) == 0
    return run


def fresh_copy(finished, tmp_path):
    """A copy of the finished run, new for every example (hypothesis reuses the test's tmp_path)."""
    run = tmp_path / "run"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(finished, run)
    return run


def one_error_line(args: list[str], named, may_succeed: bool = False) -> None:
    """``metasam ARGS`` exits 2 with one error line that names the file ``named``, and no traceback (or, with
    ``may_succeed``, exits 0)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(args)
    assert "Traceback" not in err.getvalue()
    if code == 0 and may_succeed:
        return
    assert code == 2
    (line,) = [x for x in err.getvalue().splitlines() if ": error: " in x]
    assert str(named) in line


@FUZZ
@given(data=st.binary(max_size=2000))
def test_random_bytes_as_a_checkpoint(finished, tmp_path, data):
    run = fresh_copy(finished, tmp_path)
    (run / "best.pt").write_bytes(data)
    one_error_line(["evaluate", str(run), "--episodes", "2", "--no-progress"], run / "best.pt")
    (run / "last.pt").write_bytes(data)
    one_error_line(["train", "--resume", str(run), "--no-progress"], run / "last.pt")


@FUZZ
@given(data=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_random_bytes_as_a_config(finished, tmp_path, data):
    run = fresh_copy(finished, tmp_path)
    (run / "config.json").write_bytes(data)
    one_error_line(["evaluate", str(run), "--episodes", "2", "--no-progress"], run / "config.json")


@FUZZ
@given(key=st.sampled_from(["dataset", "ways", "shots", "iterations", "meta_batch", "inner_lr", "inner_rule", "device",
                            "image_size", "seed", "test_split", "first_order"]), value=JSON_VALUES)
def test_a_random_value_for_one_setting_of_a_config(finished, tmp_path, key, value):
    run = fresh_copy(finished, tmp_path)
    config = json.loads((run / "config.json").read_text())
    if config[key] == value:
        return
    (run / "config.json").write_text(json.dumps({**config, key: value}))
    # None is the standard setting of some fields, which may equal the saved value: then evaluate succeeds
    one_error_line(["evaluate", str(run), "--episodes", "2", "--no-progress"], run, may_succeed=value is None)


@FUZZ
@given(data=st.binary(max_size=3000), in_entry=st.booleans())
def test_random_bytes_as_an_omniglot_zip_or_drawing(tmp_path, data, in_entry):
    path = tmp_path / "images_background.zip"
    if in_entry:  # a readable zip whose drawing is random bytes
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("images_background/Alpha/character01/0101_01.png", PNG)
            z.writestr("images_background/Alpha/character01/0101_02.png", data)
    else:
        path.write_bytes(data)
    with pytest.raises(DatasetError) as info:
        Omniglot(tmp_path, cache_dir=False)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@FUZZ
@given(data=st.binary(max_size=3000))
def test_random_bytes_as_a_cache_file_are_rebuilt_with_a_warning(tmp_path, data):
    data_root, cache = tmp_path / "data", tmp_path / "cache"
    if not data_root.exists():
        for c in range(2):
            (data_root / "images_background" / "Alpha" / f"character{c:02d}").mkdir(parents=True)
            (data_root / "images_background" / "Alpha" / f"character{c:02d}" / "1.png").write_bytes(PNG)
        good = Omniglot(data_root, cache_dir=cache)
        test_random_bytes_as_a_cache_file_are_rebuilt_with_a_warning.good = good.images
    (path,) = cache.iterdir()
    path.write_bytes(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = Omniglot(data_root, cache_dir=cache)
    assert [str(w.message) for w in caught if str(path) in str(w.message) and "\n" not in str(w.message)]
    assert again.images.equal(test_random_bytes_as_a_cache_file_are_rebuilt_with_a_warning.good)
