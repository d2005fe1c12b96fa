"""Label noise, the digits splits, and the supervised training command."""

import json

import pytest
import torch

from metasam import ConfigError
from metasam.cli.main import main
from metasam.data.label_noise import symmetric_label_noise
from metasam.data.supervised import load_digits_splits
from metasam.train.supervised import SupervisedConfig, train_supervised


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.8])
def test_symmetric_noise_flips_exactly_the_rate_to_other_classes(rate):
    labels = torch.arange(1000) % 10
    noisy = symmetric_label_noise(labels, rate, 10, seed=0)
    assert (noisy != labels).sum().item() == round(rate * 1000)
    assert noisy.min() >= 0 and noisy.max() <= 9
    assert torch.equal(labels, torch.arange(1000) % 10)  # input untouched
    assert torch.equal(noisy, symmetric_label_noise(labels, rate, 10, seed=0))


def test_symmetric_noise_spreads_flips_over_all_other_classes():
    labels = torch.zeros(9000, dtype=torch.int64)
    noisy = symmetric_label_noise(labels, 1.0, 10, seed=1)
    counts = torch.bincount(noisy, minlength=10)
    assert counts[0] == 0
    assert counts[1:].min() > 850 and counts[1:].max() < 1150  # ~1000 each


def test_digits_splits_are_disjoint_stratified_and_cover_the_set():
    s = load_digits_splits(seed=0)
    sizes = [len(s.train[0]), len(s.val[0]), len(s.test[0])]
    assert sum(sizes) == 1797
    assert 340 <= sizes[2] <= 380  # 20 % test
    rows = {tuple(r.flatten().tolist()) for part in (s.train, s.val, s.test) for r in part[0]}
    assert len(rows) >= 1790  # disjoint up to the few duplicate images digits itself holds
    for _, y in (s.train, s.val, s.test):
        assert torch.bincount(y, minlength=10).min() > 0
    assert s.train[0].max() <= 1.0 and s.train[0].min() >= 0.0


def test_sharpness_optimizers_learn_digits_without_noise():
    splits = load_digits_splits(seed=0)
    for name in ("sam", "agnostic-asam"):
        result = train_supervised(SupervisedConfig(optimizer=name, epochs=3), progress=False, splits=splits)
        assert result["test_acc"] > 0.85, name  # chance is 0.10
        assert result["history"][-1]["train_loss"] < result["history"][0]["train_loss"] + 1e-9


def test_cli_writes_result_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["supervised", "--optimizer", "agnostic-sam", "--epochs", "1", "--label-noise", "0.4", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "result.json").read_text())
    assert printed["test_acc"] == saved["test_acc"]
    assert saved["config"]["rho2"] == pytest.approx(0.025)
    assert "cos_train_val" in saved["history"][0]
    before = (out / "result.json").read_text()
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "result.json").read_text() == before


def test_bad_config_values_raise_config_error():
    with pytest.raises(ConfigError, match="label-noise"):
        SupervisedConfig(label_noise=0.9)
    with pytest.raises(ConfigError, match="optimizer"):
        SupervisedConfig(optimizer="adam")
    with pytest.raises(ConfigError, match="--batch-size must be >= 1"):
        SupervisedConfig(batch_size=0)


@pytest.mark.parametrize("field, value, flag", [
    ("lr", float("inf"), "--lr"), ("lr", float("nan"), "--lr"), ("lr", 0.0, "--lr"),
    ("weight_decay", float("inf"), "--weight-decay"), ("weight_decay", float("nan"), "--weight-decay"),
    ("weight_decay", -1e-4, "--weight-decay"),
    ("eta", float("nan"), "--eta"), ("momentum", 1.0, "--momentum"), ("momentum", -0.1, "--momentum"),
    ("beta", float("nan"), "--beta"), ("rho1", -1.0, "--rho1"), ("rho2", float("inf"), "--rho2"), ("epochs", 0, "--epochs"),
])
def test_non_finite_or_out_of_range_hyperparameters_name_their_flag(field, value, flag):
    with pytest.raises(ConfigError, match=flag):
        SupervisedConfig(**{field: value})


@pytest.mark.parametrize("flags", [["--lr", "inf"], ["--weight-decay", "nan"], ["--momentum", "1"]])
def test_the_cli_names_the_flag_of_a_bad_hyperparameter_in_one_line(flags, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["supervised", *flags, "--epochs", "1", "--out", str(out), "--no-progress"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"metasam supervised: error: {flags[0]} ") and not out.exists()


@pytest.mark.parametrize("optimizer, flags, named", [
    ("sgd", ["--rho1", "0.1"], "--rho1"),
    ("sam", ["--beta", "0.5"], "--beta"),
    ("asam", ["--rho2", "0.1"], "--rho2"),
    ("agnostic-sam", ["--eta", "0.1", "--asam-scope", "weights"], "--asam-scope, --eta"),
])
def test_cli_refuses_hyperparameters_its_optimizer_does_not_use(optimizer, flags, named, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["supervised", "--optimizer", optimizer, *flags, "--epochs", "1", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"does not use {named}" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()



def test_cifar_augmentation_crops_and_flips_each_image_on_its_own():
    """Each output image is one 32×32 window of its own reflect-padded image, unflipped or flipped, found by a
    search over every offset (an independent check); offsets and flips vary within one batch (a crop offset
    shared by the whole batch, as before 2026-12-02, fails)."""
    from metasam.train.supervised import _augment

    x = torch.randn(64, 3, 32, 32, dtype=torch.float64)
    out = _augment(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    drawn = []
    for i in range(len(x)):
        windows = {(dy, dx): padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)}
        matches = [(dy, dx, flip) for (dy, dx), window in windows.items() for flip in (False, True)
                   if torch.equal(out[i], window.flip(2) if flip else window)]
        assert len(matches) == 1, (i, matches)
        drawn += matches
    assert len({(dy, dx) for dy, dx, _ in drawn}) > 20 and {flip for _, _, flip in drawn} == {False, True}
