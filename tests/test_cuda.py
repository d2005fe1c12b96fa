"""GPU behaviour: the same meta-gradients as on the CPU on both paths over tasks, full float32 unless
``--tf32``, and a CUDA run that resumes after a kill and evaluates on the CPU.

The CUDA tests need a GPU and skip without one (CI has none); benchmarks/gpu.sh runs them on a GPU
machine, with the throughput benchmark. The TF32 setting is also checked here without a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from metasam.cli.main import main
from metasam.meta import MetaLearner
from metasam.models import Conv4
from metasam.train.config import MetaTrainConfig
from metasam.train.evaluation import evaluate_run
from metasam.train.run_checkpoint import load_run_checkpoint
from metasam.train.precision import use_tf32

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none is visible to PyTorch)")
WAYS, TASKS = 5, 3


def _batch(dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(0)
    sx = (torch.rand(TASKS, WAYS, 1, 28, 28, generator=g) > 0.6).to(dtype)
    qx = (torch.rand(TASKS, WAYS * 3, 1, 28, 28, generator=g) > 0.6).to(dtype)
    sy = torch.arange(WAYS).repeat(TASKS, 1)
    qy = torch.arange(WAYS).repeat_interleave(3).repeat(TASKS, 1)
    return tuple(t.to(device) for t in (sx, sy, qx, qy))


def _meta_gradient(algo: str, path: str, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Conv4(WAYS).to(dtype).to(device)
    # agnostic-sam with 3 inner steps: its validation momentum carries across steps (one step is a SAM step);
    # "maml+meta-sgd": learned inner step sizes, whose meta-gradient is compared too
    params = {"inner_rho1": 0.05, "inner_rho2": 0.025, "inner_steps": 3} if algo == "agnostic-sam" else {}
    if algo == "maml+meta-sgd":
        algo, params = "maml", {"learn_inner_lr": True, "inner_steps": 2}
    learner = MetaLearner(model, algo, inner_lr=0.4, path=path, **params)
    return {n: g.cpu().double() for n, g in learner.meta_gradient(_batch(dtype, device)).items()}


def _compared(names) -> list[str]:
    """Leave out the conv biases (and their learned step sizes): batch norm subtracts them, so their meta-gradient
    is zero up to rounding."""
    def conv_bias(n: str) -> bool:
        n = n.removeprefix("inner_lr:")
        return n.startswith("features.") and n.endswith(".bias") and int(n.split(".")[1]) % 4 == 0

    return [n for n in names if not conv_bias(n)]


def _relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@cuda
@pytest.mark.parametrize("algo", ["maml", "agnostic-sam", "maml+meta-sgd"])
@pytest.mark.parametrize("path", ["loop", "vmap"])
def test_cuda_meta_gradient_equals_the_cpu_one_in_float64(algo, path):
    cpu = _meta_gradient(algo, "loop", torch.float64, "cpu")
    gpu = _meta_gradient(algo, path, torch.float64, "cuda")
    for name in _compared(cpu):
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-9, atol=1e-12, msg=name)


@cuda
@pytest.mark.parametrize("path", ["loop", "vmap"])
def test_cuda_float32_meta_gradient_is_float32_accurate_without_tf32(path):
    """Against the float64 truth, per tensor ‖a − b‖ / ‖b‖ ≤ 1e-3, the throughput benchmark's bound (float32
    rounding gives 2e-5 to 5e-4 on the CPU); TF32's 10-bit mantissa would not keep to it reliably."""
    use_tf32(False)
    truth = _meta_gradient("maml", "loop", torch.float64, "cpu")
    got = _meta_gradient("maml", path, torch.float32, "cuda")
    for name in _compared(truth):
        assert _relative_distance(got[name], truth[name]) <= 1e-3, name


TINY_RUN = ["train", "--dataset", "glyphs", "--ways", "3", "--queries", "2", "--meta-batch", "2", "--iterations", "1",
            "--val-every", "1", "--val-tasks", "2", "--no-progress"]


def test_tf32_is_off_unless_asked_for_and_recorded_in_the_run(tmp_path, capsys):
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        use_tf32(True)
        assert main([*TINY_RUN, "--out", str(tmp_path / "plain")]) == 0
        assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False
        assert json.loads((tmp_path / "plain" / "config.json").read_text())["tf32"] is False
        assert main([*TINY_RUN, "--tf32", "--out", str(tmp_path / "tf32")]) == 0
        assert torch.backends.cudnn.allow_tf32 is True and torch.backends.cuda.matmul.allow_tf32 is True
        assert json.loads((tmp_path / "tf32" / "config.json").read_text())["tf32"] is True
        capsys.readouterr()
        assert main(["train", "--resume", str(tmp_path / "plain"), "--tf32"]) == 2  # a run keeps its precision
        assert "drop --tf32" in capsys.readouterr().err
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


def test_a_run_saved_before_the_tf32_setting_loads_with_it_off(tmp_path):
    run = tmp_path / "run"
    assert main([*TINY_RUN, "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    del config["tf32"]
    (run / "config.json").write_text(json.dumps(config))
    ckpt = torch.load(run / "last.pt", weights_only=True)
    del ckpt["config"]["tf32"], ckpt["content_sha256"]  # as written then: format version 1, without a content hash
    torch.save({**ckpt, "version": 1}, run / "last.pt")
    cfg = MetaTrainConfig.load(run)
    assert cfg.tf32 is False
    assert load_run_checkpoint(run / "last.pt", cfg)["learner"]["iteration"] == 1


@cuda
def test_cuda_run_killed_resumes_close_to_an_uninterrupted_run_and_evaluates_on_the_cpu(tmp_path):
    """Killed once its last.pt holds iteration 2, resumed in this process. The weights are compared with
    an uninterrupted run per tensor, ‖a − b‖ / ‖b‖ ≤ 1e-3, not to the bit: CUDA's max-pool and convolution
    backward kernels accumulate with atomics, so two uninterrupted CUDA runs differ by rounding too, and
    the conv biases are left out (their meta-gradient is rounding noise, which Adam scales to ±lr steps)."""
    args = ["train", "--dataset", "glyphs", "--ways", "3", "--queries", "2", "--meta-batch", "2", "--iterations", "40",
            "--val-every", "2", "--val-tasks", "3", "--device", "cuda", "--no-progress"]
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main([*args, "--out", str(reference)]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "metasam", *args, "--out", str(run)])
    try:
        deadline, seen = time.monotonic() + 100, None
        while True:
            assert proc.poll() is None, "the CUDA run ended before its iteration-2 checkpoint: nothing was killed"
            assert time.monotonic() < deadline, "no iteration-2 checkpoint within 100 s"
            stamp = (run / "last.pt").stat().st_mtime_ns if (run / "last.pt").exists() else None
            if stamp != seen and stamp is not None:  # last.pt is replaced atomically: a complete file
                seen = stamp
                if torch.load(run / "last.pt", weights_only=True)["learner"]["iteration"] >= 2:
                    break
            time.sleep(0.005)
    finally:
        proc.kill()  # SIGKILL: at the iteration-2 checkpoint, or on a failed wait
        proc.wait()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    got = torch.load(run / "last.pt", weights_only=True)["learner"]
    want = torch.load(reference / "last.pt", weights_only=True)["learner"]
    assert got["iteration"] == want["iteration"] == 40
    for name in _compared(want["model"]):
        assert _relative_distance(got["model"][name], want["model"][name]) <= 1e-3, name
    result = evaluate_run(run, episodes=5, progress=False)  # evaluation runs on the CPU
    assert 0.0 <= result["accuracy"] <= 1.0 and len(result["task_accuracies"]) == 5


@cuda
def test_cuda_sam_with_a_grad_scaler_equals_the_unscaled_run_and_trains_under_float16():
    """SAM's grad_scaler= on a GPU: with float32 and a power-of-two scale, three steps of a Conv4 equal the run
    without a scaler (unscaling by a power of two is exact; 1e-5 allows for CUDA's summation order); under
    float16 autocast, three steps are taken (no overflow at a 2¹⁰ scale) to finite weights. The arithmetic is
    checked against the float64 reference on the CPU (tests/test_optim_in_a_trainer.py)."""
    from metasam import SAM

    sx, sy, _, _ = _batch(torch.float32, "cuda")
    x, y = sx.flatten(0, 1), sy.flatten()

    def train(scale: bool, half: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = Conv4(ways=WAYS).cuda()
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10, enabled=scale)
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, model=model, grad_scaler=scaler)
        for _ in range(3):
            def closure():
                with torch.autocast("cuda", dtype=torch.float16, enabled=half):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                scaler.scale(loss).backward()
                return loss

            opt.step(closure)
            scaler.update()
        assert opt.step_count == 3 and opt.skipped_steps == 0
        return [p.detach() for p in model.parameters()]

    plain, scaled = train(False, False), train(True, False)
    diff = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(plain, scaled)))
    assert diff <= 1e-5 * torch.sqrt(sum((a**2).sum() for a in plain))
    assert all(torch.isfinite(p).all() for p in train(True, True))
