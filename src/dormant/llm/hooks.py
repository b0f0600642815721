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

from dormant.llm.adapters import FFNLayout, Tap, TapPoint

__all__ = ["TapFn", "register_tap_hooks", "tap_hooks"]

TapFn = Callable[[int, Tap, torch.Tensor], "torch.Tensor | None"]


def register_tap_hooks(
    layout: FFNLayout, taps: Iterable[Tap], fn: TapFn, layers: Iterable[int] | None = None
) -> list[RemovableHandle]:
    """Register hooks calling ``fn`` on ``taps`` of ``layers`` (default: all); returns the handles."""
    taps = tuple(taps)
    groups: dict[TapPoint, list[tuple[Tap, int | None]]] = defaultdict(list)
    for tap in taps:
        p = layout.tap_point(tap)
        groups[TapPoint(p.module, p.direction, None, p.scope)].append((tap, p.half))
    handles = []
    last = layout.n_layers - 1
    for layer in range(layout.n_layers) if layers is None else layers:
        for point, members in groups.items():
            if point.scope == "head" and layer != last:
                continue  # the LM head runs once, after the last layer: its tap carries that layer's index
            module = layout.point_module(layer, point)
            if point.direction == "in":
                handles.append(module.register_forward_pre_hook(_pre_hook(layer, members, fn)))
            else:
                handles.append(module.register_forward_hook(_post_hook(layer, members, fn)))
    return handles


def _apply(layer: int, members, fn: TapFn, x: torch.Tensor) -> torch.Tensor | None:
    """``fn`` on each member tap in order; whole-tensor taps see the previous ones' result (e.g. ``FFN_IN`` then
    ``UP_IN`` on the input of a fused gate_up), half taps (fused gate | up outputs) see their half."""
    out, changed = x, False
    for tap, half in members:
        if half is not None:
            continue
        y = fn(layer, tap, out)
        if y is not None:
            out, changed = y, True
    halves_of = [(tap, half) for tap, half in members if half is not None]
    if not halves_of:
        return out if changed else None
    halves = list(out.chunk(2, dim=-1))
    for tap, half in halves_of:
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
