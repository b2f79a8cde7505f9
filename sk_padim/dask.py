"""Fit and score PaDiM pipelines on a Dask cluster.

PaDiM's fit is a sum: the per-position counts, means and scatter matrices of any split of
the training images merge exactly into those of the whole set
(:meth:`PadimDetector.merge`). :func:`fit_distributed` therefore fits one partial
detector per partition of image paths on the workers and merges the partials pairwise on
the cluster (a binary tree); only model-sized objects travel, never features.
:func:`score_distributed` scores partitions in parallel and returns the image scores as a
Dask array, optionally writing each image's anomaly map to a ``.npy`` file.

Both take a :class:`dask.distributed.Client` that the caller creates, connected to a
``LocalCluster`` or to a remote scheduler; see ``docs/scale_out.md`` for the recipe,
including grid searches with ``joblib.parallel_backend("dask")``.

This module needs the ``dask`` extra (``pip install 'sk-padim[dask]'``) and is not
imported by ``import sk_padim``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Sequence
from numbers import Integral

import numpy as np
from sklearn.base import clone
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

try:
    import dask.array as da
    from distributed import Client
except ImportError as error:  # pragma: no cover - exercised in a test with dask hidden
    raise ImportError(
        "sk_padim.dask needs Dask's distributed scheduler; install it with "
        "pip install 'sk-padim[dask]' (or pip install 'dask[distributed]')."
    ) from error

from sk_padim.detector import PadimDetector
from sk_padim.features import PatchFeatureTransformer

__all__ = ["fit_distributed", "score_distributed"]


def fit_distributed(
    pipeline: Pipeline,
    paths,
    client: Client,
    *,
    partition_size: int = 128,
    retries: int = 0,
) -> Pipeline:
    """Fit a ``[PatchFeatureTransformer, PadimDetector]`` pipeline on a Dask cluster.

    The transformer learns nothing from images, so it is fitted here, once, and
    broadcast to the workers with the backbone's weights inside it (workers need no
    model hub). Each task transforms one partition of ``paths`` and returns a partial
    detector fitted on it (a model-sized object); the partials are merged pairwise on the
    cluster with :meth:`PadimDetector.merge`, and only the final model comes back. A
    worker never holds more than one partition's features plus two models. The fitted
    detector equals ``pipeline.fit`` on the same images to float32 rounding, whatever
    ``partition_size`` and the number of workers; the merge tree is fixed by the order of
    ``paths``, so reruns give the same model.

    **Threshold**: as with :func:`sk_padim.fit_streaming`, the training images are not
    scored a second time, so ``threshold_`` is set only from the detector's explicit
    ``threshold`` parameter; otherwise it is left unset and ``predict`` raises until you
    set ``threshold`` or calibrate (:class:`sk_padim.F1ThresholdCalibrator`).

    **Failures**: a task that raises is retried up to ``retries`` times (tasks are
    deterministic, so a retried fit gives the same model); a worker that dies has its
    tasks rerun by Dask. If a partition still fails, a ``RuntimeError`` names it and the
    pipeline is left unchanged: no partition is ever skipped.

    Parameters
    ----------
    pipeline : Pipeline
        Two steps: a :class:`PatchFeatureTransformer` then a :class:`PadimDetector`.
        On success both steps are replaced by fitted copies (as ``Pipeline.fit`` does
        with ``memory=...``); read them back with ``pipeline[0]``, ``pipeline[-1]`` or
        ``named_steps``.
    paths : sequence of str or os.PathLike
        Image files of normal parts, readable **by the workers** at these paths (use
        absolute paths on a shared file system).
    client : dask.distributed.Client
        Client of the cluster to run on.
    partition_size : int, default=128
        Images per task. A task holds ``partition_size * d * h * w * 4`` bytes of
        features (1.25 MB per image for ResNet-18, d=100 at 224 px) besides the model;
        more partitions mean more parallelism and more (cheap) merges.
    retries : int, default=0
        Times Dask reruns a task that raised, for transient failures (a flaky network
        file system).

    Returns
    -------
    pipeline : Pipeline
        The same pipeline object, fitted.

    See Also
    --------
    score_distributed : Score images on the cluster.
    sk_padim.fit_streaming : The same fit on one machine.

    Examples
    --------
    >>> from dask.distributed import Client, LocalCluster  # doctest: +SKIP
    >>> client = Client(LocalCluster(n_workers=2, threads_per_worker=1))  # doctest: +SKIP
    >>> pipe = Pipeline([("feat", PatchFeatureTransformer()), ("padim", PadimDetector())])
    ... # doctest: +SKIP
    >>> fit_distributed(pipe, good_paths, client, partition_size=64)  # doctest: +SKIP
    >>> scores = score_distributed(pipe, test_paths, client).compute()  # doctest: +SKIP
    """
    (feat_name, feat), (detector_name, detector) = _check_pipeline(pipeline, "fit_distributed")
    paths = _check_paths(paths)
    partition_size = _check_count(partition_size, "partition_size", minimum=1)
    retries = _check_count(retries, "retries", minimum=0)
    _check_client(client)
    detector.check_params()

    fitted_feat = clone(feat).fit()
    # Partials keep float32 covariances whatever the final storage, so that a float16
    # model is rounded once, at the end, as a single-machine fit is.
    template = clone(detector).set_params(covariance_dtype="float32")
    token = uuid.uuid4().hex[:8]
    feat_future = client.scatter(fitted_feat, broadcast=True, hash=False)
    parts = _partitions(len(paths), partition_size)
    futures = [
        client.submit(
            _fit_partition,
            feat_future,
            template,
            paths[part],
            index,
            len(parts),
            part.start,
            key=f"padim-fit-partition-{token}-{index}",
            retries=retries,
        )
        for index, part in enumerate(parts)
    ]
    level, depth = list(futures), 0
    while len(level) > 1:
        merged = [
            client.submit(
                _merge,
                level[i],
                level[i + 1],
                key=f"padim-fit-merge-{token}-{depth}-{i // 2}",
                retries=retries,
            )
            for i in range(0, len(level) - 1, 2)
        ]
        futures += merged
        level = merged + level[len(level) - len(level) % 2 :]
        depth += 1
    try:
        model = level[0].result()
    except Exception as error:
        with contextlib.suppress(Exception):  # the cluster may be what failed
            client.cancel([*futures, feat_future])
        hint = "" if retries else " Pass retries=N to retry transient failures."
        raise RuntimeError(
            f"fit_distributed failed, so the pipeline is unchanged. "
            f"{type(error).__name__}: {error}.{hint}"
        ) from error
    finally:
        del futures, level

    if detector.covariance_dtype == template.covariance_dtype:
        final = model  # merge() kept the template's parameters, which are the user's
    else:
        final = clone(detector).set_statistics(model.statistics(), model.feature_shape_)
    pipeline.steps[0] = (feat_name, fitted_feat)
    pipeline.steps[1] = (detector_name, final)
    return pipeline


def score_distributed(
    pipeline: Pipeline,
    paths,
    client: Client,
    *,
    partition_size: int = 128,
    heatmap_dir: str | os.PathLike | None = None,
    retries: int = 0,
) -> da.Array:
    """Image anomaly scores of many image files, computed on a Dask cluster.

    The fitted pipeline is broadcast to the workers once; each task scores one partition
    of ``paths``. The tasks are submitted at once and run in the background; the
    returned Dask array is backed by their results, in the order of ``paths``.
    Scores equal ``pipeline.decision_function(paths)`` (higher means more anomalous).

    Parameters
    ----------
    pipeline : Pipeline
        A fitted ``[PatchFeatureTransformer, PadimDetector]`` pipeline.
    paths : sequence of str or os.PathLike
        Image files, readable by the workers at these paths.
    client : dask.distributed.Client
        Client of the cluster to run on.
    partition_size : int, default=128
        Images per task; the chunk size of the returned array.
    heatmap_dir : str, os.PathLike or None, default=None
        If given, each task also writes every image's anomaly map (``score_samples``,
        ``(H, W)`` float32) with ``np.save`` to
        ``heatmap_dir/<path relative to the images' common folder, extension .npy>``,
        e.g. ``good/000.png`` -> ``heatmap_dir/good/000.npy``. The folder must be
        writable by the workers (a shared file system for a remote cluster). Files are
        written atomically (temporary file, then rename), so a retried task leaves no
        partial file. Two paths that would give the same file name are an error.
    retries : int, default=0
        Times Dask reruns a task that raised.

    Returns
    -------
    scores : dask.array.Array of shape (n,), float32
        Chunked by partition. ``scores.compute()`` waits for and gathers them; errors
        in a partition are raised there, naming the partition.

    Examples
    --------
    >>> scores = score_distributed(pipe, paths, client, heatmap_dir="/shared/maps")
    ... # doctest: +SKIP
    >>> scores.compute()  # doctest: +SKIP
    """
    (_, feat), (_, detector) = _check_pipeline(pipeline, "score_distributed")
    check_is_fitted(feat)
    check_is_fitted(detector)
    paths = _check_paths(paths)
    partition_size = _check_count(partition_size, "partition_size", minimum=1)
    retries = _check_count(retries, "retries", minimum=0)
    _check_client(client)
    targets = None
    if heatmap_dir is not None:
        if not isinstance(heatmap_dir, (str, os.PathLike)):
            raise TypeError(
                f"heatmap_dir must be a folder path or None; got {type(heatmap_dir).__name__}."
            )
        root = os.fspath(heatmap_dir)
        targets = [os.path.join(root, name) for name in _heatmap_names(paths)]

    token = uuid.uuid4().hex[:8]
    pipeline_future = client.scatter(pipeline, broadcast=True, hash=False)
    parts = _partitions(len(paths), partition_size)
    chunks = []
    for index, part in enumerate(parts):
        future = client.submit(
            _score_partition,
            pipeline_future,
            paths[part],
            None if targets is None else targets[part],
            index,
            len(parts),
            part.start,
            key=f"padim-score-partition-{token}-{index}",
            retries=retries,
        )
        chunks.append(da.from_delayed(future, shape=(part.stop - part.start,), dtype=np.float32))
    return da.concatenate(chunks)


def _fit_partition(feat, template, paths, index, n_parts, start):
    try:
        features = feat.transform(paths)
        return clone(template).partial_fit(features)
    except Exception as error:
        raise RuntimeError(
            _partition_failure("Fitting", index, n_parts, start, paths, error)
        ) from error


def _merge(left: PadimDetector, right: PadimDetector) -> PadimDetector:
    return left.merge(right)


def _score_partition(pipeline, paths, targets, index, n_parts, start):
    try:
        if targets is None:
            return np.asarray(pipeline.decision_function(paths), dtype=np.float32)
        maps = pipeline.score_samples(paths)
        for anomaly_map, target in zip(maps, targets, strict=True):
            _save_atomically(target, anomaly_map)
        return maps.max(axis=(1, 2)).astype(np.float32, copy=False)
    except Exception as error:
        raise RuntimeError(
            _partition_failure("Scoring", index, n_parts, start, paths, error)
        ) from error


def _partition_failure(action, index, n_parts, start, paths, error) -> str:
    return (
        f"{action} partition {index + 1} of {n_parts} (images {start} to "
        f"{start + len(paths) - 1} of paths) failed: {type(error).__name__}: {error}"
    )


def _save_atomically(target: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    temporary = f"{target}.{uuid.uuid4().hex}.tmp"
    try:
        with open(temporary, "wb") as file:
            np.save(file, array)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _heatmap_names(paths: list) -> list[str]:
    """Paths relative to their common folder, extension replaced by ``.npy``."""
    full = [os.path.abspath(os.fspath(path)) for path in paths]
    base = os.path.commonpath([os.path.dirname(path) for path in full])
    names = [os.path.splitext(os.path.relpath(path, base))[0] + ".npy" for path in full]
    owners: dict[str, str] = {}
    for path, name in zip(full, names, strict=True):
        if owners.setdefault(name, path) != path:
            raise ValueError(
                f"Images {owners[name]!r} and {path!r} would both write the heat map "
                f"{name!r}; rename one of them (they differ only by extension)."
            )
    return names


def _partitions(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _check_pipeline(pipeline, caller: str):
    steps = getattr(pipeline, "steps", None)
    if (
        not isinstance(pipeline, Pipeline)
        or len(steps) != 2
        or not isinstance(steps[0][1], PatchFeatureTransformer)
        or not isinstance(steps[1][1], PadimDetector)
    ):
        raise TypeError(
            f"{caller} needs Pipeline([(name, PatchFeatureTransformer(...)), "
            f"(name, PadimDetector(...))]); got {pipeline!r}."
        )
    return steps[0], steps[1]


def _check_paths(paths) -> list:
    if isinstance(paths, (str, os.PathLike)):
        raise TypeError("paths must be a list of image file paths; wrap a single path as [path].")
    if isinstance(paths, np.ndarray) and paths.dtype.kind in "US":
        paths = paths.tolist()
    if isinstance(paths, np.ndarray) or not isinstance(paths, Sequence):
        raise TypeError(
            "paths must be a list of image file paths (str or os.PathLike) that the workers "
            f"can read; got {type(paths).__name__}. For images already in memory use "
            "Pipeline.fit or sk_padim.fit_streaming."
        )
    items = list(paths)
    if not items:
        raise ValueError("Got an empty list of paths; pass at least one image file.")
    for index, item in enumerate(items):
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(
                f"paths[{index}] is a {type(item).__name__}, not a file path; the workers "
                "read the images themselves, so pass paths (str or os.PathLike). For images "
                "already in memory use Pipeline.fit or sk_padim.fit_streaming."
            )
    return items


def _check_count(value, name: str, minimum: int) -> int:
    if not isinstance(value, Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}.")
    return int(value)


def _check_client(client) -> None:
    if not isinstance(client, Client):
        raise TypeError(
            "client must be a dask.distributed.Client, e.g. Client('tcp://scheduler:8786') "
            f"or Client(LocalCluster()); got {type(client).__name__}."
        )
    if client.status not in ("running", "connecting", "newly-created"):
        raise ValueError(f"The Dask client is {client.status}; pass a connected client.")
