"""The model's dataflow as a list of JSON nodes (``torch.fx``), and the digital operations between layers.

Each node is ``{"name", "op", "inputs": [earlier node names], ...attributes}``. Layers (CIM or float) are
``"cim_conv2d"``, ``"cim_linear"``, ``"conv2d"`` or ``"linear"`` nodes naming their ``"layer"``; everything
between them is one of the digital operations of `DIGITAL_OPS`, executed in float32 as the accelerator's
digital unit would. A model using any other operation is refused with the node that uses it.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cimq_pl.export.format import CIM_LAYER_OPS, DIGITAL_LAYER_OPS, ExportError, pair
from cimq_pl.quant.layers import CIMConv2d, CIMLinear, _CIMLayerBase


def _slice_index(index) -> list:
    """Basic indexing ``x[a:b:c, ...]`` as one ``[start, stop, step]`` (or None for ``:``) per dimension."""
    index = index if isinstance(index, tuple) else (index,)
    if not all(isinstance(item, slice) for item in index):
        raise ValueError(f"only slices are supported, got {index!r}")
    return [None if item == slice(None) else [item.start, item.stop, item.step] for item in index]


def _run_slice(x, node):
    return x[tuple(slice(None) if item is None else slice(*item) for item in node["index"])]


# op name -> (function(inputs, node) -> tensor, number of inputs)
DIGITAL_OPS: dict[str, tuple[Callable, int]] = {
    "identity": (lambda xs, node: xs[0], 1),
    "relu": (lambda xs, node: F.relu(xs[0]), 1),
    "add": (lambda xs, node: xs[0] + xs[1], 2),
    "flatten": (lambda xs, node: torch.flatten(xs[0], node["start_dim"], node["end_dim"]), 1),
    "adaptive_avg_pool2d": (lambda xs, node: F.adaptive_avg_pool2d(xs[0], node["output_size"]), 1),
    "max_pool2d": (lambda xs, node: F.max_pool2d(xs[0], node["kernel_size"], node["stride"], node["padding"],
                                                 node["dilation"], node["ceil_mode"]), 1),
    "pad": (lambda xs, node: F.pad(xs[0], node["pad"], "constant", node["value"]), 1),
    "slice": (lambda xs, node: _run_slice(xs[0], node), 1),
}
GRAPH_OPS = ("input", "output") + CIM_LAYER_OPS + DIGITAL_LAYER_OPS + tuple(DIGITAL_OPS)


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        return isinstance(module, _CIMLayerBase) or super().is_leaf_module(module, name)


def _module_node(module: nn.Module, target: str) -> dict:
    if isinstance(module, CIMConv2d):
        return {"op": "cim_conv2d", "layer": target}
    if isinstance(module, CIMLinear):
        return {"op": "cim_linear", "layer": target}
    if type(module) is nn.Conv2d:
        return {"op": "conv2d", "layer": target}
    if type(module) is nn.Linear:
        return {"op": "linear", "layer": target}
    if isinstance(module, (nn.Identity, nn.Dropout)):  # dropout is the identity at inference
        return {"op": "identity"}
    if isinstance(module, nn.ReLU):
        return {"op": "relu"}
    if isinstance(module, nn.Flatten):
        return {"op": "flatten", "start_dim": module.start_dim, "end_dim": module.end_dim}
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return {"op": "adaptive_avg_pool2d", "output_size": pair(module.output_size)}
    if isinstance(module, nn.MaxPool2d):
        return {"op": "max_pool2d", "kernel_size": pair(module.kernel_size), "stride": pair(module.stride),
                "padding": pair(module.padding), "dilation": pair(module.dilation), "ceil_mode": module.ceil_mode}
    raise ValueError(f"module type {type(module).__name__}")


def _flatten_node(args: tuple, kwargs: dict) -> dict:
    start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
    end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
    return {"op": "flatten", "start_dim": start, "end_dim": end}


def _function_node(target, args: tuple, kwargs: dict) -> dict:
    if target in (operator.add, torch.add) and not kwargs:
        return {"op": "add"}
    if target in (F.relu, torch.relu, torch.relu_):
        return {"op": "relu"}
    if target is torch.flatten:
        return _flatten_node(args, kwargs)
    if target is F.pad:
        pad = args[1] if len(args) > 1 else kwargs["pad"]
        mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
        value = args[3] if len(args) > 3 else kwargs.get("value", None)
        if mode != "constant":
            raise ValueError(f"F.pad mode={mode!r} (only 'constant')")
        return {"op": "pad", "pad": list(pad), "value": float(value or 0.0)}
    if target is operator.getitem:
        return {"op": "slice", "index": _slice_index(args[1])}
    if target is F.adaptive_avg_pool2d:
        return {"op": "adaptive_avg_pool2d", "output_size": pair(args[1] if len(args) > 1 else kwargs["output_size"])}
    raise ValueError(f"function {getattr(target, '__name__', target)}")


def _method_node(target: str, args: tuple, kwargs: dict) -> dict:
    if target == "flatten":
        return _flatten_node(args, kwargs)
    if target in ("relu", "relu_"):
        return {"op": "relu"}
    if target in ("add", "__add__") and not kwargs:
        return {"op": "add"}
    raise ValueError(f"tensor method .{target}()")


def trace_graph(model: nn.Module) -> tuple[list, dict]:
    """The model's graph as export nodes, and ``{layer name: module}`` of the layers it names.

    Raises:
        ExportError: when the model cannot be traced by ``torch.fx`` or uses an operation outside `GRAPH_OPS`
            (the message names the node).
    """
    try:
        graph = _Tracer().trace(model)
    except Exception as error:  # noqa: BLE001 - fx raises many types; report one clear line
        raise ExportError(f"the model cannot be traced by torch.fx for export: {error}") from error
    modules = dict(model.named_modules())
    nodes, layers = [], {}
    for node in graph.nodes:
        inputs = [arg.name for arg in node.args if isinstance(arg, torch.fx.Node)]
        try:
            if node.op == "placeholder":
                entry = {"op": "input"}
            elif node.op == "output":
                entry = {"op": "output"}
            elif node.op == "call_module":
                entry = _module_node(modules[node.target], node.target)
            elif node.op == "call_function":
                entry = _function_node(node.target, node.args, node.kwargs)
            elif node.op == "call_method":
                entry = _method_node(node.target, node.args, node.kwargs)
            else:
                raise ValueError(f"fx op {node.op!r}")
        except (ValueError, KeyError, TypeError) as error:
            raise ExportError(
                f"cannot export node {node.name!r} ({node.op} {node.target}): unsupported {error}; the export "
                f"supports CIM/float conv and linear layers and {sorted(DIGITAL_OPS)}"
            ) from error
        if "layer" in entry:
            layers[entry["layer"]] = modules[entry["layer"]]
        nodes.append({"name": node.name, **entry, "inputs": inputs})
    return nodes, layers


def check_graph(nodes, layers: dict) -> None:
    """Raise `ExportError` unless ``nodes`` is a well-formed graph: known ops, one input and one output node,
    every input an earlier node, every layer node naming an entry of ``layers`` of its kind."""
    if not isinstance(nodes, list) or not nodes:
        raise ExportError("manifest 'graph' must be a non-empty list of nodes")
    seen = set()
    for position, node in enumerate(nodes):
        if not isinstance(node, dict) or not {"name", "op", "inputs"} <= set(node):
            raise ExportError(f"graph node #{position} must be an object with 'name', 'op' and 'inputs': {node!r}")
        name, op = node["name"], node["op"]
        if op not in GRAPH_OPS:
            raise ExportError(f"graph node {name!r} has unknown op {op!r}: expected one of {list(GRAPH_OPS)}")
        missing = [i for i in node["inputs"] if i not in seen]
        if missing:
            raise ExportError(f"graph node {name!r} reads {missing}, which no earlier node produces")
        arity = DIGITAL_OPS[op][1] if op in DIGITAL_OPS else (0 if op == "input" else 1)
        if len(node["inputs"]) != arity:
            raise ExportError(f"graph node {name!r} ({op}) has {len(node['inputs'])} inputs: expected {arity}")
        if op in CIM_LAYER_OPS + DIGITAL_LAYER_OPS:
            layer = layers.get(node.get("layer"))
            if layer is None or layer.get("op") != op:
                raise ExportError(f"graph node {name!r} ({op}) names layer {node.get('layer')!r}, which 'layers' "
                                  f"does not hold as a {op}")
        seen.add(name)
    ops = [node["op"] for node in nodes]
    if ops.count("input") != 1 or ops[0] != "input" or ops.count("output") != 1 or ops[-1] != "output":
        raise ExportError("manifest 'graph' must start with its one 'input' node and end with its one 'output' node")


__all__ = ["DIGITAL_OPS", "GRAPH_OPS", "check_graph", "trace_graph"]
