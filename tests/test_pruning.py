"""Cutting the deepest layer's unused channels (for the export) leaves the features unchanged."""

import numpy as np
import pytest
import torch
from torch import nn

from sk_padim import PatchFeatureTransformer
from sk_padim.core.embedding import PatchEmbedding
from sk_padim.core.pruning import _prune_output_channels, pruned_embedding

PIXELS = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def fitted_embedding(backbone="resnet18", **params) -> PatchEmbedding:
    params = {"weights": None, "image_size": 64, "random_state": 0, **params}
    return PatchFeatureTransformer(backbone=backbone, **params).fit().to_module("cpu")


def features(embedding: PatchEmbedding) -> torch.Tensor:
    with torch.inference_mode():
        return embedding(PIXELS)


class TwoConvs(nn.Module):
    """A model outside the known families: the hook route at fit, traceable by fx."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.b(torch.relu(self.a(x))).mean(dim=(2, 3)))


@pytest.mark.parametrize(
    ("backbone", "params"),
    [
        ("resnet18", {}),
        ("efficientnet_b0", {}),
        ("efficientnet_lite0", {}),
        (TwoConvs(), {"layers": ("a", "b"), "n_features": 12}),
    ],
    ids=["resnet18", "efficientnet_b0", "efficientnet_lite0", "hook route"],
)
def test_pruned_embedding_gives_the_embeddings_features(backbone, params):
    if backbone == "efficientnet_lite0":
        pytest.importorskip("efficientnet_lite_pytorch")
    embedding = fitted_embedding(backbone, **params)
    expected = features(embedding)
    pruned = pruned_embedding(embedding)
    assert pruned is not embedding
    assert pruned.backbone.model_name == embedding.backbone.model_name
    assert isinstance(pruned.backbone.model, torch.fx.GraphModule)
    torch.testing.assert_close(features(pruned), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(features(embedding), expected, rtol=0, atol=0)  # unchanged


def test_resnet_convolution_is_cut_not_sliced():
    embedding = fitted_embedding()
    n_kept = len(embedding.kept_channels()[2])
    graph = pruned_embedding(embedding).backbone.model
    assert graph.get_submodule("model.layer3.1.conv2").out_channels == n_kept < 256
    assert graph.get_submodule("model.layer3.1.conv1").out_channels == 256  # feeds conv2 whole
    assert embedding.backbone.model.get_submodule("layer3.1.conv2").out_channels == 256


def test_projection_is_left_alone():
    embedding = fitted_embedding(projection="semi_orthogonal", n_features=20)
    assert pruned_embedding(embedding) is embedding


def test_a_deepest_layer_without_kept_channels_is_left_alone():
    fitted = fitted_embedding()
    embedding = PatchEmbedding(
        fitted.backbone, np.arange(10), (64, 128, 256), *fitted.normalization, (64, 64)
    )
    assert pruned_embedding(embedding) is embedding


def test_a_deepest_layer_that_feeds_another_is_left_alone():
    embedding = fitted_embedding(layers=("layer2", "layer1"))  # layer1 feeds layer2
    assert pruned_embedding(embedding) is embedding


class Recording(TwoConvs):
    """Python code on the data's values: fx cannot trace it."""

    def forward(self, x):
        if x.sum() > 0:
            x = x + 1
        return super().forward(x)


class TracedOtherwise(TwoConvs):
    """Its forward asks whether torch.fx traces it, so its graph differs from it."""

    def forward(self, x):
        if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            x = -x
        return super().forward(x)


@pytest.mark.parametrize(
    "backbone", [Recording(), TracedOtherwise()], ids=["untraceable", "traced otherwise"]
)
def test_a_graph_that_would_differ_is_not_used(backbone):
    embedding = fitted_embedding(backbone, layers=("a", "b"), n_features=12)
    assert pruned_embedding(embedding) is embedding


class CalledTwice(TwoConvs):
    """``b`` runs twice; its first output is the layer's output, in both routes."""

    def __init__(self):
        super().__init__()
        self.b = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.b(self.b(torch.relu(self.a(x))))


def test_a_layer_called_twice_gives_its_first_output():
    embedding = fitted_embedding(CalledTwice(), layers=("a", "b"), n_features=12)
    pruned = pruned_embedding(embedding)
    assert pruned is not embedding
    torch.testing.assert_close(features(pruned), features(embedding), rtol=1e-5, atol=1e-5)


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
    _prune_output_channels(graph, "out", torch.tensor([1, 3]))
    assert graph.conv.out_channels == 4
    torch.testing.assert_close(graph(x)["out"], expected)
