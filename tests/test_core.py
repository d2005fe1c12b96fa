"""The perturbation functions against hand computations (docs/algorithms.md §1)."""

import math

import pytest
import torch

import reference as ref
from metasam import ConfigError, agnostic_perturbation, cosine_similarity, global_norm, momentum_update, sam_perturbation

D = torch.float64


def t(*values):
    return torch.tensor(values, dtype=D)


def test_sam_perturbation_is_rho_times_unit_gradient_by_hand():
    grads = [t(3.0, 0.0), t(4.0)]  # ‖g‖ = 5
    eps = sam_perturbation([t(9.0, 9.0), t(9.0)], grads, rho=0.5)
    assert torch.allclose(eps[0], t(0.3, 0.0))
    assert torch.allclose(eps[1], t(0.4))


def test_asam_perturbation_with_eta_by_hand():
    # two tensors of unequal norm, so that a norm taken per tensor gives another ε
    params, grads, rho, eta = [t(1.0, -2.0), t(3.0)], [t(2.0, 1.0), t(-1.0)], 0.7, 0.5
    # T = |θ| + η = (1.5, 2.5), (3.5); T g = (3, 2.5), (-3.5); ‖T g‖² = 9 + 6.25 + 12.25 = 27.5; ε = ρ T² g / ‖T g‖
    eps = sam_perturbation(params, grads, rho, adaptive=True, eta=eta)
    assert torch.allclose(eps[0], t(0.7 * 2.25 * 2.0, 0.7 * 6.25 * 1.0) / math.sqrt(27.5))
    assert torch.allclose(eps[1], t(0.7 * 12.25 * -1.0) / math.sqrt(27.5))


def test_agnostic_perturbation_by_hand():
    g_s, m = [t(0.0, 2.0), t(1.0)], [t(1.0, 1.0), t(-3.0)]  # ‖g_S‖ = √5, ‖m‖ = √11 over both tensors
    eps = agnostic_perturbation([t(5.0, 5.0), t(5.0)], g_s, m, rho1=0.2, rho2=0.1)
    # ρ1 g_S / ‖g_S‖ − ρ2 m / ‖m‖
    assert torch.allclose(eps[0], 0.2 * t(0.0, 2.0) / math.sqrt(5.0) - 0.1 * t(1.0, 1.0) / math.sqrt(11.0))
    assert torch.allclose(eps[1], 0.2 * t(1.0) / math.sqrt(5.0) - 0.1 * t(-3.0) / math.sqrt(11.0))


def test_agnostic_asam_perturbation_by_hand():
    params, g_s, m, eta = [t(2.0, -1.0), t(0.5)], [t(1.0, 3.0), t(2.0)], [t(-2.0, 1.0), t(1.0)], 0.01
    scale = [t(2.01, 1.01), t(0.51)]  # |θ| + η
    # ‖T g_S‖² = (2.01·1)² + (1.01·3)² + (0.51·2)², ‖T m‖² = (2.01·−2)² + (1.01·1)² + (0.51·1)²
    up = math.sqrt(2.01**2 + (1.01 * 3) ** 2 + (0.51 * 2) ** 2)
    down = math.sqrt((2.01 * 2) ** 2 + 1.01**2 + 0.51**2)
    eps = agnostic_perturbation(params, g_s, m, 0.4, 0.1, adaptive=True, eta=eta)
    for e, sc, g, mi in zip(eps, scale, g_s, m):
        assert torch.allclose(e, 0.4 * sc**2 * g / up - 0.1 * sc**2 * mi / down)


@pytest.mark.parametrize("adaptive", [False, True])
def test_agnostic_perturbation_equals_the_reference_on_several_tensors(adaptive):
    """ε = ρ1 T² g_S / ‖T g_S‖ − ρ2 T² m / ‖T m‖ with ρ2 > 0, against tests/reference.py (no metasam code)."""
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(3, 4, generator=gen, dtype=D), 5 * torch.randn(4, generator=gen, dtype=D)]
    g_s = [torch.randn_like(p) for p in params]
    m = [torch.randn_like(p) for p in params]
    eps = agnostic_perturbation(params, g_s, m, 0.3, 0.12, adaptive, eta=0.01)
    for got, expected in zip(eps, ref.agnostic_eps(params, g_s, m, 0.3, 0.12, adaptive, eta=0.01)):
        assert torch.allclose(got, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("adaptive", [False, True])
def test_rho2_zero_reduces_agnostic_to_sam(adaptive):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 4, generator=gen, dtype=D), torch.randn(4, generator=gen, dtype=D)]
    g_s = [torch.randn_like(p) for p in params]
    m = [torch.randn_like(p) for p in params]
    agnostic = agnostic_perturbation(params, g_s, m, 0.3, 0.0, adaptive, eta=0.01)
    sam = sam_perturbation(params, g_s, 0.3, adaptive, eta=0.01)
    for a, s in zip(agnostic, sam):
        assert torch.equal(a, s)


def test_momentum_after_two_steps_equals_formula():
    g1, g2, beta = [t(1.0, 2.0)], [t(-3.0, 0.5)], 0.9
    m = momentum_update(None, g1, beta)
    assert torch.equal(m[0], g1[0])  # m starts as g_V
    m = momentum_update(m, g2, beta)
    assert torch.allclose(m[0], t(0.9 * 1.0 + 0.1 * -3.0, 0.9 * 2.0 + 0.1 * 0.5))
    assert torch.equal(momentum_update(m, g2, 0.0)[0], g2[0])  # β = 0 gives m = g_V


def test_zero_gradient_gives_zero_perturbation_not_nan():
    eps = sam_perturbation([t(1.0)], [t(0.0)], rho=0.05)
    assert torch.equal(eps[0], t(0.0))


def test_functions_do_not_write_inputs():
    params, grads = [t(1.0, 2.0)], [t(3.0, 4.0)]
    before = [params[0].clone(), grads[0].clone()]
    agnostic_perturbation(params, grads, grads, 0.1, 0.05, adaptive=True, eta=0.1)
    assert torch.equal(params[0], before[0]) and torch.equal(grads[0], before[1])


def test_perturbation_is_differentiable_for_second_order_use():
    theta = t(1.0, 2.0).requires_grad_()
    grad = 2 * theta  # ∇ of ‖θ‖²
    eps = sam_perturbation([theta], [grad], rho=1.0)[0]  # = θ/‖θ‖
    (jac_row0,) = torch.autograd.grad(eps[0], theta)
    # d(θ0/‖θ‖)/dθ = (e0 ‖θ‖² − θ0 θ) / ‖θ‖³
    n = math.sqrt(5.0)
    assert torch.allclose(jac_row0, t((5.0 - 1.0) / n**3, -2.0 / n**3))


def test_asam_is_invariant_to_elementwise_rescaling_and_sam_is_not():
    """With η = 0, θ' = Aθ (A > 0 diagonal) and L'(θ') = L(A⁻¹θ') give g' = A⁻¹g and ε' = Aε:
    the perturbed point of the rescaled problem is the rescaled perturbed point (Kwon et al. 2021)."""
    gen = torch.Generator().manual_seed(1)
    theta = [torch.randn(5, generator=gen, dtype=D)]
    grads = [torch.randn(5, generator=gen, dtype=D)]
    scale = torch.rand(5, generator=gen, dtype=D) * 4 + 0.25
    eps = sam_perturbation(theta, grads, 0.5, adaptive=True, eta=0.0)[0]  # exact at η = 0
    eps_scaled = sam_perturbation([scale * theta[0]], [grads[0] / scale], 0.5, adaptive=True, eta=0.0)[0]
    assert torch.allclose(eps_scaled, scale * eps)
    sam = sam_perturbation(theta, grads, 0.5)[0]
    sam_scaled = sam_perturbation([scale * theta[0]], [grads[0] / scale], 0.5)[0]
    assert not torch.allclose(sam_scaled, scale * sam)


def test_asam_invariant_under_relu_layer_rescaling_in_a_network():
    """Scaling layer 1 of a ReLU MLP by c and layer 2 by 1/c keeps the function; ASAM (η = 0) then
    finds the same perturbed loss, SAM a different one."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, dtype=D), torch.randn(16, 1, dtype=D)

    def loss_at(w1, w2):
        return ((torch.relu(x @ w1.T) @ w2.T - y) ** 2).mean()

    def perturbed_loss(w1, w2, adaptive):
        w = [w1.clone().requires_grad_(), w2.clone().requires_grad_()]
        grads = torch.autograd.grad(loss_at(*w), w)
        eps = sam_perturbation([p.detach() for p in w], grads, 0.3, adaptive=adaptive, eta=0.0)  # exact at η = 0
        return loss_at(w1 + eps[0], w2 + eps[1])

    w1, w2 = torch.randn(4, 3, dtype=D), torch.randn(1, 4, dtype=D)
    c = 5.0
    assert torch.allclose(loss_at(w1, w2), loss_at(c * w1, w2 / c))
    assert torch.allclose(perturbed_loss(w1, w2, True), perturbed_loss(c * w1, w2 / c, True))
    assert not torch.allclose(perturbed_loss(w1, w2, False), perturbed_loss(c * w1, w2 / c, False))


def test_cosine_and_norm_match_flattened_reference():
    a = [t(1.0, 2.0), t(3.0)]
    b = [t(-1.0, 0.5), t(2.0)]
    flat_a, flat_b = torch.cat(a), torch.cat(b)
    assert torch.allclose(global_norm(a), flat_a.norm())
    assert torch.allclose(cosine_similarity(a, b), torch.nn.functional.cosine_similarity(flat_a, flat_b, dim=0))


@pytest.mark.parametrize("bad", [-0.1, float("nan")])
def test_negative_or_nan_radius_is_rejected(bad):
    with pytest.raises(ConfigError, match="rho"):
        sam_perturbation([t(1.0)], [t(1.0)], bad)
    with pytest.raises(ConfigError, match="rho2"):
        agnostic_perturbation([t(1.0)], [t(1.0)], [t(1.0)], 0.1, bad)


def test_mismatched_lengths_and_bad_beta_are_rejected():
    with pytest.raises(ConfigError, match="same order"):
        sam_perturbation([t(1.0)], [t(1.0), t(2.0)], 0.1)
    with pytest.raises(ConfigError, match="beta"):
        momentum_update(None, [t(1.0)], 1.0)
