"""Batch-norm folding in EfficientNet-Lite0 (efficientnet-lite-pytorch, the 'lite' extra)."""

import copy

import numpy as np
import pytest
import torch
from synthetic import smooth_texture
from torch import nn

from sk_padim import PatchFeatureTransformer
from sk_padim.core.backbones import REGISTRY, TruncatedBackbone, fold_batch_norms, load_backbone
from sk_padim.core.embedding import PatchEmbedding

lite = pytest.importorskip("efficientnet_lite_pytorch")

LAYERS = REGISTRY["efficientnet_lite0"].layers  # _blocks.2, _blocks.4, _blocks.10


def randomise_batch_norms(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial statistics and affine parameters in every batch norm, in eval mode.

    Variances stay in [0.5, 1.5] and scales near 1, so that activations keep their
    size through 16 blocks of ReLU6 instead of saturating (which would hide errors).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                shape = module.running_mean.shape
                module.running_mean.copy_(0.5 * torch.randn(shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
                module.weight.copy_(1 + 0.3 * torch.randn(shape, generator=generator))
                module.bias.copy_(0.3 * torch.randn(shape, generator=generator))
    return model.eval()


def lite0(image_size: int | None) -> nn.Module:
    """Random Lite0; ``image_size=None`` gives dynamic-padding convolutions, else static."""
    torch.manual_seed(0)
    model = lite.EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    return randomise_batch_norms(model, seed=1)


def layer_outputs(model: nn.Module, layers, x: torch.Tensor) -> list[torch.Tensor]:
    """The layers' outputs in the full model's own forward, by forward hooks."""
    outputs = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: outputs.setdefault(name, o)
        )
        for name in layers
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return [outputs[name] for name in layers]


def batch_norm_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("image_size", [224, None])  # static / dynamic same padding
def test_folded_lite0_gives_the_same_layer_outputs(image_size):
    # A requested convolution keeps its own, unnormalised output (and its batch norm).
    layers = (*LAYERS, "_blocks.3._depthwise_conv")
    model = lite0(image_size)
    folded = copy.deepcopy(model)
    assert len(batch_norm_names(model)) == 49  # stem, head, 16 blocks of 3 less 1
    assert fold_batch_norms(folded, keep=layers) == 48
    assert batch_norm_names(folded) == ["_blocks.3._bn1"]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    expected = layer_outputs(model, layers, x)
    for output, reference in zip(layer_outputs(folded, layers, x), expected, strict=True):
        assert reference.abs().max() > 1  # not saturated nor vanished
        atol = 1e-4 * float(reference.abs().max())
        np.testing.assert_allclose(output, reference, rtol=1e-4, atol=atol)


def test_folded_convolution_follows_the_closed_form():
    # conv(x) * s + (beta - mean * s), s = gamma / sqrt(var + eps); the bias is far from
    # zero, so folding is no near no-op here (as it would be with unit statistics).
    model = lite0(224)
    folded = copy.deepcopy(model)
    fold_batch_norms(folded)
    block = model._blocks[3]
    bn = block._bn0
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    expected_bias = bn.bias - bn.running_mean * scale
    with torch.no_grad():
        np.testing.assert_allclose(
            folded._blocks[3]._expand_conv.weight,
            block._expand_conv.weight * scale.view(-1, 1, 1, 1),
            rtol=1e-5,
            atol=1e-7,
        )
        np.testing.assert_allclose(
            folded._blocks[3]._expand_conv.bias, expected_bias, rtol=1e-5, atol=1e-7
        )
    assert (expected_bias.abs() > 0.1).any()


def test_transformer_features_equal_the_unfolded_backbones(tmp_path):
    weights = tmp_path / "lite0.pth"
    torch.save(lite0(224).state_dict(), weights)
    images = np.stack([smooth_texture(np.random.default_rng(i), 64) for i in range(2)])
    feat = PatchFeatureTransformer(
        backbone="efficientnet_lite0",
        weights=str(weights),
        image_size=64,
        n_features=40,
        random_state=0,
        device="cpu",
    )
    features = feat.fit_transform(images)
    assert batch_norm_names(feat.backbone_) == []

    unfolded = load_backbone("efficientnet_lite0", str(weights), init_seed=0)
    probe = torch.zeros(1, 3, 64, 64)
    embedding = PatchEmbedding(
        TruncatedBackbone(unfolded, LAYERS, probe),
        feat.channel_indices_,
        feat.layer_channels_,
        *feat.normalization_,
        feat.image_size_,
    ).eval()
    assert len(batch_norm_names(embedding)) == 33  # the stem's and 32 in blocks 0-10
    with torch.no_grad():
        expected = embedding(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    assert features.shape == expected.shape == (2, 40, 16, 16)
    atol = 1e-4 * float(np.abs(expected).max())
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=atol)
