"""Meta-training runs on the synthetic glyph set: resume exactness, checkpoint choice, CLI, evaluation."""

import json
from dataclasses import asdict
import os
import signal

import pytest
import torch

from metasam import CheckpointError, ConfigError
from metasam.atomic_write import save_atomic
from metasam.checkpoint import DIGEST_KEY, load_checkpoint
from metasam.analysis.curves import CURVE_KEYS
from metasam.cli.main import main
from metasam.meta import AgnosticRule, MetaLearner, SAMRule
from metasam.models import Conv4
from metasam.train.config import MetaTrainConfig
from metasam.train.evaluation import eval_file_name
from metasam.train.meta import MetaTrainer

TINY = dict(dataset="glyphs", ways=3, shots=1, queries=2, meta_batch=2, hidden=8, val_every=2, val_tasks=4)


def weights(learner):
    """The model's state and the learned inner step sizes (learn_inner_lr), if any."""
    return {**{k: v.clone() for k, v in learner.model.state_dict().items()},
            **{f"inner_lr of {k}": v.detach().clone() for k, v in learner.inner_lrs.items()}}


@pytest.mark.parametrize("algo, extra", [("maml", {}), ("agnostic-sam-both", {}), ("sharp-maml-low", {"learn_inner_lr": True})])
def test_interrupted_and_resumed_run_reaches_the_weights_of_an_uninterrupted_one(tmp_path, algo, extra):
    cfg = MetaTrainConfig(algo=algo, iterations=5, **TINY, **extra)
    full = MetaTrainer(cfg, tmp_path / "full")
    full.start()
    full.train(progress=False)

    cut = MetaTrainer(cfg, tmp_path / "cut")
    cut.start()
    step = cut.learner.meta_step

    def step_then_interrupt(*args, **kwargs):
        out = step(*args, **kwargs)
        if cut.learner.iteration == 3:
            os.kill(os.getpid(), signal.SIGINT)  # handled: finish the iteration, save, stop
        return out

    cut.learner.meta_step = step_then_interrupt
    with pytest.raises(KeyboardInterrupt, match="--resume"):
        cut.train(progress=False)

    resumed = MetaTrainer(MetaTrainConfig.load(tmp_path / "cut"), tmp_path / "cut")
    resumed.resume()
    assert resumed.learner.iteration == 3
    resumed.train(progress=False)
    assert len(weights(full.learner)) == len(weights(resumed.learner)) == len(full.learner.model.state_dict()) + (
        len(full.learner.names) if extra else 0)
    for (name, a), b in zip(weights(full.learner).items(), weights(resumed.learner).values()):
        assert torch.equal(a, b), name
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines if "query_loss" in r] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("seconds, kept", [(0, 3), (3600, 0)])
def test_last_checkpoint_is_also_written_when_time_has_passed_between_validations(tmp_path, monkeypatch, seconds, kept):
    """A crash at iteration 4 of a run that validates only at its end keeps the iterations done before it when
    CHECKPOINT_SECONDS have passed since the last write (0 here: after every iteration), else only iteration 0."""
    import metasam.train.meta as meta

    monkeypatch.setattr(meta, "CHECKPOINT_SECONDS", seconds)
    cfg = MetaTrainConfig(algo="maml", iterations=5, **{**TINY, "val_every": 100})
    trainer = MetaTrainer(cfg, tmp_path / "run")
    trainer.start()
    step = trainer.learner.meta_step

    def step_then_crash(*args, **kwargs):
        if trainer.learner.iteration == 3:
            raise RuntimeError("the machine is lost")
        return step(*args, **kwargs)

    trainer.learner.meta_step = step_then_crash
    with pytest.raises(RuntimeError, match="the machine is lost"):
        trainer.train(progress=False)
    resumed = MetaTrainer(MetaTrainConfig.load(tmp_path / "run"), tmp_path / "run")
    resumed.resume()
    assert resumed.learner.iteration == kept


def test_best_checkpoint_is_the_best_validation_score_and_loads_back(tmp_path):
    cfg = MetaTrainConfig(algo="sharp-maml-low", iterations=6, inner_rule=SAMRule(rho=0.05), **TINY)
    trainer = MetaTrainer(cfg, tmp_path / "run")
    trainer.start()
    summary = trainer.train(progress=False)
    vals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in vals if "val_acc" in r]
    assert [r["iteration"] for r in vals] == [2, 4, 6]
    best = max(vals, key=lambda r: r["val_acc"])  # first maximum wins, as in the trainer
    assert summary["best_iteration"] == best["iteration"]
    loaded = MetaLearner.load(tmp_path / "run")
    assert loaded.algo == "sharp-maml-low" and loaded.inner_rule.rho == 0.05
    assert loaded.iteration == best["iteration"]
    # the reloaded learner scores what the trainer measured on the same validation tasks
    assert loaded.evaluate(trainer.val_set)[0] == pytest.approx(best["val_acc"], abs=1e-9)

    # a CPU run's CPUConv4 weights load into the textbook Conv4, which runs where CPUConv4 refuses (vmap here)
    assert type(loaded.model).__name__ == "CPUConv4"
    kwargs = {"ways": 3, "in_channels": 1, "hidden": 8, "image_size": cfg.image_size}
    textbook = MetaLearner.load(tmp_path / "run", model=Conv4(**kwargs), path="vmap")
    assert type(textbook.model) is Conv4 and textbook.iteration == best["iteration"]
    assert textbook.evaluate(trainer.val_set)[0] == pytest.approx(best["val_acc"], abs=0.02)  # rounding may flip a few
    with pytest.raises(CheckpointError, match="written for another model"):
        MetaLearner.load(tmp_path / "run", model=Conv4(**{**kwargs, "ways": 5}))


def test_cli_train_then_evaluate_and_refuse_to_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--dataset", "glyphs", "--ways", "3", "--queries", "2", "--meta-batch", "2",
            "--iterations", "2", "--val-every", "1", "--val-tasks", "3", "--algo", "agnostic-sam",
            "--inner-rho1", "0.1", "--inner-rho2", "0.05", "--out", str(run), "--no-progress"]
    assert main(args) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["inner_rule"] == {"kind": "agnostic", "params": {**asdict(AgnosticRule()), "rho1": 0.1, "rho2": 0.05}}
    assert saved["outer_rule"] == {"kind": "gd", "params": {}}
    assert {"best.pt", "last.pt", "val_tasks.json", "metrics.jsonl"} <= {p.name for p in run.iterdir()}
    capsys.readouterr()
    assert main(["evaluate", str(run), "--episodes", "5", "--no-progress"]) == 0
    result = json.loads((run / "eval_best_5_seed1234.json").read_text())
    assert 0.0 <= result["accuracy"] <= 1.0 and result["episodes"] == 5
    default = (run / "eval_best_5_seed1234.json").read_text()
    assert main(["evaluate", str(run), "--episodes", "5", "--test-rule", "gd", "--no-progress"]) == 0
    assert "test rule gd)" in capsys.readouterr().out
    assert main(["evaluate", str(run), "--episodes", "5", "--test-inner-steps", "7", "--no-progress"]) == 0
    written = {p.name: json.loads(p.read_text()) for p in run.glob("eval_*.json")}
    assert len(written) == 3 and (run / "eval_best_5_seed1234.json").read_text() == default  # nothing overwritten
    assert written["eval_best_5_seed1234_gd.json"]["test_rule"] == "gd"
    assert written["eval_best_5_seed1234_steps7.json"]["test_inner_steps"] == 7
    cfg = MetaTrainConfig.load(run)
    other_split = eval_file_name("best", 5, 1234, cfg, test_split="images_background_small2:Japanese_(katakana)")
    assert other_split.startswith("eval_best_5_seed1234_split-") and other_split.endswith(".json")
    assert eval_file_name("best", 5, 1234, cfg, cfg.test_rule, cfg.test_inner_steps, cfg.test_split) == "eval_best_5_seed1234.json"
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_a_meta_sgd_run_keeps_its_learned_step_sizes_through_load_evaluate_and_bench(tmp_path, capsys):
    tiny = ["--dataset", "glyphs", "--queries", "2", "--meta-batch", "2", "--iterations", "2",
            "--val-every", "1", "--val-tasks", "3", "--inner-lr", "0.3", "--learn-inner-lr", "--no-progress"]
    run = tmp_path / "run"
    assert main(["train", *tiny, "--ways", "3", "--out", str(run)]) == 0
    saved = torch.load(run / "last.pt", weights_only=True)["learner"]["inner_lrs"]
    learner = MetaLearner.load(run, which="last")
    assert list(learner.inner_lrs) == learner.names
    for n, a in learner.inner_lrs.items():
        assert torch.equal(a, saved[n]), n
    moved = [n for n, a in learner.inner_lrs.items() if not torch.equal(a, torch.full_like(a, 0.3))]
    assert "head.weight" in moved  # learned (a convolution's bias before BatchNorm gets no gradient at all)
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"query_loss"' in x]
    assert all(s["inner_lr_min"] <= s["inner_lr_mean"] <= s["inner_lr_max"] for s in steps) and len(steps) == 2
    assert main(["plot", str(run), "--out", str(tmp_path / "curves.png")]) == 0  # a panel of α's mean among them
    assert "inner_lr_mean" in CURVE_KEYS
    assert main(["evaluate", str(run), "--episodes", "4", "--no-progress"]) == 0
    checkpoint = load_checkpoint(run / "best.pt")  # a NaN step size behind a valid content hash
    checkpoint["learner"]["inner_lrs"]["head.bias"][0] = float("nan")
    save_atomic({k: v for k, v in checkpoint.items() if k != DIGEST_KEY}, run / "best.pt", digest=True)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--episodes", "4", "--no-progress"]) == 2
    assert "non-finite weights: learned step size of head.bias (NaN)" in capsys.readouterr().err
    bench = tmp_path / "bench"
    assert main(["bench", *tiny, "--adapt", "head", "--settings", "3w1s", "--algos", "maml", "--episodes", "4",
                 "--out", str(bench)]) == 0
    assert "**Learned inner step sizes (Meta-SGD, `--learn-inner-lr`).**" in (bench / "results.md").read_text()
    assert "**ANIL (`--adapt head`).**" in (bench / "results.md").read_text()
    assert "--learn-inner-lr" in json.loads((bench / "results.json").read_text())["command"]


@pytest.mark.parametrize("path", ["loop", "vmap"])  # CPUConv4 and Conv4
def test_adapt_head_is_anil_the_body_is_meta_learned_but_never_adapted(tmp_path, path):
    cfg = MetaTrainConfig(iterations=2, adapt="head", path=path, **TINY)
    trainer = MetaTrainer(cfg, tmp_path / "run")
    trainer.start()
    learner = trainer.learner
    assert learner.inner.adapted == ("head.weight", "head.bias")
    before = weights(learner)
    sx, sy, _, _ = trainer.sampler.batch(range(1))
    phi = learner.adapt(sx[0], sy[0])
    assert all(torch.equal(phi[n], learner.params[n]) for n in learner.names if not n.startswith("head."))
    assert not torch.equal(phi["head.weight"], learner.params["head.weight"])
    trainer.train(progress=False)
    after = weights(learner)
    assert not torch.equal(before["features.0.weight"], after["features.0.weight"])  # the body learns through the query loss
    assert MetaLearner.load(tmp_path / "run").inner.adapted == ("head.weight", "head.bias")
    assert MetaTrainConfig.load(tmp_path / "run").adapt == "head"


def test_config_errors_are_specific():
    with pytest.raises(ConfigError, match="--algo"):
        MetaTrainConfig(algo="reptile")
    with pytest.raises(ConfigError, match="the agnostic rule has no setting rhoo; it takes rho1, rho2"):
        MetaTrainConfig(algo="agnostic-sam", inner_rule={"kind": "agnostic", "params": {"rhoo": 0.1}})
    with pytest.raises(ConfigError, match="maml does not use a SAMRule as its inner rule"):
        MetaTrainConfig(algo="maml", inner_rule=SAMRule(rho=0.1), **TINY)


def test_standard_settings_fill_unset_hyperparameters():
    omni20 = MetaTrainConfig(dataset="omniglot", ways=20)
    assert (omni20.inner_lr, omni20.inner_steps, omni20.test_inner_steps, omni20.meta_batch) == (0.1, 5, 5, 16)
    mini5 = MetaTrainConfig(dataset="miniimagenet", ways=5, shots=5)
    assert (mini5.inner_lr, mini5.inner_steps, mini5.test_inner_steps, mini5.meta_batch, mini5.hidden) == (0.01, 5, 10, 2, 32)


def test_loading_a_checkpoint_of_another_model_names_the_mismatch(tmp_path):
    cfg = MetaTrainConfig(algo="maml", iterations=2, **TINY)
    trainer = MetaTrainer(cfg, tmp_path / "run")
    trainer.start()
    trainer.train(progress=False)
    other = MetaTrainer(MetaTrainConfig(algo="maml", iterations=2, **{**TINY, "hidden": 16}), tmp_path / "run")
    with pytest.raises(CheckpointError, match="another"):
        other.resume()


def test_mean_ci95_by_hand():
    from metasam.stats import mean_ci95

    mean, ci = mean_ci95([0.5, 1.0, 0.75])
    assert mean == pytest.approx(0.75)
    assert ci == pytest.approx(1.96 * 0.25 / 3**0.5)
    assert mean_ci95([0.3]) == (0.3, 0.0)


def test_agnostic_outer_rule_gets_validation_meta_batches_of_outer_val_tasks(tmp_path):
    cfg = MetaTrainConfig(algo="agnostic-sam-up", iterations=3, outer_val_tasks=1, **{**TINY, "meta_batch": 3})
    assert MetaTrainConfig(algo="agnostic-sam-up", iterations=3, **TINY).outer_val_tasks == TINY["meta_batch"]
    trainer = MetaTrainer(cfg, tmp_path / "run")
    trainer.start()
    seen = []
    step = trainer.learner.meta_step

    def record(batch, val_batch, **kwargs):
        seen.append((batch.support_x.shape[0], val_batch))
        return step(batch, val_batch, **kwargs)

    trainer.learner.meta_step = record
    trainer.train(progress=False)
    assert [tasks for tasks, _ in seen] == [3, 3, 3]
    for it, (_, val_batch) in enumerate(seen):  # task `it` of the validation sampler, one per step
        expected = trainer.outer_val_sampler.batch([it])
        assert all(torch.equal(a, b) for a, b in zip(val_batch, expected))
    with pytest.raises(ConfigError, match="--outer-val-tasks must be an int >= 1"):
        MetaTrainConfig(algo="agnostic-sam-up", outer_val_tasks=0, **TINY)


def test_alignment_every_logs_both_levels_before_and_after_and_plot_draws_them(tmp_path):
    """--alignment-every 2 on a maml run: iterations 2 and 4 log outer and inner cos before and after the
    update, the others none; the training itself is the same as without the diagnostic."""
    from metasam.analysis import curves

    plain = MetaTrainer(MetaTrainConfig(algo="maml", iterations=4, **TINY), tmp_path / "plain")
    plain.start()
    plain.train(progress=False)
    aligned = MetaTrainer(MetaTrainConfig(algo="maml", iterations=4, alignment_every=2, **TINY), tmp_path / "aligned")
    aligned.start()
    aligned.train(progress=False)
    lines = [json.loads(x) for x in (tmp_path / "aligned" / "metrics.jsonl").read_text().splitlines()]
    keys = ("outer_cos_before", "outer_cos_after", "inner_cos_before", "inner_cos_after")
    logged = [r["iteration"] for r in lines if "outer_cos_before" in r]
    assert logged == [2, 4] and all(all(-1 <= r[k] <= 1 for k in keys) for r in lines if "outer_cos_before" in r)
    for a, b in zip(plain.learner.model.parameters(), aligned.learner.model.parameters()):
        assert torch.equal(a, b)
    assert curves.plot_alignment([tmp_path / "aligned"], tmp_path / "align.png").is_file()


@pytest.mark.parametrize("path,model", [("auto", "CPUConv4"), ("loop", "CPUConv4"), ("vmap", "Conv4")])
def test_trainer_builds_cpu_conv4_on_the_cpu_outside_the_vmap_path_and_records_it(path, model):
    """The trainer picks the model; the checkpoint names its class, and both models have the same weights."""
    from metasam.models import MODELS
    from metasam.train.meta import build_learner

    learner = build_learner(MetaTrainConfig(path=path, **TINY), channels=1)
    assert type(learner.model).__name__ == model and learner.model_spec["name"] == model
    rebuilt = MODELS[model](**learner.model_spec["kwargs"])
    other = build_learner(MetaTrainConfig(path="vmap" if model == "CPUConv4" else "loop", **TINY), channels=1)
    for name, value in learner.model.state_dict().items():
        assert torch.equal(other.model.state_dict()[name], value) and rebuilt.state_dict()[name].shape == value.shape


def test_task_threads_flag_reaches_the_learner_is_recorded_and_may_change_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--dataset", "glyphs", "--ways", "3", "--queries", "2", "--meta-batch", "2",
            "--val-every", "2", "--val-tasks", "3", "--no-progress"]
    assert main([*args, "--iterations", "2", "--task-threads", "1", "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["task_threads"] == 1
    assert main(["train", "--resume", str(run), "--iterations", "4", "--task-threads", "2", "--no-progress"]) == 0
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["task_threads"]) for r in steps if "task_threads" in r] == [(1, 1), (2, 1), (3, 2), (4, 2)]
    capsys.readouterr()
    assert main([*args, "--task-threads", "0", "--out", str(tmp_path / "zero")]) == 2
    assert "--task-threads must be 'auto' or an int >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: "invalid threads_or_auto value: 'two'"
        main([*args, "--task-threads", "two", "--out", str(tmp_path / "two")])
    assert MetaTrainConfig(**TINY).task_threads == "auto"
    assert main(["bench", "--dataset", "glyphs", "--grid", "maml:task_threads=1,2", "--out", str(tmp_path / "b")]) == 2
    assert "--task-threads" in capsys.readouterr().err
