"""CPUConv4 and its blocks (:func:`metasam.models.cpu_conv4.first_block` and
:func:`~metasam.models.cpu_conv4.conv_block`) against the layers in order, and its refusals.

The reference is torch's own layers (conv2d, batch_norm with batch statistics, ReLU, max_pool2d in
NCHW memory), so the check is independent of the re-association it tests: batch norm moved after the
pooling, its statistics from patch moments (first_block) or float64 sums over channels-last rows
(conv_block), the convolution as a matrix product (first_block)."""

import pytest
import torch
import torch.nn.functional as F

from metasam import ConfigError
from metasam.meta import MetaLearner, TaskBatch
from metasam.models import Conv4, CPUConv4
from metasam.models.cpu_conv4 import conv_block, first_block

D = torch.float64


def layers_in_order(x, weight, bias, gamma, beta):
    z = F.batch_norm(F.conv2d(x, weight, bias, padding=1), None, None, gamma, beta, training=True)
    return F.max_pool2d(F.relu(z), 2)


def inputs(channels: int, size: int, binary: bool, dtype=D, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shape = (6, channels, size, size)
    if binary:  # strokes on a blank background, whose identical patches tie in the pooling windows
        x = (torch.rand(shape, generator=gen) > 0.7).to(dtype)
        x[..., : size // 2] = 0
    else:
        x = torch.randn(shape, generator=gen).to(dtype)
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


CHANNELS_LAST = torch.channels_last
BLOCKS = [  # (block, input channels, size, binary input, input memory format)
    (first_block, 1, 28, True, torch.contiguous_format),
    (first_block, 3, 15, False, torch.contiguous_format),
    (first_block, 1, 9, True, torch.contiguous_format),
    (conv_block, 4, 14, True, CHANNELS_LAST),
    (conv_block, 3, 15, False, CHANNELS_LAST),
    (conv_block, 4, 7, True, torch.contiguous_format),
    (conv_block, 1, 3, False, CHANNELS_LAST),
]
BLOCK_IDS = ["first_block omniglot-like binary 28x28 (tied windows)", "first_block rgb odd 15x15",
             "first_block binary odd 9x9", "conv_block binary 14x14 channels-last (tied windows)",
             "conv_block rgb odd 15x15 channels-last", "conv_block binary odd 7x7 nchw", "conv_block 3x3 to 1x1"]


@pytest.mark.parametrize("block,channels,size,binary,memory_format", BLOCKS, ids=BLOCK_IDS)
def test_block_equals_the_layers_in_order_in_value_gradient_and_second_order(block, channels, size, binary, memory_format):
    x, params = inputs(channels, size, binary)
    x = x.detach().contiguous(memory_format=memory_format).requires_grad_()
    if binary and size > 9:  # the case that matters for gradient routing: exactly tied maxima in the pooling windows
        z = F.conv2d(x, params[0], params[1], padding=1)
        windows = z.unfold(2, 2, 2).unfold(3, 2, 2).flatten(-2).topk(2, dim=-1).values
        assert (windows[..., 0] == windows[..., 1]).sum() > 5
    ours = value_gradient_and_second_order(block, x, params)
    theirs = value_gradient_and_second_order(layers_in_order, x, params)
    assert ours[0].shape == theirs[0].shape and ours[0].is_contiguous(memory_format=CHANNELS_LAST)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-10, atol=1e-12)
    for name, a, b in zip(["x", "W", "b", "γ", "β"], ours[1], theirs[1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"gradient in {name}")
    for name, a, b in zip(["x", "W", "b", "γ", "β"], ours[2], theirs[2]):
        if b is None:  # β enters linearly: no second-order term either way
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=f"second-order gradient in {name}")


@pytest.mark.parametrize("block,channels,memory_format", [(first_block, 1, torch.contiguous_format),
                                                          (conv_block, 4, CHANNELS_LAST)], ids=["first_block", "conv_block"])
def test_block_in_float32_is_within_float32_rounding_of_float64(block, channels, memory_format):
    x64, params64 = inputs(channels, 12, binary=False, seed=1)
    x32, params32 = inputs(channels, 12, binary=False, dtype=torch.float32, seed=1)
    x32 = x32.detach().contiguous(memory_format=memory_format).requires_grad_()
    truth = value_gradient_and_second_order(layers_in_order, x64, params64)
    ours = value_gradient_and_second_order(block, x32, params32)
    relative = lambda a, b: float((a.detach().double() - b.detach()).norm() / b.detach().norm())  # noqa: E731
    assert relative(ours[0], truth[0]) < 1e-6
    for name, a, b in zip(["x", "W", "b", "γ", "β"], ours[1], truth[1]):
        if name != "b":  # the conv bias's gradient is zero up to rounding (batch norm subtracts it)
            assert relative(a, b) < 1e-5, name
    for name, a, b in zip(["x", "W", "γ"], [ours[2][i] for i in (0, 1, 3)], [truth[2][i] for i in (0, 1, 3)]):
        assert relative(a, b) < 1e-4, f"second-order gradient in {name}"


def conv4_with_the_same_weights(model: CPUConv4) -> Conv4:
    """The layers in order (Conv4, metasam's BatchNorm) holding ``model``'s parameters."""
    in_order = Conv4(**model.config).to(next(model.parameters()).dtype)
    in_order.load_state_dict(model.state_dict())
    return in_order


def test_cpu_conv4_runs_the_blocks_and_equals_conv4_with_the_same_weights(monkeypatch):
    torch.manual_seed(0)
    calls = []
    monkeypatch.setattr("metasam.models.cpu_conv4.first_block",
                        lambda *args, **kw: calls.append("first") or first_block(*args, **kw))
    monkeypatch.setattr("metasam.models.cpu_conv4.conv_block",
                        lambda *args, **kw: calls.append("conv") or conv_block(*args, **kw))
    for channels, size, first in [(1, 28, "first"), (3, 40, "conv")]:  # Omniglot-like; RGB, 40 → 2×2 for the head
        model = CPUConv4(5, in_channels=channels, hidden=8, image_size=size).double()
        x = (torch.rand(10, channels, size, size) > 0.8).double()
        calls.clear()
        fast = model(x)
        assert calls == [first, "conv", "conv", "conv"]
        in_order = conv4_with_the_same_weights(model)(x)
        assert len(calls) == 4
        torch.testing.assert_close(fast, in_order, rtol=1e-10, atol=1e-12)


def test_cpu_conv4_has_conv4s_parameters_state_dict_and_initialisation():
    """Weights and checkpoints carry over both ways; a run seeded alike starts from the same weights."""
    torch.manual_seed(3)
    layers = Conv4(5, in_channels=3, hidden=8, image_size=40)
    torch.manual_seed(3)
    blocks = CPUConv4(5, in_channels=3, hidden=8, image_size=40)
    assert [n for n, _ in blocks.named_parameters()] == [n for n, _ in layers.named_parameters()]
    assert blocks.state_dict().keys() == layers.state_dict().keys()
    for name, value in layers.state_dict().items():
        assert torch.equal(blocks.state_dict()[name], value), name
    assert blocks.config == layers.config
    Conv4(5, in_channels=3, hidden=8, image_size=40).load_state_dict(blocks.state_dict())
    CPUConv4(5, in_channels=3, hidden=8, image_size=40).load_state_dict(layers.state_dict())


def test_cpu_conv4_has_no_layers_to_hook():
    """Documented: ``features.<i>`` hold parameters only, so a module hook on one of them never fires; a hook on
    the whole model (a module it is called as) does."""
    torch.manual_seed(0)
    model = CPUConv4(5, hidden=8).double()
    x = (torch.rand(10, 1, 28, 28) > 0.8).double()
    seen = []
    model.features["9"].register_forward_hook(lambda module, inputs, output: seen.append("batch norm"))
    model.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    model(x)
    assert seen == [(10, 5)]
    assert not any(isinstance(m, (torch.nn.Conv2d, torch.nn.MaxPool2d)) for m in model.features.modules())


@pytest.mark.parametrize("channels", [1, 3])
def test_cpu_conv4_refuses_torch_func_vmap_naming_conv4(channels):
    """The blocks ask for channels-last memory, which vmap cannot give: one line that names Conv4, before
    anything is computed; torch.func's other transforms (grad, jvp) run the blocks, and so does vmap over a
    gradient in the input where no copy is needed (grayscale input: the same function as Conv4's)."""
    torch.manual_seed(0)
    model = CPUConv4(5, in_channels=channels, hidden=8, image_size=28).double()
    xs = torch.randn(3, 4, channels, 28, 28, dtype=D)
    with pytest.raises(ConfigError, match=r"^CPUConv4 cannot run under torch\.func\.vmap.*use metasam\.models\.Conv4") as info:
        torch.func.vmap(model)(xs)
    assert "\n" not in str(info.value)
    params = {n: p.detach() for n, p in model.named_parameters()}
    loss = lambda p: torch.func.functional_call(model, p, (xs[0],)).square().mean()  # noqa: E731
    torch.func.jvp(torch.func.grad(loss), (params,), (params,))
    # vmap over a gradient in the input: grayscale input needs no channels-last copy and computes the function
    gradient_in_input = lambda m: torch.func.vmap(torch.func.grad(lambda x: m(x).square().sum()))(xs)  # noqa: E731
    if channels == 1:
        torch.testing.assert_close(gradient_in_input(model), gradient_in_input(conv4_with_the_same_weights(model)),
                                   rtol=1e-10, atol=1e-12)
    else:
        with pytest.raises(ConfigError, match=r"^CPUConv4 cannot run under torch\.func\.vmap"):
            gradient_in_input(model)


def test_metalearner_vmap_path_with_cpu_conv4_is_refused_naming_conv4():
    torch.manual_seed(0)
    learner = MetaLearner(CPUConv4(3, hidden=4), "maml", inner_lr=0.4, path="vmap")
    x = torch.rand(2, 3, 1, 28, 28)
    y = torch.arange(3).repeat(2, 1)
    with pytest.raises(ConfigError, match="CPUConv4 cannot run under torch.func.vmap.*Conv4"):
        learner.meta_gradient(TaskBatch(x, y, x, y))


def test_cpu_conv4_refuses_another_device_and_input_that_is_not_nchw():
    model = CPUConv4(5, hidden=8)
    with pytest.raises(ConfigError, match=r"^CPUConv4 runs on the CPU only \(input on meta\); use metasam\.models\.Conv4"):
        model.to("meta")(torch.empty(2, 1, 28, 28, device="meta"))
    for x in (torch.rand(1, 28, 28), torch.rand(2, 1 * 28 * 28), torch.rand(2, 2, 1, 28, 28)):
        with pytest.raises(ConfigError, match=r"^CPUConv4 takes images \[N, C, H, W\] \(got shape .*use metasam\.models\.Conv4"):
            CPUConv4(5, hidden=8)(x)


@pytest.mark.parametrize("block,channels", [(first_block, 1), (conv_block, 4)], ids=["first_block", "conv_block"])
def test_block_gradient_in_a_zero_gamma_is_the_right_derivative(block, channels):
    """At γ_c = 0 the block is not differentiable in γ_c (the pooling turns from min to max): it returns
    the right derivative, checked by a one-sided finite difference."""
    x, params = inputs(channels, 12, binary=False, seed=2)
    gamma = params[2].detach().clone()
    gamma[2] = 0.0
    params[2] = gamma.requires_grad_()
    beta = params[3].detach().clone()
    beta[2] = 0.5  # above 0: the ReLU passes channel 2 on both sides of γ = 0, so left and right derivatives differ
    params[3] = beta.requires_grad_()
    u = torch.linspace(-1, 1, 6 * 5 * 36, dtype=D).view(6, 5, 6, 6)
    (grad,) = torch.autograd.grad((block(x, *params) * u).sum(), params[2])
    h = 1e-7
    with torch.no_grad():
        right = block(x, params[0], params[1], gamma + h * torch.eye(5, dtype=D)[2], params[3])
        f0 = block(x, *params)
    assert abs(float(((right - f0) * u).sum() / h) - float(grad[2])) < 1e-5 * max(1.0, abs(float(grad[2])))


def test_hessian_vector_products_through_the_cpu_blocks_equal_double_backward_through_the_layers():
    """``metasam analyze`` differentiates the model forward-over-reverse (jvp of grad): every operation of
    the CPU blocks needs a forward-mode derivative of its backward. The reference is double backward
    through Conv4 (the layers in order) with the same weights."""
    from torch.func import functional_call

    from metasam.analysis.hessian import hessian_vector_product

    torch.manual_seed(0)
    model = CPUConv4(5, hidden=6).double()
    in_order = conv4_with_the_same_weights(model)
    x, y = (torch.rand(10, 1, 28, 28) > 0.8).double(), torch.arange(5).repeat(2)
    params = {n: p.detach() for n, p in model.named_parameters()}
    vector = {n: torch.randn_like(p) for n, p in params.items()}

    def loss(p, net=model):
        return F.cross_entropy(functional_call(net, p, (x,)), y)

    hv = hessian_vector_product(loss, params, vector)
    leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
    grads = torch.autograd.grad(loss(leaves, in_order), list(leaves.values()), create_graph=True)
    reference = torch.autograd.grad(sum((g * vector[n]).sum() for n, g in zip(leaves, grads)), list(leaves.values()))
    largest = max(float(r.norm()) for r in reference)
    for (name, h), r in zip(hv.items(), reference):
        torch.testing.assert_close(h, r, rtol=1e-8, atol=1e-10 * largest, msg=name)
