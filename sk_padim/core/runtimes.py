"""How the backbone runs: its precision and its runtime.

The backbone is most of PaDiM's work, and hardware runs it far faster than eager float32
where it has reduced-precision units (bfloat16 on CPUs with AMX or AVX512-BF16, bfloat16
or float16 on GPUs) or through a compiled runtime (OpenVINO). This module decides what a
device runs natively and wraps a truncated backbone so that it runs that way; the rest
of the pipeline (channel selection, statistics, distances) stays in float32/float64.

Nothing here changes process-wide state: autocast is entered inside the forward pass,
on the thread that runs it, and OpenVINO compiles a traced copy of the backbone into an
object of its own, run through one infer request per call (so threads may share it).
"""

from __future__ import annotations

import copy
import importlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = [
    "AutocastBackbone",
    "BackboneSetting",
    "OpenVinoBackbone",
    "PRECISIONS",
    "RUNTIMES",
    "backbone_setting",
    "native_reduced_precision",
    "openvino_available",
]

PRECISIONS = ("float32", "bfloat16", "float16", "auto")
RUNTIMES = ("eager", "openvino")


def native_reduced_precision(device: torch.device) -> torch.dtype | None:
    """The reduced-precision dtype ``device`` runs natively, or None.

    bfloat16 on CPUs with AMX or AVX512-BF16 instructions and on CUDA GPUs of compute
    capability 8.0 or later (Ampere on). Elsewhere bfloat16 is emulated, slower than
    float32 (6x slower for ResNet-18 on a 2-core AVX2 CPU), so there is none.

    Examples
    --------
    >>> import torch
    >>> from sk_padim.core.runtimes import native_reduced_precision
    >>> native_reduced_precision(torch.device("cpu")) in (None, torch.bfloat16)
    True
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else None
    if device.type == "cpu" and _cpu_runs_bfloat16():
        return torch.bfloat16
    return None


def _cpu_runs_bfloat16() -> bool:
    # torch's own CPU feature checks; an older torch without them counts as no support.
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


@dataclass(frozen=True)
class BackboneSetting:
    """How the backbone runs on one device: ``dtype``, ``runtime``, and ``fallback``, the
    reason (or None) why this differs from what the parameters asked for."""

    dtype: torch.dtype
    runtime: str
    fallback: str | None = None


def backbone_setting(
    precision: str, runtime: str, device: torch.device, *, strict: bool
) -> BackboneSetting:
    """The dtype and runtime the backbone runs in on ``device`` for these parameters.

    ``"auto"`` is :func:`native_reduced_precision` or float32. An explicit bfloat16
    where it is emulated runs, with a warning when ``strict``. What cannot run here
    (``"float16"`` off CUDA; ``"openvino"`` off the CPU or without the package) raises
    with ``strict=True`` (when fitting), and otherwise falls back to float32 or
    ``"eager"`` with the reason in ``fallback`` (a model fitted elsewhere and loaded
    here keeps working).

    Raises
    ------
    ValueError
        For unknown names, or (``strict``) a precision or runtime the device lacks.
    ImportError
        With ``strict``, for ``"openvino"`` without the ``openvino`` package.

    Examples
    --------
    >>> import torch
    >>> from sk_padim.core.runtimes import backbone_setting
    >>> backbone_setting("float16", "eager", torch.device("cpu"), strict=False).dtype
    torch.float32
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}.")
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime!r} is not one of {RUNTIMES}.")
    dtype, precision_problem = _precision_on(precision, device)
    runtime_problem = _runtime_problem(runtime, device)
    if strict and precision_problem:
        raise ValueError(precision_problem)
    if strict and runtime_problem:
        raise runtime_problem
    if strict and dtype == torch.bfloat16 and native_reduced_precision(device) is None:
        warnings.warn(
            f"precision='bfloat16' is emulated on this {device.type} (no native bfloat16: "
            "AMX or AVX512-BF16 on a CPU, compute capability 8.0 on a GPU), so the backbone "
            "runs several times slower than in float32; precision='auto' picks float32 here.",
            UserWarning,
            stacklevel=2,
        )
    fallback = " ".join(str(p) for p in (precision_problem, runtime_problem) if p) or None
    return BackboneSetting(dtype, "eager" if runtime_problem else runtime, fallback)


def _precision_on(precision: str, device: torch.device) -> tuple[torch.dtype, str | None]:
    """The dtype for ``precision`` on ``device``, and why it is float32 instead, if so."""
    if precision == "auto":
        return native_reduced_precision(device) or torch.float32, None
    if precision == "float16" and device.type != "cuda":
        return torch.float32, (
            f"precision='float16' runs natively on CUDA GPUs only, not on {device.type!r}; "
            "use precision='bfloat16' or 'auto' (bfloat16 where the hardware has it)."
        )
    return getattr(torch, precision), None


def _runtime_problem(runtime: str, device: torch.device) -> Exception | None:
    """Why ``runtime`` cannot run on ``device`` here, as the error to raise, or None."""
    if runtime != "openvino":
        return None
    if device.type != "cpu":
        return ValueError(
            f"runtime='openvino' runs the backbone on the CPU, not on {device.type!r}; use "
            "device='cpu', or runtime='eager' (with precision='auto') on a GPU."
        )
    if not openvino_available():
        return ImportError(
            "runtime='openvino' needs the openvino package: pip install "
            "'sk-padim[openvino]' (or pip install openvino), or use runtime='eager'."
        )
    return None


class AutocastBackbone(nn.Module):
    """A backbone run under ``torch.autocast`` with ``dtype``: layer maps in that dtype.

    The autocast context is entered in :meth:`forward`, on the calling thread, so it
    covers the backbone and nothing around it; callers convert the maps to float32.

    Parameters
    ----------
    backbone : nn.Module
        Prepared pixels -> list of layer maps (shared, not copied).
    dtype : torch.dtype
        ``torch.bfloat16`` or ``torch.float16``.
    """

    def __init__(self, backbone: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.backbone = backbone
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.backbone(x)


def openvino_available() -> bool:
    """Whether the optional ``openvino`` package imports."""
    try:
        importlib.import_module("openvino")
    except ImportError:
        return False
    return True


class OpenVinoBackbone(nn.Module):
    """A truncated backbone compiled by OpenVINO for the CPU: prepared pixels -> layer maps.

    A copy of the backbone is exported with ``torch.export`` (the original, which other
    threads may run, is not touched) with a dynamic batch, height and width, so that
    ragged last batches and tiles of any size run without recompiling, and compiled
    once. Each call runs its own infer request, so any number of threads may call one
    instance.

    Parameters
    ----------
    backbone : nn.Module
        Pixels ``(B, 3, H, W)`` float32 -> list of layer maps.
    example : Tensor of shape (1, 3, H, W)
        An input for the export.
    dtype : torch.dtype
        ``torch.float32``, or ``torch.bfloat16`` for OpenVINO's bf16 inference hint.
    cache_dir : str or path or None, default=None
        OpenVINO's model cache: a compiled model found there is loaded, not compiled.

    Examples
    --------
    >>> import torch, torchvision
    >>> from sk_padim.core.backbones import TruncatedBackbone
    >>> from sk_padim.core.runtimes import OpenVinoBackbone
    >>> model = torchvision.models.resnet18(weights=None).eval()
    >>> probe = torch.zeros(1, 3, 64, 64)
    >>> eager = TruncatedBackbone(model, ("layer1", "layer2"), probe)
    >>> compiled = OpenVinoBackbone(eager, probe, torch.float32)  # doctest: +SKIP
    >>> [tuple(m.shape) for m in compiled(torch.zeros(2, 3, 64, 64))]  # doctest: +SKIP
    [(2, 64, 16, 16), (2, 128, 8, 8)]
    """

    def __init__(
        self,
        backbone: nn.Module,
        example: torch.Tensor,
        dtype: torch.dtype,
        cache_dir: str | Path | None = None,
    ):
        super().__init__()
        ov = importlib.import_module("openvino")
        copied = _TupleOutputs(copy.deepcopy(backbone)).eval()
        examples = (example.expand(2, *example.shape[1:]).contiguous(),)  # a batch > 1
        dynamic = {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
        try:
            exported = torch.export.export(copied, examples, dynamic_shapes=(dynamic,))
            model = ov.convert_model(exported)
        except Exception as error:
            raise ValueError(
                f"runtime='openvino' could not export this backbone ({type(error).__name__}: "
                f"{error}); use runtime='eager' with it."
            ) from error
        hint = "bf16" if dtype == torch.bfloat16 else "f32"
        config = {"INFERENCE_PRECISION_HINT": hint}
        if cache_dir is not None:
            config["CACHE_DIR"] = str(cache_dir)
        self.compiled = ov.Core().compile_model(model, "CPU", config)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        pixels = np.ascontiguousarray(x.detach().cpu().float().numpy())
        outputs = self.compiled.create_infer_request().infer({0: pixels})
        return [torch.from_numpy(outputs[i]) for i in range(len(outputs))]

    def __deepcopy__(self, memo):
        raise TypeError(
            "An OpenVINO-compiled backbone cannot be copied; build another from the eager backbone."
        )


class _TupleOutputs(nn.Module):
    """The backbone with a tuple of outputs (what ``torch.export`` takes), for the export."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.backbone(x))
