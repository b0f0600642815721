"""Brute-force reference caches: the readable specification :func:`dormant.offload.simulator.simulate` is tested against.

Per layer, one neuron per item, plain Python containers:

* LRU -- a move-to-front list of resident items. Each token's touched items are moved to the back in
  ascending index order, then items are popped from the front until at most ``C`` remain.
* LFU -- a resident set and perfect use counts (kept after eviction); after each token the resident
  item with the smallest ``(uses, last_touch, index)`` is evicted until ``C`` remain.
* ``window=k`` -- before trimming, items not touched in the last ``k`` tokens are dropped.

Pinned items are always resident and never enter the dynamic cache.
"""

from __future__ import annotations

import numpy as np

__all__ = ["reference_loads"]


def reference_loads(
    masks: np.ndarray,
    capacity: int,
    kind: str = "lru",
    window: int = 0,
    pinned: np.ndarray | None = None,
    predicted: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Items loaded and items hit per token and layer.

    Args:
        masks: bool ``[T, L, N]`` active items.
        capacity: dynamic cache items per layer (0 = no cache).
        kind: ``lru`` or ``lfu``.
        window: drop items not touched in the last ``window`` tokens (0 = no limit).
        pinned: bool ``[L, N]`` always-resident items.
        predicted: bool ``[T, L, N]`` prefetched items (mispredicted active items are loaded too).

    Returns:
        ``(loads [T, L], hits [T, L])`` int arrays.
    """
    n_tok, n_layers, _ = masks.shape
    loads = np.zeros((n_tok, n_layers), dtype=np.int64)
    hits = np.zeros((n_tok, n_layers), dtype=np.int64)
    for layer in range(n_layers):
        pin = set(np.flatnonzero(pinned[layer])) if pinned is not None else set()
        order: list[int] = []           # LRU list, front = least recent
        resident: set[int] = set()      # LFU
        uses: dict[int, int] = {}
        last: dict[int, int] = {}
        for t in range(n_tok):
            active = set(np.flatnonzero(masks[t, layer]))
            pred = set(np.flatnonzero(predicted[t, layer])) if predicted is not None else set()
            held = (set(order) if kind == "lru" else resident) | pin
            hits[t, layer] = len(active & held)
            loads[t, layer] = len((active | pred) - held)
            touched = sorted((active | pred) - pin)
            for i in touched:
                last[i] = t
            for i in active - pin:
                uses[i] = uses.get(i, 0) + 1
            if capacity == 0:
                order, resident = [], set()
                continue
            if kind == "lru":
                for i in touched:
                    if i in order:
                        order.remove(i)
                    order.append(i)
                if window:
                    order = [i for i in order if last[i] > t - window]
                while len(order) > capacity:
                    order.pop(0)
            else:
                resident |= set(touched)
                if window:
                    resident = {i for i in resident if last[i] > t - window}
                while len(resident) > capacity:
                    resident.remove(min(resident, key=lambda i: (uses.get(i, 0), last[i], i)))
    return loads, hits
