"""Where computations run: the ``device`` parameter shared by the estimators."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

__all__ = ["DeviceFeatures", "PerDeviceCache", "as_tensor", "resolve_device", "run_chunks"]


def resolve_device(device: str | torch.device) -> torch.device:
    """Turn a ``device`` parameter into a usable ``torch.device``.

    ``"auto"`` picks CUDA when it is available and the CPU otherwise; ``"cuda"`` becomes
    the current CUDA device with its index. A CUDA device on
    a machine without CUDA (for example a model fitted on a GPU and loaded on a laptop)
    is an error that says how to switch to the CPU.
    """
    if isinstance(device, str) and device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
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
    if resolved.type == "cuda" and resolved.index is None:
        # With its index, as tensors report it, so that it compares equal to theirs.
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


class DeviceFeatures:
    """Features kept where they were computed (a GPU), read as NumPy only when asked.

    :meth:`PatchFeatureTransformer.transform` returns this on a GPU when it was given
    NumPy images or files, so that in a ``Pipeline`` the features go to
    :class:`PadimDetector` without a trip through host memory, while code that treats
    them as an array still gets one: ``np.asarray(features)`` (and anything calling it,
    such as indexing with a NumPy mask through :meth:`numpy`) copies them to the host.
    Pickling stores the NumPy array. On the CPU the transformer returns NumPy arrays.

    Parameters
    ----------
    tensor : Tensor of shape (n, d, h, w), float32
        The features, on their device.

    Attributes
    ----------
    tensor : Tensor
        The features, on their device.

    Examples
    --------
    >>> import numpy as np
    >>> import torch
    >>> from sk_padim.core.devices import DeviceFeatures
    >>> features = DeviceFeatures(torch.zeros(2, 3, 4, 4))
    >>> features.shape, np.asarray(features).dtype
    ((2, 3, 4, 4), dtype('float32'))
    """

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    @property
    def shape(self) -> tuple[int, ...]:
        """``(n, d, h, w)``."""
        return tuple(self.tensor.shape)

    @property
    def ndim(self) -> int:
        """4."""
        return self.tensor.ndim

    @property
    def dtype(self) -> np.dtype:
        """The NumPy dtype of the features."""
        return np.dtype(str(self.tensor.dtype).removeprefix("torch."))

    @property
    def device(self) -> torch.device:
        """Where the features are."""
        return self.tensor.device

    def __len__(self) -> int:
        return len(self.tensor)

    def __getitem__(self, index) -> DeviceFeatures:
        """Rows by slice, integer or integer/boolean array; the result stays on the device."""
        if isinstance(index, np.ndarray):
            index = torch.as_tensor(index, device=self.tensor.device)
        elif isinstance(index, list):
            index = torch.as_tensor(np.asarray(index), device=self.tensor.device)
        result = self.tensor[index]
        return DeviceFeatures(result) if result.ndim == self.tensor.ndim else result.cpu().numpy()

    def numpy(self) -> np.ndarray:
        """Copy the features to host memory.

        Returns
        -------
        features : ndarray of shape (n, d, h, w)
            A NumPy array of the features.
        """
        return self.tensor.detach().cpu().numpy()

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self.numpy()
        return array if dtype is None else array.astype(dtype, copy=False)

    def __reduce__(self):
        return (np.asarray, (self.numpy(),))

    def __repr__(self) -> str:
        return f"DeviceFeatures(shape={self.shape}, device={self.device})"


def as_tensor(X) -> torch.Tensor | None:
    """The tensor behind ``X`` (a tensor or :class:`DeviceFeatures`), or None."""
    if isinstance(X, DeviceFeatures):
        return X.tensor
    if isinstance(X, torch.Tensor):
        return X
    return None


class PerDeviceCache:
    """Objects built once per key (device and settings), safe to share among threads.

    The first caller for a key builds the object under a lock while the others wait;
    later callers read it without locking. The ``size`` most recent keys are kept (a
    model scored with a few settings in turn does not rebuild each time, and settings
    changed many times do not pile up). Not pickled: a copy starts empty.
    """

    size = 4

    def __init__(self):
        self._lock = threading.Lock()
        self._items: dict = {}

    def get(self, key, build):
        """The object for ``key``, made by ``build()`` if there is none yet."""
        item = self._items.get(key)
        if item is None:
            with self._lock:
                item = self._items.get(key)
                if item is None:
                    item = build()
                    self._store(key, item)
        return item

    def put(self, key, item) -> None:
        """Store ``item`` for ``key`` (e.g. built as a by-product of fitting)."""
        with self._lock:
            self._store(key, item)

    def _store(self, key, item) -> None:
        # Readers see the old or the new dict, never one being changed.
        items = {k: v for k, v in self._items.items() if k != key}
        items[key] = item
        self._items = dict(list(items.items())[-self.size :])

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def __deepcopy__(self, memo):
        return PerDeviceCache()


def run_chunks(work: Callable[[slice], None], chunks: list[slice], device: torch.device) -> None:
    """Run ``work`` on every chunk: on the CPU in threads of one torch thread each.

    Batched kernels on small matrices (Cholesky factors, whitening matmuls of a chunk of
    positions) gain nothing from torch's intra-op threads, and when another process
    competes for the cores the threads' synchronisation makes them 5-30x slower.
    Independent chunks in as many Python threads as torch has threads, each running its
    kernels on one thread (its own setting; the caller's is untouched), use the cores
    without that synchronisation. Elsewhere (a GPU) the chunks run in turn.

    Examples
    --------
    >>> import torch
    >>> from sk_padim.core.devices import run_chunks
    >>> out = torch.zeros(6)
    >>> def double(rows):
    ...     out[rows] = 2 * torch.arange(6.0)[rows]
    >>> run_chunks(double, [slice(0, 3), slice(3, 6)], torch.device("cpu"))
    >>> out
    tensor([ 0.,  2.,  4.,  6.,  8., 10.])
    """
    workers = min(torch.get_num_threads(), len(chunks)) if device.type == "cpu" else 1
    if workers == 1:
        for rows in chunks:
            work(rows)
        return
    inference = torch.is_inference_mode_enabled()  # a per-thread state: pass it on

    def run(rows: slice) -> None:
        with torch.inference_mode(inference):
            work(rows)

    with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        list(pool.map(run, chunks))
