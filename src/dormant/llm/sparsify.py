"""Apply thresholds in place (``sparsify_``), undo them (``unsparsify_``), and measure sparsity.

``sparsify_`` registers one forward hook per thresholded tap that zeroes entries with ``|a| < T`` (or
``|a_c| < T / s_c`` per channel for a scored tap; :class:`~dormant.llm.thresholds.Thresholds`) with
``masked_fill``, so NaNs pass through and ``T = 0`` leaves every value bit-identical. No module
is replaced and no forward is patched: parameter names, ``state_dict``, ``generate()`` and the KV
cache behave as before, and prefill and decode tokens are thresholded alike (as in the paper).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from dormant import distributed
from dormant.llm.adapters import FFNLayout, Tap, ffn_layout
from dormant.llm.hooks import register_tap_hooks, tap_hooks
from dormant.llm.models import input_device
from dormant.llm.thresholds import Thresholds

__all__ = [
    "sparsify_",
    "unsparsify_",
    "is_sparsified",
    "active_thresholds",
    "SparsifyState",
    "sparsify_state",
    "sparsified",
    "SparsityMeter",
    "measure_sparsity",
]


@dataclass(frozen=True)
class SparsifyState:
    """What :func:`sparsify_` installed on a model: its thresholds and the ids of its hook handles.

    Executors that bypass the hooked modules (:mod:`dormant.llm.sparse_decode`) use the ids to tell
    these hooks, whose effect they reproduce, from foreign hooks they must not skip.
    """

    thresholds: Thresholds
    hook_ids: frozenset[int]


@dataclass
class _State:
    public: SparsifyState
    handles: list


_ACTIVE: weakref.WeakKeyDictionary[nn.Module, _State] = weakref.WeakKeyDictionary()


def sparsify_(model: nn.Module, thresholds: Thresholds, model_id: str | None = None) -> nn.Module:
    """Enforce ``thresholds`` on ``model`` in place (validated against the model first). Returns ``model``."""
    layout = ffn_layout(model)
    thresholds.validate(layout, model_id)
    if model in _ACTIVE:
        unsparsify_(model)
    table = {(layer, tap): thresholds.channel_thresholds(layer, tap)
             for layer in range(layout.n_layers) for tap in thresholds.taps}
    device = input_device(model)
    table = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in table.items()}
    active = {k for k, v in table.items() if (bool((v > 0).any()) if isinstance(v, torch.Tensor) else v > 0)}

    def enforce(layer: int, tap: Tap, x: torch.Tensor) -> torch.Tensor | None:
        if (layer, tap) not in active:
            return None  # T = 0 everywhere: bit-identical to dense
        t = table[(layer, tap)]
        if isinstance(t, torch.Tensor) and (t.device != x.device or t.dtype != x.dtype):
            t = t.to(device=x.device, dtype=x.dtype)  # compare in the activation's dtype, as a scalar would be
            table[(layer, tap)] = t
        return x.masked_fill(x.abs() < t, 0)

    handles = register_tap_hooks(layout, thresholds.taps, enforce)
    _ACTIVE[model] = _State(SparsifyState(thresholds, frozenset(h.id for h in handles)), handles)
    return model


def unsparsify_(model: nn.Module) -> nn.Module:
    """Remove the thresholds ``sparsify_`` installed (no-op on a dense model). Returns ``model``."""
    state = _ACTIVE.pop(model, None)
    if state is not None:
        for h in state.handles:
            h.remove()
    return model


@contextmanager
def sparsified(model: nn.Module, thresholds: Thresholds | None, model_id: str | None = None) -> Iterator[nn.Module]:
    """Enforce ``thresholds`` inside the block and restore the model's previous state on exit, always.

    ``thresholds=None`` leaves the model as it is. On exit the thresholds that were active before (if any) are
    put back, otherwise the model is dense again.
    """
    if thresholds is None:
        yield model
        return
    previous = active_thresholds(model)
    sparsify_(model, thresholds, model_id)
    try:
        yield model
    finally:
        if previous is None:
            unsparsify_(model)
        else:
            sparsify_(model, previous)


def is_sparsified(model: nn.Module) -> bool:
    return model in _ACTIVE


def sparsify_state(model: nn.Module) -> SparsifyState | None:
    """The thresholds and hook ids :func:`sparsify_` installed on ``model`` (``None`` if dense)."""
    state = _ACTIVE.get(model)
    return None if state is None else state.public


def active_thresholds(model: nn.Module) -> Thresholds | None:
    state = sparsify_state(model)
    return None if state is None else state.thresholds


class SparsityMeter:
    """Counts exact zeros per (layer, tap) in the forward passes run while it is active.

    ``MID`` is always measured: its zero fraction is the **neuron-level sparsity**, the fraction of
    FFN neurons (per token) whose weights in ``down`` need not be read; so is ``ACT`` for gated FFNs (a zero
    ``act(gate)`` also spares the neuron's up row).
    """

    def __init__(self, layout: FFNLayout, taps: Sequence[Tap]):
        self.layout = layout
        self.taps = tuple(dict.fromkeys((*taps, Tap.MID, *((Tap.ACT,) if layout.gated else ()))))
        self.zeros = torch.zeros(layout.n_layers, len(self.taps), dtype=torch.float64)
        self.total = torch.zeros(layout.n_layers, len(self.taps), dtype=torch.float64)
        self._pending: list[tuple[int, int, torch.Tensor, int]] = []

    def observe(self, layer: int, tap: Tap, x: torch.Tensor) -> None:
        j = self.taps.index(tap)
        self._pending.append((layer, j, (x == 0).sum(), x.numel()))
        if len(self._pending) > 4096:
            self._flush()

    def _flush(self) -> None:
        for layer, j, z, n in self._pending:
            self.zeros[layer, j] += float(z)
            self.total[layer, j] += n
        self._pending.clear()

    def fraction(self) -> torch.Tensor:
        """``[n_layers, n_taps]`` zero fraction."""
        self._flush()
        return self.zeros / self.total.clamp(min=1)

    def zero(self) -> dict[tuple[int, Tap], float]:
        """``{(layer, tap): zero fraction}`` (the LM head's ``HEAD_IN`` under the last layer)."""
        frac = self.fraction()
        return {(layer, t): float(frac[layer, j]) for j, t in enumerate(self.taps)
                for layer in range(self.layout.n_layers) if self.total[layer, j] > 0}

    def summary(self) -> dict:
        frac = self.fraction()
        out = {
            "per_tap": {t.value: float(frac[self.total[:, j] > 0, j].mean()) if (self.total[:, j] > 0).any() else 0.0
                        for j, t in enumerate(self.taps)},
            "per_layer": {t.value: frac[:, j].tolist() for j, t in enumerate(self.taps)},
            "neuron": float(frac[:, self.taps.index(Tap.MID)].mean()),
        }
        return out


@contextmanager
def measure_sparsity(model: nn.Module, taps: Sequence[Tap] = ()) -> Iterator[SparsityMeter]:
    """Measure zero fractions at ``taps`` (and ``MID``) during the enclosed forward passes.

    Hooks registered here run after those of :func:`sparsify_`, so they see the thresholded tensors.
    """
    layout = ffn_layout(model)
    meter = SparsityMeter(layout, taps)
    with tap_hooks(layout, meter.taps, meter.observe):
        yield meter
    meter._flush()
    for t in (meter.zeros, meter.total):  # under torchrun: every rank's windows (ratios are unchanged otherwise)
        distributed.all_reduce_sum_(t)
