"""A disk cache of backbone layer outputs, per image and per layer, shared across fits.

A grid search over ``n_features``, layer sets, ``random_state`` or the detector's
parameters runs the same backbone over the same images for every candidate and fold.
:class:`LayerCache` stores each image's output of each layer (all its channels, at the
layer's own grid) as a ``.npy`` file in the folder of a ``joblib.Memory`` (under
``sk_padim/layers``), so that every transformer sharing the memory runs the backbone once
per image; the kept channels are selected and upsampled from the stored outputs, as they
would be from fresh ones. Files are written whole or not at all
(``sk_padim.files.atomic_file``), so processes sharing the folder never read half
an entry.

An entry's key covers everything its values depend on: a digest of the backbone's
architecture and weights (:func:`model_digest`), the context given by the transformer
(image size, normalisation, ``autocast``, device type), the versions of sk-padim, torch
and torchvision, the layer's name, and a digest of the image's pixels as they enter the
network (after decoding and resizing). A change to any of them reads another entry.
Nothing is kept in the process's memory: every read is a file read.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision
from sklearn.utils.validation import check_memory
from torch import nn

from sk_padim._version import __version__
from sk_padim.files import atomic_file

__all__ = [
    "LayerCache",
    "clear_feature_cache",
    "_image_digests",
    "model_digest",
]


def clear_feature_cache(memory) -> None:
    """Delete every layer output that transformers stored in ``memory``.

    Other functions cached in the same ``joblib.Memory`` (e.g. a Pipeline's fitted
    transformers) are left alone, as ``joblib.Memory(folder).clear()`` leaves the layer
    outputs (they are stored next to joblib's folder, in ``sk_padim/layers``).

    Parameters
    ----------
    memory : str, path or joblib.Memory
        What was passed as ``PatchFeatureTransformer(memory=...)``.

    Examples
    --------
    >>> import tempfile
    >>> from sk_padim.feature_cache import clear_feature_cache
    >>> clear_feature_cache(tempfile.mkdtemp())
    """
    folder = _layers_folder(memory)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def _layers_folder(memory) -> Path | None:
    """Where the layer outputs of ``memory`` go; None for a ``joblib.Memory(None)``."""
    if hasattr(memory, "__fspath__"):
        memory = os.fspath(memory)
    memory = check_memory(memory)
    if not hasattr(memory, "location"):
        raise TypeError(
            f"memory must be a folder path or a joblib.Memory; got {type(memory).__name__}, "
            "which has no location to store layer outputs in."
        )
    return None if memory.location is None else Path(memory.location) / "sk_padim" / "layers"


def model_digest(model: nn.Module, weights_key: str | None = None) -> str:
    """A digest of a model's architecture (its module tree) and of its weights.

    The module tree is the model's ``repr`` (module classes and their settings). The
    weights are known by ``weights_key`` when it fixes them (see
    :func:`sk_padim.core.backbones.weights_key`; the library versions are part of every cache
    key), else every tensor of the state dict goes in with its name, dtype and shape
    (0.08 s for ResNet-18). Python code in a custom module's ``forward`` is not part of
    it: clear the cache after changing such code (:func:`clear_feature_cache`).

    Parameters
    ----------
    model : torch.nn.Module
    weights_key : str or None, default=None
        What fixes the weights, or None to read them.

    Returns
    -------
    digest : str
        32 hexadecimal characters.

    Examples
    --------
    >>> from torch import nn
    >>> from sk_padim.feature_cache import model_digest
    >>> layer = nn.Conv2d(3, 4, 1)
    >>> model_digest(layer) == model_digest(layer)
    True
    """
    digest = hashlib.blake2b(repr(model).encode(), digest_size=16)
    if weights_key is not None:
        digest.update(f"weights {weights_key}".encode())
        return digest.hexdigest()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(data.numpy().data)
    return digest.hexdigest()


def _image_digests(pixels: torch.Tensor) -> list[str]:
    """A digest of each image of a batch of pixels ``(B, C, H, W)`` (dtype, shape, values).

    Parameters
    ----------
    pixels : Tensor of shape (B, C, H, W)

    Returns
    -------
    digests : list of str
        One per image, 32 hexadecimal characters each.
    """
    pixels = pixels.detach().cpu()
    header = f"{pixels.dtype} {tuple(pixels.shape[1:])}".encode()
    digests = []
    for image in pixels:
        digest = hashlib.blake2b(header, digest_size=16)
        digest.update(image.contiguous().numpy().reshape(-1).view(np.uint8))
        digests.append(digest.hexdigest())
    return digests


class LayerCache:
    """Backbone layer outputs per image and layer, in a ``joblib.Memory``.

    Parameters
    ----------
    memory : str, path or joblib.Memory
        Where the outputs are stored, as for ``Pipeline(memory=...)``. A
        ``joblib.Memory(None)`` stores nothing (every lookup misses).
    context : tuple
        Everything besides the image and the layer that the outputs depend on, e.g. the
        :func:`model_digest` of the backbone, the image size and the normalisation.

    Examples
    --------
    >>> import tempfile, torch
    >>> from sk_padim.feature_cache import LayerCache
    >>> cache = LayerCache(tempfile.mkdtemp(), context=("example",))
    >>> pixels = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    >>> def run(pixels):
    ...     return [pixels.float().mean(1, keepdim=True)]
    >>> cache.layer_maps(pixels, ("only",), run)[0].shape
    torch.Size([2, 1, 8, 8])
    """

    def __init__(self, memory, context: tuple):
        self.context = (*context, __version__, torch.__version__, torchvision.__version__)
        folder = _layers_folder(memory)
        key = hashlib.blake2b(repr(self.context).encode(), digest_size=16).hexdigest()
        self.folder = None if folder is None else folder / key

    def load(self, image: str, layer: str) -> np.ndarray | None:
        """The stored output of ``layer`` for the image of digest ``image``, or None."""
        if self.folder is None:
            return None
        try:
            return np.load(self._path(image, layer))
        except (FileNotFoundError, ValueError, EOFError):
            return None  # not stored, or damaged: computed and stored again

    def store(self, image: str, layer: str, output: np.ndarray) -> None:
        """Store the output ``(C, h, w)`` of ``layer`` for the image of digest ``image``."""
        if self.folder is None:
            return
        path = self._path(image, layer)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as file:
            np.save(file, output)

    def _path(self, image: str, layer: str) -> Path:
        # Layer names are module paths ("layer1", "features.2"): safe as folder names.
        return self.folder / layer / f"{image}.npy"

    def layer_maps(
        self,
        pixels: torch.Tensor,
        layers: Sequence[str],
        run: Callable[[torch.Tensor], list[torch.Tensor]],
        channels: Sequence[np.ndarray | None] | None = None,
    ) -> list[torch.Tensor]:
        """The outputs of ``layers`` for a batch of pixels, from the cache where stored.

        Images with an output missing go through ``run`` together, and all their outputs
        are stored (all channels, whatever ``channels`` asks for).

        Parameters
        ----------
        pixels : Tensor of shape (B, C, H, W)
            The images as they enter the network (the digests are of these).
        layers : sequence of str
            Names of the layers ``run`` returns, in its order.
        run : callable
            Pixels ``(b, C, H, W)`` -> one tensor ``(b, C_l, h_l, w_l)`` per layer.
        channels : sequence of (array of int or None), default=None
            Per layer, the channels to return (None: all of them); ``None``: all
            channels of every layer. Selecting here copies only those channels.

        Returns
        -------
        layer_maps : list of Tensor of shape (B, C_l, h_l, w_l), float32, on the CPU
        """
        digests = _image_digests(pixels)
        found = [[self.load(image, layer) for layer in layers] for image in digests]
        missing = [i for i, outputs in enumerate(found) if any(o is None for o in outputs)]
        if missing:
            computed = run(pixels[torch.as_tensor(missing, device=pixels.device)])
            for row, i in enumerate(missing):
                found[i] = [maps[row].float().cpu().contiguous().numpy() for maps in computed]
                for layer, output in zip(layers, found[i], strict=True):
                    self.store(digests[i], layer, output)
        channels = [None] * len(layers) if channels is None else channels
        return [
            torch.from_numpy(_stacked([outputs[k] for outputs in found], kept))
            for k, kept in enumerate(channels)
        ]


def _stacked(outputs: list[np.ndarray], channels: np.ndarray | None) -> np.ndarray:
    """The outputs ``(C, h, w)`` stacked ``(B, c, h, w)``, only ``channels`` if given."""
    if channels is None:
        return np.stack(outputs)
    batch = np.empty((len(outputs), len(channels), *outputs[0].shape[1:]), np.float32)
    for output, into in zip(outputs, batch, strict=True):
        np.take(output, channels, axis=0, out=into)
    return batch
