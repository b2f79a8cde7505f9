"""The evaluation harness: one scoring pass, metrics equal to scikit-learn's, reports."""

import csv

import numpy as np
import pytest
from PIL import Image
from sklearn.base import BaseEstimator
from sklearn.metrics import roc_auc_score

from sk_padim import make_defect_textures, write_mvtec_layout
from sk_padim.datasets import load_mvtec_category
from sk_padim.evaluation import (
    Category,
    CategoryResult,
    evaluate,
    maps_and_scores,
    padim_pipeline,
    results_table,
    write_results,
)
from sk_padim.heatmaps import heatmap_writer


class MapIsImage(BaseEstimator):
    """A stand-in detector whose anomaly map of an image is the image itself."""

    def fit(self, X, y=None):
        self.n_fitted_ = len(X)
        return self

    def score_samples(self, X):
        type(self).calls += 1
        return np.asarray(X, dtype=float)

    calls = 0


def test_maps_and_scores_equal_score_samples_and_decision_function():
    X = np.random.default_rng(0).integers(0, 256, size=(7, 32, 32, 3), dtype=np.uint8)
    pipe = padim_pipeline(weights=None, image_size=32, n_features=8, random_state=0)
    pipe.fit(X[:5])
    maps, scores = maps_and_scores(pipe, X[5:])
    np.testing.assert_array_equal(maps, pipe.score_samples(X[5:]))
    np.testing.assert_array_equal(scores, pipe.decision_function(X[5:]))


def test_maps_and_scores_score_the_images_once():
    MapIsImage.calls = 0
    images = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    maps, scores = maps_and_scores(MapIsImage().fit(images), images)
    assert MapIsImage.calls == 1
    np.testing.assert_array_equal(maps, images)
    np.testing.assert_array_equal(scores, [11, 23])


@pytest.fixture
def categories():
    """Two categories whose images are their own maps: defects are the bright pixels."""
    rng = np.random.default_rng(0)
    data = {}
    for name in ("a", "b"):
        X_test = rng.uniform(0, 0.5, size=(6, 8, 8))
        masks = np.zeros((6, 8, 8), dtype=bool)
        masks[3:, 2:4, 2:4] = True
        X_test[masks] += rng.uniform(0, 0.5, size=masks.sum())
        kinds = np.array(["good"] * 3 + ["crack"] * 3)
        data[name] = Category(name, X_test[:2], X_test, (kinds != "good").astype(int), masks, kinds)
    return data


def test_evaluate_measures_each_category_like_scikit_learn(categories, tmp_path):
    results = evaluate(MapIsImage(), ["b", "a"], categories.__getitem__)
    assert [result.category for result in results] == ["b", "a"]
    for result in results:
        category = categories[result.category]
        X = category.X_test
        assert (result.n_train, result.n_test) == (2, 6)
        assert result.image_auroc == pytest.approx(roc_auc_score(category.y_test, X.max((1, 2))))
        assert result.pixel_auroc == pytest.approx(
            roc_auc_score(category.masks_test.ravel(), X.ravel())
        )
        assert 0 <= result.aupro <= 1
        assert result.fit_seconds > 0 and result.score_seconds > 0


def test_evaluate_writes_results_and_one_picture_per_defect_type(categories, tmp_path):
    results = evaluate(
        MapIsImage(),
        ["a"],
        categories.__getitem__,
        output=tmp_path,
        on_scored=heatmap_writer(tmp_path / "heatmaps", 1),
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "heatmaps",
        "results.csv",
        "results.md",
    ]  # no temporary file left
    with open(tmp_path / "results.csv") as file:
        (row,) = csv.DictReader(file)
    assert float(row["image_auroc"]) == results[0].image_auroc
    assert (tmp_path / "results.md").read_text() == results_table(results) + "\n"
    pictures = sorted(path.name for path in (tmp_path / "heatmaps" / "a").iterdir())
    assert pictures == ["crack_000.png", "good_000.png", "regions.jsonl"]
    with Image.open(tmp_path / "heatmaps" / "a" / "crack_000.png") as png:
        assert png.size == (900, 360)  # three panels: the F1 threshold is drawn


def test_on_scored_gets_each_category_its_maps_and_masks_at_the_maps_size(categories):
    seen = []
    evaluate(MapIsImage(), ["b", "a"], categories.__getitem__, on_scored=lambda *a: seen.append(a))
    assert [category.name for category, _, _ in seen] == ["b", "a"]
    for category, maps, masks in seen:
        np.testing.assert_array_equal(maps, category.X_test)
        np.testing.assert_array_equal(masks, category.masks_test)


def test_results_table_adds_a_mean_row_with_totals():
    results = [
        CategoryResult("x", 10, 4, 0.5, 0.7, 0.2, 1.0, 2.0),
        CategoryResult("y", 30, 6, 1.0, 0.9, 0.4, 3.0, 3.0),
    ]
    lines = results_table(results).splitlines()
    assert len(lines) == 5
    cells = [cell.strip() for cell in lines[-1].strip("|").split("|")]
    # mean metrics; total counts and times; throughput = total images / total seconds
    assert cells == ["mean", "40", "10", "0.750", "0.800", "0.300", "4.0", "10.0", "5.0", "2.0"]


def test_write_results_keeps_full_precision(tmp_path):
    result = CategoryResult("x", 3, 7, 1 / 3, 2 / 3, 0.1, 0.3, 0.7)
    csv_path, markdown_path = write_results([result], tmp_path / "new")
    with open(csv_path) as file:
        (row,) = csv.DictReader(file)
    assert float(row["image_auroc"]) == 1 / 3
    assert float(row["score_images_per_second"]) == 7 / 0.7
    assert markdown_path.read_text().splitlines()[2].startswith("| x ")


def test_padim_pipeline_puts_both_steps_on_the_device():
    pipe = padim_pipeline(device="cpu", n_features=20, weights=None)
    assert [name for name, _ in pipe.steps] == ["feat", "padim"]
    params = pipe.get_params()
    assert params["feat__device"] == params["padim__device"] == "cpu"
    assert params["feat__n_features"] == 20 and params["feat__weights"] is None


def test_load_mvtec_category_reads_masks_with_another_suffix(tmp_path):
    data = make_defect_textures(
        "grass", image_size=32, n_train=2, n_test_good=1, n_test_defective=2, random_state=0
    )
    root = write_mvtec_layout(data, tmp_path)
    for mask in (root / "grass" / "ground_truth").rglob("*_mask.png"):
        mask.rename(mask.with_name(mask.name.replace("_mask", "")))
    category = load_mvtec_category(root, "grass", mask_suffix=".png")
    np.testing.assert_array_equal(category.masks_test, data.grass.masks_test)
    np.testing.assert_array_equal(category.y_test, data.grass.y_test)
    assert len(category.X_train) == 2
