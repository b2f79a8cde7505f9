"""Compute only the channels of the deepest layer that PaDiM keeps.

PaDiM keeps ``d`` channels of the layers' concatenation; of the deepest layer, whose
output feeds nothing else, only its kept channels are ever read. In a traced backbone
the convolutions that produce that output can then produce those channels alone:
channel-wise operations (batch norm, activations, residual additions) are followed back
from the layer's output to the convolutions, whose output channels are cut; any other
producer, and any tensor also used elsewhere (a residual's input), is sliced instead.
For ResNet-18 this drops 200 of the 256 output channels of ``layer3.1.conv2`` at d=100
(1.8 MB of weights and its share of the compute), with the same values.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

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


def prune_output_channels(
    graph: fx.GraphModule, layer: str, channels: torch.Tensor
) -> fx.GraphModule:
    """Make the output ``layer`` of a traced backbone hold only ``channels``, in place.

    Parameters
    ----------
    graph : torch.fx.GraphModule
        Returns a dict of layer outputs (a :class:`~sk_padim.backbones.TruncatedBackbone`
        graph); modified in place.
    layer : str
        The name of the output to prune; it must feed nothing else in the graph.
    channels : Tensor of int
        The channels to keep, in the order they will come out.

    Returns
    -------
    graph : torch.fx.GraphModule
        The same module, recompiled.
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
