"""PatchFeatureTransformer: images -> PaDiM patch embeddings ``(n, d, h, w)``."""

from __future__ import annotations

import copy
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from numbers import Integral

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context, clone
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from sk_padim.core.backbones import (
    REGISTRY,
    TruncatedBackbone,
    check_backbone,
    check_layers,
    fold_batch_norms,
    load_backbone,
    weights_key,
)
from sk_padim.core.devices import DeviceFeatures, PerDeviceCache, resolve_device
from sk_padim.core.embedding import PatchEmbedding, semi_orthogonal_matrix
from sk_padim.core.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_images,
    image_sizes,
    iter_batches,
    size_pair,
)
from sk_padim.core.runtimes import (
    PRECISIONS,
    RUNTIMES,
    AutocastBackbone,
    BackboneSetting,
    OpenVinoBackbone,
    backbone_setting,
)
from sk_padim.core.tiling import TilePlan, images_per_pass, plan_tiles
from sk_padim.feature_cache import LayerCache, model_digest
from sk_padim.versioning import VersionedPickleMixin

__all__ = ["PatchFeatureTransformer"]


@dataclass(frozen=True)
class _BuiltBackbone:
    """A truncated backbone and what fitting a transformer reads from it."""

    backbone: TruncatedBackbone
    layers: tuple[str, ...]
    layer_channels: tuple[int, ...]
    grid: tuple[int, int]
    image_size: tuple[int, int]
    digest: str | None


class PatchFeatureTransformer(VersionedPickleMixin, TransformerMixin, BaseEstimator):
    """Patch embeddings from a pretrained CNN, as in PaDiM.

    The backbone runs only up to the deepest requested layer. From the concatenation of
    the requested layers' channels, ``n_features`` channels are drawn once, uniformly
    without replacement, in :meth:`fit`. Those channels are selected per layer *before*
    the deeper layers are upsampled (nearest) to the first layer's grid, so the full
    concatenation is never built.

    The draws are nested: for a given ``random_state`` and layers, the channels kept
    for a smaller ``n_features`` are among those kept for a larger one (both are the
    first ``n_features`` of one random permutation of the channels), so a grid over
    ``n_features`` compares nested sets of channels.

    Parameters
    ----------
    backbone : str or torch.nn.Module, default="resnet18"
        A torchvision classification model name (``"resnet18"``, ``"wide_resnet50_2"``,
        ``"efficientnet_b0"`` ... ``"efficientnet_b7"``, ...), ``"efficientnet_lite0"``
        (ImageNet weights shipped in the ``lite`` extra, no download), or a module.
    layers : tuple of str, default=None
        Names of the modules whose outputs form the embedding, shallowest first (the
        first one sets the grid). ``None`` uses the backbone's default: ``layer1,
        layer2, layer3`` for ResNets. Required for backbones outside the registry.
    n_features : int, default=None
        Number ``d`` of channels kept. ``None`` uses the backbone's default (ResNet-18:
        100, Wide-ResNet-50-2: 550, EfficientNets: 100), capped at the channels available.
    weights : str, path or None, default="DEFAULT"
        A torchvision weights name (``"DEFAULT"``, ``"IMAGENET1K_V1"``, ...), a path to
        a state-dict file, or ``None`` for random initialisation. For an ``nn.Module``,
        ``"DEFAULT"`` and ``None`` keep the module's own weights.
    image_size : int, (int, int) or None, default=224
        Images are resized (bilinear, antialiased) to this ``(height, width)``; the
        aspect ratio is not kept. ``None``: native resolution, chosen on purpose:
        :meth:`fit` takes the size from its training images, which must all share one
        ``(height, width)`` (non-square allowed, e.g. ``(4400, 1500)``), and
        :meth:`transform` refuses images of another size (it never resizes them).

        The feature grid follows the backbone: ``ceil(H / 4) x ceil(W / 4)`` for the
        default layers (the first at stride 4), each cell summarising about 4 x 4 px.
        Choose the size against the smallest defect to find: resizing an ``H`` px image
        to ``S`` px shrinks a defect by ``S / H``, and it should still cover about one
        cell, 4 px. A 6 px defect on a 2048 px image is 0.66 px at 224 (lost), 3 px at
        1024 and 6 px at the native 2048. Memory and time grow with ``S**2``: the
        detector keeps a Gaussian per cell. With ``image_size=None`` the detector's maps
        (4 x the grid by default) are the image's size when ``H`` and ``W`` are
        multiples of 4; otherwise set its ``map_size`` to ``image_size_``.
    batch_size : int, default=32
        Images per forward pass, fewer when they would hold more than
        ``sk_padim.core.tiling.BATCH_PIXELS`` pixels (1.6 megapixels: 32 images of 224 x
        224 px, 6 of 512 x 512, one of 1024 x 1024 or larger), so that the activations
        stay bounded; one image runs whole up to ``sk_padim.core.tiling.PIXEL_BUDGET`` (4
        megapixels: 0.5 GB of activations for ResNet-18 up to ``layer3``, 1.2 GB for
        EfficientNet-Lite0, measured on a CPU), larger ones in tiles (``tile_size``).
    device : str or torch.device, default="auto"
        Where the backbone runs; ``"auto"`` uses CUDA when available. The fitted
        backbone is kept on the CPU, so pickles load on any machine.
    random_state : int, RandomState instance or None, default=None
        Seeds the draw of the channel indices and, with ``weights=None``, the random
        initialisation of the backbone.
    autocast : {"bfloat16", "float16"} or None, default=None
        Deprecated: use ``precision``, which this sets when given.
    verbose : bool, default=False
        Show a progress bar over batches.
    memory : str, path, joblib.Memory or None, default=None
        Where to cache the backbone's layer outputs, as ``Pipeline(memory=...)``: a
        folder or a ``joblib.Memory``; ``None`` caches nothing. Each image's output of
        each requested layer (all its channels, at the layer's own grid) is stored once,
        and any transformer sharing the memory reads it back instead of running the
        backbone: transformers that differ only in ``n_features``, ``random_state``
        (with pretrained weights) or in ``layers`` among those already stored share
        one backbone pass per image, e.g. the candidates and folds of a grid search.
        The key covers the backbone's architecture and weights, ``image_size_``, the
        normalisation, the precision and runtime the backbone runs in, the device type,
        the library versions and each
        image's pixels, so changing any of them never reads stale outputs. Features
        equal those without memory, to float32 rounding where the backend rounds an
        image's convolutions differently in batches of another size (oneDNN does for
        one image alone at small sizes; at 224 px ResNet-18 gives the same bits in
        every batch size). Disk use: 4 bytes per value, 1.4 MB per
        image for ResNet-18's default layers at 224 px, 5.6 MB for Wide-ResNet-50-2's;
        :func:`sk_padim.clear_feature_cache` deletes them. Nothing is kept in the
        process's memory between fits: each fit builds its backbone, and with memory
        fingerprints its weights (a few tens of ms for ResNet-18).
    projection : {"channels", "semi_orthogonal"}, default="channels"
        How the layers' ``F`` concatenated channels become ``d``. ``"channels"``:
        PaDiM's ``d`` channels drawn at random (``channel_indices_``). ``"semi_orthogonal"``:
        Kim et al.'s semi-orthogonal embedding (arXiv 2105.14737), ``W^T x`` per position
        for a random ``(F, d)`` matrix ``W`` with orthonormal columns
        (``projection_``), computed per layer on its own grid; see docs/algorithm.md for
        when to prefer it.
    tile_size : "auto", int or None, default="auto"
        Run the backbone on overlapping tiles of each image, so that activation memory
        stays that of one tile. Tiling is exact: the stitched layer outputs equal the
        whole image's, to float32 rounding (tiles overlap by the layers' receptive
        field, measured at :meth:`fit`; see ``sk_padim.core.tiling``). ``"auto"`` tiles
        images above ``sk_padim.core.tiling.PIXEL_BUDGET`` pixels (4 megapixels; 224 px
        images never are),
        with the largest square tiles that fit it, margins included. An int tiles every
        image larger than it, with cores of this side in pixels (rounded up to a
        multiple of the deepest layer's stride, 16 for the default layers); ``None``
        never tiles. Backbones that pool over the whole image (torchvision's
        EfficientNets, with squeeze-and-excitation) cannot be tiled: with them, use
        ``None``.
    precision : {"float32", "bfloat16", "float16", "auto"}, default="float32"
        The precision the backbone runs in. ``"float32"`` is exact (the reference
        recipe). ``"bfloat16"`` and ``"float16"`` run it in reduced precision, with
        channels-last memory; the features handed on are float32 and the statistics,
        factors and distances stay float32/float64, so only the backbone's rounding
        changes (features about 1e-2 relative; image and pixel AUROCs within 0.01 of
        float32 on the built-in data, see docs/performance.md). ``"float16"`` needs a
        CUDA device. ``"auto"`` is bfloat16 where the device runs it natively (CPUs with
        AMX or AVX512-BF16, CUDA GPUs from Ampere on) and float32 elsewhere, where
        bfloat16 is emulated and slower (``sk_padim.core.runtimes.native_reduced_precision``);
        it is resolved on the machine that runs the transform, so a model moves between
        machines and keeps the fast path where there is one.
    runtime : {"eager", "openvino"}, default="eager"
        What runs the backbone. ``"eager"``: PyTorch. ``"openvino"``: the truncated
        backbone exported once per fitted transformer (``torch.export`` of a copy) and
        compiled by OpenVINO for the CPU, in bf16 where ``precision`` asks for it and the
        CPU has it, float32 otherwise; shared by threads, for batches and tiles of any
        size. Needs the ``openvino`` extra and ``device="cpu"``; :meth:`fit` says so
        when either is missing, and a model fitted with it and loaded where OpenVINO is
        not installed runs eagerly, with one warning. Compiling takes about 4 s, at the
        first :meth:`transform` that runs the backbone (with ``memory``, only when an
        image misses the cache, and OpenVINO's compiled model is cached in that folder
        too). Measure before choosing: on a 2-core AVX2 CPU it scored 1.1x the eager
        float32 pipeline; OpenVINO's bf16 on CPUs with AMX is reported far faster
        (docs/performance.md).

    Attributes
    ----------
    backbone_ : sk_padim.core.backbones.TruncatedBackbone
        The truncated backbone, on the CPU: batch norms folded into the convolutions
        before them where the order is known (see
        ``sk_padim.core.backbones.fold_batch_norms``), run up to the deepest layer.
    layers_ : tuple of str
        The layers used.
    layer_channels_ : tuple of int
        Channels of each layer.
    channel_indices_ : ndarray of shape (``n_features_``,)
        Sorted indices of the kept channels in the concatenation of the layers (with
        ``projection="channels"``).
    projection_ : ndarray of shape (F, ``n_features_``), float32
        The semi-orthogonal ``W`` (with ``projection="semi_orthogonal"``).
    n_features_ : int
        Number of channels kept, ``d``.
    feature_shape_ : tuple of int
        ``(d, h, w)`` of one transformed image.
    image_size_ : tuple of int
        ``(height, width)`` the images are resized to, or, with ``image_size=None``,
        the training images' own size.
    tile_plan_ : sk_padim.core.tiling.TilePlan or None
        The tiles the backbone runs on (``None``: whole images).
    normalization_ : tuple
        ``(mean, std)`` applied to the RGB pixels in [0, 1].

    See Also
    --------
    PadimDetector : Fits a Gaussian per patch position on these features.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_padim import PatchFeatureTransformer
    >>> X = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    >>> feat = PatchFeatureTransformer(weights=None, image_size=64, n_features=20,
    ...                                random_state=0)
    >>> feat.fit_transform(X).shape
    (2, 20, 16, 16)
    """

    _parameter_constraints: dict = {
        "backbone": [str, nn.Module],
        "layers": [tuple, list, None],
        "n_features": [Interval(Integral, 1, None, closed="left"), None],
        "weights": [str, os.PathLike, None],
        "image_size": [Interval(Integral, 1, None, closed="left"), tuple, list, None],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "device": [str, torch.device],
        "random_state": ["random_state"],
        "precision": [StrOptions(set(PRECISIONS))],
        "runtime": [StrOptions(set(RUNTIMES))],
        "autocast": [StrOptions({"bfloat16", "float16"}), None],
        "verbose": ["boolean"],
        "memory": [str, os.PathLike, HasMethods(["cache"]), None],
        "projection": [StrOptions({"channels", "semi_orthogonal"})],
        "tile_size": [StrOptions({"auto"}), Interval(Integral, 1, None, closed="left"), None],
    }

    def __init__(
        self,
        backbone: str | nn.Module = "resnet18",
        layers: tuple[str, ...] | None = None,
        n_features: int | None = None,
        weights: str | os.PathLike | None = "DEFAULT",
        image_size: int | tuple[int, int] | None = 224,
        batch_size: int = 32,
        device: str | torch.device = "auto",
        random_state=None,
        autocast: str | None = None,
        verbose: bool = False,
        memory=None,
        projection: str = "channels",
        tile_size: str | int | None = "auto",
        precision: str = "float32",
        runtime: str = "eager",
    ):
        self.backbone = backbone
        self.layers = layers
        self.n_features = n_features
        self.weights = weights
        self.image_size = image_size
        self.batch_size = batch_size
        self.device = device
        self.random_state = random_state
        self.autocast = autocast
        self.verbose = verbose
        self.memory = memory
        self.projection = projection
        self.tile_size = tile_size
        self.precision = precision
        self.runtime = runtime

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X=None, y=None):
        """Load the backbone and draw the channel indices.

        Nothing is learnt from the images but, with ``image_size=None``, their size:
        ``X``, when given, is checked (as :meth:`transform` would), so that bad input
        fails before the fitted state changes.

        Parameters
        ----------
        X : images or None, default=None
            Images, only checked; required with ``image_size=None``, whose size they
            give (they must all share one).
        y : None
            Ignored; present for scikit-learn's API.

        Returns
        -------
        self : PatchFeatureTransformer
            The fitted transformer.
        """
        images = None if X is None else check_images(X)
        check_backbone(self.backbone)
        self._setting(resolve_device(self.device), strict=True)
        spec = REGISTRY.get(self.backbone) if isinstance(self.backbone, str) else None
        rng = check_random_state(self.random_state)
        seed = int(rng.randint(2**31 - 1))
        size = self._resolve_size(images)
        built = self._build_backbone(seed, self._resolve_layers(spec), size)
        tile_plan = plan_tiles(built.backbone, size, self.tile_size)
        channels = built.layer_channels
        n_features = self._resolve_n_features(spec, built.layers, sum(channels))
        for name in ("channel_indices_", "projection_"):
            vars(self).pop(name, None)  # a refit with the other projection
        if self.projection == "channels":
            # Nested draws: a smaller n_features keeps a prefix of the same permutation.
            self.channel_indices_ = np.sort(rng.permutation(sum(channels))[:n_features])
        else:
            self.projection_ = semi_orthogonal_matrix(sum(channels), n_features, rng)
        self.backbone_ = built.backbone
        self.layers_ = built.layers
        self.layer_channels_ = channels
        self.n_features_ = n_features
        self.feature_shape_ = (n_features, *built.grid)
        self.image_size_ = built.image_size
        self.tile_plan_ = tile_plan
        self.normalization_ = (spec.mean, spec.std) if spec else (IMAGENET_MEAN, IMAGENET_STD)
        self._modules_by_device = PerDeviceCache()
        self._backbone_digest = built.digest
        return self

    def _resolve_size(self, images) -> tuple[int, int]:
        """``image_size`` as ``(height, width)``, or the training images' one size."""
        if self.image_size is not None:
            return size_pair(self.image_size, "image_size")
        if images is None:
            raise ValueError(
                "image_size=None takes the size from the training images passed to fit; "
                "call fit(X) with them, or set image_size=(height, width)."
            )
        sizes = Counter(image_sizes(images))
        if len(sizes) > 1:
            raise ValueError(
                f"image_size=None needs training images of one size; found {len(sizes)} "
                f"sizes (height x width): {_size_counts(sizes)}. Resize them to one size "
                "first, or set image_size=(height, width) to resize every image to it."
            )
        return next(iter(sizes))

    def _build_backbone(self, seed: int, layers: tuple[str, ...], size) -> _BuiltBackbone:
        model = load_backbone(self.backbone, self.weights, seed)
        check_layers(model, layers)
        fold_batch_norms(model, keep=layers)
        # The model before truncation: transformers with other layers share its digest.
        digest = None
        if self.memory is not None:
            digest = model_digest(model, weights_key(self.backbone, self.weights, seed))
        truncated, outputs = self._truncate(model, layers, size)
        return _BuiltBackbone(
            backbone=truncated.to(memory_format=torch.channels_last),
            layers=layers,
            layer_channels=tuple(int(output.shape[1]) for output in outputs),
            grid=tuple(outputs[0].shape[2:]),
            image_size=size,
            digest=digest,
        )

    def _truncate(self, model: nn.Module, layers: tuple[str, ...], size: tuple[int, int]):
        """The truncated backbone and its outputs for one blank image, checked."""
        probe = torch.zeros(1, 3, *size)
        try:
            truncated = TruncatedBackbone(model, layers, probe)
            outputs = _probe_outputs(truncated, probe)
        except RuntimeError as error:
            raise ValueError(
                f"{self._size_name(size)} does not fit the backbone's layers "
                f"{layers} ({error}); use a larger image_size, e.g. 224."
            ) from error
        for name, output in zip(layers, outputs, strict=True):
            if output.ndim != 4:
                raise ValueError(
                    f"Layer {name!r} outputs shape {tuple(output.shape)}; PaDiM needs "
                    "convolutional feature maps (batch, channels, height, width)."
                )
            if min(output.shape[2:]) < 2:
                raise ValueError(
                    f"{self._size_name(size)} leaves layer {name!r} a "
                    f"{tuple(output.shape[2:])} map; use a larger image_size (224 is usual)."
                )
        return truncated, outputs

    def _size_name(self, size: tuple[int, int]) -> str:
        if self.image_size is None:
            return f"image_size=None (the training images' {size[0]} x {size[1]} px)"
        return f"image_size={self.image_size!r}"

    def transform(self, X) -> np.ndarray | torch.Tensor | DeviceFeatures:
        """Compute the patch embeddings of images.

        Parameters
        ----------
        X : ndarray of shape (n, H, W) or (n, H, W, C), Tensor, list or folder
            Images: an array (uint8 0-255 or float 0-1, grey or RGB), a tensor
            ``(n, C, H, W)`` (channels first, on any device), a list of arrays, PIL
            images or file paths (sizes may differ, but with ``image_size=None`` all
            must be ``image_size_``), or a folder of image files.

        Returns
        -------
        features : ndarray, Tensor or DeviceFeatures of shape (n, d, h, w), float32
            A tensor on the transformer's device for a tensor ``X``. Otherwise a NumPy
            array on the CPU, and on a GPU a :class:`~sk_padim.core.devices.DeviceFeatures`:
            the features stay on the GPU (where :class:`PadimDetector` reads them) and
            turn into a NumPy array with ``np.asarray``.
        """
        check_is_fitted(self)
        images = check_images(X)
        if self.image_size is None:
            self._check_native_sizes(images)
        device = resolve_device(self.device)
        embedding = self.to_module(device)
        cache = self._layer_cache(device)
        if device.type == "cpu":  # assembled straight into the returned array
            out = torch.from_numpy(np.empty((len(images), *self.feature_shape_), np.float32))
        else:
            out = torch.empty((len(images), *self.feature_shape_), device=device)
        # On the CPU without a cache, pixels are normalised in the loader's thread, while
        # the backbone runs on the previous batch; a GPU normalises them itself.
        overlap = device.type == "cpu" and cache is None
        kept = None if cache is None else embedding.kept_channels()
        prepare = embedding.prepare if overlap else None
        batch_size = images_per_pass(self.image_size_, self.batch_size)
        batches = iter_batches(images, self.image_size_, batch_size, prepare)
        # The backbone in the precision and runtime set: built on first use (with a
        # cache that holds every image's outputs, never).
        runner = None if cache is not None else self._runtime_embedding(device)

        def layer_maps(pixels: torch.Tensor) -> list[torch.Tensor]:
            fast = self._runtime_embedding(device, cache)
            return fast.layer_maps(pixels.to(embedding.mean.device))

        start = 0
        for batch in tqdm(
            batches,
            disable=not self.verbose,
            total=-(-len(out) // batch_size),
            desc="features",
            unit="batch",
            leave=False,
        ):
            stop = start + len(batch)
            with torch.inference_mode():
                if overlap:
                    embedding.assemble(runner.run_backbone(batch), out=out[start:stop])
                elif cache is None:
                    runner(batch.to(device), out=out[start:stop])
                else:
                    stored = cache.layer_maps(batch, self.layers_, layer_maps, kept)
                    maps = [layer_map.to(device) for layer_map in stored]
                    embedding.assemble(maps, out=out[start:stop], selected=True)
            start = stop
        if isinstance(images, torch.Tensor):
            return out
        return out.numpy() if device.type == "cpu" else DeviceFeatures(out)

    def _check_native_sizes(self, images) -> None:
        """Refuse images whose size is not ``image_size_`` (native mode never resizes)."""
        sizes = image_sizes(images)
        others = Counter(size for size in sizes if size != self.image_size_)
        if others:
            height, width = self.image_size_
            first = next(i for i, size in enumerate(sizes) if size != self.image_size_)
            raise ValueError(
                f"This transformer (image_size=None) was fitted on {height} x {width} px "
                f"images and never resizes; got {others.total()} image(s) of another size "
                f"(height x width): {_size_counts(others)}, the first at index {first}. "
                f"Resize them to {height} x {width} first, or fit with "
                f"image_size=({height}, {width}) to resize every image to it."
            )

    def to_module(self, device: str | torch.device | None = None) -> PatchEmbedding:
        """The fitted embedding as a torch module on ``device``: pixels -> features.

        Built once per device and shared (it is read-only, so any number of threads may
        run it); on the CPU it holds ``backbone_`` itself. It takes pixels ``(B, 3, H, W)``
        at ``image_size_`` (uint8 0-255 or float 0-1) and returns float32 features
        ``(B, d, h, w)``, as :meth:`transform` does for those pixels with
        ``precision="float32"`` and ``runtime="eager"`` (this module is exact and
        exportable whatever they are).

        Parameters
        ----------
        device : str or torch.device, default=None
            ``None`` uses the ``device`` parameter.

        Returns
        -------
        embedding : sk_padim.core.embedding.PatchEmbedding
            Pixels -> features, on ``device``.
        """
        check_is_fitted(self)
        device = resolve_device(self.device if device is None else device)
        cache = vars(self).setdefault("_modules_by_device", PerDeviceCache())
        return cache.get(device, lambda: self._embedding(device))

    def _embedding(self, device: torch.device, backbone=None) -> PatchEmbedding:
        """The embedding on ``device``; ``backbone(eager backbone)`` replaces its backbone."""
        embedding = PatchEmbedding(
            self.backbone_,
            getattr(self, "channel_indices_", None),
            self.layer_channels_,
            *self.normalization_,
            self.image_size_,
            getattr(self, "projection_", None),
            getattr(self, "tile_plan_", None),
        ).eval()
        # .to() would move backbone_ itself; a GPU copy must leave it on the CPU.
        embedding = embedding if device.type == "cpu" else _copy_to(embedding, device)
        if backbone is not None:  # a new embedding: nothing shares it yet
            embedding.backbone = backbone(embedding.backbone)
        return embedding

    def _setting(self, device: torch.device, strict: bool = False) -> BackboneSetting:
        """The precision and runtime the backbone runs in on ``device`` (see ``runtimes``)."""
        precision = self.precision
        if self.autocast is not None:
            if self.precision != "float32":
                raise ValueError(
                    f"autocast={self.autocast!r} and precision={self.precision!r} are both "
                    "set; autocast is deprecated: set precision alone."
                )
            if strict:
                warnings.warn(
                    f"autocast is deprecated and will be removed in 0.2; use "
                    f"precision={self.autocast!r} instead.",
                    FutureWarning,
                    stacklevel=4,
                )
            precision = self.autocast
        return backbone_setting(precision, self.runtime, device, strict=strict)

    def _runtime_embedding(self, device: torch.device, cache=None) -> PatchEmbedding:
        """:meth:`to_module`'s embedding with the backbone in the precision and runtime
        set, built once per device and setting and shared (like :meth:`to_module`'s)."""
        setting = self._setting(device)
        if setting == BackboneSetting(torch.float32, "eager"):
            return self.to_module(device)
        modules = vars(self).setdefault("_modules_by_device", PerDeviceCache())
        key = (device, setting)
        return modules.get(key, lambda: self._fast_embedding(device, setting, cache))

    def _fast_embedding(self, device, setting: BackboneSetting, cache) -> PatchEmbedding:
        if setting.fallback is not None:
            warnings.warn(
                f"This transformer runs its backbone in {setting.runtime} "
                f"{str(setting.dtype).removeprefix('torch.')} here: {setting.fallback}",
                UserWarning,
                stacklevel=4,
            )
        if setting.runtime == "openvino":
            folder = None if cache is None or cache.folder is None else cache.folder / "openvino"
            probe = torch.zeros(1, 3, *self.image_size_)
            return self._embedding(
                device, lambda eager: OpenVinoBackbone(eager, probe, setting.dtype, folder)
            )
        if setting.dtype == torch.float32:
            return self.to_module(device)
        return self._embedding(device, lambda eager: AutocastBackbone(eager, setting.dtype))

    def _layer_cache(self, device: torch.device) -> LayerCache | None:
        if self.memory is None:
            return None
        digest = vars(self).get("_backbone_digest")
        if digest is None:
            raise ValueError(
                "memory was set after fit; call fit again, so that the backbone's weights "
                "are fingerprinted for the cache."
            )
        setting = self._setting(device)
        context = (
            digest,
            self.image_size_,
            self.normalization_,
            str(setting.dtype),
            setting.runtime,
            device.type,
        )
        return LayerCache(self.memory, context)

    def _resolve_layers(self, spec) -> tuple[str, ...]:
        if self.layers is not None:
            layers = tuple(self.layers)
            if not layers or not all(isinstance(name, str) for name in layers):
                raise ValueError(f"layers must be a non-empty tuple of names; got {self.layers!r}.")
            if len(set(layers)) != len(layers):
                raise ValueError(f"layers contains a name twice: {self.layers!r}.")
            return layers
        if spec is None:
            raise ValueError(
                f"backbone={self.backbone!r} has no default layers; pass layers=(...) with "
                f"module names, or use one of {sorted(REGISTRY)}."
            )
        return spec.layers

    def _resolve_n_features(self, spec, layers: tuple[str, ...], n_available: int) -> int:
        if self.n_features is None:
            return min(spec.n_features if spec else 100, n_available)
        if self.n_features > n_available:
            raise ValueError(
                f"n_features={self.n_features} but the layers {layers} give only "
                f"{n_available} channels; use n_features <= {n_available}."
            )
        return self.n_features

    def fitted_state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Give the fitted state as NumPy arrays and a JSON-able record (for file formats).

        Returns
        -------
        arrays : dict of str to ndarray
            ``"channel_indices"`` or ``"projection"``, and the truncated backbone's
            weights under ``"backbone.<state dict key>"`` (float32), so that the model
            reloads offline whatever its ``weights`` were.
        record : dict
            The fitted shapes, layers, image size and tile plan.

        Raises
        ------
        TypeError
            If the backbone is an ``nn.Module``: a module is Python code, which arrays
            cannot hold.

        See Also
        --------
        from_fitted_state : The inverse.
        """
        check_is_fitted(self)
        if not isinstance(self.backbone, str):
            raise TypeError(
                f"Cannot store a PatchFeatureTransformer whose backbone is an nn.Module "
                f"({type(self.backbone).__name__}) as arrays: a module is Python code. "
                "Export the detector alone (save_npz(pipeline[-1], path)) and rebuild the "
                "transformer in your code, or use save_model (joblib) for trusted storage."
            )
        arrays = {}
        if hasattr(self, "projection_"):
            arrays["projection"] = np.asarray(self.projection_, dtype=np.float32)
        else:
            arrays["channel_indices"] = np.asarray(self.channel_indices_, dtype=np.int64)
        for key, tensor in self.backbone_.state_dict().items():
            arrays["backbone." + key] = tensor.detach().cpu().float().contiguous().numpy()
        record = {
            "layers_": list(self.layers_),
            "layer_channels_": [int(c) for c in self.layer_channels_],
            "n_features_": int(self.n_features_),
            "feature_shape_": [int(s) for s in self.feature_shape_],
            "image_size_": [int(s) for s in self.image_size_],
            "tile_plan_": _plan_record(getattr(self, "tile_plan_", None)),
            "backbone_digest": self._backbone_digest,
        }
        return arrays, record

    @classmethod
    def from_fitted_state(cls, params: dict, arrays: dict, record: dict) -> PatchFeatureTransformer:
        """Rebuild a transformer from :meth:`fitted_state`'s arrays and record.

        The backbone's architecture is built without its weights (no download, no file)
        and the stored weights are loaded into it.

        Parameters
        ----------
        params : dict
            The transformer's parameters (``get_params()``).
        arrays : dict of str to ndarray
            The arrays of :meth:`fitted_state`.
        record : dict
            The record of :meth:`fitted_state`.

        Returns
        -------
        feat : PatchFeatureTransformer
            Fitted, transforming as the transformer the state came from.

        Raises
        ------
        ValueError
            If the arrays and record do not fit the rebuilt architecture (e.g. another
            torchvision version's), or the channel indices or projection are invalid.
        """
        feat = cls(**params)
        # A fixed seed, so that the unused channel draw leaves NumPy's global state alone;
        # the size recorded (a native size needs no images); the tile plan is read below.
        shell_params = {"weights": None, "random_state": 0, "tile_size": None}
        if "image_size_" in record:  # absent from records written before native sizes
            shell_params["image_size"] = tuple(record["image_size_"])
        shell = clone(feat).set_params(**shell_params).fit()
        for name in ("layers_", "layer_channels_", "n_features_", "feature_shape_"):
            if np.ravel(getattr(shell, name)).tolist() != np.ravel(record[name]).tolist():
                raise ValueError(
                    f"{name} of the rebuilt backbone is {getattr(shell, name)}, the record "
                    f"says {record[name]} (another torchvision version's architecture?)"
                )
        state = {
            key.removeprefix("backbone."): torch.from_numpy(np.array(value))
            for key, value in arrays.items()
            if key.startswith("backbone.")
        }
        try:
            shell.backbone_.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"the stored backbone weights do not fit: {error}") from None
        for name in ("backbone_", "layers_", "layer_channels_", "n_features_"):
            setattr(feat, name, getattr(shell, name))
        for name in ("feature_shape_", "image_size_", "normalization_"):
            setattr(feat, name, getattr(shell, name))
        name, reduction = _stored_reduction(arrays, sum(feat.layer_channels_), feat.n_features_)
        setattr(feat, name, reduction)
        feat.tile_plan_ = _stored_plan(record.get("tile_plan_"))
        feat._modules_by_device = PerDeviceCache()
        feat._backbone_digest = record.get("backbone_digest")
        return feat

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_modules_by_device", None)
        return state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.requires_fit = True
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags


def _size_counts(sizes: Counter) -> str:
    """``"1500 x 4400 (12 images), 1024 x 1024 (3 images)"``: the most common first."""
    shown = [
        f"{height} x {width} ({count} image{'s' if count > 1 else ''})"
        for (height, width), count in sizes.most_common(5)
    ]
    more = f", and {len(sizes) - 5} more" if len(sizes) > 5 else ""
    return ", ".join(shown) + more


def _plan_record(plan: TilePlan | None) -> dict | None:
    if plan is None:
        return None
    return {"strides": list(plan.strides), "margin": plan.margin, "core": list(plan.core)}


def _stored_plan(record: dict | None) -> TilePlan | None:
    """The recorded tile plan, checked (None: whole images, untiled)."""
    if record is None:
        return None
    try:
        return TilePlan(tuple(record["strides"]), record["margin"], tuple(record["core"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"the recorded tile plan {record!r} is not valid: {error}") from None


def _stored_reduction(arrays: dict, n_channels: int, n_features: int) -> tuple[str, np.ndarray]:
    """``(attribute, array)``: the stored channel indices or projection, checked."""
    if "projection" in arrays:
        projection = np.asarray(arrays["projection"], dtype=np.float32)
        if projection.shape != (n_channels, n_features) or not np.isfinite(projection).all():
            raise ValueError("the projection is not a finite (channels, n_features) matrix")
        return "projection_", projection
    indices = np.asarray(arrays["channel_indices"])
    if (
        indices.shape != (n_features,)
        or indices.dtype.kind not in "iu"
        or len(np.unique(indices)) != len(indices)
        or indices.min() < 0
        or indices.max() >= n_channels
    ):
        raise ValueError("the channel indices are not distinct valid channel numbers")
    return "channel_indices_", indices.astype(np.int64)


def _probe_outputs(backbone: TruncatedBackbone, probe: torch.Tensor) -> list[torch.Tensor]:
    """The backbone's outputs for ``probe``, for their shapes.

    A backbone running stages runs with meta stand-ins for its weights (shapes without
    compute: 0.06 instead of 0.8 s for ResNet-18 at 224 px on a busy 2-core machine,
    most of a fit); a hooked one runs for real, since its Python code may read values.
    """
    if backbone.stages is None:
        with torch.inference_mode():
            return backbone(probe)
    # Meta stand-ins for the weights (no copy of the module: it is not shared yet).
    tensors = dict(backbone.named_parameters()) | dict(backbone.named_buffers())
    meta = {name: tensor.to("meta") for name, tensor in tensors.items()}
    with torch.inference_mode():
        return functional_call(backbone, meta, (probe.to("meta"),))


def _copy_to(module: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``module`` on ``device`` (the original stays where it is)."""
    return copy.deepcopy(module).to(device)
