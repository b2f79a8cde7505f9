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
import warnings
from numbers import Integral

import joblib
import numpy as np
import torch
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

from sk_padim.detector import PadimDetector
from sk_padim.features import PatchFeatureTransformer
from sk_padim.files import atomic_file
from sk_padim.versioning import (
    STATE_FORMAT,
    OldFormatError,
    check_state_format,
    current_versions,
    warn_if_versions_differ,
)

__all__ = ["load_model", "load_npz", "save_model", "save_npz"]

_FORMAT = "sk-padim-npz"
_FORMAT_VERSION = STATE_FORMAT  # the container and the estimators' state layout
_METADATA_KEY = "metadata"
_CLASSES = {"PadimDetector": PadimDetector, "PatchFeatureTransformer": PatchFeatureTransformer}
# Parameters given as tuples; JSON turns them into lists.
_TUPLE_PARAMS = {"layers", "image_size", "map_size"}


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
    The archive holds, per estimator, what its ``fitted_state()`` gives: NumPy arrays
    (the detector's statistics or factors; the transformer's channel indices or
    projection and its truncated backbone's weights, so the model reloads offline
    whatever its ``weights`` were) and a JSON record; plus its parameters and the
    versions of sk-padim and torch that wrote it. A parameter ``random_state`` given as
    a ``RandomState`` instance is stored as ``None`` (with a warning): it only matters
    for a refit, the drawn channels are stored.

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
        state, record = estimator.fitted_state()
        arrays.update({f"step{index}.{key}": value for key, value in state.items()})
        step_records.append(
            {
                "name": name,
                "class": type(estimator).__name__,
                "params": _json_params(estimator),
                "fitted": record,
            }
        )
    metadata = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "versions": current_versions(),
        "kind": "Pipeline" if isinstance(model, Pipeline) else type(model).__name__,
        "steps": step_records,
    }
    arrays[_METADATA_KEY] = np.array(json.dumps(metadata))
    with atomic_file(path) as file:
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
        If the file is not an sk-padim export, or it is truncated, corrupted,
        inconsistent, or of an earlier development format (refit the model); the
        message names the file.

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
    except OldFormatError as error:
        raise OldFormatError(f"{error} (file {path!r})") from None
    except _NewerFormat as error:
        raise ValueError(f"Cannot read model file {path!r}: {error}.") from error
    except Exception as error:  # zipfile, zlib and numpy raise many types for bad bytes
        raise ValueError(
            f"Cannot read model file {path!r} ({type(error).__name__}: {error}). It is "
            "truncated, corrupted, or not a file written by sk_padim.persistence.save_npz; "
            "export the model again from its source."
        ) from error
    warn_if_versions_differ(metadata.get("versions", {}), f"The model in {path!r}")
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
    with atomic_file(path) as file:
        joblib.dump(model, file, compress=compress)
    checksum_path = path + ".sha256"
    with atomic_file(checksum_path) as file:
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
        If the checksum does not match, joblib cannot read the file (truncated,
        corrupted, or not a joblib file), or the model is of an earlier development
        format (refit it); the message names the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Model file not found: {path!r}.")
    checksum_path = path + ".sha256"
    if verify or (verify is None and os.path.isfile(checksum_path)):
        _verify_checksum(path, checksum_path)
    try:
        return joblib.load(path)
    except OldFormatError as error:
        raise OldFormatError(f"{error} (file {path!r})") from None
    except ImportError as error:
        if (getattr(error, "name", None) or "").startswith("sk_padim."):
            raise OldFormatError(
                f"The model file {path!r} was saved by an earlier development version of "
                f"sk-padim (it names the module {error.name}, which this version does not "
                "have); refit it and save it again."
            ) from None
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


def _verify_checksum(path: str, checksum_path: str) -> None:
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


def _library_versions() -> str:
    import sklearn

    versions = {**current_versions(), "scikit-learn": sklearn.__version__}
    return ", ".join(f"{name} {version}" for name, version in versions.items())


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
    steps = list(model.steps) if isinstance(model, Pipeline) else [(None, model)]
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


def _parse_metadata(entry: np.ndarray | None) -> dict:
    if entry is None:
        raise _NotAnExport(f"it has no {_METADATA_KEY!r} entry")
    if entry.dtype.kind != "U" or entry.ndim != 0:
        raise _NotAnExport("its metadata entry is not a JSON string")
    try:
        metadata = json.loads(str(entry))
    except json.JSONDecodeError as error:
        raise _NotAnExport(f"its metadata is not valid JSON: {error}") from error
    if not isinstance(metadata, dict) or metadata.get("format") != _FORMAT:
        raise _NotAnExport(f"its metadata does not declare format {_FORMAT!r}")
    version = metadata.get("format_version")
    if not isinstance(version, int) or version > _FORMAT_VERSION:
        raise _NewerFormat(
            f"its format_version {version!r} is not one this sk-padim reads "
            f"({_FORMAT_VERSION}); upgrade sk-padim"
        )
    check_state_format(version, "This model file")
    if metadata.get("kind") not in ("Pipeline", *_CLASSES) or not metadata.get("steps"):
        raise _NotAnExport(f"unknown model kind {metadata.get('kind')!r} or no steps")
    return metadata


def _rebuild_step(record: dict, index: int, arrays: dict):
    cls = _CLASSES.get(record["class"])
    if cls is None:
        raise ValueError(f"step {index} has unknown class {record['class']!r}")
    params = {
        key: tuple(value) if key in _TUPLE_PARAMS and isinstance(value, list) else value
        for key, value in record["params"].items()
    }
    prefix = f"step{index}."
    state = {key[len(prefix) :]: value for key, value in arrays.items() if key.startswith(prefix)}
    return cls.from_fitted_state(params, state, record["fitted"])
