"""The structure of a conversion: trace an ANN, check every operation, fold batch-norm, swap in spiking modules.

:func:`spiking_graph` turns a trained ANN into the ``torch.fx`` graph a
:class:`~dormant.snn.network.SpikingNetwork` runs: each ``nn.ReLU`` (or QCFS activation) becomes an
:class:`~dormant.snn.neurons.IFNeuron` with unit thresholds, each max pooling a spike-count max pooling (or moves in
front of its neuron). It is shared by the conversion (:mod:`dormant.snn.conversion`, which then sets thresholds from
training activations) and by :meth:`SpikingNetwork.load` (which rebuilds the structure and loads the saved state),
so loading a network never needs the conversion itself. See :mod:`dormant.snn.conversion` for the supported
operations.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from dormant.config import UserError
from dormant.snn.configs import ConvertConfig
from dormant.snn.models import ZeroPadShortcut
from dormant.snn.neurons import IFNeuron, SpikeMaxPool2d
from dormant.snn.qcfs import QCFS

__all__ = ["ConversionError", "trace", "fold_batchnorm", "spiking_graph"]


class ConversionError(UserError, ValueError):
    """The network contains something the conversion cannot map onto spiking layers."""


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (ZeroPadShortcut, QCFS)) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` (a deep copy in eval mode) and check every operation (module docstring)."""
    model = copy.deepcopy(model).eval()
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many types on data-dependent control flow
        raise ConversionError(
            f"torch.fx could not trace {type(model).__name__} ({type(e).__name__}: {e}); conversion needs a forward "
            "without data-dependent control flow") from e
    gm = fx.GraphModule(model, graph)
    _check(gm)
    return gm


# ---- which operations are allowed --------------------------------------------------------------------------
_STATELESS_MODULES = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.AvgPool1d, nn.AvgPool2d,
                      nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity, nn.Dropout, nn.Dropout1d,
                      nn.Dropout2d, ZeroPadShortcut)
_ACTIVATIONS = (nn.ReLU, QCFS)
_MODULE_NAMES = "Conv1d/2d, Linear, BatchNorm1d/2d, ReLU, QCFS, AvgPool1d/2d, AdaptiveAvgPool1d/2d, MaxPool2d, Flatten, " \
                "Identity, Dropout, ZeroPadShortcut"
_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_, F.relu6, F.leaky_relu, torch.clamp, torch.clip}
_RELU_METHODS = {"relu", "relu_", "clamp", "clamp_", "clip"}


def _arg(node: fx.Node, i: int, name: str, default: Any) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _dims_keep_batch(dim: Any) -> bool:
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return dim is not None and all(isinstance(d, int) and d != 0 for d in dims)


def _getitem_ok(node: fx.Node) -> bool:
    src = node.args[0]
    if isinstance(src, fx.Node) and src.op == "call_method" and src.target == "size":
        return True
    idx = node.args[1]
    first = idx[0] if isinstance(idx, tuple) else idx
    return first == slice(None, None, None)


_FUNCTIONS: dict[Any, Callable[[fx.Node], bool]] = {
    operator.add: lambda n: True,
    operator.iadd: lambda n: True,
    torch.add: lambda n: True,
    torch.flatten: lambda n: _arg(n, 1, "start_dim", 0) != 0,
    torch.cat: lambda n: _arg(n, 1, "dim", 0) != 0,
    operator.getitem: _getitem_ok,
    F.avg_pool2d: lambda n: True,
    F.adaptive_avg_pool2d: lambda n: True,
    F.pad: lambda n: _arg(n, 2, "mode", "constant") == "constant" and not _arg(n, 3, "value", 0),
    torch.mean: lambda n: _dims_keep_batch(_arg(n, 1, "dim", None)),
}
_METHODS: dict[str, Callable[[fx.Node], bool]] = {
    "view": lambda n: True,
    "reshape": lambda n: True,
    "size": lambda n: True,
    "dim": lambda n: True,
    "contiguous": lambda n: True,
    "add": lambda n: True,
    "flatten": lambda n: _arg(n, 1, "start_dim", 0) != 0,
    "mean": lambda n: _dims_keep_batch(_arg(n, 1, "dim", None)),
}


def _fn_name(f: Any) -> str:
    return getattr(f, "__name__", repr(f))


def _check(gm: fx.GraphModule) -> None:
    mods = dict(gm.named_modules())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ConversionError(f"the network must take exactly one input tensor, got {len(placeholders)}")
    for node in gm.graph.nodes:
        where = f"node {node.name!r} ({node.format_node()})"
        if node.op == "call_module":
            m = mods[node.target]
            if isinstance(m, _ACTIVATIONS) or isinstance(m, _STATELESS_MODULES):
                if isinstance(m, QCFS) and (m.phi != 0.5 or float(m.theta.detach()) <= 0):
                    raise ConversionError(f"{where}: QCFS needs shift phi = 1/2 and theta > 0 to convert "
                                          f"(phi={m.phi}, theta={float(m.theta.detach()):.4g})")
                if isinstance(m, nn.Flatten) and m.start_dim == 0:
                    raise ConversionError(f"{where}: Flatten(start_dim=0) would mix time steps; use start_dim=1")
                continue
            if isinstance(m, nn.MaxPool2d):
                if m.return_indices:
                    raise ConversionError(f"{where}: max pooling that returns indices cannot be converted")
                continue
            raise ConversionError(
                f"{where}: module type {type(m).__name__} cannot be converted. Supported modules: {_MODULE_NAMES}")
        if node.op == "call_function":
            if node.target in _RELU_FUNCTIONS:
                raise ConversionError(
                    f"{where}: functional activation {_fn_name(node.target)}(...) has no module that could hold a "
                    "threshold and a membrane; write it as an nn.ReLU module (one per call site)")
            ok = _FUNCTIONS.get(node.target)
            if ok is None:
                raise ConversionError(
                    f"{where}: function {_fn_name(node.target)} cannot be converted. Supported functions: "
                    + ", ".join(sorted(_fn_name(f) for f in _FUNCTIONS)))
            if not ok(node):
                raise ConversionError(f"{where}: this use of {_fn_name(node.target)} would mix the batch (time) "
                                      "dimension or is not linear; see dormant.snn.conversion for the allowed forms")
        elif node.op == "call_method":
            if node.target in _RELU_METHODS:
                raise ConversionError(f"{where}: tensor method .{node.target}() used as activation; write it as an "
                                      "nn.ReLU module (one per call site)")
            ok = _METHODS.get(node.target)
            if ok is None:
                raise ConversionError(f"{where}: tensor method .{node.target}() cannot be converted. Supported "
                                      f"methods: {', '.join(sorted(_METHODS))}")
            if not ok(node):
                raise ConversionError(f"{where}: this use of .{node.target}() would mix the batch (time) dimension")
        elif node.op == "get_attr":
            raise ConversionError(f"{where}: direct use of a parameter/buffer in forward cannot be converted; put it "
                                  "in a supported module")
        elif node.op == "output":
            if not isinstance(node.args[0], fx.Node):
                raise ConversionError("the network must return a single tensor of logits")


# ---- batch-norm folding ------------------------------------------------------------------------------------
def _call_sites(gm: fx.GraphModule) -> dict[str, int]:
    sites: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            sites[n.target] = sites.get(n.target, 0) + 1
    return sites


@torch.no_grad()
def fold_batchnorm(gm: fx.GraphModule) -> list[str]:
    """Fold every BatchNorm whose input is a conv/linear used only there, in place. Returns the folded BN names."""
    mods = dict(gm.named_modules())
    sites = _call_sites(gm)
    folded = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(mods[node.target], (nn.BatchNorm1d, nn.BatchNorm2d)):
            continue
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1
                and isinstance(mods[prev.target], (nn.Conv1d, nn.Conv2d, nn.Linear))
                and sites[prev.target] == 1 and sites[node.target] == 1):
            continue
        bn, layer = mods[node.target], mods[prev.target]
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        g = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        b = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        layer.weight.copy_(layer.weight * g.view(-1, *([1] * (layer.weight.dim() - 1))))
        new_bias = (b - bn.running_mean) * g + beta
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias.clone())
        else:
            layer.bias.copy_(new_bias)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        folded.append(node.target)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return folded


def _move_maxpool_before_relu(gm: fx.GraphModule) -> None:
    """``maxpool(relu(z)) -> relu(maxpool(z))`` for every MaxPool2d (exact for the ANN; ReLU is monotone)."""
    mods = dict(gm.named_modules())
    for pool in list(gm.graph.nodes):
        if pool.op != "call_module" or not isinstance(mods[pool.target], nn.MaxPool2d):
            continue
        relu = pool.args[0]
        if not (isinstance(relu, fx.Node) and relu.op == "call_module" and isinstance(mods[relu.target], _ACTIVATIONS)
                and len(relu.users) == 1):
            raise ConversionError(f"maxpool='pre_neuron' needs ReLU -> MaxPool2d with no other use of the ReLU "
                                  f"output (at {pool.name!r}); use maxpool='spike_count'")
        z = relu.args[0]
        pool.replace_all_uses_with(relu)
        pool.args = (z,) + tuple(pool.args[1:])
        relu.args = (pool,)
        pool.append(relu)
    gm.graph.lint()
    gm.recompile()


def spiking_graph(ann: nn.Module, example: torch.Tensor, cfg: ConvertConfig | None = None) -> fx.GraphModule:
    """The traced, checked, batch-norm-folded graph of ``ann`` with spiking modules in place (unit thresholds).

    Args:
        ann: the trained ANN (left untouched: a copy is traced).
        example: one input batch ``[N, ...]`` (only its shape matters).
        cfg: conversion options (``v0``, ``shift`` and ``maxpool`` shape the structure).
    """
    from torch.fx.passes.shape_prop import ShapeProp

    cfg = cfg or ConvertConfig()
    gm = trace(ann)
    fold_batchnorm(gm)
    if cfg.maxpool == "pre_neuron":
        _move_maxpool_before_relu(gm)
    ShapeProp(gm).propagate(example.to(next(iter(gm.parameters())).device) if list(gm.parameters()) else example)
    mods = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = mods[node.target]
        if isinstance(m, _ACTIVATIONS):
            channels = node.meta["tensor_meta"].shape[1]
            if isinstance(m, QCFS):  # threshold = the trained clip value, ANN mode = the QCFS activation
                neuron = IFNeuron(m.theta.detach().float().expand(channels), cfg.v0, cfg.shift, levels=m.levels)
            else:
                neuron = IFNeuron(torch.ones(channels), v0=cfg.v0, shift=cfg.shift)
            gm.add_submodule(f"neurons.{node.name}", neuron)
            node.target = f"neurons.{node.name}"
        elif isinstance(m, nn.MaxPool2d) and cfg.maxpool == "spike_count":
            gm.add_submodule(f"pools.{node.name}", SpikeMaxPool2d(m))
            node.target = f"pools.{node.name}"
    gm.delete_all_unused_submodules()
    gm.recompile()
    if not any(isinstance(m, IFNeuron) for m in gm.modules()):
        raise ConversionError("the network has no nn.ReLU or QCFS module: nothing to convert into spiking neurons")
    return gm
