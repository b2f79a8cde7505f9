"""Export a fitted PaDiM model to one ONNX file, for inspection lines without Python.

The graph takes ``uint8`` images ``(batch, H, W, 3)`` at the transformer's
``image_size`` and returns the anomaly maps and image scores exactly as the pipeline's
``score_samples`` and ``decision_function`` do, plus the verdict when the model has a
threshold. The Gaussians are stored as each position's packed triangular whitening
factor (about half of a full inverse covariance) and unpacked inside the graph by one
``Gather``; models past protobuf's 2 GiB limit are written with ONNX external data.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted
from torch import nn

from sk_padim._checks import one_line
from sk_padim._version import __version__
from sk_padim.core.model import PadimModel, PatchScorer
from sk_padim.core.pruning import pruned_embedding
from sk_padim.files import atomic_file
from sk_padim.pipelines import padim_steps

__all__ = ["export_onnx"]

# protobuf cannot serialise a message of 2 GiB or more; leave room for the graph.
EXTERNAL_DATA_BYTES = 2**31 - 2**26
# External data: initialisers of fewer bytes stay in the .onnx file; the others start at
# page boundaries (onnxruntime maps them) and are copied a block at a time.
_EXTERNAL_MIN_BYTES = 1024
_EXTERNAL_ALIGN = 4096
_COPY_BYTES = 64 * 2**20
# With float16=True, initialisers with fewer values stay float32 (biases), and so do the
# Gaussians' means (rounding a mean moves every distance by its rounding error).
_FLOAT16_MIN_VALUES = 1024
_KEEP_FLOAT32 = ("mean_high", "mean_low")


class _ExportedPadim(nn.Module):
    """uint8 images ``(B, H, W, 3)`` -> ``anomaly_map``, ``score`` [, ``is_anomalous``].

    The same :class:`~sk_padim.core.model.PadimModel` that scores in Python, its Gaussians'
    factors kept packed (:class:`~sk_padim.core.mahalanobis.PatchGaussians`), with
    the layout change of the input and the verdict around it.

    Parameters
    ----------
    model : PadimModel
    threshold : float or None
        The model's image threshold: with one, the module takes a second input, the
        threshold to judge with (exported as a graph input whose default is this value),
        and adds the ``is_anomalous`` output, ``score >= threshold``.
    """

    def __init__(self, model: PadimModel, threshold: float | None):
        super().__init__()
        self.model = model
        self.threshold = threshold

    def forward(self, images: torch.Tensor, threshold: torch.Tensor | None = None):
        anomaly_map, score = self.model(images.permute(0, 3, 1, 2))
        if self.threshold is None:
            return anomaly_map, score
        if threshold is None:
            threshold = torch.tensor(self.threshold, dtype=score.dtype, device=score.device)
        return anomaly_map, score, score >= threshold


def export_onnx(
    model,
    path: str | os.PathLike,
    *,
    float16: bool = False,
    opset: int | None = None,
) -> Path:
    """Write a fitted model as one ONNX file that scores like the Python pipeline.

    Parameters
    ----------
    model : Pipeline, F1ThresholdCalibrator, QuantileThresholdCalibrator or PadimModel
        A fitted ``Pipeline([PatchFeatureTransformer, PadimDetector])``, a fitted
        calibrator around one (:class:`~sk_padim.F1ThresholdCalibrator` or
        :class:`~sk_padim.QuantileThresholdCalibrator`: its thresholds are used), or a
        :class:`~sk_padim.core.model.PadimModel` (no threshold).
    path : str or path-like
        The ``.onnx`` file to write. A model larger than 2 GiB also writes its weights
        next to it, in ``<path>.data`` (ONNX external data); keep the two together.
    float16 : bool, default=False
        Store the whitening factors and the backbone's weights in half precision (half
        the file). Computation stays float32; maps move by up to a few percent of their
        range (mostly from the backbone's rounded weights), image AUROC by less than
        0.002 on the tests' images.
    opset : int, default=None
        The ONNX opset; ``None`` uses 17.

    Returns
    -------
    path : pathlib.Path
        The file written.

    Raises
    ------
    sklearn.exceptions.NotFittedError
        If the model is not fitted.
    FileNotFoundError
        If the folder of ``path`` does not exist.
    ValueError
        If a module of the backbone cannot be exported (it is named).

    Notes
    -----
    Graph inputs and outputs:

    - ``images``: ``uint8``, ``(batch, H, W, 3)``, RGB, ``(H, W)`` the transformer's
      ``image_size_`` (resize first); normalisation happens in the graph;
    - ``threshold``: float32 scalar, optional (only when the model has a threshold): the
      image threshold to judge with, per run or per camera; left out, the model's own
      (an initializer of the same name holds it, its default);
    - ``anomaly_map``: float32 ``(batch, H_map, W_map)``, as ``score_samples``;
    - ``score``: float32 ``(batch,)``, as ``decision_function``;
    - ``is_anomalous``: bool ``(batch,)``, ``score >= threshold`` as ``predict`` (only
      when the model has a threshold).

    Metadata properties: ``sk_padim_version``, ``backbone``, ``layers`` (pipelines),
    ``n_features``, ``image_size`` (``"H,W"``), ``map_size``, ``normalization_mean``,
    ``normalization_std`` (applied to RGB in [0, 1] inside the graph), ``threshold``
    (empty when there is none), ``threshold_source``, ``pixel_threshold`` (the pixel score
    defect regions are cut at; empty when there is none), ``storage`` (float32 or float16).
    The graph is the Python scoring model itself (:class:`~sk_padim.core.model.PadimModel`,
    its factors packed), the means kept as float32 high + low pairs, so the file scores
    as Python does, float16 models included.

    Exporting traces the backbone with ``torch.fx`` (on a copy, to compute only the
    deepest layer's kept channels), which patches ``nn.Module.__call__`` in every thread
    while it traces (0.07-0.35 s for ResNet-18 to Wide-ResNet-50-2): a forward pass of
    any model running in another thread of the process at that moment can fail, so
    export while no other thread of the process runs models.

    Examples
    --------
    >>> import tempfile, numpy as np, onnxruntime
    >>> from sklearn.pipeline import Pipeline
    >>> from sk_padim import PadimDetector, PatchFeatureTransformer, export_onnx
    >>> X = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    >>> pipe = Pipeline([
    ...     ("feat", PatchFeatureTransformer(weights=None, image_size=32, n_features=8)),
    ...     ("padim", PadimDetector()),
    ... ]).fit(X)
    >>> path = export_onnx(pipe, tempfile.mkdtemp() + "/padim.onnx")
    >>> session = onnxruntime.InferenceSession(path)
    >>> anomaly_map, score, is_anomalous = session.run(None, {"images": X})
    >>> bool(np.allclose(score, pipe.decision_function(X), rtol=1e-4))
    True
    >>> lower = np.array(score.min(), dtype=np.float32)  # a threshold set at run time
    >>> bool(session.run(["is_anomalous"], {"images": X, "threshold": lower})[0].all())
    True
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"The folder of {str(path)!r} does not exist; create it first.")
    module, metadata, image_size = _exportable(model, float16)
    example = (torch.zeros(1, *image_size, 3, dtype=torch.uint8),)
    outputs = ["anomaly_map", "score"]
    if module.threshold is not None:
        example += (torch.tensor(module.threshold, dtype=torch.float32),)
        outputs.append("is_anomalous")
    with tempfile.TemporaryDirectory(dir=path.parent) as folder:
        raw = Path(folder) / "raw.onnx"
        _torch_export(module, example, raw, outputs, 17 if opset is None else opset)
        _finish(raw, path, metadata, float16, module.threshold)
    return path


def _exportable(model, float16: bool) -> tuple[_ExportedPadim, dict, tuple[int, int]]:
    """The module to export, its metadata and its input size."""
    threshold, source, feat, pixel_threshold = None, "", None, None
    if hasattr(model, "estimator") and hasattr(model, "predict_masks"):  # a calibrator
        check_is_fitted(model)
        threshold, pixel_threshold = float(model.threshold_), model.pixel_threshold_
        level = getattr(model, "level", None)
        source = f"calibrated ({level} F1)" if level else f"{type(model).__name__}"
        model = model.estimator_
    if isinstance(model, PadimModel):
        embedding, scorer = model.embedding, model.scorer
    else:
        try:
            (_, feat), (_, detector) = padim_steps(model, "export_onnx", fitted=True)
        except TypeError as error:
            raise TypeError(
                f"{error} A calibrator (F1ThresholdCalibrator, QuantileThresholdCalibrator) "
                "around one, or a PadimModel, is exported too."
            ) from None
        if threshold is None and hasattr(detector, "threshold_"):
            threshold, source = float(detector.threshold_), "the detector's threshold_"
        if pixel_threshold is None:
            pixel_threshold = getattr(detector, "pixel_threshold_", None)
        embedding, scorer = feat.to_module("cpu"), detector.to_module("cpu")
    gaussians = scorer.gaussians.in_memory().cpu()
    packed_scorer = PatchScorer(gaussians, copy.deepcopy(scorer.maps).cpu())
    embedding = pruned_embedding(copy.deepcopy(embedding).cpu())
    module = _ExportedPadim(PadimModel(embedding, packed_scorer), threshold).eval()
    normalization_mean, normalization_std = embedding.normalization
    metadata = {
        "sk_padim_version": __version__,
        "backbone": _backbone_name(feat, embedding),
        "n_features": str(embedding.n_features),
        "image_size": ",".join(map(str, embedding.image_size)),
        "map_size": ",".join(map(str, packed_scorer.maps.size)),
        "normalization_mean": ",".join(map(str, normalization_mean)),
        "normalization_std": ",".join(map(str, normalization_std)),
        "threshold": "" if threshold is None else repr(threshold),
        "threshold_source": source,
        "pixel_threshold": "" if pixel_threshold is None else repr(float(pixel_threshold)),
        "storage": "float16" if float16 or gaussians.storage == "float16" else "float32",
    }
    if feat is not None:
        metadata["layers"] = ",".join(feat.layers_)
    return module, metadata, embedding.image_size


def _backbone_name(feat, embedding) -> str:
    if feat is not None and isinstance(feat.backbone, str):
        return feat.backbone
    return embedding.backbone.model_name


def _torch_export(module, example: tuple, path: Path, outputs: list[str], opset: int) -> None:
    inputs = ["images", "threshold"][: len(example)]
    dynamic = {"images": {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of one that needs
            # onnxscript; it exports these graphs exactly, so its notices are muted.
            warnings.simplefilter("ignore", DeprecationWarning)
            # Notes that a Slice of step > 1 is not constant-folded: folding is off anyway
            # (it would unpack the factors into the file).
            warnings.filterwarnings("ignore", "Constant folding", UserWarning)
            # The backbone's tiles are laid out for the exported image size, which is
            # fixed (only the batch is dynamic): their size arithmetic is constant.
            warnings.filterwarnings(
                "ignore", category=torch.jit.TracerWarning, module="sk_padim.core.tiling"
            )
            torch.onnx.export(
                module,
                example,
                str(path),
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=dynamic,
                opset_version=opset,
                do_constant_folding=False,  # folding would unpack the factor into the file
                dynamo=False,
            )
    except Exception as error:
        backbone = module.model.embedding.backbone.model_name
        raise ValueError(
            f"The model could not be exported to ONNX; its backbone is {backbone}: "
            f"{type(error).__name__}: {one_line(error, limit=300)}. A custom backbone must be "
            "traceable by torch.jit.trace and use operators ONNX has."
        ) from error


def _finish(raw: Path, path: Path, metadata: dict, float16: bool, threshold) -> None:
    """Metadata, float16 initialisers, the threshold input's default (an initializer of
    the input's name, which onnxruntime uses when the input is not fed) and, past the
    size limit, external data; then ``path``.

    The initialisers are read where torch wrote them (past 2 GiB, in files next to
    ``raw``, read through memory maps) and external data is written a block at a time,
    so that the export holds no second copy of the Gaussians.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as error:
        raise ImportError(
            "export_onnx needs the onnx package: pip install 'sk-padim[export]'."
        ) from error

    model = onnx.load(str(raw), load_external_data=False)
    if threshold is not None:
        default = np.asarray(threshold, dtype=np.float32)
        model.graph.initializer.append(numpy_helper.from_array(default, "threshold"))
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    tensors = [(tensor, _values(tensor, raw.parent)) for tensor in model.graph.initializer]
    halves = {tensor.name for tensor, values in tensors if float16 and _halved(tensor, values)}
    size = sum(
        values.size * (2 if tensor.name in halves else values.itemsize)
        for tensor, values in tensors
    )
    data_name = path.name + ".data"
    external = size >= EXTERNAL_DATA_BYTES
    data_file = atomic_file(path.with_name(data_name)) if external else contextlib.nullcontext()
    with data_file as data:
        for tensor, values in tensors:
            dtype = np.float16 if tensor.name in halves else values.dtype
            if external and values.nbytes >= _EXTERNAL_MIN_BYTES:
                _write_external(tensor, values, dtype, data, data_name)
            elif dtype != values.dtype or _is_external(tensor):
                tensor.CopyFrom(numpy_helper.from_array(np.asarray(values, dtype), tensor.name))
    _cast_halves(model, halves)
    with atomic_file(path) as file:
        file.write(model.SerializeToString())


def _values(tensor, folder: Path) -> np.ndarray:
    """An initialiser's values: its array, or a read-only map of its external file."""
    from onnx import helper, numpy_helper
    from onnx.external_data_helper import ExternalDataInfo

    if not _is_external(tensor):
        return numpy_helper.to_array(tensor)
    info = ExternalDataInfo(tensor)
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims, dtype=np.int64))
    values = np.memmap(folder / info.location, dtype, "r", info.offset or 0, (count,))
    return values.reshape(tuple(tensor.dims))


def _is_external(tensor) -> bool:
    from onnx import TensorProto

    return tensor.data_location == TensorProto.EXTERNAL


def _halved(tensor, values: np.ndarray) -> bool:
    """Whether ``float16=True`` stores this initialiser in half precision."""
    return (
        values.dtype == np.float32
        and values.size >= _FLOAT16_MIN_VALUES
        and not tensor.name.endswith(_KEEP_FLOAT32)
    )


def _write_external(tensor, values: np.ndarray, dtype, data, location: str) -> None:
    """Append ``values`` as ``dtype`` to the open file ``data`` (named ``location``), a
    block at a time, and make ``tensor`` point there."""
    from onnx import TensorProto, helper
    from onnx.external_data_helper import set_external_data

    data.write(bytes(-data.tell() % _EXTERNAL_ALIGN))
    start = data.tell()
    flat = values.reshape(-1)
    step = max(1, _COPY_BYTES // values.itemsize)
    for first in range(0, flat.size, step):
        data.write(memoryview(np.ascontiguousarray(flat[first : first + step], dtype)))
    shape, name = tuple(tensor.dims), tensor.name
    tensor.Clear()
    tensor.name, tensor.data_type = name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    tensor.dims.extend(shape)
    tensor.raw_data = b""  # set_external_data asks for the field
    set_external_data(tensor, location, offset=start, length=data.tell() - start)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL


def _cast_halves(model, halves: set[str]) -> None:
    """Rename the float16 initialisers and cast them back to float32 in the graph."""
    from onnx import TensorProto, helper

    casts = []
    for tensor in model.graph.initializer:
        if tensor.name in halves:
            name = tensor.name
            tensor.name = name + "_float16"
            casts.append(helper.make_node("Cast", [tensor.name], [name], to=TensorProto.FLOAT))
    for cast in reversed(casts):
        model.graph.node.insert(0, cast)
