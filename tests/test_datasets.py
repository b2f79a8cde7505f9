"""Tests for sk_padim.datasets (the MVTec AD layout) and sk_padim.synthetic (the built-in
texture datasets)."""

import doctest
import functools
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skimage_data

import sk_padim.datasets
import sk_padim.synthetic
from sk_padim.datasets import (
    find_mvtec_categories,
    list_images,
    load_masks,
    load_mvtec_ad,
    write_mvtec_layout,
)
from sk_padim.synthetic import make_defect_textures, make_high_resolution_textures

KINDS = ["hole", "patch", "scratch", "stain"]


@pytest.fixture(scope="module")
def dataset():
    return make_defect_textures(random_state=0)


@functools.cache
def _photo(category):
    return getattr(skimage_data, category)()


def _crop(category, origin, size=128):
    row, col = origin
    return _photo(category)[row : row + size, col : col + size]


def _rgb(grey):
    return np.repeat(grey[..., None], 3, axis=-1)


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def _read(path):
    with Image.open(path) as image:
        return np.asarray(image)


# ------------------------------------------------------------ make_defect_textures


def test_default_shapes_dtypes_and_counts(dataset):
    assert list(dataset) == ["brick", "grass", "gravel"]
    for bunch in dataset.values():
        assert bunch.X_train.shape == (40, 128, 128, 3)
        assert bunch.X_train.dtype == np.uint8
        assert bunch.X_test.shape == (30, 128, 128, 3)
        assert bunch.X_test.dtype == np.uint8
        assert bunch.masks_test.shape == (30, 128, 128)
        assert bunch.masks_test.dtype == bool
        assert Counter(bunch.defect_types_test) == {"good": 10, **dict.fromkeys(KINDS, 5)}
        np.testing.assert_array_equal(bunch.y_test, bunch.defect_types_test != "good")


def test_test_images_sorted_by_defect_type(dataset):
    types = dataset.brick.defect_types_test
    np.testing.assert_array_equal(types, np.sort(types))


def test_same_seed_gives_identical_arrays_other_seed_differs(dataset):
    again = make_defect_textures(random_state=0)
    other = make_defect_textures(random_state=1)
    for category, bunch in dataset.items():
        for key, value in bunch.items():
            np.testing.assert_array_equal(again[category][key], value)
        assert not np.array_equal(other[category].X_train, bunch.X_train)
        assert not np.array_equal(other[category].masks_test, bunch.masks_test)


def test_normal_images_are_grey_photo_crops_repeated_to_rgb(dataset):
    for category, bunch in dataset.items():
        for image, origin in zip(bunch.X_train, bunch.origins_train, strict=True):
            np.testing.assert_array_equal(image, _rgb(_crop(category, origin)))
        good = bunch.defect_types_test == "good"
        for image, origin in zip(bunch.X_test[good], bunch.origins_test[good], strict=True):
            np.testing.assert_array_equal(image, _rgb(_crop(category, origin)))


def test_defects_change_exactly_the_masked_pixels(dataset):
    for category, bunch in dataset.items():
        for image, mask, origin, kind in zip(
            bunch.X_test, bunch.masks_test, bunch.origins_test, bunch.defect_types_test, strict=True
        ):
            clean = _rgb(_crop(category, origin))
            np.testing.assert_array_equal(image[~mask], clean[~mask])
            if kind != "good":
                changed = (image != clean).any(axis=-1)
                assert changed[mask].mean() > 0.9, (category, kind)


def _occurs_in(photo, mask, image):
    """Whether ``image[mask]`` equals ``crop[mask]`` for some square crop of ``photo``."""
    windows = np.lib.stride_tricks.sliding_window_view(photo, mask.shape)
    rows, cols = np.nonzero(mask)
    candidates = np.ones(windows.shape[:2], dtype=bool)
    for row, col in zip(rows[:10], cols[:10], strict=True):
        candidates &= windows[:, :, row, col] == image[row, col]
    return any(np.array_equal(windows[i, j][mask], image[mask]) for i, j in np.argwhere(candidates))


def test_patches_are_pasted_from_another_photograph(dataset):
    for category, bunch in dataset.items():
        others = [_photo(other) for other in dataset if other != category]
        patches = bunch.defect_types_test == "patch"
        for image, mask in zip(bunch.X_test[patches], bunch.masks_test[patches], strict=True):
            assert any(_occurs_in(photo, mask, image[..., 0]) for photo in others)


def test_every_defect_kind_appears_with_a_nonempty_mask(dataset):
    for bunch in dataset.values():
        assert set(bunch.defect_types_test) == {"good", *KINDS}
        areas = bunch.masks_test.sum(axis=(1, 2))
        assert (areas[bunch.y_test == 1] > 0).all()
        assert (areas[bunch.y_test == 0] == 0).all()


@pytest.mark.parametrize("image_size", [32, 128, 256])
def test_train_crops_never_overlap_test_crops(image_size):
    dataset = make_defect_textures(
        image_size=image_size, n_train=20, n_test_good=5, n_test_defective=8, random_state=0
    )
    for bunch in dataset.values():
        assert bunch.X_train.shape[1:3] == (image_size, image_size)
        last_train_column = bunch.origins_train[:, 1].max() + image_size - 1
        assert last_train_column < bunch.origins_test[:, 1].min()


def test_defects_shared_evenly_among_selected_kinds_first_kinds_get_the_rest():
    dataset = make_defect_textures(
        "grass",
        n_train=2,
        n_test_good=1,
        n_test_defective=4,
        defect_kinds=["stain", "hole", "scratch"],
        random_state=0,
    )
    assert list(dataset) == ["grass"]
    assert dataset.grass.defect_types_test.tolist() == [
        "good",
        "hole",
        "scratch",
        "stain",
        "stain",
    ]


@pytest.mark.parametrize(
    "params, match",
    [
        ({"categories": ["brick", "marble"]}, "categories must be"),
        ({"categories": []}, "categories must be"),
        ({"defect_kinds": ["crack"]}, "defect_kinds must be"),
        ({"image_size": 300}, "image_size must be an int from 32 to 256"),
        ({"image_size": 16}, "image_size must be an int from 32 to 256"),
        ({"n_train": 0}, "n_train must be an int >= 1"),
        ({"n_train": 2.5}, "n_train must be an int >= 1"),
        ({"n_test_good": -1}, "n_test_good must be an int >= 0"),
        ({"n_test_defective": True}, "n_test_defective must be an int >= 0"),
        ({"n_test_good": 0, "n_test_defective": 0}, "both 0; ask for a test image"),
    ],
)
def test_make_defect_textures_rejects_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        make_defect_textures(**params)


# --------------------------------------------------- make_high_resolution_textures

HIGH_RES_SHAPE = (96, 160)  # not square, and not a multiple of the 128-px crops


@pytest.fixture(scope="module")
def high_res():
    return make_high_resolution_textures(
        "gravel",
        image_size=HIGH_RES_SHAPE,
        n_train=6,
        n_test_good=3,
        n_test_defective=16,
        random_state=0,
    )


def _mosaic(category, tiles, shape):
    """The grey mosaic that ``tiles`` describe, rebuilt from the photograph."""
    image = np.zeros((tiles.shape[0] * 128, tiles.shape[1] * 128), dtype=np.uint8)
    for a in range(tiles.shape[0]):
        for b in range(tiles.shape[1]):
            row, col, turns, mirrored = tiles[a, b]
            block = np.rot90(_crop(category, (row, col)), turns)
            image[128 * a : 128 * (a + 1), 128 * b : 128 * (b + 1)] = (
                np.fliplr(block) if mirrored else block
            )
    return image[: shape[0], : shape[1]]


def _extents(masks):
    """Longer side of each mask's bounding box."""
    extents = []
    for mask in masks:
        rows, cols = np.nonzero(mask)
        extents.append(max(np.ptp(rows), np.ptp(cols)) + 1)
    return np.array(extents)


def test_high_resolution_shapes_dtypes_and_counts(high_res):
    assert high_res.X_train.shape == (6, *HIGH_RES_SHAPE, 3)
    assert high_res.X_test.shape == (19, *HIGH_RES_SHAPE, 3)
    assert high_res.X_train.dtype == high_res.X_test.dtype == np.uint8
    assert high_res.masks_test.shape == (19, *HIGH_RES_SHAPE)
    assert high_res.masks_test.dtype == bool
    assert high_res.tiles_train.shape == (6, 1, 2, 4)  # ceil(96 / 128), ceil(160 / 128)
    assert high_res.tiles_test.shape == (19, 1, 2, 4)
    types = high_res.defect_types_test
    assert Counter(types) == {"good": 3, **dict.fromkeys(KINDS, 4)}
    np.testing.assert_array_equal(types, np.sort(types))
    np.testing.assert_array_equal(high_res.y_test, types != "good")


def test_high_resolution_images_are_mosaics_of_photo_crops_at_native_scale(high_res):
    for image, tiles in zip(high_res.X_train, high_res.tiles_train, strict=True):
        np.testing.assert_array_equal(image, _rgb(_mosaic("gravel", tiles, HIGH_RES_SHAPE)))
    good = high_res.y_test == 0
    for image, tiles in zip(high_res.X_test[good], high_res.tiles_test[good], strict=True):
        np.testing.assert_array_equal(image, _rgb(_mosaic("gravel", tiles, HIGH_RES_SHAPE)))


def test_high_resolution_tiles_use_every_orientation_and_disjoint_strips():
    data = make_high_resolution_textures(
        image_size=(512, 512), n_train=4, n_test_good=4, n_test_defective=0, random_state=0
    )
    for tiles in (data.tiles_train, data.tiles_test):
        orientations = {tuple(t) for t in tiles[..., 2:].reshape(-1, 2).tolist()}
        assert orientations == {(turns, m) for turns in range(4) for m in range(2)}
        assert tiles[..., 0].min() >= 0
        assert tiles[..., 0].max() + 128 <= 512
    # Training crops end left of the 192 right-hand columns that test crops come from.
    assert data.tiles_train[..., 1].min() >= 0
    assert data.tiles_train[..., 1].max() + 128 <= 512 - 192 <= data.tiles_test[..., 1].min()
    assert data.tiles_test[..., 1].max() + 128 <= 512


def test_high_resolution_defects_change_only_masked_pixels(high_res):
    defective = high_res.y_test == 1
    changed_in_masks = []
    for image, mask, tiles in zip(
        high_res.X_test[defective],
        high_res.masks_test[defective],
        high_res.tiles_test[defective],
        strict=True,
    ):
        clean = _rgb(_mosaic("gravel", tiles, HIGH_RES_SHAPE))
        changed = (image != clean).any(axis=-1)
        assert not changed[~mask].any()
        assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
        changed_in_masks.append(changed[mask])
    # Pixels already at the defect's value (or clipped at 0 or 255) stay as they were.
    assert np.concatenate(changed_in_masks).mean() > 0.9


@pytest.mark.parametrize("defect_size", [(2, 3), (4, 9), (12, 20)])
def test_high_resolution_defect_extents_within_the_requested_range(defect_size):
    data = make_high_resolution_textures(
        "brick",
        image_size=(160, 96),
        n_train=1,
        n_test_good=2,
        n_test_defective=24,
        defect_size=defect_size,
        random_state=1,
    )
    assert not data.masks_test[data.y_test == 0].any()
    extents = _extents(data.masks_test[data.y_test == 1])
    assert extents.min() >= defect_size[0]
    assert extents.max() <= defect_size[1]
    if defect_size[1] > defect_size[0]:
        assert len(set(extents.tolist())) > 1  # sizes vary within the range


def test_high_resolution_same_seed_same_arrays_other_seed_differs(high_res):
    params = {
        "image_size": HIGH_RES_SHAPE,
        "n_train": 6,
        "n_test_good": 3,
        "n_test_defective": 16,
    }
    again = make_high_resolution_textures("gravel", **params, random_state=0)
    assert again.keys() == high_res.keys()
    for key, value in high_res.items():
        np.testing.assert_array_equal(again[key], value)
    other = make_high_resolution_textures("gravel", **params, random_state=1)
    assert not np.array_equal(other.X_train, high_res.X_train)
    assert not np.array_equal(other.masks_test, high_res.masks_test)


def test_high_resolution_square_int_size_and_selected_kinds():
    data = make_high_resolution_textures(
        "grass",
        image_size=64,
        n_train=1,
        n_test_good=0,
        n_test_defective=3,
        defect_kinds="scratch",
        random_state=0,
    )
    assert data.X_test.shape == (3, 64, 64, 3)
    assert data.defect_types_test.tolist() == ["scratch"] * 3


@pytest.mark.parametrize(
    "params, match",
    [
        ({"category": "marble"}, r"category must be one of \['brick', 'grass', 'gravel'\]"),
        ({"defect_kinds": ["crack"]}, "defect_kinds must be"),
        ({"image_size": (0, 64)}, "image_size must be a positive int or"),
        ({"image_size": 16}, r"image_size=\(16, 16\) is too small .* at least 36 px"),
        ({"image_size": (64, 40), "defect_size": (4, 12)}, "at least 48 px"),
        ({"defect_size": (1, 4)}, "defect_size must be"),
        ({"defect_size": (9, 4)}, "defect_size must be"),
        ({"defect_size": 5}, "defect_size must be"),
        ({"n_train": 0}, "n_train must be an int >= 1"),
        ({"n_test_good": 0, "n_test_defective": 0}, "both 0; ask for a test image"),
    ],
)
def test_make_high_resolution_textures_rejects_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        make_high_resolution_textures(**{"image_size": 64, **params})


# ------------------------------------------------------------- write + load round trip


def test_round_trip_through_mvtec_layout(dataset, tmp_path):
    root = write_mvtec_layout(dataset, tmp_path)
    assert root == tmp_path
    for category, bunch in dataset.items():
        train = load_mvtec_ad(root, category, split="train")
        np.testing.assert_array_equal([_read(p) for p in train.images], bunch.X_train)
        assert train.target.tolist() == [0] * 40
        assert not train.masks.any()

        test = load_mvtec_ad(root, category, split="test")
        np.testing.assert_array_equal([_read(p) for p in test.images], bunch.X_test)
        np.testing.assert_array_equal(test.masks, bunch.masks_test)
        np.testing.assert_array_equal(test.target, bunch.y_test)
        np.testing.assert_array_equal(test.defect_types, bunch.defect_types_test)


def test_write_refuses_an_existing_category_folder(tmp_path):
    dataset = make_defect_textures("brick", n_train=1, n_test_good=1, n_test_defective=1)
    (tmp_path / "brick").mkdir()
    with pytest.raises(FileExistsError, match="brick already exists"):
        write_mvtec_layout(dataset, tmp_path)


# -------------------------------------------------------------------- load_mvtec_ad


@pytest.fixture
def tree(tmp_path):
    """A small hand-written MVTec AD tree; each image's value identifies it."""
    category = tmp_path / "widget"
    for name, value in [("b.png", 1), ("a.png", 2)]:
        _save(category / "train" / "good" / name, np.full((6, 8), value))
    for name, value in [("001.png", 10), ("000.png", 11)]:
        _save(category / "test" / "good" / name, np.full((6, 8), value))
    defects = [("scratch", "b.png", 20), ("crack", "b.png", 30), ("crack", "a.png", 31)]
    for defect, name, value in defects:
        _save(category / "test" / defect / name, np.full((6, 8), value))
        mask = np.zeros((6, 8))
        mask[value % 6, :] = 255  # row of the mask tells which image it belongs to
        _save(category / "ground_truth" / defect / name.replace(".png", "_mask.png"), mask)
    (category / "test" / "crack" / "notes.txt").write_text("not an image")
    (category / "test" / ".cache").mkdir()
    return tmp_path


def test_loader_sorts_by_defect_type_then_name(tree):
    test = load_mvtec_ad(tree, "widget", split="test")
    names = [Path(p).relative_to(tree / "widget" / "test").as_posix() for p in test.images]
    assert names == ["crack/a.png", "crack/b.png", "good/000.png", "good/001.png", "scratch/b.png"]
    assert test.defect_types.tolist() == ["crack", "crack", "good", "good", "scratch"]
    assert test.target.tolist() == [1, 1, 0, 0, 1]
    train = load_mvtec_ad(tree, "widget")
    assert [Path(p).name for p in train.images] == ["a.png", "b.png"]


def test_loader_masks_are_aligned_with_images(tree):
    test = load_mvtec_ad(tree, "widget", split="test")
    assert test.masks.shape == (5, 6, 8)
    assert test.masks.dtype == bool
    for path, mask, target in zip(test.images, test.masks, test.target, strict=True):
        value = _read(path)[0, 0]
        expected = np.zeros((6, 8), dtype=bool)
        expected[value % 6, :] = target == 1
        np.testing.assert_array_equal(mask, expected)


def test_loader_return_X_y(tree):
    images, target = load_mvtec_ad(tree, "widget", split="test", return_X_y=True)
    bunch = load_mvtec_ad(tree, "widget", split="test")
    assert images == bunch.images
    np.testing.assert_array_equal(target, bunch.target)


def test_loader_gives_a_list_of_masks_for_images_of_different_sizes(tree):
    category = tree / "widget"
    _save(category / "test" / "hole" / "x.png", np.zeros((3, 5)))
    _save(category / "ground_truth" / "hole" / "x_mask.png", np.full((3, 5), 255))
    masks = load_mvtec_ad(tree, "widget", split="test").masks
    assert isinstance(masks, list)
    assert [m.shape for m in masks] == [(6, 8)] * 4 + [(3, 5), (6, 8)]  # hole < scratch
    assert masks[4].all()


def test_loader_mask_suffix_for_other_naming_schemes(tmp_path):
    _save(tmp_path / "01" / "test" / "ko" / "0000.bmp", np.zeros((4, 4)))
    _save(tmp_path / "01" / "ground_truth" / "ko" / "0000.png", np.eye(4) * 255)
    test = load_mvtec_ad(tmp_path, "01", split="test", mask_suffix=".png")
    np.testing.assert_array_equal(test.masks[0], np.eye(4, dtype=bool))


def test_loader_rejects_an_unknown_split(tree):
    with pytest.raises(ValueError, match=r"split must be one of \['test', 'train'\], got 'val'"):
        load_mvtec_ad(tree, "widget", split="val")


@pytest.mark.parametrize(
    "category, remove, missing",
    [
        ("gadget", None, "gadget"),
        ("widget", "train", "widget/train"),
        ("widget", "train/good", "widget/train/good"),
    ],
)
def test_loader_names_a_missing_folder(tree, category, remove, missing):
    if remove:
        shutil.rmtree(tree / "widget" / remove)
    with pytest.raises(FileNotFoundError, match=re.escape(f"not found: {tree / missing}.")):
        load_mvtec_ad(tree, category, split="train")


def test_loader_names_a_test_folder_without_defect_types(tmp_path):
    (tmp_path / "widget" / "test").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=re.escape(f"No defect-type folders in {tmp_path}")):
        load_mvtec_ad(tmp_path, "widget", split="test")


def test_loader_names_a_folder_without_images(tree):
    (tree / "widget" / "test" / "empty").mkdir()
    empty = tree / "widget" / "test" / "empty"
    with pytest.raises(FileNotFoundError, match=f"No image files .* in {re.escape(str(empty))}"):
        load_mvtec_ad(tree, "widget", split="test")


def test_loader_names_a_missing_mask(tree):
    mask = tree / "widget" / "ground_truth" / "crack" / "b_mask.png"
    mask.unlink()
    image = tree / "widget" / "test" / "crack" / "b.png"
    expected = f"Ground-truth mask not found: {mask}, the mask of {image}"
    with pytest.raises(FileNotFoundError, match=re.escape(expected)) as error:
        load_mvtec_ad(tree, "widget", split="test")
    assert "mask_suffix='<their suffix>'" in str(error.value)


def test_loader_rejects_a_mask_of_the_wrong_size(tree):
    _save(tree / "widget" / "ground_truth" / "crack" / "a_mask.png", np.zeros((8, 6)))
    with pytest.raises(ValueError, match="is 6x8 pixels but its image is 8x6"):
        load_mvtec_ad(tree, "widget", split="test")


# ------------------------------------------------ list_images, categories, masks


def test_list_images_sorted_by_path_hidden_and_other_files_left_out(tree):
    test = tree / "widget" / "test"
    _save(test / ".cache" / "hidden.png", np.zeros((2, 2)))
    _save(test / "good" / ".hidden.png", np.zeros((2, 2)))
    relative = [Path(p).relative_to(test).as_posix() for p in list_images(test, recursive=True)]
    assert relative == [
        "crack/a.png",
        "crack/b.png",
        "good/000.png",
        "good/001.png",
        "scratch/b.png",
    ]
    assert list_images(test / "crack") == [
        str(test / "crack" / "a.png"),
        str(test / "crack" / "b.png"),
    ]


def test_list_images_names_the_problem(tree, tmp_path):
    expected = r"No image files .* in .*\.cache or its sub-folders"
    with pytest.raises(FileNotFoundError, match=expected):
        list_images(tree / "widget" / "test" / ".cache", recursive=True)
    with pytest.raises(
        FileNotFoundError,
        match=re.escape(
            f"No image files (.bmp, .jpeg, .jpg, .png, .tif, .tiff) in {tree / 'widget' / 'test'}."
        ),
    ):
        list_images(tree / "widget" / "test")  # only sub-folders
    with pytest.raises(FileNotFoundError, match="Folder not found"):
        list_images(tmp_path / "nowhere")


def test_find_mvtec_categories_from_a_root_or_a_category(tree):
    _save(tree / "other" / "train" / "good" / "0.png", np.zeros((2, 2)))
    (tree / "notes").mkdir()  # not a category
    assert find_mvtec_categories(tree) == (tree, ["other", "widget"])
    assert find_mvtec_categories(tree / "widget") == (tree, ["widget"])
    assert find_mvtec_categories(tree / "notes") == (tree / "notes", [])


def test_load_masks_mirrors_the_images_below_their_common_folder(tree):
    test, truth = tree / "widget" / "test", tree / "widget" / "ground_truth"
    images = [str(test / "crack" / "a.png"), str(test / "scratch" / "b.png")]
    expected = load_mvtec_ad(tree, "widget", split="test").masks[[0, 4]]
    np.testing.assert_array_equal(load_masks(images, truth), expected)
    # One folder of images: its masks are in one folder too.
    np.testing.assert_array_equal(load_masks(images[:1], truth / "crack"), expected[:1])
    with pytest.raises(FileNotFoundError, match="the mask of"):
        load_masks(images, truth / "crack")


@pytest.mark.parametrize("module", [sk_padim.datasets, sk_padim.synthetic])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
