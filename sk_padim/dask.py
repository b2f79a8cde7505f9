"""Fit and score PaDiM pipelines on a Dask cluster.

PaDiM's fit is a sum: the per-position counts, means and scatter matrices of any split of
the training images merge exactly into those of the whole set
(:meth:`PadimDetector.merge`), and positions are independent of each other.
:func:`fit_distributed` gives each worker a contiguous share of the image paths, cut
into partitions, whose features it extracts. The grid's positions are shared out, one
range per worker: each range's owner makes the model of its range from every
partition's features there and computes the held-out distances behind the
leave-one-out ``threshold_`` of a local fit. :func:`score_distributed` scores
partitions in parallel and returns the image scores as a Dask array, optionally writing
each image's anomaly map to a ``.npy`` file; :class:`DistributedScorer` does the same
call after call with the model sent to the workers once.

In every task torch uses the worker's share of its machine's cores (Dask's nannies
would leave it one thread), and image files are decoded in a background thread while
the backbone runs. For full speed, start the workers with glibc's default allocator
settings (``docs/scale_out.md``: Dask's nannies set ``MALLOC_TRIM_THRESHOLD_``).

Both take a :class:`dask.distributed.Client` that the caller creates, connected to a
``LocalCluster`` or to a remote scheduler; see ``docs/scale_out.md`` for the recipe,
the scaling figures and how to size workers, including grid searches with
``joblib.parallel_backend("dask")``.

This module needs the ``dask`` extra (``pip install 'sk-padim[dask]'``) and is not
imported by ``import sk_padim``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import pickle
import uuid
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.base import clone
from sklearn.pipeline import Pipeline

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

from sk_padim._checks import check_int
from sk_padim.core.devices import as_tensor
from sk_padim.core.images import check_images
from sk_padim.core.model import PatchScorer
from sk_padim.core.statistics import PatchStatistics, position_ranges
from sk_padim.core.tiling import images_per_pass
from sk_padim.detector import PadimDetector
from sk_padim.features import PatchFeatureTransformer
from sk_padim.files import atomic_file, output_names
from sk_padim.pipelines import padim_steps

__all__ = ["DistributedScorer", "fit_distributed", "score_distributed"]

# Largest partition of a fit, in bytes of features (ResNet-18, d=100 at 224 px: about
# 200 images). Features stay on their worker until the threshold pass; Dask spills them
# to the worker's disk beyond its memory target, a partition at a time.
_PARTITION_BYTES = 256 * 2**20


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
    worker, and a range's owner accumulates the range's statistics
    (:class:`~sk_padim.core.statistics.PatchStatistics`) from every partition's features of
    the range, which it receives, in the order of ``paths``. The ranges' statistics come
    back and are joined (:meth:`PatchStatistics.join
    <sk_padim.core.statistics.PatchStatistics.join>`) into the model
    (:meth:`~sk_padim.PadimDetector.from_statistics`); no model-sized object is sent to
    every worker. The statistics equal those of ``pipeline.fit`` on the same images to
    the float32 rounding of the features, which the backbone computes in other batches
    (and threads) here than in one process; the order of accumulation is fixed by the
    order of ``paths`` and the workers, so reruns on the same cluster give the same
    model.

    **Thresholds**: ``threshold_`` (unless ``threshold`` is given) and
    ``pixel_threshold_`` are, as after :meth:`PadimDetector.fit`, the highest
    leave-one-out image score and the ``pixel_quantile`` of the leave-one-out maps:
    each range's owner factorises its range and computes the held-out distances of its
    range's features (the backbone runs once per image) while its statistics travel to
    the client, which makes the maps. With fewer images than ``d``, the leave-one-out
    distances amplify the features' rounding differences, so ``threshold_`` may differ
    from a local fit's by more than the statistics do (see ``docs/scale_out.md``).

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
        Smaller partitions cost more small tasks (a slice per range each), never more
        bytes.
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
    (feat_name, feat), (detector_name, detector) = padim_steps(pipeline, "fit_distributed")
    paths, partition_size, torch_threads, retries = _task_options(
        paths, partition_size, torch_threads, retries
    )
    _check_client(client)
    if detector.texture_tile is not None:
        raise ValueError(
            "fit_distributed shares the positions of the grid among the workers; texture "
            "mode (texture_tile) fits one tile's Gaussians, small enough for one machine: "
            "use pipeline.fit or sk_padim.fit_streaming."
        )
    # A fit on one zero vector checks the detector's parameters before any real work.
    clone(detector).partial_fit(np.zeros((1, 1, 1, 1), np.float32))
    params = detector.get_params()

    # At image_size=None the transformer takes its size from the files' headers.
    fitted_feat = clone(feat).fit(paths if feat.image_size is None else None)
    workers = _workers(client)
    if partition_size is None:
        image_bytes = 4 * math.prod(fitted_feat.feature_shape_)
        partition_size = _fit_partition_size(len(paths), workers, image_bytes)
    score = len(paths) >= 2  # the held-out maps set threshold_ and pixel_threshold_
    statistics, distances = _submit_fit(
        client,
        fitted_feat,
        detector,
        paths,
        _partitions(len(paths), partition_size),
        workers,
        torch_threads or _threads_per_host(workers),
        retries,
        score,
    )
    n_ranges, futures = len(statistics), statistics + distances
    del statistics, distances
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
    grids = None
    if score:  # what PadimDetector.fit sets from the held-out maps
        joined = torch.from_numpy(np.concatenate(results[n_ranges:], axis=1))
        # A batch of maps at a time: all n full-size maps at once would not fit for large n.
        grids = joined.view(len(paths), *shape[1:]).split(detector.batch_size)
    final = PadimDetector.from_statistics(
        PatchStatistics.join(results[:n_ranges]), shape, held_out_distances=grids, **params
    )
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


def _submit_fit(client, feat, detector, paths, parts, workers, threads, retries, score) -> tuple:
    """Submit the fit's tasks; return the futures of the ranges' statistics and distances.

    Per partition, a task extracts the features on the partition's worker. The
    positions are shared out in one range per worker; each partition's features of a
    range go to the range's owner, which accumulates the range's statistics from them
    and, for the threshold (``score``), their held-out distances (a task of its own, so
    that the statistics travel to the client meanwhile): the features are needed there
    for the threshold anyway, and with fewer images per worker than ``d`` they are fewer
    bytes than statistics. Only the returned futures are held, so Dask keeps each
    intermediate result just until the tasks that need it are done.
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
    _, h, w = feat.feature_shape_
    range_owners = list(dict.fromkeys(owners))[: h * w]
    template = clone(detector).set_params(
        covariance_dtype="float32", threshold=1.0, false_alarm_rate=None
    )
    statistics, distances = [], []
    for k, (rows, range_owner) in enumerate(
        zip(position_ranges(h * w, len(range_owners)), range_owners, strict=True)
    ):
        slices = [
            submit(_features_range, part_features, rows, key=f"slice-{i}-{k}", owner=owner)
            for i, (part_features, owner) in enumerate(zip(features, owners, strict=True))
        ]
        stats = submit(_range_statistics, template, *slices, key=f"range-{k}", owner=range_owner)
        statistics.append(stats)
        if score:
            distances.append(
                submit(
                    _held_out_range,
                    stats,
                    detector,
                    *slices,
                    key=f"distances-{k}",
                    owner=range_owner,
                )
            )
    return statistics, distances


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

    The fitted transformer and the detector's scoring module are broadcast to the
    workers, the module with its whitening factors (:meth:`PadimDetector.to_module`:
    factorised once, on the client, and kept there for the next calls); each task scores
    one partition of ``paths``, a batch at a time (the next batch is decoded while the
    backbone runs on this one), so a task's memory does not grow with its partition. The
    tasks are submitted at once and run in the background, wherever a thread is free;
    the returned Dask array is backed by their results, in the order of ``paths``.
    Scores equal ``pipeline.decision_function(paths)`` (higher means more anomalous).

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
        ``(H, W)`` float32) with ``np.save`` to ``heatmap_dir/<name>.npy``, named by
        :func:`sk_padim.files.output_names`: the path relative to the images' common
        folder with ``/`` replaced by ``_``, e.g. ``good/000.png`` ->
        ``heatmap_dir/good_000.npy``, and ``-2``, ``-3``, ... for a name already given
        (``a.png`` and ``a.jpg`` give ``a.npy`` and ``a-2.npy``). The folder must be
        writable by the workers (a shared file system for a remote cluster). Files are
        written atomically (temporary file, then rename), so a retried task leaves no
        partial file.
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
    padim_steps(pipeline, "score_distributed", fitted=True)
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
    """A fitted pipeline kept on a Dask cluster's workers, to score images call after call.

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
        (_, feat), (_, detector) = padim_steps(pipeline, "DistributedScorer", fitted=True)
        _check_client(client)
        _workers(client)  # a clear error for a cluster without workers, before sending
        self.client = client
        self._batch_size = feat.batch_size
        # The detector as its torch module, factorised once here (it pickles as packed
        # factors); the transformer as pickled bytes (as in fit_distributed).
        self._model = client.scatter(
            [pickle.dumps(feat), detector.to_module("cpu")], broadcast=True, hash=False
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
        paths : sequence of str or os.PathLike
            Image files, readable by the workers at these paths.
        partition_size : int or None, default=None
            Images per task, as in :func:`score_distributed`.
        heatmap_dir : str, os.PathLike or None, default=None
            Where to write the anomaly maps, as in :func:`score_distributed`.
        torch_threads : int or None, default=None
            Torch threads per task, as in :func:`score_distributed`.
        retries : int, default=0
            Times Dask reruns a task that raised.

        Returns
        -------
        scores : dask.array.Array of shape (n,), float32
            Chunked by partition, in the order of ``paths``.
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


def _task_options(paths, partition_size, torch_threads, retries) -> tuple:
    """The paths and the tasks' options of a fit or a scoring, checked."""
    paths = _check_paths(paths)
    if partition_size is not None:
        partition_size = check_int(partition_size, "partition_size", 1)
    if torch_threads is not None:
        torch_threads = check_int(torch_threads, "torch_threads", 1)
    return paths, partition_size, torch_threads, check_int(retries, "retries", 0)


def _score_options(paths, partition_size, heatmap_dir, torch_threads, retries) -> tuple:
    """Checked scoring arguments, with the heat maps' file paths (or None)."""
    paths, partition_size, torch_threads, retries = _task_options(
        paths, partition_size, torch_threads, retries
    )
    targets = None
    if heatmap_dir is not None:
        if not isinstance(heatmap_dir, (str, os.PathLike)):
            raise TypeError(
                f"heatmap_dir must be a folder path or None; got {type(heatmap_dir).__name__}."
            )
        root = os.fspath(heatmap_dir)
        targets = [os.path.join(root, f"{name}.npy") for name in output_names(paths)]
    return paths, partition_size, targets, torch_threads, retries


@sizeof.register(PatchStatistics)
def _sizeof_statistics(stats: PatchStatistics) -> int:
    """Bytes of the statistics' tensors: Dask weighs transfers and spills memory by this."""
    return stats.mean.nbytes + stats.scatter.nbytes


@sizeof.register(PatchScorer)
def _sizeof_scorer(scorer: PatchScorer) -> int:
    """Bytes of the scorer's buffers: Dask weighs transfers and spills memory by this."""
    return sum(buffer.nbytes for buffer in scorer.buffers())


@sizeof.register(PatchFeatureTransformer)
def _sizeof_transformer(feat: PatchFeatureTransformer) -> int:
    """Bytes of the fitted backbone's weights (the rest is small)."""
    weights = feat.backbone_.state_dict().values() if hasattr(feat, "backbone_") else ()
    return sum(value.nbytes for value in weights)


@contextlib.contextmanager
def _task_settings(threads):
    """Run a task with ``threads`` torch threads (an int, or Dask threads per host),
    then restore the worker's setting.

    Torch's OpenMP thread count is per calling thread, so it is set in the task's own
    thread; Dask's nannies set ``OMP_NUM_THREADS=1``, which would leave it at one.
    """
    if not isinstance(threads, int):
        worker = get_worker()
        on_host = threads.get(get_address_host(worker.address), worker.state.nthreads)
        threads = max(1, CPU_COUNT // on_host)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
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


def _features_range(threads, features: np.ndarray, rows: slice) -> np.ndarray:
    """A partition's features at a range of positions, ``(n, d, positions)``."""
    return np.ascontiguousarray(features.reshape(*features.shape[:2], -1)[:, :, rows])


def _range_statistics(threads, template: PadimDetector, *slices) -> PatchStatistics:
    """The statistics of one range of positions from every partition's features of it,
    accumulated in the order of the paths (as a local fit does)."""
    with _task_settings(threads), torch.inference_mode():
        features = torch.from_numpy(np.concatenate(slices)).unsqueeze(2)  # (n, d, 1, p)
        return clone(template).partial_fit(features).statistics_


def _held_out_range(threads, stats: PatchStatistics, detector, *slices) -> np.ndarray:
    """Held-out distances ``(n, positions)`` of every partition's features of a range,
    under the range's Gaussians stored as ``detector`` stores them (float16 factors
    are rounded, as after a fit on one machine)."""
    with _task_settings(threads), torch.inference_mode():
        gaussians = stats.gaussians(detector.reg, detector.covariance_dtype)
        distances = [
            stats.held_out_distances(gaussians, torch.from_numpy(part).unsqueeze(2)).flatten(1)
            for part in slices
        ]
        return torch.cat(distances).numpy()


def _score_partition(threads, feat_bytes, scorer, paths, targets, index, n_parts, start):
    try:
        with _task_settings(threads), torch.inference_mode():
            feat = pickle.loads(feat_bytes)
            images = check_images(paths)
            scores = np.empty(len(images), np.float32)
            done = 0
            step = images_per_pass(feat.image_size_, feat.batch_size)
            for start_image in range(0, len(images), step):
                # The files themselves: transform reads them (and refuses a wrong size at
                # image_size=None, where resizing them here would hide it).
                chunk = images[start_image : start_image + step]
                features = feat.transform(chunk)
                tensor = as_tensor(features)
                features = torch.from_numpy(features) if tensor is None else tensor
                maps, batch_scores = _on_device(scorer, features.device)(features)
                stop = done + len(chunk)
                if targets is not None:
                    batch_targets = targets[done:stop]
                    for anomaly_map, target in zip(maps.cpu().numpy(), batch_targets, strict=True):
                        _save_map(target, anomaly_map)
                scores[done:stop] = batch_scores.cpu().numpy()
                done = stop
            return scores
    except Exception as error:
        raise RuntimeError(
            _partition_failure("Scoring", index, n_parts, start, paths, error)
        ) from error


def _on_device(scorer: PatchScorer, device: torch.device) -> PatchScorer:
    """The shared scorer on the CPU, a copy of it on another device."""
    return scorer if device.type == "cpu" else copy.deepcopy(scorer).to(device)


def _partition_failure(action, index, n_parts, start, paths, error) -> str:
    return (
        f"{action} partition {index + 1} of {n_parts} (images {start} to "
        f"{start + len(paths) - 1} of paths) failed: {type(error).__name__}: {error}"
    )


def _save_map(target: str, anomaly_map: np.ndarray) -> None:
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    with atomic_file(target) as file:
        np.save(file, anomaly_map)


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
    """Partitions of at most _PARTITION_BYTES of features, at least one per worker thread."""
    per_thread = math.ceil(n_images / sum(workers.values()))
    per_partition = min(per_thread, max(1, _PARTITION_BYTES // image_bytes))
    return math.ceil(per_thread / math.ceil(per_thread / per_partition))


def _owners(n_parts: int, workers: dict[str, int]) -> list[str]:
    """The worker of each partition: contiguous runs, in proportion to workers' threads."""
    addresses = list(workers)
    bounds = np.cumsum(list(workers.values())) / sum(workers.values()) * n_parts
    owners = np.searchsorted(bounds, np.arange(n_parts), side="right")
    return [addresses[owner] for owner in owners]


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


def _check_client(client) -> None:
    if not isinstance(client, Client):
        raise TypeError(
            "client must be a dask.distributed.Client, e.g. Client('tcp://scheduler:8786') "
            f"or Client(LocalCluster()); got {type(client).__name__}."
        )
    if client.status not in ("running", "connecting", "newly-created"):
        raise ValueError(f"The Dask client is {client.status}; pass a connected client.")
