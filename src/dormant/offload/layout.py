"""How FFN weights sit in the weight file, and what reading a set of neuron chunks costs in requests and bytes.

Two layouts (LLM in a flash, Alizadeh et al. 2024, §3.2):

* ``separate`` -- the three matrices are stored one after the other, each neuron-major (gate and up
  rows as in PyTorch; the down matrix stored transposed so that column ``i`` is contiguous). Loading
  neuron ``i`` costs one request per matrix.
* ``bundled`` -- row-column bundling: gate row ``i``, up row ``i`` and down column ``i`` are stored
  contiguously, so one request loads the whole neuron.

Neurons are grouped into *chunks* of ``chunk`` consecutive neurons, the unit of loading and caching
(``chunk=1``: single neurons). With ``coalesce`` a run of consecutive needed chunks is read with one
request. Every request is widened to ``align``-byte boundaries (flash pages and ``O_DIRECT`` require
it), and the widening is counted as read bytes (*padding*). For one run of chunks ``a..b`` of a region
whose unit is ``u`` bytes per neuron::

    bytes(run) = ceil(end_b / align) * align - floor(start_a / align) * align
    start_a = first_neuron(a) * u,   end_b = (last_neuron(b) + 1) * u

Each layer's region (and each matrix's region within it, for ``separate``) starts on an ``align``
boundary.
"""

from __future__ import annotations

import numpy as np

from dormant.formats import WeightFormat
from dormant.offload.configs import StorageLayout
from dormant.offload.traces import FFNGeometry

__all__ = ["StorageLayout", "ItemLayout"]


def _ceil_to(x: np.ndarray | int, a: int):
    return -(-x // a) * a


class ItemLayout:
    """Per-chunk byte geometry of one model, weight format and :class:`StorageLayout`.

    Attributes:
        n_items: chunks per layer ``M = ceil(I / chunk)``.
        item_neurons: ``[M]`` neurons in each chunk (the last may be short).
        neuron_bytes: bytes of one neuron (all matrices).
        n_segments: regions a chunk is spread over (1 bundled, ``n_mats`` separate).
        unit: bytes per neuron within one segment.
        floor_start, ceil_end: ``[M]`` aligned start / end offset of each chunk within its segment.
        segment_bytes: aligned size of one segment region; ``layer_bytes`` of one layer.
    """

    def __init__(self, geometry: FFNGeometry, fmt: WeightFormat, layout: StorageLayout):
        self.geometry, self.fmt, self.layout = geometry, fmt, layout
        n, c, a = geometry.intermediate_size, layout.chunk, layout.align
        self.n_neurons = n
        self.n_items = -(-n // c)
        first = np.arange(self.n_items, dtype=np.int64) * c
        last = np.minimum(first + c, n)
        self.item_neurons = last - first
        self.neuron_bytes = geometry.neuron_bytes(fmt)
        self.n_segments = 1 if layout.bundling == "bundled" else geometry.n_mats
        self.unit = self.neuron_bytes // self.n_segments
        self.floor_start = (first * self.unit) // a * a
        self.ceil_end = _ceil_to(last * self.unit, a)
        self.item_aligned = self.ceil_end - self.floor_start
        self.item_bytes = self.item_neurons * self.neuron_bytes  # exact (unpadded) bytes per chunk
        self.segment_bytes = int(_ceil_to(n * self.unit, a))
        self.layer_bytes = self.segment_bytes * self.n_segments

    def items(self, neuron_mask: np.ndarray) -> np.ndarray:
        """Bool ``[..., I]`` neuron mask -> ``[..., M]`` chunk mask (a chunk is needed if any neuron is)."""
        c = self.layout.chunk
        if c == 1:
            return neuron_mask
        n, m = self.n_neurons, self.n_items
        pad = m * c - n
        if pad:
            neuron_mask = np.concatenate([neuron_mask, np.zeros(neuron_mask.shape[:-1] + (pad,), bool)], -1)
        return neuron_mask.reshape(neuron_mask.shape[:-1] + (m, c)).any(-1)

    def neurons(self, item_mask: np.ndarray) -> np.ndarray:
        """Bool ``[..., M]`` chunk mask -> ``[..., I]`` mask of the neurons those chunks hold."""
        c = self.layout.chunk
        if c == 1:
            return item_mask
        return np.repeat(item_mask, c, axis=-1)[..., : self.n_neurons]

    def cost(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Requests, read bytes (padding included) and exact weight bytes of a ``[..., M]`` load mask.

        Vectorised over all leading axes (e.g. ``[tokens, layers, M]``): run starts and ends are found
        by shifting, their positions by one ``flatnonzero``, per-row sums by ``bincount``.

        Returns:
            ``(n_requests, read_bytes, exact_bytes)``, int64 arrays of the leading shape.
        """
        lead, m_items = mask.shape[:-1], mask.shape[-1]
        flat = mask.reshape(-1, m_items)
        rows = flat.shape[0]
        s = self.n_segments
        if not flat.any():
            z = np.zeros(lead, dtype=np.int64)
            return z, z.copy(), z.copy()

        def row_sums(m: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            row, col = np.divmod(np.flatnonzero(m), m_items)
            return (np.bincount(row, minlength=rows),
                    np.bincount(row, weights=weights[col], minlength=rows))

        if self.layout.coalesce:
            starts = flat.copy()
            starts[:, 1:] &= ~flat[:, :-1]
            ends = flat.copy()
            ends[:, :-1] &= ~flat[:, 1:]
            n, lo = row_sums(starts, self.floor_start)
            _, hi = row_sums(ends, self.ceil_end)
            read = hi - lo
        else:
            n, read = row_sums(flat, self.item_aligned)
        c, short = self.layout.chunk, int(self.item_neurons[-1])
        neurons = np.count_nonzero(flat, axis=1) * c
        if short != c:
            neurons -= flat[:, -1] * (c - short)
        exact = neurons * self.neuron_bytes
        return ((n * s).reshape(lead), np.rint(read * s).astype(np.int64).reshape(lead),
                exact.astype(np.int64).reshape(lead))

    def requests(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(n_requests [L], read_bytes [L])`` of a ``[L, M]`` chunk mask of loads (see :meth:`cost`)."""
        n, read, _ = self.cost(mask)
        return n, read

    def exact_bytes(self, mask: np.ndarray) -> np.ndarray:
        """``[...]`` weight bytes of the masked chunks (last axis ``M``), without padding."""
        return np.where(mask, self.item_bytes, 0).sum(-1)

    def count_bytes(self, mask: np.ndarray) -> int:
        """Total weight bytes of a ``[L, M]`` chunk mask (fast: only the last chunk may be short)."""
        c, short = self.layout.chunk, int(self.item_neurons[-1])
        n = np.count_nonzero(mask) * c - (np.count_nonzero(mask[..., -1]) * (c - short) if short != c else 0)
        return int(n) * self.neuron_bytes

    def request_list(self, layer: int, mask_row: np.ndarray) -> list[tuple[int, int]]:
        """``[(file offset, size)]`` of the requests that load ``mask_row`` (``[M]``) of ``layer``."""
        idx = np.flatnonzero(mask_row)
        if len(idx) == 0:
            return []
        if self.layout.coalesce:
            brk = np.flatnonzero(np.diff(idx) > 1)
            runs = list(zip(np.r_[idx[0], idx[brk + 1]], np.r_[idx[brk], idx[-1]]))
        else:
            runs = [(i, i) for i in idx]
        out = []
        base = layer * self.layer_bytes
        for seg in range(self.n_segments):
            off = base + seg * self.segment_bytes
            out += [(int(off + self.floor_start[a]), int(self.ceil_end[b] - self.floor_start[a])) for a, b in runs]
        return out
