"""Where computations run: the ``device`` parameter shared by the estimators."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """Turn a ``device`` parameter into a usable ``torch.device``.

    ``"auto"`` picks CUDA when it is available and the CPU otherwise. A CUDA device on
    a machine without CUDA (for example a model fitted on a GPU and loaded on a laptop)
    is an error that says how to switch to the CPU.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(
            f"device={device!r} is not a valid torch device; use 'auto', 'cpu' or 'cuda[:i]'."
        ) from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} but CUDA is not available here; call "
            "set_params(device='cpu') (or device='auto') before using the estimator."
        )
    return resolved
