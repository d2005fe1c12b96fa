"""Conv4 runs its layers in order, as written: under vmap, with hooks, with a layer swapped, with another norm."""

import pytest
import torch
from torch import nn

from metasam.models import BatchNorm, Conv4

D = torch.float64


def test_conv4_is_the_textbook_layers_in_order():
    model = Conv4(5, hidden=8)
    kinds = [type(layer) for layer in model.features]
    assert kinds == [nn.Conv2d, BatchNorm, nn.ReLU, nn.MaxPool2d] * 4 + [nn.Flatten]
    x = torch.randn(6, 1, 28, 28)
    torch.testing.assert_close(model(x), model.head(model.features(x)), rtol=0, atol=0)


def test_conv4_with_torch_batchnorm_is_the_same_function_with_the_same_parameter_names():
    """``norm=`` builds a user's model as written with torch's layers; weights load both ways."""
    torch.manual_seed(0)
    ours = Conv4(5, hidden=8).double()
    torch_layers = Conv4(5, hidden=8, norm=lambda c: nn.BatchNorm2d(c, track_running_stats=False)).double()
    assert isinstance(torch_layers.features[1], nn.BatchNorm2d)
    torch_layers.load_state_dict(ours.state_dict())
    x = torch.randn(6, 1, 28, 28, dtype=D)
    torch.testing.assert_close(ours(x), torch_layers(x), rtol=1e-12, atol=1e-12)


def test_conv4_hooks_on_its_layers_fire():
    torch.manual_seed(0)
    model = Conv4(5, in_channels=3, hidden=8, image_size=40).double()
    x = (torch.rand(10, 3, 40, 40) > 0.8).double()
    seen = []
    handle = model.features[9].register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    model(x)
    assert seen == [(10, 8, 10, 10)]  # block 3's batch norm
    handle.remove()
    model.features.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    model(x)
    assert seen[1:] == [(10, 32)]  # the whole feature stack


def test_conv4_with_a_swapped_layer_runs_the_layers_as_written():
    """A researcher's replacement layer is what runs."""
    torch.manual_seed(0)
    model = Conv4(5, hidden=8).double()
    x = torch.randn(6, 1, 28, 28, dtype=D)
    model.features[5] = nn.GroupNorm(2, 8).double()  # block 2's batch norm
    torch.testing.assert_close(model(x), model.head(model.features(x)), rtol=0, atol=0)
    model = Conv4(5, hidden=8).double()
    model.features[8] = nn.Conv2d(8, 8, 3, padding=2, dilation=2).double()  # same shapes, another conv
    torch.testing.assert_close(model(x), model.head(model.features(x)), rtol=0, atol=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_conv4_under_torch_func_vmap_equals_a_loop(channels):
    torch.manual_seed(0)
    model = Conv4(5, in_channels=channels, hidden=8, image_size=28).double()
    xs = torch.randn(3, 4, channels, 28, 28, dtype=D)
    batched = torch.func.vmap(model)(xs)
    torch.testing.assert_close(batched, torch.stack([model(x) for x in xs]), rtol=1e-10, atol=1e-12)


def test_conv4_refuses_an_image_size_too_small_for_four_poolings():
    with pytest.raises(ValueError, match="image_size 15 is too small"):
        Conv4(5, image_size=15)
