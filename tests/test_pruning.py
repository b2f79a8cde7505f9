"""Cutting the deepest layer's unused channels leaves the kept ones unchanged."""

import copy

import pytest
import torch
from torch import nn

from sk_padim import PatchFeatureTransformer
from sk_padim.pruning import prune_output_channels


def fitted_backbone(backbone="resnet18", **params):
    feat = PatchFeatureTransformer(backbone=backbone, weights=None, image_size=64, **params)
    return feat.fit().backbone_


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_pruned_layer_equals_the_kept_channels_of_the_original(backbone):
    truncated = fitted_backbone(backbone, random_state=0)
    assert truncated.traced
    channels = torch.tensor([0, 3, 7, 20, 21, 40])
    graph = copy.deepcopy(truncated.model)
    prune_output_channels(graph, truncated.layers[-1], channels)
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        expected = truncated.model(x)
        pruned = graph(x)
    last = truncated.layers[-1]
    torch.testing.assert_close(pruned[last], expected[last][:, channels], rtol=1e-5, atol=1e-5)
    for name in truncated.layers[:-1]:
        torch.testing.assert_close(pruned[name], expected[name])


def test_resnet_convolution_is_cut_not_sliced():
    truncated = fitted_backbone(random_state=0)
    graph = copy.deepcopy(truncated.model)
    prune_output_channels(graph, "layer3", torch.tensor([1, 2, 5]))
    assert graph.get_submodule("layer3.1.conv2").out_channels == 3
    assert graph.get_submodule("layer3.1.conv1").out_channels == 256  # feeds conv2 whole


def test_a_layer_that_feeds_deeper_ones_is_refused():
    truncated = fitted_backbone(random_state=0)
    with pytest.raises(ValueError, match="feeds other nodes"):
        prune_output_channels(copy.deepcopy(truncated.model), "layer2", torch.tensor([0]))


class SharedConv(nn.Module):
    """One convolution called twice: cutting it would change its first use."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return {"out": self.conv(torch.relu(self.conv(x)))}


def test_a_module_used_twice_is_sliced_after_instead():
    graph = torch.fx.symbolic_trace(SharedConv())
    x = torch.rand(1, 4, 8, 8)
    expected = graph(x)["out"][:, [1, 3]]
    prune_output_channels(graph, "out", torch.tensor([1, 3]))
    assert graph.conv.out_channels == 4
    torch.testing.assert_close(graph(x)["out"], expected)
