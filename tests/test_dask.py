"""Fits and scores on a local two-process Dask cluster equal the single-machine ones."""

import importlib
import os
import sys
import time
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from synthetic import assert_labels_like, textures_with_squares
from torch import nn

from sk_padim import NormalTrainSplit, PadimDetector, PatchFeatureTransformer, image_auroc_scorer

distributed = pytest.importorskip("dask.distributed")
da = pytest.importorskip("dask.array")
joblib = pytest.importorskip("joblib")

from dask.system import CPU_COUNT  # noqa: E402

from sk_padim.dask import DistributedScorer, fit_distributed, score_distributed  # noqa: E402

SIZE = 32


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    """Train images (all normal) and test images in two folders with clashing names."""
    root = tmp_path_factory.mktemp("images")
    train, _, _ = textures_with_squares(20, 0, size=SIZE, seed=1)
    test, labels, _ = textures_with_squares(4, 4, size=SIZE, seed=2)
    train_paths = _write(root / "train", train, range(len(train)))
    good = _write(root / "test" / "good", test[labels == 0], range(4))
    bad = _write(root / "test" / "bad", test[labels == 1], range(4))  # same file names
    return train_paths, good + bad


def _write(folder, images, numbers):
    folder.mkdir(parents=True)
    paths = []
    for image, number in zip(images, numbers, strict=True):
        path = folder / f"{number:03d}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
    return paths


def tiny_backbone():
    """A two-layer CNN (strides 4 and 8): fast to build, pickle and run."""
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 8, 3, stride=4, padding=1),
            relu=nn.ReLU(),
            conv2=nn.Conv2d(8, 16, 3, stride=2, padding=1),
        )
    )


def make_pipeline(backbone=None, **detector_params):
    """ResNet-18 (random weights) or a tiny CNN, then a detector."""
    if backbone is None:
        feat = PatchFeatureTransformer(
            tiny_backbone(), ("conv1", "conv2"), n_features=12, image_size=SIZE, random_state=0
        )
    else:
        feat = PatchFeatureTransformer(
            backbone, weights=None, image_size=SIZE, n_features=12, random_state=0
        )
    return Pipeline([("feat", feat), ("padim", PadimDetector(**detector_params))])


def local_detector(pipe, paths, **detector_params):
    """The single-machine fit on the features of the same fitted transformer."""
    return PadimDetector(**detector_params).fit(pipe[0].transform(paths))


def assert_same_model(detector, expected, atol=1e-5):
    assert detector.n_samples_seen_ == expected.n_samples_seen_
    assert detector.feature_shape_ == expected.feature_shape_
    (arrays, _), (expected_arrays, _) = detector.fitted_state(), expected.fitted_state()
    np.testing.assert_allclose(arrays["mean"], expected_arrays["mean"], rtol=1e-6, atol=1e-6)
    name = "packed_factor" if detector.covariance_dtype == "float16" else "scatter"
    np.testing.assert_allclose(
        arrays[name].astype(np.float64),
        expected_arrays[name].astype(np.float64),
        rtol=1e-2 if detector.covariance_dtype == "float16" else 1e-5,
        atol=atol * (1 if detector.covariance_dtype == "float16" else detector.n_samples_seen_),
    )


class FlakyPath(os.PathLike):
    """A path whose first read, in any process, raises (a transient file-system error)."""

    def __init__(self, path, flag):
        self.path, self.flag = path, flag

    def __fspath__(self):
        try:
            os.close(os.open(self.flag, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return self.path
        raise RuntimeError("simulated transient read failure")


class KillerPath(os.PathLike):
    """A path whose first read, in any process, kills that process (a worker dying)."""

    def __init__(self, path, flag):
        self.path, self.flag = path, flag

    def __fspath__(self):
        try:
            os.close(os.open(self.flag, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return self.path
        os._exit(1)


class ThreadProbe(nn.Module):
    """A feature channel holding the number of torch threads of the calling thread."""

    def forward(self, x):
        if bool(x.isnan().any()):  # data-dependent: the backbone is not traced but hooked
            raise ValueError("NaN input")
        return torch.full_like(x[:, :1], torch.get_num_threads())


@pytest.fixture(scope="module")
def distributed_fit(client, image_paths):
    """ResNet-18 pipeline fitted on the cluster in 4 partitions (6, 6, 6, 2 images).

    Returns the pipeline and the cluster's task stream of the fit.
    """
    with distributed.get_task_stream(client) as stream:
        pipe = fit_distributed(make_pipeline("resnet18"), image_paths[0], client, partition_size=6)
    return pipe, stream.data


@pytest.fixture(scope="module")
def local_fit(image_paths):
    return make_pipeline().fit(image_paths[0])


def test_distributed_fit_equals_local_fit_threshold_included(distributed_fit, image_paths):
    train, test = image_paths
    pipe = distributed_fit[0]
    detector = pipe[-1]
    expected = local_detector(pipe, train)
    assert detector.get_params() == PadimDetector().get_params()
    assert_same_model(detector, expected)
    assert detector.threshold_ == pytest.approx(expected.threshold_, rel=1e-4)
    test_features = pipe[0].transform(test)
    np.testing.assert_allclose(
        detector.score_samples(test_features), expected.score_samples(test_features), rtol=1e-4
    )
    scores = expected.decision_function(test_features)
    assert_labels_like(
        pipe.predict(test) == -1, scores, expected.threshold_, expected.predict(test_features)
    )


def test_distributed_fit_keeps_the_training_scores_and_a_conformal_threshold(client, image_paths):
    train = image_paths[0]  # 20 images
    pipe = fit_distributed(make_pipeline(false_alarm_rate=0.2), train, client, partition_size=6)
    expected = local_detector(pipe, train, false_alarm_rate=0.2)
    detector = pipe[-1]
    np.testing.assert_allclose(detector.training_scores_, expected.training_scores_, rtol=1e-4)
    assert detector.threshold_ == pytest.approx(expected.threshold_, rel=1e-4)
    assert detector.threshold_rule_ == expected.threshold_rule_


def _tasks_by_kind(records) -> dict:
    """Task stream records by kind and index (keys: padim-fit-<token>-<kind>-<index>)."""
    by_kind = {}
    for record in records:
        _, _, _, kind, *index = record["key"].split("-")
        by_kind.setdefault(kind, {})["-".join(index)] = record
    return by_kind


def test_range_owners_fit_their_positions_from_every_partitions_features(distributed_fit):
    by_kind = _tasks_by_kind(distributed_fit[1])
    features, slices, ranges = by_kind["features"], by_kind["slice"], by_kind["range"]
    assert "fold" not in by_kind and "split" not in by_kind  # no statistics are shipped
    # Each partition's features are cut into the two ranges of positions, and each range
    # is accumulated and scored (the threshold) once. Which worker runs a task is only a
    # preference (work stealing may move it), so it is not asserted.
    assert sorted(features) == list("0123")
    assert sorted(slices) == [f"{i}-{k}" for i in range(4) for k in "01"]
    assert sorted(ranges) == ["0", "1"]
    assert sorted(by_kind["distances"]) == ["0", "1"]


def test_with_a_threshold_the_ranges_are_fitted_alike(client, image_paths):
    train, _ = image_paths
    with distributed.get_task_stream(client) as stream:
        pipe = fit_distributed(make_pipeline(threshold=1.0), train, client, partition_size=6)
    assert_same_model(pipe[-1], local_detector(pipe, train, threshold=1.0))
    assert pipe[-1].threshold_ == 1.0
    expected = local_detector(pipe, train).pixel_threshold_
    assert pipe[-1].pixel_threshold_ == pytest.approx(expected, rel=1e-4)
    by_kind = _tasks_by_kind(stream.data)
    assert sorted(by_kind["range"]) == ["0", "1"] == sorted(by_kind["distances"])


def test_default_partitions_are_sized_from_the_cluster(client, image_paths, local_fit):
    train, test = image_paths
    with distributed.get_task_stream(client) as stream:
        fit_distributed(make_pipeline(threshold=1.0), train, client)
    kinds = [record["key"].split("-")[3] for record in stream.data]
    # Small features: one partition per worker thread, and one range of positions each.
    assert (kinds.count("features"), kinds.count("range")) == (2, 2)
    # Scoring: partitions of at least a batch (batch_size=32 > 8 images): one chunk.
    assert score_distributed(local_fit, test, client).chunks == ((8,),)


def test_torch_threads_are_the_workers_share_or_the_given_number(client, image_paths):
    train, _ = image_paths
    backbone = nn.Sequential(
        OrderedDict(conv1=nn.Conv2d(3, 8, 3, stride=4, padding=1), probe=ThreadProbe())
    )
    feat = PatchFeatureTransformer(backbone, ("conv1", "probe"), n_features=9, image_size=SIZE)
    n_threads = sum(client.nthreads().values())  # all on this machine
    for torch_threads, expected in ((None, max(1, CPU_COUNT // n_threads)), (3, 3)):
        pipe = Pipeline([("feat", clone(feat)), ("padim", PadimDetector())])
        fit_distributed(pipe, train[:4], client, torch_threads=torch_threads)
        np.testing.assert_array_equal(pipe[-1].statistics_.mean[:, -1], expected)


def test_explicit_threshold_and_float16_storage_are_kept(client, image_paths):
    train, _ = image_paths
    params = {"threshold": 2.5, "covariance_dtype": "float16"}
    pipe = fit_distributed(make_pipeline(**params), train, client, partition_size=3)  # 7 parts
    assert pipe[-1].get_params() == PadimDetector(**params).get_params()
    assert pipe[-1].threshold_ == 2.5
    assert pipe[-1].fitted_state()[0]["packed_factor"].dtype == np.float16
    assert_same_model(pipe[-1], local_detector(pipe, train, **params), atol=1e-3)


def test_float16_threshold_is_the_local_float16_threshold(client, image_paths):
    train, _ = image_paths
    params = {"covariance_dtype": "float16", "batch_size": 3}  # the maps in several batches
    pipe = fit_distributed(make_pipeline(**params), train, client)
    expected = local_detector(pipe, train, **params)
    assert pipe[-1].threshold_ == pytest.approx(expected.threshold_, rel=1e-4)


def test_distributed_scores_equal_local_scores_in_input_order(client, image_paths, local_fit):
    pipe, test = local_fit, image_paths[1]
    scores = score_distributed(pipe, test, client, partition_size=3)
    assert isinstance(scores, da.Array)
    assert scores.chunks == ((3, 3, 2),)
    np.testing.assert_allclose(scores.compute(), pipe.decision_function(test), rtol=1e-5)


def _keys_on_workers(client) -> set:
    return set().union(*client.has_what().values())


def test_distributed_scorer_keeps_its_model_on_the_cluster_until_closed(client, image_paths):
    train, test = image_paths
    pipe = make_pipeline().fit(train)
    expected = pipe.decision_function(test)
    before = _keys_on_workers(client)
    with DistributedScorer(pipe, client) as scorer:
        model = _keys_on_workers(client) - before  # the transformer and the scorer
        assert {str(key).split("-")[0] for key in model} == {"bytes", "PatchScorer"}
        first = scorer.score(test, partition_size=3).compute()
        pipe.fit(train[:10])  # a snapshot: refitting the pipeline does not change it
        client.amm.run_once()  # Dask keeps one copy of the model between calls
        second = scorer.score(test, partition_size=3).compute()
        now = _keys_on_workers(client)
        assert model <= now
        # Nothing was sent again: no other scattered transformer or detector.
        assert not any(str(key).startswith(("bytes-", "PatchScorer-")) for key in now - model)
    np.testing.assert_allclose(first, expected, rtol=1e-5)
    np.testing.assert_array_equal(second, first)
    with pytest.raises(ValueError, match="closed"):
        scorer.score(test)
    deadline = time.monotonic() + 10
    while model & _keys_on_workers(client):
        assert time.monotonic() < deadline, "the cluster kept a closed scorer's model"
        time.sleep(0.05)


def test_heat_maps_are_written_per_image_under_flat_relative_names(
    client, image_paths, local_fit, tmp_path
):
    pipe, test = local_fit, image_paths[1]
    scores = score_distributed(pipe, test, client, partition_size=3, heatmap_dir=tmp_path)
    scores = scores.compute()
    maps = pipe.score_samples(test)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == [f"{kind}_{i:03d}.npy" for kind in ("bad", "good") for i in range(4)]
    for path, anomaly_map, score in zip(test, maps, scores, strict=True):
        kind, name = path.split(os.sep)[-2:]
        saved = np.load(tmp_path / f"{kind}_{name.replace('.png', '.npy')}")
        np.testing.assert_allclose(saved, anomaly_map, rtol=1e-5)
        assert score == saved.max()


def test_task_failing_once_is_retried_to_the_same_model(client, image_paths, tmp_path):
    train, _ = image_paths
    flaky = [*train[:9], FlakyPath(train[9], str(tmp_path / "failed-once")), *train[10:]]
    pipe = fit_distributed(make_pipeline(), flaky, client, partition_size=6, retries=1)
    assert (tmp_path / "failed-once").exists()  # the failure did happen
    expected = local_detector(pipe, train)
    assert pipe[-1].n_samples_seen_ == len(train)
    assert_same_model(pipe[-1], expected)


def test_failing_partition_is_a_clear_error_and_leaves_pipeline_unchanged(
    client, image_paths, tmp_path
):
    train, _ = image_paths
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    pipe = make_pipeline()
    feat, detector = pipe[0], pipe[-1]
    paths = [*train[:8], str(corrupt), *train[8:]]
    with pytest.raises(RuntimeError, match=r"partition 2 of 4 \(images 6 to 11.*corrupt\.png"):
        fit_distributed(pipe, paths, client, partition_size=6)
    assert pipe[0] is feat and pipe[-1] is detector
    assert not hasattr(feat, "backbone_") and not hasattr(detector, "statistics_")


def test_failing_scoring_partition_names_it(client, image_paths, local_fit, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    paths = [*image_paths[1], str(corrupt)]
    scores = score_distributed(local_fit, paths, client, partition_size=4)
    with pytest.raises(RuntimeError, match=r"Scoring partition 3 of 3 .*corrupt\.png"):
        scores.compute()


@pytest.mark.parametrize(
    "function, args, error, message",
    [
        ("fit", lambda p: (PadimDetector(), p), TypeError, "needs Pipeline"),
        ("fit", lambda p: (make_pipeline(), p[0]), TypeError, r"wrap a single path as \[path\]"),
        ("fit", lambda p: (make_pipeline(), []), ValueError, "empty list of paths"),
        (
            "fit",
            lambda p: (make_pipeline(), np.zeros((2, SIZE, SIZE, 3), np.uint8)),
            TypeError,
            "fit_streaming",
        ),
        ("fit", lambda p: (make_pipeline(), [*p, 3]), TypeError, r"paths\[20\] is a int"),
        ("score", lambda p: (make_pipeline(), p), NotFittedError, "not fitted"),
    ],
    ids=["not-a-pipeline", "single-path", "empty", "image-array", "non-path-item", "unfitted"],
)
def test_mismatched_inputs_are_clear_errors(client, image_paths, function, args, error, message):
    pipeline, paths = args(image_paths[0])
    run = fit_distributed if function == "fit" else score_distributed
    with pytest.raises(error, match=message):
        run(pipeline, paths, client)


def test_bad_client_and_partition_size_are_clear_errors(client, image_paths):
    train, _ = image_paths
    with pytest.raises(TypeError, match="dask.distributed.Client"):
        fit_distributed(make_pipeline(), train, "tcp://127.0.0.1:8786")
    with pytest.raises(ValueError, match="partition_size must be an int >= 1; got 0"):
        fit_distributed(make_pipeline(), train, client, partition_size=0)


def test_a_cluster_without_workers_is_a_clear_error(image_paths, local_fit):
    train, test = image_paths
    with (
        distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as empty,
        distributed.Client(empty) as client,
    ):
        for call in (
            lambda: fit_distributed(make_pipeline(), train, client),
            lambda: score_distributed(local_fit, test, client),
            lambda: DistributedScorer(local_fit, client),
        ):
            with pytest.raises(ValueError, match="no workers"):
                call()


def test_images_differing_only_by_extension_get_a_map_each(
    client, image_paths, local_fit, tmp_path
):
    folder = tmp_path / "images"
    folder.mkdir()
    twins = [str(folder / "a.png"), str(folder / "a.jpg")]
    with Image.open(image_paths[1][0]) as good, Image.open(image_paths[1][-1]) as bad:
        good.save(twins[0])
        bad.save(twins[1])
    score_distributed(local_fit, twins, client, heatmap_dir=tmp_path / "maps").compute()
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["a-2.npy", "a.npy"]
    expected = local_fit.score_samples(twins)
    assert not np.allclose(expected[0], expected[1])  # so a swap would show
    for name, anomaly_map in zip(["a", "a-2"], expected, strict=True):
        # Float32 maps of another process: equal up to rounding.
        np.testing.assert_allclose(
            np.load(tmp_path / "maps" / f"{name}.npy"), anomaly_map, rtol=1e-5
        )


def test_grid_search_on_the_dask_joblib_backend_equals_local_search(client):
    images, labels, _ = textures_with_squares(8, 4, size=SIZE, seed=3)
    pipe = make_pipeline()
    search = GridSearchCV(
        pipe,
        {"feat__n_features": [4, 16], "padim__sigma": [0.0, 4.0]},
        scoring=image_auroc_scorer,
        cv=NormalTrainSplit(n_splits=2),
        n_jobs=2,
    )
    local = clone(search).set_params(n_jobs=1).fit(images, labels)
    with distributed.get_task_stream(client) as stream:
        with joblib.parallel_backend("dask"):
            search.fit(images, labels)
    assert stream.data, "no task ran on the cluster"
    np.testing.assert_allclose(
        search.cv_results_["mean_test_score"], local.cv_results_["mean_test_score"]
    )
    assert search.best_params_ == local.best_params_


def test_missing_dask_names_the_extra(monkeypatch):
    for name in ("dask", "dask.array", "distributed"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.delitem(sys.modules, "sk_padim.dask")
    with pytest.raises(ImportError, match=r"pip install 'sk-padim\[dask\]'"):
        importlib.import_module("sk_padim.dask")


def test_worker_killed_mid_fit_gives_the_same_model(client, image_paths, tmp_path):
    train, _ = image_paths
    flag = str(tmp_path / "killed-once")
    paths = [*train[:13], KillerPath(train[13], flag), *train[14:]]  # the second worker's
    pipe = fit_distributed(make_pipeline(), paths, client, partition_size=5)
    assert os.path.exists(flag)  # a worker did die
    expected = local_detector(pipe, train)
    assert_same_model(pipe[-1], expected)
    assert pipe[-1].threshold_ == pytest.approx(expected.threshold_, rel=1e-4)
    client.wait_for_workers(2, timeout=60)  # the nanny restarts it, for later tests
