"""Property: random ``metasam train`` arguments end in one clean error or in valid settings, before any data loads.

Every value the parser accepts is checked against an oracle written here from the documented rules; bad
settings must give exactly one ``error:`` line (our exceptions, exit code 2) or argparse's own usage error,
valid ones must get as far as loading the data, and nothing else (a traceback) may come out.
"""

from __future__ import annotations

import contextlib
import io
import math
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metasam.cli.main import build_parser, main
from metasam.meta.presets import PRESETS
from metasam.train import meta


class DataReached(Exception):
    """The settings passed every check and the run went on to load its data."""


INT_FLAGS = {"ways": 2, "shots": 1, "queries": 1, "iterations": 1, "meta_batch": 1, "outer_val_tasks": 1, "inner_steps": 1,
             "test_inner_steps": 1, "val_every": 1, "val_tasks": 1, "seed": 0, "skip_nonfinite": 0}
POSITIVE_FLOATS = ("inner_lr", "outer_lr")
USES = {"gd": (), "plain": (), "sam": ("rho", "adaptive", "eta", "detach_perturbation"),
        "agnostic": ("rho1", "rho2", "beta", "adaptive", "eta", "detach_perturbation")}
"""The settings each rule takes, as docs/algorithms.md lists them."""
RULE_FLOATS = ("inner_rho", "inner_rho1", "inner_rho2", "inner_eta", "inner_beta",
               "outer_rho", "outer_rho1", "outer_rho2", "outer_eta", "outer_beta")

numbers = st.one_of(
    st.integers(-3, 8).map(str),
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e309", "-0.0", "0.5", "0.99", "1", "1.5", "abc", ""]),
)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def expected_valid(ns) -> bool:
    """The documented rules, written independently of metasam's checks."""
    for name, low in INT_FLAGS.items():
        value = getattr(ns, name)
        if value is not None and value < low:
            return False
    for name in POSITIVE_FLOATS:
        value = getattr(ns, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            return False
    preset = PRESETS[ns.algo]
    for name in (*RULE_FLOATS, "inner_adaptive", "outer_detach_perturbation"):
        value = getattr(ns, name)
        if value is None:
            continue
        level, param = name.split("_", 1)
        if param not in USES[preset.inner if level == "inner" else preset.outer]:
            return False  # the algorithm does not use it
        if isinstance(value, bool):
            continue
        if param == "beta" and not 0 <= value < 1:
            return False
        if param != "beta" and not (math.isfinite(value) and value >= 0):
            return False
    return True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(algo=st.sampled_from(sorted(PRESETS)),
       values=st.dictionaries(st.sampled_from([*INT_FLAGS, *POSITIVE_FLOATS, *RULE_FLOATS]), numbers, max_size=4),
       switches=st.sets(st.sampled_from(["--first-order", "--inner-adaptive", "--outer-detach-perturbation"]), max_size=2))
def test_random_train_arguments_give_one_clean_error_or_valid_settings(tmp_path_factory, algo, values, switches):
    out = tmp_path_factory.getbasetemp() / "never-created"
    argv = ["train", "--dataset", "glyphs", "--algo", algo, "--out", str(out), "--no-progress", *sorted(switches)]
    for name, text in sorted(values.items()):
        argv.append(f"{flag(name)}={text}")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), mock.patch.object(meta, "load_splits", side_effect=DataReached):
        try:
            ns = build_parser().parse_args(argv)
        except SystemExit as exc:  # argparse's own one-line usage error (e.g. --ways=abc)
            assert exc.code == 2 and err.getvalue().strip().splitlines()[-1].startswith("metasam train: error: ")
            return
        try:
            rc = main(argv)
        except DataReached:
            assert expected_valid(ns), f"accepted invalid settings {argv}"
            return
    assert rc == 2, argv
    lines = [line for line in err.getvalue().splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err.getvalue(), err.getvalue()
    assert not expected_valid(ns), f"refused valid settings {argv}: {lines[0]}"
    assert not out.exists()
