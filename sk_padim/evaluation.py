"""The evaluation harness: fit and evaluate a pipeline category by category.

For each category of an anomaly detection dataset (:class:`Category`: normal training
images, labelled test images and their defect masks), :func:`evaluate` fits a clone of
a pipeline on the normal images, scores the test images once (:func:`maps_and_scores`)
and measures image AUROC, pixel AUROC and AUPRO (:class:`CategoryResult`).
:func:`results_table` and :func:`write_results` report the results. ``sk-padim
evaluate`` and ``sk-padim demo`` are thin wrappers around :func:`evaluate`.

This module returns numbers; it draws nothing and reads no dataset layout. The front
does: :func:`sk_padim.datasets.load_mvtec_category` reads a category, and
:func:`sk_padim.heatmaps.heatmap_writer` writes pictures of each category's maps when
passed as
``evaluate(..., on_scored=...)``.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.base import clone
from sklearn.pipeline import Pipeline
from tqdm.auto import tqdm

from sk_padim._checks import pixel_masks
from sk_padim.detector import PadimDetector
from sk_padim.features import PatchFeatureTransformer
from sk_padim.files import atomic_file
from sk_padim.metrics import aupro, image_auroc, pixel_auroc

__all__ = [
    "Category",
    "CategoryResult",
    "evaluate",
    "maps_and_scores",
    "padim_pipeline",
    "results_table",
    "write_results",
]


@dataclass(frozen=True)
class Category:
    """One category of an anomaly detection dataset: normal training images, labelled tests.

    Parameters
    ----------
    name : str
        Category name, e.g. ``"bottle"``.
    X_train : ndarray or list
        Normal training images, in any form the estimators take (array, file paths).
    X_test : ndarray or list
        Test images.
    y_test : ndarray of shape (n_test,)
        1 for defective test images, 0 for normal ones.
    masks_test : ndarray of shape (n_test, H, W) or list of (H_i, W_i) arrays
        Ground-truth defect masks of the test images.
    defect_types_test : ndarray of shape (n_test,)
        ``"good"`` or the defect type of each test image.

    See Also
    --------
    evaluate : Fit and evaluate a pipeline on categories.

    Examples
    --------
    >>> from sk_padim import make_defect_textures
    >>> from sk_padim.evaluation import Category
    >>> data = make_defect_textures("brick", n_train=5, random_state=0)
    >>> brick = Category.from_textures("brick", data.brick)
    >>> len(brick.X_train), len(brick.X_test), int(brick.y_test.sum())
    (5, 30, 20)
    """

    name: str
    X_train: np.ndarray | list
    X_test: np.ndarray | list
    y_test: np.ndarray
    masks_test: np.ndarray | list
    defect_types_test: np.ndarray

    @classmethod
    def from_textures(cls, name: str, bunch) -> Category:
        """A category of :func:`~sk_padim.make_defect_textures`.

        Parameters
        ----------
        name : str
            The category's name.
        bunch : Bunch
            ``make_defect_textures(...)[name]``.

        Returns
        -------
        category : Category

        Examples
        --------
        >>> from sk_padim import make_defect_textures
        >>> from sk_padim.evaluation import Category
        >>> data = make_defect_textures("grass", n_train=3, random_state=0)
        >>> Category.from_textures("grass", data.grass).masks_test.shape
        (30, 128, 128)
        """
        return cls(
            name,
            bunch.X_train,
            bunch.X_test,
            bunch.y_test,
            bunch.masks_test,
            bunch.defect_types_test,
        )


@dataclass(frozen=True)
class CategoryResult:
    """Evaluation of one category: the metrics and the time taken.

    Times are wall-clock seconds; ``fit_seconds`` includes loading the backbone, and
    ``score_seconds`` covers computing the anomaly maps and image scores of the test
    images (one backbone pass).

    Parameters
    ----------
    category : str
        The category's name (``"mean"`` in the summary row of :func:`results_table`).
    n_train, n_test : int
        Numbers of training and test images.
    image_auroc, pixel_auroc, aupro : float
        The metrics on the test images (:func:`~sk_padim.image_auroc`,
        :func:`~sk_padim.pixel_auroc`, :func:`~sk_padim.aupro`).
    fit_seconds, score_seconds : float
        Wall-clock times of the fit and of scoring the test images.

    Attributes
    ----------
    fit_images_per_second, score_images_per_second : float
        The throughputs, images over seconds.

    Examples
    --------
    >>> from sk_padim.evaluation import CategoryResult
    >>> result = CategoryResult("brick", 40, 30, 0.98, 0.98, 0.93, 2.0, 0.5)
    >>> result.fit_images_per_second, result.score_images_per_second
    (20.0, 60.0)
    """

    category: str
    n_train: int
    n_test: int
    image_auroc: float
    pixel_auroc: float
    aupro: float
    fit_seconds: float
    score_seconds: float

    @property
    def fit_images_per_second(self) -> float:
        return self.n_train / self.fit_seconds

    @property
    def score_images_per_second(self) -> float:
        return self.n_test / self.score_seconds


_COLUMNS = {  # CategoryResult field -> (table header, format)
    "category": ("category", "{}"),
    "n_train": ("train", "{}"),
    "n_test": ("test", "{}"),
    "image_auroc": ("image AUROC", "{:.3f}"),
    "pixel_auroc": ("pixel AUROC", "{:.3f}"),
    "aupro": ("AUPRO", "{:.3f}"),
    "fit_seconds": ("fit s", "{:.1f}"),
    "fit_images_per_second": ("fit img/s", "{:.1f}"),
    "score_seconds": ("score s", "{:.1f}"),
    "score_images_per_second": ("score img/s", "{:.1f}"),
}


def maps_and_scores(estimator, images) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly maps and image scores of a fitted estimator, scoring the images once.

    PaDiM's image score is the maximum of the image's anomaly map, so the scores are
    taken from the maps instead of running the backbone and the Gaussians a second
    time: they equal ``estimator.decision_function(images)``.

    Parameters
    ----------
    estimator : fitted estimator
        A Pipeline ending in a :class:`~sk_padim.PadimDetector` (or anything whose
        ``score_samples`` gives anomaly maps whose maximum is the image score).
    images : ndarray or list
        The images to score.

    Returns
    -------
    maps : ndarray of shape (n, H, W)
        ``estimator.score_samples(images)``, higher = more anomalous.
    scores : ndarray of shape (n,)
        The maximum of each map.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_padim.evaluation import maps_and_scores, padim_pipeline
    >>> X = np.random.default_rng(0).integers(0, 256, (6, 32, 32), dtype=np.uint8)
    >>> pipe = padim_pipeline(weights=None, image_size=32, random_state=0).fit(X[:5])
    >>> maps, scores = maps_and_scores(pipe, X[5:])
    >>> maps.shape, bool(np.array_equal(scores, pipe.decision_function(X[5:])))
    ((1, 32, 32), True)
    """
    maps = np.asarray(estimator.score_samples(images))
    return maps, maps.max(axis=(1, 2))


def evaluate(
    estimator: Pipeline,
    names: Sequence[str],
    load: Callable[[str], Category],
    *,
    output: str | os.PathLike | None = None,
    on_scored: Callable[[Category, np.ndarray, np.ndarray], object] | None = None,
    progress: bool = False,
) -> list[CategoryResult]:
    """Fit a clone of ``estimator`` on each category and evaluate it on its test images.

    Parameters
    ----------
    estimator : Pipeline
        Unfitted pipeline of a feature transformer and a :class:`~sk_padim.PadimDetector`.
    names : sequence of str
        The categories to evaluate, in order.
    load : callable
        ``load(name) -> Category``; called when the category's turn comes, so only one
        category is in memory at a time.
    output : str or path-like, default=None
        Folder for ``results.csv`` and ``results.md``; nothing is written if None.
    on_scored : callable, default=None
        Called as ``on_scored(category, maps, masks)`` once a category is scored, with
        its test maps ``(n_test, H, W)`` and its masks at the maps' size, e.g.
        :func:`sk_padim.heatmaps.heatmap_writer` to draw pictures of them.
    progress : bool, default=False
        Show a progress bar over the categories.

    Returns
    -------
    results : list of CategoryResult
        One per category, in the order of ``names``.

    See Also
    --------
    results_table : The results as a table.

    Examples
    --------
    >>> from sk_padim import make_defect_textures
    >>> from sk_padim.evaluation import Category, evaluate, padim_pipeline
    >>> data = make_defect_textures(("brick", "grass"), image_size=32, n_train=5,
    ...                             n_test_good=2, n_test_defective=2, random_state=0)
    >>> results = evaluate(
    ...     padim_pipeline(weights=None, image_size=32, random_state=0),
    ...     ["brick", "grass"],
    ...     lambda name: Category.from_textures(name, data[name]),
    ... )
    >>> [(result.category, result.n_train, result.n_test) for result in results]
    [('brick', 5, 4), ('grass', 5, 4)]
    """
    results = []
    bar = tqdm(names, desc="categories", unit="category", disable=not progress, leave=False)
    for name in bar:
        bar.set_postfix_str(name)
        category = load(name)
        result, maps, masks = _fit_and_score(estimator, category)
        results.append(result)
        if on_scored is not None:
            on_scored(category, maps, masks)
    if output is not None:
        write_results(results, output)
    return results


def _fit_and_score(estimator: Pipeline, category: Category):
    """The category's result, its test maps, and its masks at the maps' size."""
    fitted = clone(estimator)
    start = time.perf_counter()
    fitted.fit(category.X_train)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    maps, scores = maps_and_scores(fitted, category.X_test)
    score_seconds = time.perf_counter() - start
    masks = _masks_like(category.masks_test, maps.shape)
    result = CategoryResult(
        category=category.name,
        n_train=len(category.X_train),
        n_test=len(category.X_test),
        image_auroc=image_auroc(category.y_test, scores),
        pixel_auroc=pixel_auroc(masks, maps),
        aupro=aupro(masks, maps),
        fit_seconds=fit_seconds,
        score_seconds=score_seconds,
    )
    return result, maps, masks


def _masks_like(masks: np.ndarray | list, shape: tuple[int, ...]) -> np.ndarray:
    """Masks at the maps' size (nearest), also when the images' sizes differ."""
    if isinstance(masks, np.ndarray):
        return pixel_masks(masks, shape)
    return np.concatenate([pixel_masks(mask[None], (1, *shape[1:])) for mask in masks])


def results_table(results: Sequence[CategoryResult]) -> str:
    """The results as a Markdown table, which also reads well in a terminal.

    With several categories, a last row ``mean`` holds the means of the metrics and
    the totals of the counts and times (its throughputs are total images over total
    seconds).

    Parameters
    ----------
    results : sequence of CategoryResult
        The results of :func:`evaluate`, one per category.

    Returns
    -------
    table : str
        A Markdown table, one row per category (and a ``mean`` row for several).

    Examples
    --------
    >>> from sk_padim.evaluation import CategoryResult, results_table
    >>> print(results_table([CategoryResult("brick", 40, 30, 0.98, 0.98, 0.93, 2.0, 0.5)]))
    | category | train | test | image AUROC | pixel AUROC | AUPRO | fit s | fit img/s | score s | score img/s |
    |----------|------:|-----:|------------:|------------:|------:|------:|----------:|--------:|------------:|
    | brick    |    40 |   30 |       0.980 |       0.980 | 0.930 |   2.0 |      20.0 |     0.5 |        60.0 |
    """  # noqa: E501
    rows = [_cells(result) for result in results]
    if len(results) > 1:
        rows.append(_cells(_summary(results)))
    header = [title for title, _ in _COLUMNS.values()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    lines = [_table_line(cells, widths) for cells in [header, *rows]]
    return "\n".join([lines[0], rule, *lines[1:]])


def _cells(result: CategoryResult) -> list[str]:
    return [fmt.format(getattr(result, key)) for key, (_, fmt) in _COLUMNS.items()]


def _summary(results: Sequence[CategoryResult]) -> CategoryResult:
    """The ``mean`` row: means of the metrics, totals of the counts and times."""

    def total(key):
        return sum(getattr(result, key) for result in results)

    def mean(key):
        return float(np.mean([getattr(result, key) for result in results]))

    return CategoryResult(
        category="mean",
        n_train=total("n_train"),
        n_test=total("n_test"),
        image_auroc=mean("image_auroc"),
        pixel_auroc=mean("pixel_auroc"),
        aupro=mean("aupro"),
        fit_seconds=total("fit_seconds"),
        score_seconds=total("score_seconds"),
    )


def _table_line(cells: list[str], widths: list[int]) -> str:
    """A Markdown table row: the first column left-aligned, the numbers right-aligned."""
    padded = [cells[0].ljust(widths[0])]
    padded += [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
    return "| " + " | ".join(padded) + " |"


def write_results(
    results: Sequence[CategoryResult], folder: str | os.PathLike
) -> tuple[Path, Path]:
    """Write ``results.csv`` (one row per category, full precision) and ``results.md``.

    Parameters
    ----------
    results : sequence of CategoryResult
        The results of :func:`evaluate`, one per category.
    folder : str or path-like
        Created if needed; existing results files are replaced.

    Returns
    -------
    csv_path, markdown_path : pathlib.Path
        The files written: ``results.csv`` (full precision) and ``results.md``.

    Examples
    --------
    >>> import tempfile
    >>> from sk_padim.evaluation import CategoryResult, write_results
    >>> result = CategoryResult("brick", 40, 30, 0.98, 0.98, 0.93, 2.0, 0.5)
    >>> csv_path, _ = write_results([result], tempfile.mkdtemp())
    >>> print(csv_path.read_text(), end="")
    category,n_train,n_test,image_auroc,pixel_auroc,aupro,fit_seconds,fit_images_per_second,score_seconds,score_images_per_second
    brick,40,30,0.98,0.98,0.93,2.0,20.0,0.5,60.0
    """  # noqa: E501
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, markdown_path = folder / "results.csv", folder / "results.md"
    with atomic_file(csv_path) as file, io.TextIOWrapper(file, newline="") as text:
        writer = csv.DictWriter(text, fieldnames=list(_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows({key: getattr(r, key) for key in _COLUMNS} for r in results)
    with atomic_file(markdown_path) as file:
        file.write((results_table(results) + "\n").encode())
    return csv_path, markdown_path


def padim_pipeline(*, device: str = "auto", random_state=0, **feature_params) -> Pipeline:
    """An unfitted ``Pipeline([("feat", PatchFeatureTransformer), ("padim", PadimDetector)])``.

    Parameters
    ----------
    device : str, default="auto"
        Where both steps run.
    random_state : int, RandomState or None, default=0
        Seed of the transformer's random channel choice. Fixed by default, unlike
        ``PatchFeatureTransformer``'s ``None`` (scikit-learn's convention), so that the
        same call gives the same model and the same scores; None draws anew each fit.
    **feature_params
        Other parameters of :class:`~sk_padim.PatchFeatureTransformer`.

    Returns
    -------
    pipeline : Pipeline
        Unfitted; fit it on images of normal parts.

    Examples
    --------
    >>> from sk_padim.evaluation import padim_pipeline
    >>> pipe = padim_pipeline(backbone="resnet18", weights=None, device="cpu")
    >>> list(pipe.named_steps), pipe.get_params()["padim__device"]
    (['feat', 'padim'], 'cpu')
    >>> pipe.get_params()["feat__random_state"]
    0
    """
    features = PatchFeatureTransformer(device=device, random_state=random_state, **feature_params)
    return Pipeline([("feat", features), ("padim", PadimDetector(device=device))])
