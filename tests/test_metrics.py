"""Metrics and scorers against independent computations and hand-built curves."""

from fractions import Fraction

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from scipy.integrate import trapezoid
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_validate

from sk_padim import (
    NormalTrainSplit,
    PadimDetector,
    aupro,
    aupro_scorer,
    image_auroc,
    image_auroc_scorer,
    pixel_auroc,
    pixel_auroc_scorer,
)


def random_masks_and_maps(seed: int, shape=(6, 12, 10), decimals=None):
    """Blob masks and noisy maps that score masked pixels a little higher."""
    rng = np.random.default_rng(seed)
    masks = ndimage.gaussian_filter(rng.normal(size=shape), sigma=(0, 1.5, 1.5)) > 0.25
    maps = rng.normal(size=shape) + masks
    if decimals is not None:  # many tied scores
        maps = np.round(maps, decimals)
    return masks, maps.astype(np.float32)


# --- AUROC -------------------------------------------------------------------------


@pytest.mark.parametrize("decimals", [None, 1, 0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_auroc_equals_roc_auc_score_on_flattened_pixels(seed, decimals):
    masks, maps = random_masks_and_maps(seed, decimals=decimals)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_is_exact_on_a_million_pixels():
    masks, maps = random_masks_and_maps(3, shape=(16, 256, 256), decimals=2)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_auroc_counts_ties_as_one_half():
    assert image_auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert image_auroc([0, 1], [0.2, 0.7]) == 1.0
    assert image_auroc([0, 1], [0.7, 0.2]) == 0.0


def test_image_auroc_equals_roc_auc_score():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(30), np.ones(20)].astype(int)
    scores = rng.normal(size=50) + labels
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))


def test_image_auroc_takes_masks_as_labels_any_pixel():
    masks, _ = random_masks_and_maps(0)
    masks[:2] = False  # two normal images
    scores = np.arange(len(masks), dtype=float)[::-1]
    expected = roc_auc_score(masks.any(axis=(1, 2)), scores)
    assert image_auroc(masks, scores) == pytest.approx(expected)
    assert image_auroc(masks.astype(np.uint8), scores) == pytest.approx(expected)


# --- resizing masks to the maps -------------------------------------------------------


def nearest_by_distance(size_in: int, size_out: int) -> list[int]:
    """For each output pixel, the input pixel with the nearest centre (ties: the later)."""
    indices = []
    for i in range(size_out):
        centre = Fraction(2 * i + 1, 2) * Fraction(size_in, size_out)
        distances = [abs(Fraction(2 * j + 1, 2) - centre) for j in range(size_in)]
        best = min(distances)
        indices.append(max(j for j, dist in enumerate(distances) if dist == best))
    return indices


@pytest.mark.parametrize(
    ("mask_size", "map_size"), [((13, 9), (5, 7)), ((4, 6), (11, 17)), ((10, 10), (7, 3))]
)
def test_masks_are_resized_to_the_maps_by_nearest_pixel_centre(mask_size, map_size):
    rng = np.random.default_rng(0)
    masks = rng.random((3, *mask_size)) < 0.3
    maps = rng.normal(size=(3, *map_size))
    rows = nearest_by_distance(mask_size[0], map_size[0])
    cols = nearest_by_distance(mask_size[1], map_size[1])
    resized = masks[:, rows][:, :, cols]
    assert pixel_auroc(masks, maps) == pixel_auroc(resized, maps)
    assert aupro(masks, maps) == aupro(resized, maps)


@pytest.mark.parametrize(("mask_size", "map_size"), [(256, 64), (64, 16), (32, 96)])
def test_resizing_by_integer_factors_matches_pil_nearest(mask_size, map_size):
    rng = np.random.default_rng(1)
    masks = rng.random((2, mask_size, mask_size)) < 0.2
    maps = rng.normal(size=(2, map_size, map_size))
    resized = np.stack(
        [
            np.asarray(Image.fromarray(m.astype(np.uint8)).resize((map_size,) * 2, Image.NEAREST))
            for m in masks
        ]
    ).astype(bool)
    assert pixel_auroc(masks, maps) == pixel_auroc(resized, maps)


# --- AUPRO: hand-built curves ------------------------------------------------------------


def diagonal_pro_case(n: int = 10):
    """One region of n pixels and n normal pixels scored 1..n each: PRO = FPR exactly.

    Row 0 is the region (connected), row 1 is normal; at threshold k, n - k + 1 pixels
    of each are detected, so the curve is the points (j / n, j / n).
    """
    masks = np.zeros((1, 2, n), dtype=bool)
    masks[0, 0] = True
    maps = np.tile(np.arange(1.0, n + 1), (1, 2, 1))
    return masks, maps


@pytest.mark.parametrize("fpr_limit", [0.3, 0.25, 0.05, 1.0, 0.73])
def test_aupro_of_the_diagonal_curve_is_half_the_limit(fpr_limit):
    # integral of x from 0 to L is L**2 / 2; normalised by L gives L / 2. Limits between
    # curve points (0.25, 0.05, 0.73) need the interpolated end point.
    masks, maps = diagonal_pro_case()
    assert aupro(masks, maps, fpr_limit=fpr_limit) == pytest.approx(fpr_limit / 2)


def test_aupro_averages_over_regions_not_pixels():
    # A 4-pixel region found before any normal pixel, a 1-pixel region found last:
    # PRO = (1 + 0) / 2 up to FPR 1, so AUPRO = 0.5 (pixel recall would give 0.8).
    masks = np.zeros((1, 5, 5), dtype=bool)
    masks[0, :2, :2] = True
    masks[0, 4, 4] = True
    maps = np.full((1, 5, 5), 0.5)
    maps[0, :2, :2] = 1.0
    maps[0, 4, 4] = 0.0
    assert aupro(masks, maps) == pytest.approx(0.5)


def test_aupro_regions_are_eight_connected():
    # (0, 0) touches (1, 1) diagonally, which touches (1, 2): one region of 3 pixels,
    # one of them found first, so PRO = 1/3 (4-connectivity would give 2 regions: 1/2).
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True
    maps = np.full((1, 4, 4), 0.5)
    maps[0, 0, 0] = 1.0
    maps[0, 1, 1] = maps[0, 1, 2] = 0.0
    assert aupro(masks, maps) == pytest.approx(1 / 3)


def test_aupro_regions_never_join_across_images():
    # Overlapping positions in two images are two regions: (1 + 0) / 2, not 1 / 4.
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 1, 1] = True
    masks[1, 1, 1:4] = True
    maps = np.full((2, 4, 4), 0.5)
    maps[0, 1, 1] = 1.0
    maps[1, 1, 1:4] = 0.0
    assert aupro(masks, maps) == pytest.approx(0.5)


def test_aupro_is_one_when_every_region_scores_above_every_normal_pixel():
    masks, _ = random_masks_and_maps(0)
    maps = masks + np.random.default_rng(0).uniform(0, 0.9, masks.shape)
    assert aupro(masks, maps) == pytest.approx(1.0)


def brute_force_pro_curve(masks, maps):
    """FPR and PRO at every distinct threshold, one image and one region at a time."""
    regions = []
    for image, mask in enumerate(masks):
        labelled, n_regions = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(image, labelled == k) for k in range(1, n_regions + 1)]
    normal_scores = maps[~masks]
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        fprs.append(np.mean(normal_scores >= threshold))
        pros.append(np.mean([np.mean(maps[i][r] >= threshold) for i, r in regions]))
    return np.array(fprs + [1.0]), np.array(pros + [1.0])


@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("seed", [0, 1])
def test_aupro_to_fpr_one_equals_the_area_of_a_brute_force_pro_curve(seed, decimals):
    masks, maps = random_masks_and_maps(seed, shape=(3, 9, 8), decimals=decimals)
    fprs, pros = brute_force_pro_curve(masks, maps)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(trapezoid(pros, fprs))


# --- bad input -------------------------------------------------------------------------


def test_auroc_of_a_single_class_is_refused():
    with pytest.raises(ValueError, match="only normal samples"):
        image_auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="only anomalous samples"):
        pixel_auroc(np.ones((1, 2, 2)), np.zeros((1, 2, 2)))


@pytest.mark.parametrize("metric", [pixel_auroc, aupro])
def test_nan_in_maps_is_refused(metric):
    masks, maps = random_masks_and_maps(0)
    maps[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        metric(masks, maps)


def test_nan_in_image_scores_is_refused():
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0, 1], [0.1, np.nan])


@pytest.mark.parametrize("metric", [pixel_auroc, aupro])
def test_masks_and_maps_with_other_image_counts_are_refused(metric):
    masks, maps = random_masks_and_maps(0)
    with pytest.raises(ValueError, match="do not match"):
        metric(masks[:-1], maps)


def test_image_scores_of_the_wrong_length_are_refused():
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        image_auroc([0, 1, 1], [0.1, 0.2])


@pytest.mark.parametrize("metric", [pixel_auroc, aupro])
def test_pixel_metrics_refuse_image_labels(metric):
    with pytest.raises(ValueError, match=r"Pixel masks of shape \(n, H, W\)"):
        metric(np.array([0, 1]), np.zeros((2, 3, 3)))


def test_plus_minus_one_labels_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="y == -1"):
        image_auroc([1, -1, 1], [0.1, 0.9, 0.2])


def test_0_255_masks_are_refused_with_the_fix():
    masks, maps = random_masks_and_maps(0)
    with pytest.raises(ValueError, match="masks > 0"):
        pixel_auroc(masks * 255, maps)


def test_aupro_without_an_anomalous_region_is_refused():
    with pytest.raises(ValueError, match="no anomalous region"):
        aupro(np.zeros((2, 4, 4)), np.random.default_rng(0).normal(size=(2, 4, 4)))


def test_aupro_without_a_normal_pixel_is_refused():
    with pytest.raises(ValueError, match="no normal pixel"):
        aupro(np.ones((2, 4, 4)), np.random.default_rng(0).normal(size=(2, 4, 4)))


@pytest.mark.parametrize("fpr_limit", [0, -0.1, 1.5, "0.3"])
def test_aupro_refuses_fpr_limits_outside_zero_one(fpr_limit):
    masks, maps = diagonal_pro_case()
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=fpr_limit)


# --- scorers ---------------------------------------------------------------------------


def shifted_feature_squares(n_normal=12, n_anomalous=4, seed=0):
    """Features (n, d, 4, 4) with one shifted grid cell per anomalous image.

    The masks are given on the 4 x 4 feature grid; the detector's 16 x 16 maps make the
    scorers resize them.
    """
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_normal + n_anomalous, 3, 4, 4)).astype(np.float32)
    masks = np.zeros((len(X), 4, 4), dtype=bool)
    for i in range(n_normal, len(X)):
        row, col = rng.integers(0, 4, size=2)
        masks[i, row, col] = True
        X[i, :, row, col] += 4.0
    return X, masks


def test_scorers_in_a_scoring_dict_equal_the_metrics_fold_by_fold():
    X, masks = shifted_feature_squares()
    cv = NormalTrainSplit(n_splits=3)
    scoring = {"image": image_auroc_scorer, "pixel": pixel_auroc_scorer, "aupro": aupro_scorer}
    results = cross_validate(PadimDetector(), X, masks, scoring=scoring, cv=cv)

    for fold, (train, test) in enumerate(cv.split(X, masks)):
        detector = PadimDetector().fit(X[train])
        maps = detector.score_samples(X[test])
        expected_masks = masks[test].repeat(4, axis=1).repeat(4, axis=2)  # 4 x 4 -> 16 x 16
        labels = masks[test].any(axis=(1, 2))
        assert results["test_image"][fold] == pytest.approx(
            roc_auc_score(labels, maps.max(axis=(1, 2)))
        )
        assert results["test_pixel"][fold] == pytest.approx(
            roc_auc_score(expected_masks.ravel(), maps.ravel())
        )
        assert results["test_aupro"][fold] == pytest.approx(aupro(expected_masks, maps))


def test_image_auroc_scorer_takes_image_labels():
    X, masks = shifted_feature_squares()
    detector = PadimDetector().fit(X[:8])
    labels = masks.any(axis=(1, 2)).astype(int)
    expected = roc_auc_score(labels[8:], detector.decision_function(X[8:]))
    assert image_auroc_scorer(detector, X[8:], labels[8:]) == pytest.approx(expected)
