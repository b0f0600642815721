"""Observe or rewrite FFN taps with forward hooks -- the one mechanism behind calibration,
sparsification and measurement.

``fn(layer, tap, x)`` is called with the tap's tensor ``x``; returning a tensor replaces it in the
forward pass, returning ``None`` only observes. Taps on the same module share one hook, so a fused
``gate_up_proj`` output is split once. Handles are always removed by :func:`tap_hooks`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch.utils.hooks import RemovableHandle

from dormant.llm.adapters import FFNLayout, Tap

__all__ = ["TapFn", "register_tap_hooks", "tap_hooks"]

TapFn = Callable[[int, Tap, torch.Tensor], "torch.Tensor | None"]


def register_tap_hooks(
    layout: FFNLayout, taps: Iterable[Tap], fn: TapFn, layers: Iterable[int] | None = None
) -> list[RemovableHandle]:
    """Register hooks calling ``fn`` on ``taps`` of ``layers`` (default: all); returns the handles."""
    taps = tuple(taps)
    groups: dict[tuple[str, str], list[tuple[Tap, int | None]]] = defaultdict(list)
    for tap in taps:
        p = layout.tap_point(tap)
        groups[(p.module, p.direction)].append((tap, p.half))
    handles = []
    for layer in range(layout.n_layers) if layers is None else layers:
        for (name, direction), members in groups.items():
            module = layout.module(layer, name) if name else layout.ffns[layer]
            if direction == "in":
                handles.append(module.register_forward_pre_hook(_pre_hook(layer, members, fn)))
            else:
                handles.append(module.register_forward_hook(_post_hook(layer, members, fn)))
    return handles


def _apply(layer: int, members, fn: TapFn, x: torch.Tensor) -> torch.Tensor | None:
    if members[0][1] is None:  # whole tensor (a module carries at most one whole-tensor tap)
        return fn(layer, members[0][0], x)
    halves = list(x.chunk(2, dim=-1))
    changed = False
    for tap, half in members:
        y = fn(layer, tap, halves[half])
        if y is not None:
            halves[half], changed = y, True
    return torch.cat(halves, dim=-1) if changed else None


def _pre_hook(layer: int, members, fn: TapFn):
    def hook(module, args):
        y = _apply(layer, members, fn, args[0])
        return None if y is None else (y, *args[1:])

    return hook


def _post_hook(layer: int, members, fn: TapFn):
    def hook(module, args, output):
        return _apply(layer, members, fn, output)

    return hook


@contextmanager
def tap_hooks(
    layout: FFNLayout, taps: Iterable[Tap], fn: TapFn, layers: Iterable[int] | None = None
) -> Iterator[None]:
    """Context manager form of :func:`register_tap_hooks`; the hooks are removed on exit, always."""
    handles = register_tap_hooks(layout, taps, fn, layers)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
