"""Hessian eigenvalues, loss landscapes and plots against analytic and brute-force references."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from metasam.analysis import (
    filter_normalized_direction,
    hessian_eigenvalues,
    loss_landscape,
    meta_loss_fn,
    model_loss_fn,
    plot_alignment,
    plot_landscape,
    plot_runs,
)
from metasam.meta import MetaLearner

D = torch.float64


def test_eigenvalues_of_a_quadratic_are_the_analytic_ones():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=D))
    spectrum = torch.tensor([9.0, 7.5, 5.0, 4.0, 3.0, 1.0, 0.5, 0.1, -0.2, -1.0, -2.0, -3.0], dtype=D)
    a = q @ torch.diag(spectrum) @ q.T

    def loss(params):
        w = params["w"].reshape(-1)
        return 0.5 * w @ a @ w

    values = hessian_eigenvalues(loss, {"w": torch.randn(3, 4, generator=gen, dtype=D)}, k=5, tol=1e-10)
    assert torch.allclose(values, spectrum[:5], rtol=1e-7)


def test_eigenvalues_of_a_small_mlp_equal_those_of_the_full_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(20, 3, dtype=D), torch.randint(0, 2, (20,))
    loss_fn = model_loss_fn(model, (x, y))
    params = dict(model.named_parameters())
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]

    def flat_loss(flat):
        parts = torch.split(flat, sizes)
        return loss_fn({n: p.view(s) for n, p, s in zip(names, parts, shapes)})

    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    full = torch.autograd.functional.hessian(flat_loss, flat)
    expected = torch.linalg.eigvalsh(full).flip(0)[:5]
    got = hessian_eigenvalues(loss_fn, params, k=5, tol=1e-10)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-9)


def test_meta_query_loss_eigenvalues_match_the_full_hessian_through_adaptation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    learner = MetaLearner(model, "sharp-maml-low", inner_lr=0.3, inner_rho=0.05)
    gen = torch.Generator().manual_seed(1)
    tasks = [(torch.randn(4, 2, generator=gen, dtype=D), torch.tensor([0, 0, 1, 1]),
              torch.randn(6, 2, generator=gen, dtype=D), torch.tensor([0, 0, 0, 1, 1, 1])) for _ in range(2)]
    loss_fn = meta_loss_fn(learner, tasks, loss="query")
    params = {n: p.detach() for n, p in model.named_parameters()}
    names, shapes, sizes = list(params), [p.shape for p in params.values()], [p.numel() for p in params.values()]

    def flat_loss(flat):
        return loss_fn({n: p.view(s) for n, p, s in zip(names, torch.split(flat, sizes), shapes)})

    full = torch.autograd.functional.hessian(flat_loss, torch.cat([p.reshape(-1) for p in params.values()]))
    expected = torch.linalg.eigvalsh(full).flip(0)[:3]
    assert torch.allclose(hessian_eigenvalues(loss_fn, params, k=3, tol=1e-10), expected, rtol=1e-6, atol=1e-9)
    support = meta_loss_fn(learner, tasks, loss="support")(params)
    by_hand = sum(nn.functional.cross_entropy(model(sx), sy) for sx, sy, _, _ in tasks) / 2
    assert torch.allclose(support, by_hand)


def test_the_meta_objective_of_a_first_order_learner_is_the_second_order_function():
    """fomaml trains on an approximate gradient of L_q(φ_K(θ)); its Hessian is still that function's: the same
    full Hessian as maml's with the same weights and tasks, and not the Hessian of L_q at a fixed φ_K."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    gen = torch.Generator().manual_seed(1)
    tasks = [(torch.randn(4, 2, generator=gen, dtype=D), torch.tensor([0, 0, 1, 1]),
              torch.randn(6, 2, generator=gen, dtype=D), torch.tensor([0, 0, 0, 1, 1, 1]))]
    params = {n: p.detach() for n, p in model.named_parameters()}
    names, shapes, sizes = list(params), [p.shape for p in params.values()], [p.numel() for p in params.values()]
    flat = torch.cat([p.reshape(-1) for p in params.values()])

    def hessian(algo):
        loss_fn = meta_loss_fn(MetaLearner(model, algo, inner_lr=0.3, inner_steps=2), tasks)
        return torch.autograd.functional.hessian(
            lambda f: loss_fn({n: p.view(s) for n, p, s in zip(names, torch.split(f, sizes), shapes)}), flat)

    torch.testing.assert_close(hessian("fomaml"), hessian("maml"), rtol=1e-12, atol=1e-14)


def test_filter_normalisation_matches_each_filter_norm_and_zeroes_1d_parameters():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    params = dict(conv.named_parameters())
    d = filter_normalized_direction(params, seed=0)
    for j in range(4):
        assert torch.allclose(d["weight"][j].norm(), params["weight"][j].detach().norm(), rtol=1e-5)
    assert torch.equal(d["bias"], torch.zeros(4))
    assert not torch.equal(d["weight"], filter_normalized_direction(params, seed=1)["weight"])


def test_landscape_of_a_quadratic_is_the_analytic_paraboloid():
    theta = {"w": torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=D)}
    alphas, betas, losses = loss_landscape(lambda p: 0.5 * (p["w"] ** 2).sum(), theta, steps=5, span=2.0, seed=3)
    d1, d2 = filter_normalized_direction(theta, 3)["w"], filter_normalized_direction(theta, 4)["w"]
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            expected = 0.5 * float(((theta["w"] + a * d1 + b * d2) ** 2).sum())
            assert losses[i, j] == pytest.approx(expected, rel=1e-12)
    assert losses[2, 2] == pytest.approx(0.5 * float((theta["w"] ** 2).sum()))  # the centre is θ itself
    assert np.allclose(alphas, np.linspace(-2, 2, 5))


def _png(path):
    with Image.open(path) as img:
        img.load()
        return img.size, len(np.unique(np.asarray(img.convert("L"))))


def test_plots_are_nonempty_pngs_of_the_requested_size(tmp_path):
    a = np.linspace(-1, 1, 7)
    losses = np.add.outer(a**2, 2 * a**2)
    contour, surface = plot_landscape(a, a, losses, tmp_path / "quad", title="quadratic", size=(400, 300))
    for path in (contour, surface):
        size, shades = _png(path)
        assert size == (400, 300) and shades > 10
    runs = []
    for name, offset in (("agn", 0.0), ("agn2", 0.1)):
        run = tmp_path / name
        run.mkdir()
        lines = [{"epoch": e, "train_loss": 1.0 / e, "test_acc": 0.5 + offset, "cos_train_val": 0.1 * e + offset} for e in (1, 2, 3)]
        lines += [{"step": s, "cos_before": 0.1 * s + offset, "cos_after": 0.12 * s + offset} for s in (1, 2, 3)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        runs.append(run)
    size, shades = _png(plot_runs(runs, tmp_path / "curves.png", size=(900, 300)))
    assert size == (900, 300) and shades > 10
    size, _ = _png(plot_alignment(runs, tmp_path / "align.png", size=(500, 300)))
    assert size == (500, 300)


def test_analyze_and_plot_commands_on_a_supervised_run(tmp_path, capsys, monkeypatch):
    from metasam.cli.main import main
    from metasam.train import analyze

    run = tmp_path / "digits"
    assert main(["supervised", "--optimizer", "agnostic-sam", "--epochs", "1", "--alignment-every", "5", "--out", str(run),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["analyze", str(run), "--hessian", "--landscape", "--k", "2", "--steps", "3", "--tasks", "7"]) == 0
    first = (run / "analysis_k2_steps3.json").read_text()  # its settings away from the defaults (--tasks: meta runs)
    result = json.loads(first)
    top = result["hessian_top_eigenvalues"]
    assert len(top) == 2 and top[0] >= top[1] and result["settings"]["k"] == 2
    grid = np.array(result["landscape"]["losses"])
    assert grid.shape == (3, 3) and grid[1, 1] == pytest.approx(result["loss_at_theta"], rel=1e-5)
    assert _png(run / "landscape_steps3_contour.png")[0] == (640, 480)  # the landscape does not depend on --k
    assert main(["analyze", str(run), "--hessian", "--k", "1", "--seed", "3"]) == 0  # another analysis: its own file
    assert json.loads((run / "analysis_hessian_k1_seed3.json").read_text())["settings"]["seed"] == 3
    assert (run / "analysis_k2_steps3.json").read_text() == first
    assert sorted(p.name for p in run.glob("analysis*")) == ["analysis_hessian_k1_seed3.json", "analysis_k2_steps3.json"]
    # the same settings again: refused before anything is computed, the earlier files kept; replaced if asked
    contour = (run / "landscape_steps3_contour.png").read_bytes()
    (run / "analysis_k2_steps3.json").unlink()  # the PNGs alone are enough to refuse
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(analyze, "_supervised_loss", lambda *a: pytest.fail("computed before the refusal"))
        assert main(["analyze", str(run), "--landscape", "--steps", "3"]) == 2
        assert capsys.readouterr().err.strip() == (
            f"metasam analyze: error: {run / 'landscape_steps3_contour.png'} exists (an analysis with these settings): "
            "pass --overwrite to replace it (overwrite=True in Python), or choose other settings")
        assert main(["analyze", str(run), "--hessian", "--k", "1", "--seed", "3"]) == 2
    assert (run / "landscape_steps3_contour.png").read_bytes() == contour
    earlier = (run / "analysis_hessian_k1_seed3.json").stat().st_ino
    assert main(["analyze", str(run), "--hessian", "--k", "1", "--seed", "3", "--overwrite"]) == 0
    assert (run / "analysis_hessian_k1_seed3.json").stat().st_ino != earlier  # replaced (atomically: a new file)
    state = torch.load(run / "model.pt", weights_only=True)  # a plain state_dict, as users load it
    next(v for v in state.values() if v.is_floating_point()).view(-1)[0] += 1.0  # a damaged (finite) weight
    torch.save(state, run / "model.pt")
    capsys.readouterr()
    assert main(["analyze", str(run), "--hessian", "--k", "1"]) == 2
    assert "model.pt fails its content check against the model_sha256 of" in capsys.readouterr().err
    assert main(["plot", str(run), "--alignment", "--out", str(tmp_path / "a.png")]) == 0
    assert _png(tmp_path / "a.png")[1] > 10


def test_analysis_file_names_say_the_settings_away_from_the_defaults():
    from metasam.train.analyze import DEFAULTS, output_suffix

    base = {"hessian": True, "landscape": True, **DEFAULTS}
    assert output_suffix(base, is_meta=True) == ""  # analysis.json, landscape_contour.png
    other = {**base, "landscape": False, "tasks": 50, "loss": "support", "span": 0.5}
    assert output_suffix(other, is_meta=True) == "_hessian_tasks50_support_span0.5"
    assert output_suffix(other, is_meta=False) == "_hessian_span0.5"  # a supervised run has no tasks to choose
    assert output_suffix({**base, "k": 20, "steps": 5}, is_meta=True, plots=True) == "_steps5"
