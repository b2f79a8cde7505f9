"""Fit and score PaDiM pipelines on a Dask cluster.

PaDiM's fit is a sum: the per-position counts, means and scatter matrices of any split of
the training images merge exactly into those of the whole set
(:meth:`PadimDetector.merge`), and positions are independent of each other.
:func:`fit_distributed` gives each worker a contiguous share of the image paths, cut
into partitions, whose features it extracts. The grid's positions are shared out, one
range per worker: each range's owner makes the model of its range from every
partition's features there (or, with an explicit threshold, from every worker's
statistics of it) and computes the held-out distances behind the leave-one-out
``threshold_`` of a local fit. :func:`score_distributed` scores
partitions in parallel and returns the image scores as a Dask array, optionally writing
each image's anomaly map to a ``.npy`` file; :class:`DistributedScorer` does the same
call after call with the model sent to the workers once.

In every task torch uses the worker's share of its machine's cores (Dask's nannies
would leave it one thread), glibc keeps freed memory for reuse until the task ends
(see :mod:`sk_padim.allocator`), and image files are decoded in a background thread
while the backbone runs.

Both take a :class:`dask.distributed.Client` that the caller creates, connected to a
``LocalCluster`` or to a remote scheduler; see ``docs/scale_out.md`` for the recipe,
the scaling figures and how to size workers, including grid searches with
``joblib.parallel_backend("dask")``.

This module needs the ``dask`` extra (``pip install 'sk-padim[dask]'``) and is not
imported by ``import sk_padim``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import pickle
import uuid
from collections.abc import Sequence
from numbers import Integral

import numpy as np
import torch
from sklearn.base import clone
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

try:
    import dask.array as da
    from dask.sizeof import sizeof
    from dask.system import CPU_COUNT
    from distributed import Client, as_completed, get_worker
    from distributed.comm import get_address_host
except ImportError as error:  # pragma: no cover - exercised in a test with dask hidden
    raise ImportError(
        "sk_padim.dask needs Dask's distributed scheduler; install it with "
        "pip install 'sk-padim[dask]' (or pip install 'dask[distributed]')."
    ) from error

from sk_padim.allocator import freed_memory_kept
from sk_padim.detector import PadimDetector
from sk_padim.features import PatchFeatureTransformer
from sk_padim.gaussian import GaussianStatistics
from sk_padim.images import check_images, iter_batches

__all__ = ["DistributedScorer", "fit_distributed", "score_distributed"]

# Largest partition of a fit, in bytes of features (ResNet-18, d=100 at 224 px: about
# 200 images). Features stay on their worker until the threshold pass; Dask spills them
# to the worker's disk beyond its memory target, a partition at a time.
PARTITION_BYTES = 256 * 2**20


def fit_distributed(
    pipeline: Pipeline,
    paths,
    client: Client,
    *,
    partition_size: int | None = None,
    torch_threads: int | None = None,
    retries: int = 0,
) -> Pipeline:
    """Fit a ``[PatchFeatureTransformer, PadimDetector]`` pipeline on a Dask cluster.

    The transformer learns nothing from images, so it is fitted here, once, and
    broadcast to the workers with the backbone's weights inside it (workers need no
    model hub). Each worker gets a contiguous share of ``paths`` (in proportion to its
    threads), cut into partitions. A task per partition extracts its features, which
    stay on that worker. The positions of the feature grid are cut into one range per
    worker, and a range's owner makes the range's model (the factorisation is shared
    out, not repeated): from every partition's features of the range, which it
    receives, or, with an explicit ``threshold``, from every worker's statistics of it
    (each worker folds its partitions into its own statistics,
    :meth:`PadimDetector.accumulate`, and ships one partial, in pieces). The ranges'
    models come back and are joined (:meth:`PadimDetector.join_positions`); no
    model-sized object is sent to every worker. The fitted pipeline equals
    ``pipeline.fit`` on the same images to float32 rounding, ``threshold_`` included,
    whatever the partitions and the number of workers; the order of accumulation is
    fixed by the order of ``paths`` and the workers, so reruns on the same cluster give
    the same model.

    **Threshold**: with ``threshold=None`` the detector's ``threshold_`` is, as after
    :meth:`PadimDetector.fit`, the highest leave-one-out score of a training image
    (:meth:`PadimDetector.held_out_scores`): each range's owner computes the held-out
    distances of its range's features (:meth:`PadimDetector.held_out_distances`; the
    backbone runs once per image) while its model travels to the client, which makes
    the maps. An explicit ``threshold`` is used as it is, and each partition's features
    are released once folded.

    **Failures**: a task that raises is retried up to ``retries`` times (tasks are
    deterministic, so a retried fit gives the same model); a worker that dies has its
    tasks rerun by Dask on the others. If a partition still fails, a ``RuntimeError``
    names it and the pipeline is left unchanged: no partition is ever skipped.

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
    partition_size : int or None, default=None
        Images per task. ``None``: each worker's share in as few partitions as keep a
        partition's features under 256 MiB (about 200 images for ResNet-18, d=100 at
        224 px; ``d * h * w * 4`` bytes per image), and at least one per worker thread.
        Smaller partitions cost more small tasks (with an explicit ``threshold``, one
        merge of statistics each on their worker: about 0.1 s on one thread at that
        size), never more bytes.
    torch_threads : int or None, default=None
        Torch threads per task. ``None``: the worker's share of its machine's cores,
        ``dask.system.CPU_COUNT`` divided by the Dask threads of all the workers on
        that machine (at least 1), whatever ``OMP_NUM_THREADS`` Dask gave the worker.
        Each task restores the worker's setting when it ends.
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
    >>> fit_distributed(pipe, good_paths, client)  # doctest: +SKIP
    >>> pipe.predict(test_paths)  # doctest: +SKIP
    >>> scores = score_distributed(pipe, test_paths, client).compute()  # doctest: +SKIP
    """
    (feat_name, feat), (detector_name, detector) = _check_pipeline(pipeline, "fit_distributed")
    paths = _check_paths(paths)
    if partition_size is not None:
        partition_size = _check_count(partition_size, "partition_size", minimum=1)
    if torch_threads is not None:
        torch_threads = _check_count(torch_threads, "torch_threads", minimum=1)
    retries = _check_count(retries, "retries", minimum=0)
    _check_client(client)
    detector.check_params()

    fitted_feat = clone(feat).fit()
    workers = _workers(client)
    if partition_size is None:
        image_bytes = 4 * math.prod(fitted_feat.feature_shape_)
        partition_size = _fit_partition_size(len(paths), workers, image_bytes)
    # Partials keep float32 covariances whatever the final storage, so that a float16
    # model is rounded once, at the end, as a single-machine fit is.
    template = clone(detector).set_params(covariance_dtype="float32")
    storage = None if detector.covariance_dtype == "float32" else clone(detector)
    score = detector.threshold is None and len(paths) >= 2
    models, distances = _submit_fit(
        client,
        fitted_feat,
        template,
        storage,
        paths,
        _partitions(len(paths), partition_size),
        workers,
        torch_threads or _threads_per_host(workers),
        retries,
        score,
    )
    n_ranges, futures = len(models), models + distances
    del models, distances
    try:
        results = _gather_as_completed(futures)
    except Exception as error:
        with contextlib.suppress(Exception):  # the cluster may be what failed
            client.cancel(futures)  # and, with them, all they wait for
        hint = "" if retries else " Pass retries=N to retry transient failures."
        raise RuntimeError(
            f"fit_distributed failed, so the pipeline is unchanged. "
            f"{type(error).__name__}: {error}.{hint}"
        ) from error
    finally:
        del futures

    shape = fitted_feat.feature_shape_
    final = PadimDetector.join_positions(results[:n_ranges], shape)
    if storage is not None:
        final = storage.set_statistics(final.statistics(), shape)
    if score:  # what PadimDetector.fit sets: the highest held-out image score
        grids = np.concatenate(results[n_ranges:], axis=1)
        grids = torch.from_numpy(grids).view(len(paths), *shape[1:])
        # A batch of maps at a time: all n full-size maps at once would not fit for large n.
        batches = grids.split(template.batch_size)
        final.threshold_ = max(float(template.maps_of_distances(b)[1].max()) for b in batches)
    pipeline.steps[0] = (feat_name, fitted_feat)
    pipeline.steps[1] = (detector_name, final)
    return pipeline


def _gather_as_completed(futures) -> list:
    """The futures' results, in order, each fetched as soon as it is done
    (``client.gather`` waits for all of them before fetching any)."""
    order = {future.key: index for index, future in enumerate(futures)}
    results = [None] * len(futures)
    for future, result in as_completed(futures, with_results=True):
        results[order[future.key]] = result
    return results


def _submit_fit(
    client, feat, template, storage, paths, parts, workers, threads, retries, score
) -> tuple:
    """Submit the fit's tasks; return the futures of the ranges' models and distances.

    Per partition, a task extracts the features on the partition's worker. The
    positions are shared out in one range per worker. For the threshold (``score``),
    each partition's features of a range go to the range's owner, which makes the
    range's model from them and then their held-out distances: the features are needed
    there anyway, and with fewer images per worker than ``d`` they are fewer bytes than
    the statistics. Otherwise each worker's statistics of a range go to the range's
    owner (bytes independent of the number of images), and there are no distances. Only
    the returned futures are held, so Dask keeps each intermediate result just until
    the tasks that need it are done.
    """
    token = uuid.uuid4().hex[:8]

    def submit(function, *args, key, owner=None):
        # A loose restriction: the task runs on its owner, or elsewhere if it dies.
        where = {} if owner is None else {"workers": [owner], "allow_other_workers": True}
        return client.submit(
            function,
            threads,
            *args,
            key=f"padim-fit-{token}-{key}",
            retries=retries,
            **where,
        )

    # As pickled bytes: Dask serialises the module itself tensor by tensor, 4-20x slower.
    feat_future = client.scatter(pickle.dumps(feat), broadcast=True, hash=False)
    owners = _owners(len(parts), workers)
    features = [
        submit(
            _transform_partition,
            feat_future,
            paths[part],
            index,
            len(parts),
            part.start,
            key=f"features-{index}",
            owner=owner,
        )
        for index, (part, owner) in enumerate(zip(parts, owners, strict=True))
    ]
    d, h, w = feat.feature_shape_
    range_owners = list(dict.fromkeys(owners))[: h * w]
    ranges = np.array_split(np.arange(h * w), len(range_owners))
    ranges = [
        (slice(int(rows[0]), int(rows[-1]) + 1), (d, 1, len(rows)), owner)
        for rows, owner in zip(ranges, range_owners, strict=True)
    ]
    if score:
        return _ranges_on_features(submit, template, storage, features, owners, ranges)
    return _ranges_on_statistics(submit, template, features, owners, ranges), []


def _ranges_on_features(submit, template, storage, features, owners, ranges) -> tuple:
    """Per range, its owner's model from every partition's features of it, and then
    (a task of its own, so that the model travels to the client meanwhile) their
    held-out distances."""
    models, distances = [], []
    for k, (rows, shape, range_owner) in enumerate(ranges):
        slices = [
            submit(_features_range, part_features, rows, key=f"slice-{i}-{k}", owner=owner)
            for i, (part_features, owner) in enumerate(zip(features, owners, strict=True))
        ]
        model = submit(
            _fit_range_on_features, template, shape, *slices, key=f"range-{k}", owner=range_owner
        )
        models.append(model)
        distances.append(
            submit(
                _held_out_range,
                model,
                storage,
                shape,
                *slices,
                key=f"distances-{k}",
                owner=range_owner,
            )
        )
    return models, distances


def _ranges_on_statistics(submit, template, features, owners, ranges) -> list:
    """Each worker folds its partitions into one partial; per range, its owner's model
    from every worker's piece of it."""
    partials = {}
    for index, (extracted, owner) in enumerate(zip(features, owners, strict=True)):
        partials[owner] = submit(
            _fold, partials.get(owner), template, extracted, key=f"fold-{index}", owner=owner
        )
    return [
        submit(
            _fit_range_on_statistics,
            template,
            shape,
            *[
                submit(_statistics_range, partial, rows, key=f"split-{j}-{k}", owner=owner)
                for j, (owner, partial) in enumerate(partials.items())
            ],
            key=f"range-{k}",
            owner=range_owner,
        )
        for k, (rows, shape, range_owner) in enumerate(ranges)
    ]


def score_distributed(
    pipeline: Pipeline,
    paths,
    client: Client,
    *,
    partition_size: int | None = None,
    heatmap_dir: str | os.PathLike | None = None,
    torch_threads: int | None = None,
    retries: int = 0,
) -> da.Array:
    """Image anomaly scores of many image files, computed on a Dask cluster.

    The fitted transformer and detector are broadcast to the workers, the detector with
    its whitening factors (:meth:`PadimDetector.scoring_copy`: factorised once, on the
    client, and cached there for the next calls); each task scores one partition of
    ``paths``, a batch at a time (the next batch is decoded while the backbone runs on
    this one), so a task's memory does not grow with its partition. The tasks are
    submitted at once and run in the background, wherever a thread is free; the
    returned Dask array is backed by their results, in the order of ``paths``. Scores
    equal ``pipeline.decision_function(paths)`` (higher means more anomalous).

    The model is sent with every call; to score many sets of images with one model,
    send it once with :class:`DistributedScorer`.

    Parameters
    ----------
    pipeline : Pipeline
        A fitted ``[PatchFeatureTransformer, PadimDetector]`` pipeline.
    paths : sequence of str or os.PathLike
        Image files, readable by the workers at these paths.
    client : dask.distributed.Client
        Client of the cluster to run on.
    partition_size : int or None, default=None
        Images per task; the chunk size of the returned array. ``None``: about four
        partitions per worker thread, so that a slow worker delays the end by little,
        but at least the transformer's ``batch_size`` images.
    heatmap_dir : str, os.PathLike or None, default=None
        If given, each task also writes every image's anomaly map (``score_samples``,
        ``(H, W)`` float32) with ``np.save`` to
        ``heatmap_dir/<path relative to the images' common folder, extension .npy>``,
        e.g. ``good/000.png`` -> ``heatmap_dir/good/000.npy``. The folder must be
        writable by the workers (a shared file system for a remote cluster). Files are
        written atomically (temporary file, then rename), so a retried task leaves no
        partial file. Two paths that would give the same file name are an error.
    torch_threads : int or None, default=None
        Torch threads per task; ``None``: the worker's share of its machine's cores, as
        in :func:`fit_distributed`.
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
    _check_fitted_pipeline(pipeline, "score_distributed")
    _check_client(client)
    # Checked before the model is sent, so that bad arguments cost nothing.
    _score_options(paths, partition_size, heatmap_dir, torch_threads, retries)
    with DistributedScorer(pipeline, client) as scorer:
        return scorer.score(
            paths,
            partition_size=partition_size,
            heatmap_dir=heatmap_dir,
            torch_threads=torch_threads,
            retries=retries,
        )


class DistributedScorer:
    """A fitted pipeline kept on a Dask cluster's workers, to score images there call
    after call.

    :func:`score_distributed` sends the model from the client at each call: the
    transformer's weights and the detector's whitening factors, 74 MiB for ResNet-18
    (d=100) at 224 px and about 2 GB for Wide-ResNet-50-2 (d=550), which every worker
    then unpacks. A ``DistributedScorer`` sends them once, when it is made, to every
    worker, and the cluster keeps them until :meth:`close` (or the end of a ``with``
    block). Between calls, Dask's active memory manager (on by default) keeps a single
    copy: a worker without one fetches it from another worker at its first task of a
    call, and unpacks it again; the others keep theirs, unpacked. Workers that join
    later fetch it the same way. It holds a snapshot of the pipeline: refitting the
    pipeline afterwards does not change it. Any number of threads may call
    :meth:`score`.

    Parameters
    ----------
    pipeline : Pipeline
        A fitted ``[PatchFeatureTransformer, PadimDetector]`` pipeline.
    client : dask.distributed.Client
        Client of the cluster to run on.

    Examples
    --------
    >>> with DistributedScorer(pipe, client) as scorer:  # doctest: +SKIP
    ...     for paths in batches_of_paths:
    ...         scores = scorer.score(paths).compute()
    """

    def __init__(self, pipeline: Pipeline, client: Client):
        feat, detector = _check_fitted_pipeline(pipeline, "DistributedScorer")
        _check_client(client)
        _workers(client)  # a clear error for a cluster without workers, before sending
        self.client = client
        self._batch_size = feat.batch_size
        # The detector apart so that Dask knows its size (see _sizeof_detector); the
        # transformer as pickled bytes (as in fit_distributed).
        self._model = client.scatter(
            [pickle.dumps(feat), detector.scoring_copy()], broadcast=True, hash=False
        )

    def score(
        self,
        paths,
        *,
        partition_size: int | None = None,
        heatmap_dir: str | os.PathLike | None = None,
        torch_threads: int | None = None,
        retries: int = 0,
    ) -> da.Array:
        """Image anomaly scores of image files, as :func:`score_distributed` computes them.

        Parameters
        ----------
        paths, partition_size, heatmap_dir, torch_threads, retries
            As in :func:`score_distributed`.

        Returns
        -------
        scores : dask.array.Array of shape (n,), float32
        """
        model = self._model  # read once: another thread may close the scorer
        if model is None:
            raise ValueError("This DistributedScorer is closed; make a new one to score.")
        paths, partition_size, targets, torch_threads, retries = _score_options(
            paths, partition_size, heatmap_dir, torch_threads, retries
        )
        workers = _workers(self.client)
        threads = torch_threads or _threads_per_host(workers)
        if partition_size is None:
            n_slots = sum(workers.values())
            partition_size = max(self._batch_size, math.ceil(len(paths) / (4 * n_slots)))
        token = uuid.uuid4().hex[:8]
        parts = _partitions(len(paths), partition_size)
        chunks = []
        for index, part in enumerate(parts):
            future = self.client.submit(
                _score_partition,
                threads,
                *model,
                paths[part],
                None if targets is None else targets[part],
                index,
                len(parts),
                part.start,
                key=f"padim-score-partition-{token}-{index}",
                retries=retries,
            )
            chunks.append(
                da.from_delayed(future, shape=(part.stop - part.start,), dtype=np.float32)
            )
        return da.concatenate(chunks)

    def close(self) -> None:
        """Let the workers drop the model (once the tasks that need it are done)."""
        self._model = None

    def __enter__(self) -> DistributedScorer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _score_options(paths, partition_size, heatmap_dir, torch_threads, retries) -> tuple:
    """Checked scoring arguments, with the heat maps' file paths (or None)."""
    paths = _check_paths(paths)
    if partition_size is not None:
        partition_size = _check_count(partition_size, "partition_size", minimum=1)
    if torch_threads is not None:
        torch_threads = _check_count(torch_threads, "torch_threads", minimum=1)
    retries = _check_count(retries, "retries", minimum=0)
    targets = None
    if heatmap_dir is not None:
        if not isinstance(heatmap_dir, (str, os.PathLike)):
            raise TypeError(
                f"heatmap_dir must be a folder path or None; got {type(heatmap_dir).__name__}."
            )
        root = os.fspath(heatmap_dir)
        targets = [os.path.join(root, name) for name in _heatmap_names(paths)]
    return paths, partition_size, targets, torch_threads, retries


@sizeof.register(PadimDetector)
def _sizeof_detector(detector: PadimDetector) -> int:
    """Bytes of the fitted arrays: Dask weighs transfers and spills memory by this."""
    names = ("mean_", "packed_covariance_", "packed_factor_")
    return sum(getattr(detector, name).nbytes for name in names if hasattr(detector, name))


@sizeof.register(PatchFeatureTransformer)
def _sizeof_transformer(feat: PatchFeatureTransformer) -> int:
    """Bytes of the fitted backbone's weights (the rest is small)."""
    weights = feat.backbone_.state_dict().values() if hasattr(feat, "backbone_") else ()
    return sum(value.nbytes for value in weights)


@contextlib.contextmanager
def _task_settings(threads):
    """Run a task with ``threads`` torch threads (an int, or Dask threads per host) and
    freed memory kept for reuse, then restore the worker's settings.

    Torch's OpenMP thread count is per calling thread, so it is set in the task's own
    thread; Dask's nannies set ``OMP_NUM_THREADS=1``, which would leave it at one. They
    also set ``MALLOC_TRIM_THRESHOLD_``, which makes every large allocation a fresh
    mapping (see :mod:`sk_padim.allocator`).
    """
    if not isinstance(threads, int):
        worker = get_worker()
        on_host = threads.get(get_address_host(worker.address), worker.state.nthreads)
        threads = max(1, CPU_COUNT // on_host)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with freed_memory_kept():
            yield
    finally:
        torch.set_num_threads(previous)


def _transform_partition(threads, feat_bytes, paths, index, n_parts, start) -> np.ndarray:
    try:
        with _task_settings(threads):
            return pickle.loads(feat_bytes).transform(paths)
    except Exception as error:
        raise RuntimeError(
            _partition_failure("Fitting", index, n_parts, start, paths, error)
        ) from error


def _fold(threads, previous, template: PadimDetector, features):
    """``previous`` statistics (None for a worker's first partition) with ``features`` added.

    ``previous`` is left unchanged: a task must not change its inputs, which Dask may
    hand to a retry.
    """
    with _task_settings(threads):
        stats = template.accumulate([features])
        return stats if previous is None else previous.merge(stats)


def _statistics_range(threads, stats: GaussianStatistics, rows: slice) -> tuple:
    """The statistics of a range of positions as NumPy arrays (views: Dask copies only
    the range when it sends them, and sends NumPy arrays several times faster than
    torch tensors)."""
    part = stats.positions(rows)
    return part.count, part.mean.numpy(), part.scatter.numpy()


def _features_range(threads, features: np.ndarray, rows: slice) -> np.ndarray:
    """A partition's features at a range of positions, ``(n, d, positions)``."""
    return np.ascontiguousarray(features.reshape(*features.shape[:2], -1)[:, :, rows])


def _fit_range_on_statistics(threads, template: PadimDetector, shape, *pieces) -> PadimDetector:
    """The model of one range of positions from every worker's statistics of it, merged
    in the workers' order."""
    with _task_settings(threads), torch.inference_mode():
        stats = [
            GaussianStatistics(count, torch.from_numpy(mean), torch.from_numpy(scatter))
            for count, mean, scatter in pieces
        ]
        merged = functools.reduce(lambda first, second: first.merge(second), stats)
        return clone(template).set_statistics(merged, shape)


def _fit_range_on_features(threads, template: PadimDetector, shape, *slices) -> PadimDetector:
    """The model of one range of positions from every partition's features of it,
    factorised (:func:`_held_out_range` scores with it on the same worker)."""
    with _task_settings(threads), torch.inference_mode():
        features = [torch.from_numpy(part).unsqueeze(2) for part in slices]  # (n_i, d, 1, p)
        stats = template.accumulate(features)
        return clone(template).set_statistics(stats, shape, factorise=True)


def _held_out_range(threads, model: PadimDetector, storage, shape, *slices) -> np.ndarray:
    """Held-out distances ``(n, positions)`` of every partition's features of a range.

    A float16 model (``storage``) scores with its rounded factors, as after a fit on one
    machine.
    """
    with _task_settings(threads), torch.inference_mode():
        scorer = (
            model if storage is None else clone(storage).set_statistics(model.statistics(), shape)
        )
        distances = [
            scorer.held_out_distances(torch.from_numpy(part).unsqueeze(2)).flatten(1)
            for part in slices
        ]
        return torch.cat(distances).numpy()


def _score_partition(threads, feat_bytes, detector, paths, targets, index, n_parts, start):
    try:
        with _task_settings(threads):
            feat = pickle.loads(feat_bytes)
            images = check_images(paths)
            scores = np.empty(len(images), np.float32)
            done = 0
            for pixels in iter_batches(images, feat.image_size_, feat.batch_size):
                features = feat.transform(pixels)
                stop = done + len(pixels)
                if targets is None:
                    scores[done:stop] = detector.decision_function(features).cpu().numpy()
                else:
                    maps, batch_scores = detector.maps_and_scores(features)
                    batch_targets = targets[done:stop]
                    for anomaly_map, target in zip(maps.cpu().numpy(), batch_targets, strict=True):
                        _save_atomically(target, anomaly_map)
                    scores[done:stop] = batch_scores.cpu().numpy()
                done = stop
            return scores
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


def _workers(client: Client) -> dict[str, int]:
    """Dask threads of each worker, by address, in a fixed (sorted) order."""
    info = client.scheduler_info(n_workers=-1)["workers"]
    if not info:
        raise ValueError("The Dask cluster has no workers; start some, or wait for them.")
    return {address: info[address]["nthreads"] for address in sorted(info)}


def _threads_per_host(workers: dict[str, int]) -> dict[str, int]:
    """Dask threads of all the workers on each machine, by host."""
    on_host: dict[str, int] = {}
    for address, n_threads in workers.items():
        host = get_address_host(address)
        on_host[host] = on_host.get(host, 0) + n_threads
    return on_host


def _fit_partition_size(n_images: int, workers: dict[str, int], image_bytes: int) -> int:
    """Partitions of at most PARTITION_BYTES of features, at least one per worker thread."""
    per_thread = math.ceil(n_images / sum(workers.values()))
    per_partition = min(per_thread, max(1, PARTITION_BYTES // image_bytes))
    return math.ceil(per_thread / math.ceil(per_thread / per_partition))


def _owners(n_parts: int, workers: dict[str, int]) -> list[str]:
    """The worker of each partition: contiguous runs, in proportion to workers' threads."""
    addresses = list(workers)
    bounds = np.cumsum(list(workers.values())) / sum(workers.values()) * n_parts
    owners = np.searchsorted(bounds, np.arange(n_parts), side="right")
    return [addresses[owner] for owner in owners]


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


def _check_fitted_pipeline(pipeline, caller: str) -> tuple:
    """The fitted transformer and detector of a scoring pipeline."""
    (_, feat), (_, detector) = _check_pipeline(pipeline, caller)
    check_is_fitted(feat)
    check_is_fitted(detector)
    return feat, detector


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
