"""PatchFeatureTransformer(image_size=None): each image at its own (shared) size."""

import numpy as np
import pytest
from PIL import Image
from sklearn.pipeline import Pipeline

from sk_padim import PadimDetector, PatchFeatureTransformer
from sk_padim.core.images import image_sizes, read_image
from sk_padim.persistence import load_model, load_npz, save_model, save_npz

PARAMS = {"weights": None, "n_features": 12, "random_state": 0}
HEIGHT, WIDTH = 48, 100  # non-square, multiples of 4


def pictures(n, height=HEIGHT, width=WIDTH, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def write(folder, images):
    paths = []
    for number, image in enumerate(images):
        paths.append(str(folder / f"{number}.png"))
        Image.fromarray(image).save(paths[-1])
    return paths


def test_native_size_is_the_training_images_size():
    X = pictures(3)
    native = PatchFeatureTransformer(**PARAMS, image_size=None).fit(X)
    assert native.image_size_ == (HEIGHT, WIDTH)
    assert native.feature_shape_ == (12, HEIGHT // 4, WIDTH // 4)
    # The same as resizing to that size, which leaves such images as they are.
    sized = PatchFeatureTransformer(**PARAMS, image_size=(HEIGHT, WIDTH)).fit(X)
    np.testing.assert_array_equal(native.transform(X), sized.transform(X))


def test_native_grid_follows_the_backbone_for_sizes_off_the_stride():
    X = pictures(2, 45, 70)
    feat = PatchFeatureTransformer(**PARAMS, image_size=None).fit(X)
    assert feat.transform(X).shape == (2, 12, 12, 18)  # ceil(45 / 4), ceil(70 / 4)


def test_maps_come_back_at_the_image_size(tmp_path):
    X = pictures(4)
    pipe = Pipeline(
        [("feat", PatchFeatureTransformer(**PARAMS, image_size=None)), ("padim", PadimDetector())]
    ).fit(write(tmp_path, X))
    assert pipe.score_samples(X[:2]).shape == (2, HEIGHT, WIDTH)


def test_files_give_their_size_from_the_header_without_decoding(tmp_path):
    (path,) = write(tmp_path, pictures(1, 30, 200))
    with open(path, "rb") as file:
        data = file.read()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])  # the header is intact, the pixels are not
    assert image_sizes([path, str(cut)]) == [(30, 200), (30, 200)]
    with pytest.raises(ValueError, match="cut.png"):
        read_image(str(cut))


def test_training_images_of_several_sizes_are_a_clear_error(tmp_path):
    sizes = [(48, 100)] * 3 + [(50, 100)] * 2 + [(100, 48)]
    images = [pictures(1, h, w)[0] for h, w in sizes]
    feat = PatchFeatureTransformer(**PARAMS, image_size=None)
    for X in (images, write(tmp_path, images)):
        with pytest.raises(ValueError) as error:
            feat.fit(X)
        message = str(error.value)
        assert "found 3 sizes" in message
        assert "48 x 100 (3 images), 50 x 100 (2 images), 100 x 48 (1 image)" in message
        assert "Resize them to one size" in message and "image_size=(height, width)" in message
    assert not hasattr(feat, "image_size_")


def test_native_fit_needs_the_training_images():
    with pytest.raises(ValueError, match="image_size=None takes the size from the training"):
        PatchFeatureTransformer(**PARAMS, image_size=None).fit()


def test_transform_refuses_another_size_and_never_resizes(tmp_path):
    feat = PatchFeatureTransformer(**PARAMS, image_size=None).fit(pictures(2))
    good = list(pictures(2))
    bad = [*good, pictures(1, 64, 64)[0], pictures(1, 48, 96)[0]]
    for X in (bad, write(tmp_path, bad)):
        with pytest.raises(ValueError) as error:
            feat.transform(X)
        message = str(error.value)
        assert "fitted on 48 x 100 px images and never resizes" in message
        assert "64 x 64 (1 image), 48 x 96 (1 image), the first at index 2" in message
        assert "image_size=(48, 100)" in message
    assert feat.transform(good).shape == (2, 12, 12, 25)


@pytest.mark.parametrize("route", ["npz", "joblib"])
def test_a_native_non_square_model_round_trips(route, tmp_path):
    X = pictures(3)
    feat = PatchFeatureTransformer(**PARAMS, image_size=None, tile_size=64)  # 2 tiles
    pipe = Pipeline([("feat", feat), ("padim", PadimDetector())]).fit(X)
    path = tmp_path / f"model.{route}"
    save, load = (save_npz, load_npz) if route == "npz" else (save_model, load_model)
    save(pipe, path)
    loaded = load(path)
    assert loaded[0].image_size is None and loaded[0].image_size_ == (HEIGHT, WIDTH)
    assert loaded[0].tile_plan_ == pipe[0].tile_plan_ and loaded[0].tile_plan_ is not None
    np.testing.assert_array_equal(loaded[0].transform(X), pipe[0].transform(X))
    np.testing.assert_array_equal(loaded.score_samples(X), pipe.score_samples(X))
    with pytest.raises(ValueError, match="never resizes"):
        loaded.score_samples(pictures(1, 64, 64))


def test_records_written_before_native_sizes_still_load():
    feat = PatchFeatureTransformer(**PARAMS, image_size=40).fit()
    arrays, record = feat.fitted_state()
    old = {key: value for key, value in record.items() if key not in ("image_size_", "tile_plan_")}
    loaded = PatchFeatureTransformer.from_fitted_state(feat.get_params(), arrays, old)
    assert loaded.image_size_ == (40, 40) and loaded.tile_plan_ is None
    X = pictures(2, 40, 40)
    np.testing.assert_array_equal(loaded.transform(X), feat.transform(X))


def test_a_damaged_tile_plan_record_is_refused():
    feat = PatchFeatureTransformer(**PARAMS, image_size=40).fit()
    arrays, record = feat.fitted_state()
    record["tile_plan_"] = {"strides": [4, 8, 16], "margin": 20, "core": [16, 16]}  # 20 % 16
    with pytest.raises(ValueError, match="tile plan.*not valid"):
        PatchFeatureTransformer.from_fitted_state(feat.get_params(), arrays, record)
