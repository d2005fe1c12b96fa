"""Gradient alignment cos(g_S, g_V) before and after each update: the supervised diagnostic, its log and its plot."""

import json

import pytest
import torch
from torch import nn

import reference as ref
from metasam.analysis import curves, gradient_cosine, plot_runs
from metasam.analysis.curves import run_labels
from metasam.cli.main import main
from metasam.data.supervised import load_digits_splits
from metasam.errors import ConfigError
from metasam.train.supervised import SupervisedConfig, train_supervised

D = torch.float64


def test_gradient_cosine_equals_the_reference_and_leaves_gradients_and_batchnorm_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    gen = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(12, 4, generator=gen, dtype=D), torch.randint(0, 3, (12,), generator=gen)
    xv, yv = torch.randn(6, 4, generator=gen, dtype=D), torch.randint(0, 3, (6,), generator=gen)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    got = gradient_cosine(model, lambda: nn.functional.cross_entropy(model(xs), ys), lambda: nn.functional.cross_entropy(model(xv), yv))

    def loss(w, x, y):  # the same network written out: Linear, batch-statistics BatchNorm, tanh, Linear
        w1, b1, gamma, beta, w2, b2 = w
        h = x @ w1.T + b1
        h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5) * gamma + beta
        return nn.functional.cross_entropy(torch.tanh(h) @ w2.T + b2, y)

    theta = [p.detach() for p in model.parameters()]
    g_s, g_v = ref.grad(lambda w: loss(w, xs, ys), theta, False), ref.grad(lambda w: loss(w, xv, yv), theta, False)
    expected = float(sum((a * b).sum() for a, b in zip(g_s, g_v)) / (ref.norm(g_s) * ref.norm(g_v)))
    assert got == pytest.approx(expected, rel=1e-12)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())


def test_alignment_log_is_the_agnostic_steps_own_cosine_before_and_changes_nothing_in_training():
    """With --alignment-every 1, the mean of cos_before over an epoch is Agnostic-SAM's own cos(g_S, g_V) at θ
    (an independent computation inside the optimizer, averaged as cos_train_val); cos_after differs; and the
    diagnostic leaves training as it was (SGD, whose B_V is drawn for the diagnostic alone)."""
    splits = load_digits_splits(seed=0)
    run = train_supervised(SupervisedConfig(optimizer="agnostic-sam", epochs=1, alignment_every=1), progress=False, splits=splits)
    before = [r["cos_before"] for r in run["alignment"]]
    after = [r["cos_after"] for r in run["alignment"]]
    assert len(before) == run["steps"] and [r["step"] for r in run["alignment"]] == list(range(1, run["steps"] + 1))
    assert sum(before) / len(before) == pytest.approx(run["history"][0]["cos_train_val"], abs=1e-5)
    assert abs(sum(after) - sum(before)) / len(before) > 1e-3
    for name in ("sgd", "agnostic-sam"):
        plain = train_supervised(SupervisedConfig(optimizer=name, epochs=1), progress=False, splits=splits)
        logged = train_supervised(SupervisedConfig(optimizer=name, epochs=1, alignment_every=3), progress=False, splits=splits)
        assert logged["train_loss"] == plain["train_loss"] and logged["test_acc"] == plain["test_acc"], name
        assert len(logged["alignment"]) == plain["steps"] // 3 and plain["alignment"] == []


def test_plot_alignment_draws_before_and_after_for_every_optimizer_of_a_comparison(tmp_path, monkeypatch, capsys):
    runs = []
    for name in ("sam", "agnostic-sam"):
        runs.append(tmp_path / "cmp" / name)
        args = ["supervised", "--optimizer", name, "--epochs", "1", "--alignment-every", "4", "--out", str(runs[-1]), "--no-progress"]
        assert main(args) == 0
    capsys.readouterr()
    figures = []
    original = curves._save
    monkeypatch.setattr(curves, "_save", lambda plt, fig, out, dpi: figures.append(fig) or original(plt, fig, out, dpi))
    assert main(["plot", *map(str, runs), "--alignment", "--out", str(tmp_path / "align.png")]) == 0
    (ax,) = figures[0].axes
    points = {line.get_label(): len(line.get_xdata()) for line in ax.get_lines()}
    assert set(points) == {"sam (before)", "sam (after)", "agnostic-sam (before)", "agnostic-sam (after)"}
    steps = json.loads((runs[0] / "result.json").read_text())["steps"]
    assert set(points.values()) == {steps // 4}
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 1.0}) + "\n")
    with pytest.raises(ConfigError, match="--alignment-every"):
        curves.plot_alignment([bare], tmp_path / "x.png")


def test_runs_with_the_same_name_in_different_folders_stay_apart(tmp_path):
    dirs = [tmp_path / "5w1s" / "maml", tmp_path / "5w5s" / "maml"]
    for i, d in enumerate(dirs):
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "query_loss": float(i)}) + "\n")
    assert run_labels(dirs) == ["5w1s/maml", "5w5s/maml"]
    assert run_labels([tmp_path / "a", tmp_path / "b" / "c"]) == ["a", "c"]
    with pytest.raises(ConfigError, match="twice"):
        run_labels([dirs[0], dirs[0]])
    assert plot_runs(dirs, tmp_path / "curves.png").is_file()


def test_plot_out_under_a_file_or_onto_a_folder_is_one_line_before_any_run_is_read(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for out, message in ((afile / "x.png", "is a file, not a folder"), (tmp_path, "is a folder: give the PNG's file name")):
        assert main(["plot", str(tmp_path / "no-such-run"), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert afile.read_text() == "mine"


def test_plot_refuses_an_existing_out_unless_overwrite_and_replaces_it_whole(tmp_path, capsys):
    run = tmp_path / "maml"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "query_loss": 1.0}) + "\n")
    out = tmp_path / "curves.png"
    out.write_bytes(b"an earlier figure")
    assert main(["plot", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"metasam plot: error: --out {out} exists: choose another --out, or pass --overwrite "
                   "(overwrite=True in Python) to replace it")
    assert out.read_bytes() == b"an earlier figure"
    assert main(["plot", str(run), "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
