"""Compute only the channels of the deepest layer that PaDiM keeps (for the export).

PaDiM keeps ``d`` channels of the layers' concatenation; of the deepest layer, whose
output feeds nothing else, only its kept channels are ever read. In a traced backbone
the convolutions that produce that output can then produce those channels alone:
channel-wise operations (batch norm, activations, residual additions) are followed back
from the layer's output to the convolutions, whose output channels are cut; any other
producer, and any tensor also used elsewhere (a residual's input), is sliced instead.
For ResNet-18 this drops 200 of the 256 output channels of ``layer3.1.conv2`` at d=100
(1.8 MB of weights and its share of the compute), with the same values.

The graph comes from ``torch.fx``, traced on a copy by :func:`pruned_embedding`: only
the export uses it, since tracing patches ``nn.Module.__call__`` for every thread.
"""

from __future__ import annotations

import copy
import operator

import torch
from torch import fx, nn
from torchvision.models.feature_extraction import create_feature_extractor

from sk_padim.core.backbones import TruncatedBackbone
from sk_padim.core.embedding import PatchEmbedding

__all__ = ["pruned_embedding"]

# Modules and functions that act on each channel alone: the kept channels of their
# output are those of their input(s).
_CHANNELWISE_MODULES = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.GELU,
    nn.Dropout,
)
_CHANNELWISE_FUNCTIONS = (operator.add, torch.add, operator.mul, torch.mul, torch.relu)


def pruned_embedding(embedding: PatchEmbedding) -> PatchEmbedding:
    """A copy of ``embedding`` computing only the deepest layer's kept channels.

    The copy's backbone is a ``torch.fx`` graph of the copied backbone (torchvision's
    ``create_feature_extractor``), whose deepest layer produces only the channels the
    features keep; its features equal the embedding's (to float32 rounding: a cut
    convolution may round otherwise). Where that cannot be done, the embedding itself
    is returned: with a projection (every channel is used), when the deepest layer
    keeps no channel, when the backbone does not trace or its deepest layer feeds
    another, and when the graph's features on a random image differ from the
    embedding's (a traced graph keeps the last call of a module called twice, where
    the backbone's hooks keep the first, and drops Python side effects).

    Tracing patches ``nn.Module.__call__`` for every thread while it runs (torch's
    behaviour; 0.07 to 0.35 s for ResNet-18, Wide-ResNet-50-2 and EfficientNet-B0 on a
    busy 2-core machine, torch 2.14): a forward pass of any module in another thread
    during that window can fail ("module is not installed as a submodule"). Do not
    call this while other threads run models. The check on a random image runs the
    embedding and the copy once each.

    Parameters
    ----------
    embedding : sk_padim.core.embedding.PatchEmbedding
        On any device; left unchanged.

    Returns
    -------
    embedding : sk_padim.core.embedding.PatchEmbedding
        The pruned copy, or ``embedding`` itself.

    Examples
    --------
    >>> import torch
    >>> from sk_padim import PatchFeatureTransformer
    >>> from sk_padim.core.pruning import pruned_embedding
    >>> feat = PatchFeatureTransformer(weights=None, image_size=32, n_features=8,
    ...                                random_state=0).fit()
    >>> embedding = feat.to_module("cpu")
    >>> pruned = pruned_embedding(embedding)
    >>> pixels = torch.rand(2, 3, 32, 32)
    >>> torch.allclose(pruned(pixels), embedding(pixels), rtol=1e-4, atol=1e-4)
    True
    """
    layers = embedding.backbone.layers
    name = dict(embedding.kept).get(len(layers) - 1)
    if name is None:  # a projection, or no kept channel in the deepest layer
        return embedding
    pruned = copy.deepcopy(embedding)
    channels = getattr(pruned, name)
    graph = _traced(pruned.backbone)
    if graph is None:
        return embedding
    try:
        _prune_output_channels(graph, layers[-1], channels)
    except ValueError:  # the deepest layer feeds another
        return embedding
    setattr(pruned, name, torch.arange(len(channels), device=channels.device))
    pruned.backbone = _GraphBackbone(graph, layers, embedding.backbone.model_name)
    return pruned if _same_features(embedding, pruned) else embedding


class _GraphBackbone(nn.Module):
    """A traced backbone: pixels -> the requested layers' outputs, shallowest first."""

    def __init__(self, graph: fx.GraphModule, layers: tuple[str, ...], model_name: str):
        super().__init__()
        self.model = graph
        self.layers = layers
        self.model_name = model_name

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = self.model(x)
        return [outputs[name] for name in self.layers]


def _traced(backbone: TruncatedBackbone) -> fx.GraphModule | None:
    """A plain graph module returning ``{layer: output}``, or None if it does not trace.

    A backbone running stages is traced whole (its stages are the model's only code
    that runs); a hooked one through its model. torchvision's dual train/eval graph
    module does not survive ``copy.deepcopy`` (the copy runs the train graph), so its
    eval graph is rebuilt as a plain graph module.
    """
    root, prefix = (backbone.model, "") if backbone.stages is None else (backbone, "model.")
    nodes = {prefix + layer: layer for layer in backbone.layers}
    try:
        dual = create_feature_extractor(root, return_nodes=nodes, suppress_diff_warning=True)
    except Exception:  # any tracing failure means: not pruned
        return None
    return fx.GraphModule(dual, dual.graph, class_name="TruncatedGraph").eval()


def _same_features(embedding: PatchEmbedding, pruned: PatchEmbedding) -> bool:
    """Whether both give the same features (to float32 rounding) for a random image."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, *embedding.image_size, generator=generator)
    with torch.inference_mode():
        expected = embedding(pixels.to(embedding.mean.device))
        actual = pruned(pixels.to(pruned.mean.device)).to(expected.device)
    scale = float(expected.abs().max())
    return torch.allclose(actual, expected, rtol=1e-4, atol=1e-5 * scale)


def _prune_output_channels(
    graph: fx.GraphModule, layer: str, channels: torch.Tensor
) -> fx.GraphModule:
    """Make the output ``layer`` of a graph returning a dict hold only ``channels``, in place.

    ``channels`` are the channels to keep, in the order they will come out. Raises a
    ValueError when ``layer`` feeds other nodes of the graph.
    """
    output = next(node for node in graph.graph.nodes if node.op == "output")
    produced = output.args[0][layer]
    if len(produced.users) != 1:
        raise ValueError(f"Layer {layer!r} feeds other nodes; its channels cannot be cut.")
    graph.register_buffer("pruned_channels", torch.as_tensor(channels, dtype=torch.long))
    _Pruner(graph).keep(produced)
    graph.graph.lint()
    graph.recompile()
    return graph


class _Pruner:
    def __init__(self, graph: fx.GraphModule):
        self.module = graph
        self.graph = graph.graph
        self.done: set[fx.Node] = set()
        inputs = [node for node in self.graph.nodes if node.op == "placeholder"]
        with self.graph.inserting_after(inputs[-1]):
            self.index = self.graph.get_attr("pruned_channels")

    def keep(self, node: fx.Node) -> None:
        """Make ``node`` (used only on the pruned path) produce the kept channels."""
        if node in self.done:
            return
        self.done.add(node)
        module = self.module.get_submodule(node.target) if node.op == "call_module" else None
        if (
            module is not None
            and self._calls(node.target) > 1
            and not isinstance(module, _CHANNELWISE_MODULES)
        ):
            self._slice_after(node)  # a module with weights used twice: leave it whole
        elif type(module) is nn.Conv2d and module.groups == 1:
            self._cut_convolution(node, module)
        elif type(module) is nn.BatchNorm2d:
            self._cut_batch_norm(node, module)
            self._inputs(node, node.args[:1])
        elif isinstance(module, _CHANNELWISE_MODULES) or (
            node.op == "call_function" and node.target in _CHANNELWISE_FUNCTIONS
        ):
            self._inputs(node, node.args)
        else:
            self._slice_after(node)

    def _calls(self, target: str) -> int:
        return sum(n.op == "call_module" and n.target == target for n in self.graph.nodes)

    def _inputs(self, node: fx.Node, args) -> None:
        for argument in args:
            if not isinstance(argument, fx.Node):
                continue  # a constant: the same for every channel
            if len(argument.users) == 1:
                self.keep(argument)
            else:  # also used elsewhere: slice it for this use only
                with self.graph.inserting_before(node):
                    node.replace_input_with(argument, self._sliced(argument))

    def _slice_after(self, node: fx.Node) -> None:
        with self.graph.inserting_after(node):
            sliced = self._sliced(node)
        node.replace_all_uses_with(sliced, delete_user_cb=lambda user: user is not sliced)

    def _sliced(self, node: fx.Node) -> fx.Node:
        return self.graph.call_function(torch.index_select, (node, 1, self.index))

    def _cut_convolution(self, node: fx.Node, conv: nn.Conv2d) -> None:
        index = self.module.pruned_channels
        cut = nn.Conv2d(
            conv.in_channels,
            len(index),
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
        )
        with torch.no_grad():
            cut.weight.copy_(conv.weight[index])
            if conv.bias is not None:
                cut.bias.copy_(conv.bias[index])
        self._replace(node.target, cut.to(conv.weight.device))

    def _cut_batch_norm(self, node: fx.Node, norm: nn.BatchNorm2d) -> None:
        index = self.module.pruned_channels
        cut = nn.BatchNorm2d(len(index), norm.eps, norm.momentum, norm.affine)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                if getattr(norm, name) is not None:
                    getattr(cut, name).copy_(getattr(norm, name)[index])
        self._replace(node.target, cut.eval())

    def _replace(self, target: str, module: nn.Module) -> None:
        parent, _, name = target.rpartition(".")
        setattr(self.module.get_submodule(parent) if parent else self.module, name, module)
