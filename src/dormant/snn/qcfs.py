"""QCFS: the quantization-clip-floor-shift activation, and QCFS networks made from ReLU networks.

Bu, Fang, Ding, Dai, Yu, Huang, "Optimal ANN-SNN Conversion for High-accuracy and Ultra-low-latency Spiking Neural
Networks", ICLR 2022. Each ReLU is replaced by (per layer, trainable clip ``theta``, ``L`` levels, shift
``phi = 1/2``)::

    h(z) = theta * clip( floor(z * L / theta + phi) / L, 0, 1 )

which equals ``theta * floor(clamp(z / theta, 0, 1) * L + phi) / L`` for ``0 <= phi < 1`` (the form computed here).
Gradients use the straight-through estimator ``d floor(u) / du := 1``, so inside ``0 < z < theta``::

    dh/dz = 1,   dh/dtheta = h/theta - z/theta;      above theta: dh/dz = 0, dh/dtheta = 1;   below 0: both 0.

After training, conversion (:func:`dormant.snn.conversion.convert`) turns each QCFS into an IF neuron whose threshold is
the trained ``theta`` and whose initial membrane is ``phi * theta = theta/2``; the expected SNN output then equals
``h`` at every T (QCFS Theorem 2), so QCFS networks need few steps. FTBC (Wu et al., ECCV 2024) applies on top,
with the QCFS activation as its target ("FTBC + QCFS").

Fine-tuning a ReLU network into a QCFS network (``dormant snn train-qcfs``) is the run
:func:`dormant.experiments.qcfs.train_qcfs`; this module holds the activation, the ReLU -> QCFS swap, its
initialisation from activation statistics and the checkpoint artifact.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dormant.artifacts import ArtifactError, load_artifact, save_artifact

__all__ = ["QCFS", "qcfs", "floor_ste", "qcfs_from_relu", "relu_activation_percentiles", "save_qcfs_checkpoint",
           "load_qcfs_model", "CHECKPOINT_KIND", "CHECKPOINT_VERSION"]

log = logging.getLogger(__name__)

CHECKPOINT_KIND = "dormant.QCFSCheckpoint"
CHECKPOINT_VERSION = 1


def floor_ste(u: torch.Tensor) -> torch.Tensor:
    """``floor(u)`` in the forward pass, identity gradient in the backward pass (straight-through estimator)."""
    return u + (torch.floor(u) - u).detach()


def qcfs(z: torch.Tensor, theta: torch.Tensor, levels: int, phi: float = 0.5) -> torch.Tensor:
    """``theta * floor(clamp(z/theta, 0, 1) * L + phi) / L`` (module docstring); ``theta`` broadcasts against ``z``."""
    return theta * floor_ste(torch.clamp(z / theta, 0.0, 1.0) * levels + phi) / levels


class QCFS(nn.Module):
    """QCFS activation with one trainable clip value per layer.

    Args:
        levels: quantization levels ``L`` (outputs take the ``L+1`` values ``theta * k / L``).
        theta: initial clip value (QCFS trains from 8.0; a pretrained ReLU net starts better from its activation
            statistics, see :func:`qcfs_from_relu`).
        phi: shift (1/2 gives the expected-error-free conversion with ``v(0) = theta/2``).
    """

    def __init__(self, levels: int = 4, theta: float = 8.0, phi: float = 0.5):
        super().__init__()
        if levels < 1 or theta <= 0:
            raise ValueError(f"QCFS needs levels >= 1 and theta > 0, got {levels}, {theta}")
        self.levels, self.phi = int(levels), float(phi)
        self.theta = nn.Parameter(torch.tensor(float(theta)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z``: any shape -> same shape."""
        return qcfs(z, self.theta, self.levels, self.phi)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, theta={float(self.theta.detach()):.4g}, phi={self.phi}"


def _relu_sites(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """``(parent, attribute, qualified name)`` of every ``nn.ReLU`` submodule."""
    sites = []
    for pname, parent in model.named_modules():
        for cname, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                sites.append((parent, cname, f"{pname}.{cname}" if pname else cname))
    return sites


@torch.no_grad()
def relu_activation_percentiles(model: nn.Module, x: torch.Tensor, percentile: float, batch_size: int = 100,
                                max_values: int = 2_000_000) -> dict[str, float]:
    """Per ``nn.ReLU`` module (by qualified name): the ``percentile`` of its outputs on inputs ``x`` ``[N, ...]``.

    At most ``max_values`` values per layer are kept (an evenly strided subsample) to bound memory.
    """
    model = model.eval()
    sites = _relu_sites(model)
    if not sites:
        raise ValueError(f"{type(model).__name__} has no nn.ReLU module")
    store: dict[str, list[torch.Tensor]] = {name: [] for _, _, name in sites}
    handles = []
    per_batch = max(1, max_values * batch_size // max(1, len(x)))
    for parent, cname, name in sites:
        def hook(mod, inp, out, name=name):
            v = out.detach().flatten().float()
            step = max(1, v.numel() // per_batch)
            store[name].append(v[::step].cpu())
        handles.append(getattr(parent, cname).register_forward_hook(hook))
    try:
        dev = next(model.parameters()).device
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size].to(dev))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, parts in store.items():
        v = torch.cat(parts)
        k = max(1, min(v.numel(), math.ceil(percentile / 100 * v.numel())))
        out[name] = float(v.kthvalue(k).values)
    return out


def qcfs_from_relu(model: nn.Module, levels: int, theta: float | dict[str, float] = 8.0) -> nn.Module:
    """A copy of ``model`` with every ``nn.ReLU`` module replaced by :class:`QCFS` (the input is not modified).

    Args:
        model: a ReLU network (each ReLU an ``nn.ReLU`` module).
        levels: ``L``.
        theta: initial clip value, one for all layers or ``{relu qualified name: value}``
            (e.g. from :func:`relu_activation_percentiles`).
    """
    import copy

    model = copy.deepcopy(model)
    sites = _relu_sites(model)
    if not sites:
        raise ValueError(f"{type(model).__name__} has no nn.ReLU module to replace")
    for parent, cname, name in sites:
        t = theta[name] if isinstance(theta, dict) else theta
        setattr(parent, cname, QCFS(levels, max(float(t), 1e-3)))
    return model


def save_qcfs_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer | None, meta: dict[str, Any]) -> Path:
    """Write a QCFS network (and the optimizer's momenta, to resume training) as one versioned artifact."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if opt is not None:
        for i, p in enumerate(opt.param_groups[0]["params"]):
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"opt.{i}"] = buf
    return save_artifact(path, CHECKPOINT_KIND, CHECKPOINT_VERSION, tensors, meta)


def load_qcfs_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the QCFS network saved by :func:`save_qcfs_checkpoint` (``dormant snn train-qcfs``) (any epoch checkpoint or the final ``qcfs.safetensors``).

    Returns:
        (model in eval mode on CPU, checkpoint meta: model name, levels, epoch, config, history, data).
    """
    from dormant.snn.models import build_model, load_state_dict_strict

    tensors, meta, _ = load_artifact(path, CHECKPOINT_KIND, (CHECKPOINT_VERSION,))
    try:
        model = qcfs_from_relu(build_model(meta["model"]), meta["levels"])
    except KeyError as e:
        raise ArtifactError(f"{path}: QCFS checkpoint meta lacks {e}") from e
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    load_state_dict_strict(model, state, str(path))
    return model.eval(), meta
