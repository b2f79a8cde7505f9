"""Saving and loading fitted models safely.

Two routes:

- :func:`save_npz` / :func:`load_npz`: a **pickle-free** export. The fitted statistics,
  the channel indices and the backbone's weights are plain numeric arrays in a NumPy
  ``.npz`` archive (a zip file, read with ``allow_pickle=False``), and everything else
  (parameters, fitted shapes, versions) is one JSON string inside it. Loading runs no
  code from the file, so it is the route for files from sources you do not trust, and
  zip's CRC-32 checksums make a corrupted archive an error rather than a wrong model.
- :func:`save_model` / :func:`load_model`: ``joblib.dump`` / ``joblib.load`` with a
  SHA-256 checksum written beside the model, and one clear error naming the file when
  it is truncated or corrupted. Like any pickle, a joblib file **executes code when it
  is loaded**: load only files you trust.

See ``docs/persistence_safety.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from contextlib import contextmanager
from numbers import Integral

import joblib
import numpy as np
import torch
from sklearn.base import clone
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

from sk_padim.backbones import TruncatedBackbone, fold_batch_norms, load_backbone
from sk_padim.detector import PadimDetector
from sk_padim.features import PatchFeatureTransformer
from sk_padim.versioning import VersionMismatchWarning, current_versions, major_minor

FORMAT = "sk-padim-npz"
FORMAT_VERSION = 1
_METADATA_KEY = "metadata"
_CLASSES = {"PadimDetector": PadimDetector, "PatchFeatureTransformer": PatchFeatureTransformer}
# Parameters given as tuples; JSON turns them into lists.
_TUPLE_PARAMS = {"layers", "image_size", "map_size"}
_BACKBONE_PREFIX = "backbone."


def save_npz(model, path: str | os.PathLike) -> None:
    """Export a fitted model without pickle: arrays and JSON in a ``.npz`` archive.

    Parameters
    ----------
    model : PadimDetector, PatchFeatureTransformer or Pipeline of them
        A fitted detector, a fitted transformer, or a fitted pipeline whose steps are
        these estimators (``Pipeline([("feat", ...), ("padim", ...)])``). A transformer
        must have a named backbone (a string): an ``nn.Module`` backbone is Python code,
        which a pickle-free format cannot hold.
    path : str or path-like
        The file to write, exactly this name (``.npz`` is not appended). It is written
        to a temporary file beside it and renamed, so an interruption never leaves a
        half-written model under ``path``.

    Notes
    -----
    The archive holds, per estimator: its parameters, its fitted shapes and counts, the
    versions of sk-padim and torch that wrote it (JSON); the detector's ``mean_`` and
    ``packed_covariance_``; the transformer's ``channel_indices_`` and the state dict of
    its truncated backbone, so the model reloads offline whatever its ``weights`` were
    (including ``None``, random weights that could not be drawn again). A parameter
    ``random_state`` given as a ``RandomState`` instance is stored as ``None`` (with a
    warning): it only matters for a refit, the drawn channels are stored.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from sk_padim import PadimDetector
    >>> from sk_padim.persistence import load_npz, save_npz
    >>> X = np.random.default_rng(0).normal(size=(10, 4, 3, 3)).astype(np.float32)
    >>> detector = PadimDetector().fit(X)
    >>> path = os.path.join(tempfile.mkdtemp(), "model.npz")
    >>> save_npz(detector, path)
    >>> bool((load_npz(path).decision_function(X) == detector.decision_function(X)).all())
    True
    """
    steps = _steps_of(model)
    arrays: dict[str, np.ndarray] = {}
    step_records = []
    for index, (name, estimator) in enumerate(steps):
        prefix = f"step{index}."
        if isinstance(estimator, PadimDetector):
            record = _detector_record(estimator, prefix, arrays)
        else:
            record = _transformer_record(estimator, prefix, arrays)
        step_records.append({"name": name, "class": type(estimator).__name__, **record})
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": current_versions(),
        "kind": "Pipeline" if isinstance(model, Pipeline) else type(model).__name__,
        "steps": step_records,
    }
    arrays[_METADATA_KEY] = np.array(json.dumps(metadata))
    with _atomic_file(path) as file:
        np.savez(file, **arrays)


def load_npz(path: str | os.PathLike):
    """Load a model written by :func:`save_npz`; no pickle, no code from the file runs.

    Parameters
    ----------
    path : str or path-like
        A ``.npz`` file written by :func:`save_npz`.

    Returns
    -------
    model : PadimDetector, PatchFeatureTransformer or Pipeline
        The model that was saved, fitted: it scores bit for bit as the saved one did
        (on the same device and library versions).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not an sk-padim export, or it is truncated, corrupted or
        inconsistent; the message names the file.

    Warns
    -----
    VersionMismatchWarning
        If the file was written with another major.minor version of sk-padim or torch.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Model file not found: {path!r}.")
    try:
        arrays = _read_arrays(path)
        metadata = _parse_metadata(arrays.pop(_METADATA_KEY, None))
    except _NotAnExport as error:
        raise ValueError(
            f"{path!r} is not an sk-padim export ({error}); write one with "
            "sk_padim.persistence.save_npz, or load joblib files with load_model."
        ) from error
    except _NewerFormat as error:
        raise ValueError(f"Cannot read model file {path!r}: {error}.") from error
    except Exception as error:  # zipfile, zlib and numpy raise many types for bad bytes
        raise ValueError(
            f"Cannot read model file {path!r} ({type(error).__name__}: {error}). It is "
            "truncated, corrupted, or not a file written by sk_padim.persistence.save_npz; "
            "export the model again from its source."
        ) from error
    _warn_on_version_mismatch(metadata.get("versions", {}), path)
    try:
        estimators = [
            _rebuild_step(record, index, arrays) for index, record in enumerate(metadata["steps"])
        ]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"The model file {path!r} is inconsistent: {error}") from error
    if metadata["kind"] == "Pipeline":
        names = [record["name"] for record in metadata["steps"]]
        return Pipeline(list(zip(names, estimators, strict=True)))
    return estimators[0]


def save_model(model, path: str | os.PathLike, compress: int = 0) -> list[str]:
    """``joblib.dump`` the model, with a SHA-256 checksum file beside it.

    The checksum goes to ``path + ".sha256"`` in the format of ``sha256sum``, so
    ``sha256sum -c model.joblib.sha256`` also checks it; :func:`load_model` verifies it,
    turning a corrupted file (a bad disk, an interrupted copy) into a clear error
    instead of a model that silently scores wrongly. It does not make a file from an
    untrusted source safe: whoever can change the model can change the checksum.

    Parameters
    ----------
    model : object
        Usually a fitted pipeline or detector.
    path : str or path-like
        The model file. Both files are written to temporary names and renamed, so an
        interruption never leaves a half-written model under ``path``.
    compress : int, default=0
        Passed to ``joblib.dump``.

    Returns
    -------
    paths : list of str
        The model file and the checksum file.
    """
    path = os.fspath(path)
    with _atomic_file(path) as file:
        joblib.dump(model, file, compress=compress)
    checksum_path = path + ".sha256"
    with _atomic_file(checksum_path) as file:
        file.write(f"{_sha256(path)}  {os.path.basename(path)}\n".encode("ascii"))
    return [path, checksum_path]


def load_model(path: str | os.PathLike, verify: bool | None = None):
    """``joblib.load`` with a clear error for a missing, truncated or corrupted file.

    **A joblib file runs code when it is loaded**: load only files you trust. For
    files from elsewhere, use :func:`load_npz`.

    Parameters
    ----------
    path : str or path-like
        A file written by ``joblib.dump`` or :func:`save_model`.
    verify : bool or None, default=None
        Check the file against the SHA-256 checksum that :func:`save_model` wrote beside
        it (``path + ".sha256"``). ``None`` checks it when that file exists; ``True``
        requires it.

    Returns
    -------
    model : object
        What was saved.

    Raises
    ------
    FileNotFoundError
        If ``path``, or with ``verify=True`` its checksum file, does not exist.
    ValueError
        If the checksum does not match, or joblib cannot read the file (truncated,
        corrupted, or not a joblib file); the message names the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Model file not found: {path!r}.")
    checksum_path = path + ".sha256"
    if verify or (verify is None and os.path.isfile(checksum_path)):
        if not os.path.isfile(checksum_path):
            raise FileNotFoundError(
                f"Checksum file not found: {checksum_path!r}; save the model with "
                "sk_padim.persistence.save_model, or pass verify=False."
            )
        with open(checksum_path, encoding="ascii", errors="replace") as file:
            expected = file.read().split()[:1]
        actual = _sha256(path)
        if expected != [actual]:
            raise ValueError(
                f"Model file {path!r} does not match its checksum in {checksum_path!r} "
                f"(SHA-256 {actual}): it is truncated or corrupted. Restore it from a "
                "backup or save the model again."
            )
    try:
        return joblib.load(path)
    except ImportError as error:
        raise ImportError(
            f"Loading {path!r} needs a module that is not installed here: {error}."
        ) from error
    except Exception as error:  # joblib/pickle raise many types for bad bytes
        raise ValueError(
            f"Cannot load the model file {path!r} ({type(error).__name__}: {error}). It is "
            "truncated, corrupted, not a joblib file, or saved with other versions of the "
            f"libraries (here: {_library_versions()}); restore it from a backup or save "
            "the model again."
        ) from error


def _library_versions() -> str:
    import sklearn

    versions = {**current_versions(), "scikit-learn": sklearn.__version__}
    return ", ".join(f"{name} {version}" for name, version in versions.items())


@contextmanager
def _atomic_file(path):
    """A binary file that appears at ``path`` (replacing it) only once fully written."""
    path = os.fspath(path)
    handle, temporary = tempfile.mkstemp(
        prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path) or "."
    )
    try:
        with os.fdopen(handle, "wb") as file:
            yield file
        umask = os.umask(0)  # mkstemp makes the file private; use the usual permissions
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


class _NotAnExport(Exception):
    pass


class _NewerFormat(Exception):
    pass


def _read_arrays(path: str) -> dict[str, np.ndarray]:
    """Every entry of the archive, read (and CRC-checked) now; never unpickles."""
    with open(path, "rb") as file:
        if file.read(4) != b"PK\x03\x04":
            raise _NotAnExport("it is not a zip archive, as .npz files are")
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _steps_of(model) -> list[tuple[str | None, object]]:
    if isinstance(model, Pipeline):
        steps = list(model.steps)
    else:
        steps = [(None, model)]
    for name, estimator in steps:
        if not isinstance(estimator, (PadimDetector, PatchFeatureTransformer)):
            where = "" if name is None else f" (step {name!r})"
            raise TypeError(
                f"save_npz exports PadimDetector, PatchFeatureTransformer and pipelines of "
                f"them; got {type(estimator).__name__}{where}. Use save_model (joblib) "
                "for other objects."
            )
        check_is_fitted(estimator)
    return steps


def _json_params(estimator) -> dict:
    params = {}
    for key, value in estimator.get_params(deep=False).items():
        if isinstance(value, torch.device):
            value = str(value)
        elif isinstance(value, os.PathLike):
            value = os.fspath(value)
        elif key == "random_state" and not (value is None or isinstance(value, Integral)):
            warnings.warn(
                "random_state is a RandomState instance, stored as None: the drawn "
                "channel_indices_ are stored, random_state only matters for a refit.",
                UserWarning,
                stacklevel=4,
            )
            value = None
        elif isinstance(value, tuple):
            value = list(value)
        if isinstance(value, (np.integer, np.floating)):
            value = value.item()
        params[key] = value
    return params


def _detector_record(detector: PadimDetector, prefix: str, arrays: dict) -> dict:
    arrays[prefix + "mean_"] = np.asarray(detector.mean_)
    fitted = {
        "n_samples_seen_": int(detector.n_samples_seen_),
        "n_features_in_": int(detector.n_features_in_),
        "feature_shape_": [int(s) for s in detector.feature_shape_],
    }
    name = _packed_name(detector)
    arrays[prefix + name] = np.asarray(getattr(detector, name))
    if name == "packed_factor_":
        fitted["factor_reg_"] = float(detector.factor_reg_)
    if hasattr(detector, "threshold_"):
        fitted["threshold_"] = float(detector.threshold_)
    return {"params": _json_params(detector), "fitted": fitted}


def _transformer_record(feat: PatchFeatureTransformer, prefix: str, arrays: dict) -> dict:
    if not isinstance(feat.backbone, str):
        raise TypeError(
            f"Cannot export a PatchFeatureTransformer whose backbone is an nn.Module "
            f"({type(feat.backbone).__name__}) without pickle: a module is Python code. "
            "Export the detector alone (save_npz(pipeline[-1], path)) and rebuild the "
            "transformer in your code, or use save_model (joblib) for trusted storage."
        )
    if hasattr(feat, "projection_"):
        arrays[prefix + "projection_"] = np.asarray(feat.projection_, dtype=np.float32)
    else:
        arrays[prefix + "channel_indices_"] = np.asarray(feat.channel_indices_, dtype=np.int64)
    for key, tensor in feat.backbone_.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()
        arrays[prefix + _BACKBONE_PREFIX + key] = tensor.numpy()
    fitted = {
        "layers_": list(feat.layers_),
        "layer_channels_": [int(c) for c in feat.layer_channels_],
        "n_features_": int(feat.n_features_),
        "feature_shape_": [int(s) for s in feat.feature_shape_],
    }
    return {"params": _json_params(feat), "fitted": fitted}


def _parse_metadata(entry: np.ndarray | None) -> dict:
    if entry is None:
        raise _NotAnExport(f"it has no {_METADATA_KEY!r} entry")
    if entry.dtype.kind != "U" or entry.ndim != 0:
        raise _NotAnExport("its metadata entry is not a JSON string")
    try:
        metadata = json.loads(str(entry))
    except json.JSONDecodeError as error:
        raise _NotAnExport(f"its metadata is not valid JSON: {error}") from error
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise _NotAnExport(f"its metadata does not declare format {FORMAT!r}")
    version = metadata.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise _NewerFormat(
            f"its format_version {version!r} is not one this sk-padim reads "
            f"({FORMAT_VERSION}); upgrade sk-padim"
        )
    if metadata.get("kind") not in ("Pipeline", *_CLASSES) or not metadata.get("steps"):
        raise _NotAnExport(f"unknown model kind {metadata.get('kind')!r} or no steps")
    return metadata


def _warn_on_version_mismatch(saved: dict, path: str) -> None:
    for package, version in current_versions().items():
        old = saved.get(package)
        if isinstance(old, str) and major_minor(old) != major_minor(version):
            warnings.warn(
                f"The model in {path!r} was saved with {package} {old} and is loaded with "
                f"{version}; results may differ. Refit it, or install {package}=={old}.",
                VersionMismatchWarning,
                stacklevel=3,
            )


def _params_from_json(params: dict) -> dict:
    return {
        key: tuple(value) if key in _TUPLE_PARAMS and isinstance(value, list) else value
        for key, value in params.items()
    }


def _rebuild_step(record: dict, index: int, arrays: dict):
    cls = _CLASSES.get(record["class"])
    if cls is None:
        raise ValueError(f"step {index} has unknown class {record['class']!r}")
    estimator = cls(**_params_from_json(record["params"]))
    prefix = f"step{index}."
    if cls is PadimDetector:
        _restore_detector(estimator, record["fitted"], prefix, arrays)
    else:
        _restore_transformer(estimator, record["fitted"], prefix, arrays)
    return estimator


def _packed_name(detector: PadimDetector) -> str:
    """The fitted array that holds the Gaussians' shapes: covariances or factors."""
    return "packed_factor_" if hasattr(detector, "packed_factor_") else "packed_covariance_"


def _restore_detector(detector: PadimDetector, fitted: dict, prefix: str, arrays: dict):
    d, h, w = (int(s) for s in fitted["feature_shape_"])
    n_samples = int(fitted["n_samples_seen_"])
    mean = arrays[prefix + "mean_"]
    # Files from before float16 models stored factors hold float16 covariances.
    name = "packed_factor_" if prefix + "packed_factor_" in arrays else "packed_covariance_"
    packed = arrays[prefix + name]
    if mean.shape != (h * w, d) or mean.dtype != np.float64:
        raise ValueError(
            f"mean_ has shape {mean.shape} and dtype {mean.dtype}, not {(h * w, d)} float64"
        )
    expected = (h * w, d * (d + 1) // 2)
    if packed.shape != expected or packed.dtype != np.dtype(detector.covariance_dtype):
        raise ValueError(
            f"{name} has shape {packed.shape} and dtype {packed.dtype}, not "
            f"{expected} {detector.covariance_dtype}"
        )
    if n_samples < 1 or not (np.isfinite(mean).all() and np.isfinite(packed).all()):
        raise ValueError("the statistics hold no samples or non-finite values")
    detector.n_samples_seen_ = n_samples
    detector.n_features_in_ = d
    detector.feature_shape_ = (d, h, w)
    detector.mean_ = mean
    setattr(detector, name, packed)
    if name == "packed_factor_":
        detector.factor_reg_ = float(fitted["factor_reg_"])
    if "threshold_" in fitted:
        detector.threshold_ = float(fitted["threshold_"])


def _load_backbone_state(shell: PatchFeatureTransformer, state: dict) -> None:
    """Load the stored weights into the rebuilt backbone.

    Files written before sk-padim folded batch norms into convolutions hold the unfolded
    weights: those are loaded into the full unfolded model (all weights the truncated
    backbone uses must be there), which is then folded and truncated.
    """
    try:
        shell.backbone_.load_state_dict(state)
        return
    except RuntimeError as error:
        mismatch = error
    model = load_backbone(shell.backbone, None, 0)
    prefix = "model."
    unfolded = {key.removeprefix(prefix): value for key, value in state.items()}
    try:
        missing, unexpected = model.load_state_dict(unfolded, strict=False)
    except RuntimeError:
        missing, unexpected = None, None
    used = {key.removeprefix(prefix) for key in shell.backbone_.state_dict()}
    if missing is None or unexpected or used.intersection(missing):
        raise ValueError(
            f"the stored backbone weights do not fit the architecture: {mismatch}"
        ) from mismatch
    model.eval()
    fold_batch_norms(model, keep=shell.layers_)
    probe = torch.zeros(1, 3, *shell.image_size_)
    truncated = TruncatedBackbone(model, shell.layers_, probe)
    shell.backbone_ = truncated.to(memory_format=torch.channels_last)


def _stored_reduction(shell: PatchFeatureTransformer, prefix: str, arrays: dict):
    """``(name, array)``: the stored channel indices or projection, checked."""
    n_channels = sum(shell.layer_channels_)
    if prefix + "projection_" in arrays:
        projection = np.asarray(arrays[prefix + "projection_"], dtype=np.float32)
        if projection.shape != (n_channels, shell.n_features_) or not np.isfinite(projection).all():
            raise ValueError("projection_ is not a finite (channels, n_features) matrix")
        return "projection_", projection
    indices = arrays[prefix + "channel_indices_"]
    if (
        indices.shape != (shell.n_features_,)
        or indices.dtype.kind not in "iu"
        or len(np.unique(indices)) != len(indices)
        or indices.min() < 0
        or indices.max() >= n_channels
    ):
        raise ValueError("channel_indices_ are not distinct valid channel numbers")
    return "channel_indices_", indices.astype(np.int64)


def _restore_transformer(
    feat: PatchFeatureTransformer, fitted: dict, prefix: str, arrays: dict
) -> None:
    # Build the truncated architecture without the weights (no download, no file), with
    # a fixed seed so the unused channel draw leaves numpy's global state alone.
    shell = clone(feat).set_params(weights=None, random_state=0).fit()
    for name in ("layers_", "layer_channels_", "n_features_", "feature_shape_"):
        if np.ravel(getattr(shell, name)).tolist() != np.ravel(fitted[name]).tolist():
            raise ValueError(
                f"{name} of the rebuilt backbone is {getattr(shell, name)}, the file says "
                f"{fitted[name]} (another torchvision version's architecture?)"
            )
    reduction = _stored_reduction(shell, prefix, arrays)
    key_prefix = prefix + _BACKBONE_PREFIX
    state = {
        key[len(key_prefix) :]: torch.from_numpy(np.array(value))
        for key, value in arrays.items()
        if key.startswith(key_prefix)
    }
    _load_backbone_state(shell, state)
    for name in (
        "backbone_",
        "layers_",
        "layer_channels_",
        "n_features_",
        "feature_shape_",
        "image_size_",
        "normalization_",
    ):
        setattr(feat, name, getattr(shell, name))
    for name in ("channel_indices_", "projection_"):
        vars(feat).pop(name, None)
    setattr(feat, *reduction)
