"""Conv4's CPU first block (:func:`metasam.models.conv4.first_block`) against the layers in order.

The reference is torch's own layers (conv2d, batch_norm with batch statistics, ReLU, max_pool2d), so
the check is independent of the re-association it tests: batch norm moved after the pooling, its
statistics from patch moments, the convolution as a matrix product."""

import pytest
import torch
import torch.nn.functional as F

from metasam.models import Conv4
from metasam.models.conv4 import first_block, primitive_batchnorm

D = torch.float64


def layers_in_order(x, weight, bias, gamma, beta):
    z = F.batch_norm(F.conv2d(x, weight, bias, padding=1), None, None, gamma, beta, training=True)
    return F.max_pool2d(F.relu(z), 2)


def inputs(channels: int, size: int, binary: bool, dtype=D, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shape = (6, channels, size, size)
    x = (torch.rand(shape, generator=gen) > 0.7).to(dtype) if binary else torch.randn(shape, generator=gen).to(dtype)
    params = [torch.randn(5, channels, 3, 3, generator=gen), torch.randn(5, generator=gen),
              torch.tensor([1.3, -0.7, 0.1, 0.4, -2.0]), torch.randn(5, generator=gen)]  # γ of both signs
    return x.requires_grad_(), [p.to(dtype).requires_grad_() for p in params]


def value_gradient_and_second_order(block, x, params):
    """y, ∂⟨u, y⟩/∂(x, W, b, γ, β) and the gradient of that gradient's squared norm."""
    y = block(x, *params)
    u = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    grads = torch.autograd.grad((y * u).sum(), [x, *params], create_graph=True)
    second = torch.autograd.grad(sum((g**2).sum() for g in grads), [x, *params], allow_unused=True)
    return y, grads, second


@pytest.mark.parametrize("channels,size,binary", [(1, 28, True), (3, 15, False), (1, 9, True)],
                         ids=["omniglot-like binary 28x28 (tied windows)", "rgb odd 15x15", "binary odd 9x9"])
def test_first_block_equals_the_layers_in_order_in_value_gradient_and_second_order(channels, size, binary):
    x, params = inputs(channels, size, binary)
    if binary:  # the case that matters for gradient routing: exactly tied maxima in the pooling windows
        z = F.conv2d(x, params[0], params[1], padding=1)
        windows = z.unfold(2, 2, 2).unfold(3, 2, 2).flatten(-2).topk(2, dim=-1).values
        assert (windows[..., 0] == windows[..., 1]).sum() > 5
    ours = value_gradient_and_second_order(first_block, x, params)
    theirs = value_gradient_and_second_order(layers_in_order, x, params)
    assert ours[0].shape == theirs[0].shape and ours[0].is_contiguous()
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-10, atol=1e-12)
    for name, a, b in zip(["x", "W", "b", "γ", "β"], ours[1], theirs[1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"gradient in {name}")
    for name, a, b in zip(["x", "W", "b", "γ", "β"], ours[2], theirs[2]):
        if b is None:  # β enters linearly: no second-order term either way
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=f"second-order gradient in {name}")


def test_first_block_in_float32_is_within_float32_rounding_of_float64():
    x64, params64 = inputs(1, 12, binary=False, seed=1)
    x32, params32 = inputs(1, 12, binary=False, dtype=torch.float32, seed=1)
    truth = value_gradient_and_second_order(layers_in_order, x64, params64)
    ours = value_gradient_and_second_order(first_block, x32, params32)
    relative = lambda a, b: float((a.detach().double() - b.detach()).norm() / b.detach().norm())  # noqa: E731
    assert relative(ours[0], truth[0]) < 1e-6
    for name, a, b in zip(["x", "W", "b", "γ", "β"], ours[1], truth[1]):
        if name != "b":  # the conv bias's gradient is zero up to rounding (batch norm subtracts it)
            assert relative(a, b) < 1e-5, name


def test_conv4_runs_the_first_block_for_grayscale_on_cpu_and_the_layers_in_order_otherwise(monkeypatch):
    torch.manual_seed(0)
    model = Conv4(5, hidden=8).double()
    x = (torch.rand(10, 1, 28, 28) > 0.8).double()
    calls = []
    monkeypatch.setattr("metasam.models.conv4.first_block",
                        lambda *args, **kw: calls.append(1) or first_block(*args, **kw))
    fast = model(x)
    assert calls == [1]
    with primitive_batchnorm():  # the learner's vmap path
        in_order = model(x)
    assert calls == [1]
    torch.testing.assert_close(fast, in_order, rtol=1e-10, atol=1e-12)
    Conv4(5, in_channels=3, hidden=8, image_size=16)(torch.rand(4, 3, 16, 16))  # RGB: measured no faster
    assert calls == [1]
    seen = []
    model.features[0].register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    torch.testing.assert_close(model(x), in_order, rtol=1e-10, atol=1e-12)
    assert calls == [1] and seen == [(10, 8, 28, 28)]  # a hook on the first conv fires: the layers run in order


def test_first_block_gradient_in_a_zero_gamma_is_the_right_derivative():
    """At γ_c = 0 the block is not differentiable in γ_c (the pooling turns from min to max): first_block
    returns the right derivative, checked by a one-sided finite difference."""
    x, params = inputs(1, 12, binary=False, seed=2)
    gamma = params[2].detach().clone()
    gamma[2] = 0.0
    params[2] = gamma.requires_grad_()
    u = torch.linspace(-1, 1, 6 * 5 * 36, dtype=D).view(6, 5, 6, 6)
    (grad,) = torch.autograd.grad((first_block(x, *params) * u).sum(), params[2])
    h = 1e-7
    with torch.no_grad():
        right = first_block(x, params[0], params[1], gamma + h * torch.eye(5, dtype=D)[2], params[3])
        f0 = first_block(x, *params)
    assert abs(float(((right - f0) * u).sum() / h) - float(grad[2])) < 1e-5 * max(1.0, abs(float(grad[2])))


def test_hessian_vector_products_through_the_first_block_equal_double_backward_through_the_layers():
    """``metasam analyze`` differentiates Conv4 forward-over-reverse (jvp of grad): every operation of
    the first block needs a forward-mode derivative of its backward."""
    from torch.func import functional_call

    from metasam.analysis.hessian import hessian_vector_product

    torch.manual_seed(0)
    model = Conv4(5, hidden=6).double()
    x, y = (torch.rand(10, 1, 28, 28) > 0.8).double(), torch.arange(5).repeat(2)
    params = {n: p.detach() for n, p in model.named_parameters()}
    vector = {n: torch.randn_like(p) for n, p in params.items()}

    def loss(p):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    hv = hessian_vector_product(loss, params, vector)
    leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
    with primitive_batchnorm():  # the layers in order
        grads = torch.autograd.grad(loss(leaves), list(leaves.values()), create_graph=True)
        reference = torch.autograd.grad(sum((g * vector[n]).sum() for n, g in zip(leaves, grads)), list(leaves.values()))
    largest = max(float(r.norm()) for r in reference)
    for (name, h), r in zip(hv.items(), reference):
        torch.testing.assert_close(h, r, rtol=1e-8, atol=1e-10 * largest, msg=name)
