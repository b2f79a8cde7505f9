"""The backbone run in tiles (sk_padim.core.tiling): stitched outputs equal the whole image's."""

import numpy as np
import pytest
import torch
from torch import nn

from sk_padim import PatchFeatureTransformer
from sk_padim.core.tiling import TilePlan, images_per_pass, receptive_margin, tiled_layer_maps

# Tiled and whole outputs differ by float32 rounding only (a convolution over another
# size may sum in another order): 1e-5 of the outputs' scale.
RELATIVE = 1e-5


class Branches(nn.Module):
    """Not a known family (hooked): a dilated residual branch, then a 5 x 5 layer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.b = nn.Conv2d(16, 16, 5, padding=2)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        a = torch.relu(self.a(x)) + x
        return self.b(torch.relu(self.down(a))).mean()  # pooled after the layers


def fitted(backbone, layers=None):
    return PatchFeatureTransformer(
        backbone, layers=layers, weights=None, image_size=64, n_features=8, random_state=0
    ).fit()


def relative_error(tiled, whole) -> float:
    return float((tiled - whole).abs().max() / whole.abs().max())


def layer_maps(backbone, pixels, plan=None):
    with torch.inference_mode():
        return backbone(pixels) if plan is None else tiled_layer_maps(backbone, pixels, plan)


# (backbone, layers, image (height, width), core): tall enough that some tile is cut inside
# the image at both ends (margins: ResNet-18 128 px, Lite0 208 px), narrow to stay fast.
CASES = [
    pytest.param("resnet18", None, (448, 150), 96, id="resnet18"),
    pytest.param("efficientnet_lite0", None, (587, 160), 112, id="efficientnet_lite0"),
    pytest.param(Branches(), ("a", "b"), (90, 77), 16, id="hooked module"),
]


@pytest.mark.parametrize(("backbone", "layers", "size", "core"), CASES)
def test_stitched_layer_maps_equal_the_whole_image(backbone, layers, size, core):
    feat = fitted(backbone, layers)
    strides, margin = receptive_margin(feat.backbone_)
    plan = TilePlan(strides, margin, (core, core))
    rows = plan.spans(size[0], axis=0)
    assert any(0 < span.start and span.stop < size[0] for span in rows)
    assert len(plan.spans(size[1], axis=1)) > 1
    pixels = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    whole = layer_maps(feat.backbone_, pixels)
    tiled = layer_maps(feat.backbone_, pixels, plan)
    for tiled_map, whole_map in zip(tiled, whole, strict=True):
        assert tiled_map.shape == whole_map.shape
        assert relative_error(tiled_map, whole_map) <= RELATIVE
    # The seams are seen: margins of one stride leave them wrong.
    short = TilePlan(strides, max(strides), (core, core))
    assert relative_error(layer_maps(feat.backbone_, pixels, short)[-1], whole[-1]) > 1e-3


def test_margin_of_a_chain_of_convolutions_is_its_radius_plus_a_stride():
    # Three 3 x 3 convolutions: a cell depends on pixels 3 away; plus one stride (1).
    net = nn.Sequential(*[nn.Conv2d(3, 3, 3, padding=1) for _ in range(3)])
    assert receptive_margin(lambda x: [net(x)]) == ((1,), 4)
    # Two 3 x 3 convolutions of stride 2: cell c reads pixels 4c - 3 ... 4c + 3, its own
    # are 4c ... 4c + 3: 3 px before, rounded up to the stride (4), plus one stride.
    strided = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, 2, 1))
    parameters_before = [p.clone() for p in strided.parameters()]
    assert receptive_margin(lambda x: [strided(x)]) == ((4,), 8)
    assert all(p.grad is None for p in strided.parameters())  # nothing accumulated
    after = strided.parameters()
    assert all(torch.equal(a, b) for a, b in zip(parameters_before, after, strict=True))


def test_odd_sizes_and_same_padding_of_another_parity_stay_exact():
    # TensorFlow's "same" padding pads by the input's parity (pad_h // 2 on top).
    class SamePad(nn.Conv2d):
        def forward(self, x):
            pad_h, pad_w = x.shape[-2] % 2 + 1, x.shape[-1] % 2 + 1  # odd: 1 on top
            pads = [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2]
            return super().forward(nn.functional.pad(x, pads))

    net = nn.Sequential(SamePad(3, 4, 3, 2), nn.ReLU(), SamePad(4, 4, 3, 2))
    backbone = lambda x: [net(x)]  # noqa: E731
    plan = TilePlan(*receptive_margin(backbone), core=(8, 8))
    pixels = torch.randn(1, 3, 61, 47, generator=torch.Generator().manual_seed(0))
    whole, tiled = layer_maps(backbone, pixels)[0], layer_maps(backbone, pixels, plan)[0]
    assert relative_error(tiled, whole) <= RELATIVE


@pytest.mark.parametrize(("projection", "memory"), [("channels", True), ("semi_orthogonal", False)])
def test_tiled_features_equal_whole_image_features(projection, memory, tmp_path):
    X = np.random.default_rng(0).integers(0, 256, (2, 200, 120, 3), dtype=np.uint8)
    params = {"weights": None, "image_size": None, "n_features": 30, "random_state": 0}
    params["projection"] = projection
    expected = PatchFeatureTransformer(**params, tile_size=None).fit_transform(X)
    memory = tmp_path if memory else None
    tiled = PatchFeatureTransformer(**params, tile_size=90, memory=memory).fit(X)
    assert tiled.tile_plan_.core == (96, 96)  # rounded up to the stride, 16
    for _ in range(2):  # with memory=: stored, then read back
        features = tiled.transform(X)
        assert np.abs(features - expected).max() <= RELATIVE * np.abs(expected).max()


def test_default_size_is_never_tiled_and_gives_the_same_bits():
    X = np.random.default_rng(1).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    auto = PatchFeatureTransformer(weights=None, n_features=10, random_state=0).fit(X)
    never = PatchFeatureTransformer(weights=None, n_features=10, random_state=0, tile_size=None)
    assert auto.tile_plan_ is None and auto.to_module().tile_plan is None
    assert images_per_pass((224, 224), 32) == 32
    np.testing.assert_array_equal(auto.transform(X), never.fit(X).transform(X))


def test_images_per_pass_holds_to_the_pixel_budget(monkeypatch):
    seen = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, 2, 1)
            self.b = nn.Conv2d(4, 4, 3, 2, 1)

        def forward(self, x):
            seen.append(len(x))
            return self.b(self.a(x))

    monkeypatch.setattr("sk_padim.core.tiling.BATCH_PIXELS", 3 * 32 * 32)
    feat = PatchFeatureTransformer(
        Recorder(), layers=("a", "b"), weights=None, image_size=32, n_features=4
    ).fit()
    seen.clear()
    X = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    features = feat.transform(X)
    assert seen == [3, 3, 1]
    unbounded = feat.set_params(batch_size=7)
    monkeypatch.setattr("sk_padim.core.tiling.BATCH_PIXELS", 10**9)
    np.testing.assert_allclose(features, unbounded.transform(X), rtol=1e-5, atol=1e-5)


def test_budget_plans_fit_their_tiles_in_the_budget():
    plan = TilePlan.for_budget((4, 8, 16), 128, 4 * 1024 * 1024)
    assert plan.core == (1776, 1776)  # 1776 + 2 x 128 + 15 <= 2048 px per side
    for length in range(4000, 4016):  # every remainder modulo the stride, 16
        spans = plan.spans(length, axis=0)
        assert max(span.stop - span.start for span in spans) <= 2048
    spans = plan.spans(5000, axis=0)
    cores = [(span.core_start, span.core_stop) for span in spans]
    assert cores[0][0] == 0 and cores[-1][1] == 5000
    assert all(a[1] == b[0] for a, b in zip(cores, cores[1:], strict=False))  # a partition
    with pytest.raises(ValueError, match="no core inside margins of 128 px"):
        TilePlan.for_budget((4, 8, 16), 128, 200 * 200)


class SqueezeExcite(nn.Module):
    """Each cell scaled by a mean over the whole image (hooked)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, 2, 1)
        self.b = nn.Conv2d(4, 4, 3, 2, 1)

    def forward(self, x):
        x = self.a(x)
        x = x * torch.sigmoid(x.mean(dim=(2, 3), keepdim=True))
        return self.b(x)


@pytest.mark.parametrize(("backbone", "tiled"), [(Branches(), True), (SqueezeExcite(), False)])
def test_auto_tiles_images_above_the_budget_where_it_can(backbone, tiled, monkeypatch):
    X = np.random.default_rng(0).integers(0, 256, (2, 90, 77, 3), dtype=np.uint8)
    params = {"layers": ("a", "b"), "weights": None, "image_size": None, "n_features": 8}
    params["random_state"] = 0
    expected = PatchFeatureTransformer(backbone, **params, tile_size=None).fit_transform(X)
    monkeypatch.setattr("sk_padim.core.tiling.PIXEL_BUDGET", 60 * 60)
    auto = PatchFeatureTransformer(backbone, **params)
    if not tiled:
        with pytest.raises(ValueError, match="squeeze-and-excitation.*tile_size=None"):
            auto.fit(X)
        return
    features = auto.fit_transform(X)
    plan = auto.tile_plan_
    assert (plan.core[0] + 2 * plan.margin + plan.stride - 1) ** 2 <= 60 * 60 < 90 * 77
    assert np.abs(features - expected).max() <= RELATIVE * np.abs(expected).max()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"strides": (4, 6), "margin": 12, "core": (12, 12)}, "divide the largest"),
        ({"strides": (4,), "margin": 6, "core": (8, 8)}, "multiples"),
        ({"strides": (4,), "margin": 8, "core": (0, 8)}, "multiples"),
    ],
)
def test_invalid_plans_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        TilePlan(**fields)
