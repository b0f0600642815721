"""Trace-driven simulation of FFN weight loading: what a policy reads, keeps and waits for, per token.

Two steps, so one cache simulation serves every device profile:

1. :func:`simulate` replays an :class:`~dormant.llm.masks.ActivationTrace` through a
   :class:`~dormant.offload.policies.Policy` under a DRAM budget and returns :class:`AccessStats`: per
   token and layer the demand and prefetch requests and bytes, the neurons computed; in total the DRAM
   hit rate, pollution and footprint.
2. :func:`estimate_time` turns those into time per token on a
   :class:`~dormant.offload.profiles.DeviceProfile`.

**Cache semantics** (per layer, chunk granularity; capacity ``C`` chunks per layer). A token's whole
active set ``A_t`` is known when the layer runs (oracle, or predictor plus demand misses), so a chunk
needed now is never evicted to make room for another chunk needed now. After token ``t`` the cache
holds the ``C`` chunks with the largest key among those in DRAM (cached before, or touched by ``t``)::

    LRU: key = (last_touch, index)            LFU: key = (uses, last_touch, index)

with perfect use counts and ties among chunks touched by the same token keeping the higher index. One
``np.partition`` per token and layer-row selects them, branch-free (:mod:`dormant.offload.reference`
holds the move-to-front list / evict-min reference it is tested against). A ``window`` of ``k``
first drops chunks not touched in the last ``k`` tokens. Pinned chunks sit outside the dynamic cache.

**Per token and layer**, with ``R`` the chunks in DRAM before the token and ``P`` the predicted ones::

    demand:   loads_dem = A \\ R
    prefetch: loads_pf  = P \\ R          (issued `lookahead` layers early)
              loads_dem = A \\ (R | P)    (mispredictions, charged as demand loads)
    dense:    loads_pf  = all \\ R        (streamed one layer ahead)

Requests and bytes come from :meth:`~dormant.offload.layout.ItemLayout.requests` (runs, alignment).
*Pollution* is the weight bytes of neurons that were loaded and left DRAM again without being used
(chunk over-read, false-positive prefetches, unused window entries); *padding* the alignment bytes.

**Timing model** (:func:`estimate_time`), per token; layers run in order and one storage queue serves
requests first-come first-served. With ``c_attn``, ``c_ffn[l]`` compute times
(``max(bytes / DRAM_bandwidth, FLOPs / throughput)`` -- batch-1 decode is DRAM-bound) and
``T(n, S)`` the storage batch time (:class:`~dormant.offload.profiles.StorageModel`)::

    at the start of layer j:  issue prefetch of layer j + d      (layers 0..d at token start)
                              io_free = max(io_free, now) + T(pf[j + d]);  ready[j + d] = io_free
    layer l:  now += c_attn + c_pred
              now  = max(now, ready[l])                        wait for the prefetch
              now  = io_free = max(io_free, now) + T(dem[l])   demand misses stall
              now += c_ffn[l]
    token:    now += c_head;   stall = now - sum(compute)

Not modelled: DRAM-bandwidth contention between I/O and compute, CPU cost of issuing reads,
KV-cache traffic, storage read/compute overlap inside a request.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dormant.offload.layout import ItemLayout
from dormant.offload.policies import Policy
from dormant.offload.profiles import DeviceProfile
from dormant.offload.traces import check_aligned, iter_masks
from dormant.traces import ActivationTrace

__all__ = ["AccessStats", "simulate", "capacity", "hot_chunks", "estimate_time"]


@dataclass
class AccessStats:
    """What one policy read and kept over the counted tokens of a trace.

    Per token and layer (``[T, L]``, counted tokens only): ``dem_req``, ``dem_bytes`` (demand
    requests / read bytes), ``pf_req``, ``pf_bytes`` (prefetch), ``compute`` (neurons computed).
    Totals are over the counted tokens.
    """

    policy: Policy
    budget: float
    n_tokens: int
    dem_req: np.ndarray
    dem_bytes: np.ndarray
    pf_req: np.ndarray
    pf_bytes: np.ndarray
    compute: np.ndarray
    needed: int = 0           # active neuron uses
    hits: int = 0             # ... found in DRAM from earlier tokens (cache or pinned)
    ready: int = 0            # ... in DRAM when needed (cache, pinned or prefetched)
    skipped: int = 0          # ... neither, and skipped (on_miss="skip")
    exact_bytes: int = 0      # weight bytes loaded (no padding)
    padding_bytes: int = 0
    pollution_bytes: int = 0
    resident_max: int = 0     # bytes held in DRAM after a token (pinned + cache), max over tokens
    resident_mean: float = 0.0
    transient_max: int = 0    # bytes of one layer loaded but not kept (streamed through), max
    capacity_items: int = 0   # dynamic cache chunks, all layers
    pinned_items: int = 0     # pinned chunks in total
    pin_load_bytes: int = 0   # one-time start-up load of the pinned chunks
    accesses: int = 0         # active-neuron accesses simulated (incl. warm-up)
    seconds: float = 0.0      # wall time of the simulation
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def read_bytes(self) -> np.ndarray:
        """``[T]`` bytes read from storage per token."""
        return (self.dem_bytes + self.pf_bytes).sum(1)

    def summary(self) -> dict[str, Any]:
        """Per-token averages and rates (JSON-ready)."""
        n = max(self.n_tokens, 1)
        need = max(self.needed, 1)
        return {
            "policy": self.policy.name,
            "budget": self.budget,
            "tokens": self.n_tokens,
            "bytes_per_token": float(self.read_bytes.mean()) if self.n_tokens else 0.0,
            "demand_bytes_per_token": float(self.dem_bytes.sum() / n),
            "prefetch_bytes_per_token": float(self.pf_bytes.sum() / n),
            "requests_per_token": float((self.dem_req + self.pf_req).sum() / n),
            "hit_rate": self.hits / need,
            "ready_rate": self.ready / need,
            "skipped_rate": self.skipped / need,
            "pollution_bytes_per_token": self.pollution_bytes / n,
            "padding_bytes_per_token": self.padding_bytes / n,
            "dram_footprint_bytes": int(self.resident_max + self.transient_max),
            "dram_resident_mean_bytes": float(self.resident_mean),
            "cache_chunks": self.capacity_items,
            "pinned_chunks": self.pinned_items,
            "pin_load_bytes": self.pin_load_bytes,
            "neurons_computed_per_token": float(self.compute.sum() / n),
            "sim_accesses_per_s": self.accesses / self.seconds if self.seconds > 0 else None,
        }


def capacity(policy: Policy, budget: float, n_layers: int, n_items: int,
             pinned: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """``(dynamic chunks per layer [L], pinned chunks in total)`` for a budget given as a fraction of the FFN.

    ``cap = floor(budget * L * M)`` chunks in all (``inf`` = all); ``floor(pin * cap)`` of them pinned. The
    rest is shared by the layers' dynamic caches in proportion to their unpinned chunks ``M - p_l``
    (evenly without pinning)::

        C_l = floor((cap - n_pin) * (M - p_l) / (L * M - n_pin))

    Args:
        pinned: bool ``[L, M]`` pinned chunks once chosen (``None``: only the pinned count is needed yet).
    """
    if budget < 0:
        raise ValueError("budget must be >= 0")
    full = n_layers * n_items
    total = full if math.isinf(budget) else min(int(budget * full + 1e-9), full)
    n_pin = int(policy.pin * total + 1e-9) if policy.pin else 0
    if policy.cache == "none":
        return np.zeros(n_layers, dtype=np.int64), n_pin
    per_layer_pinned = np.zeros(n_layers, dtype=np.int64) if pinned is None else pinned.sum(1)
    free = n_items - per_layer_pinned
    if full == n_pin:
        return np.zeros(n_layers, dtype=np.int64), n_pin
    caps = ((total - n_pin) * free) // (full - n_pin)
    return np.minimum(caps, free).astype(np.int64), n_pin


def hot_chunks(trace: ActivationTrace, items: ItemLayout, n: int, stop: int, block: int = 256) -> np.ndarray:
    """Bool ``[L, M]``: the ``n`` chunks most often active in tokens ``[0, stop)`` (ties: lower layer, index)."""
    counts = np.zeros((trace.n_layers, items.n_items), dtype=np.int64)
    for _, m in iter_masks(trace, 0, stop, block):
        counts += items.items(m).sum(0)
    pinned = np.zeros(counts.size, dtype=bool)
    if n > 0:
        pinned[np.argsort(-counts.ravel(), kind="stable")[:n]] = True
    return pinned.reshape(counts.shape)


def simulate(
    trace: ActivationTrace,
    policy: Policy,
    budget: float,
    items: ItemLayout,
    predicted: ActivationTrace | None = None,
    split: int = 0,
    warmup: int = 0,
    block: int = 256,
) -> AccessStats:
    """Replay ``trace`` tokens ``[split, T)`` through ``policy`` with a DRAM budget.

    Args:
        trace: oracle trace (the neurons that must be computed).
        policy: the policy.
        budget: DRAM for FFN chunks (pinned + cache) as a fraction of all FFN bytes; ``inf`` = unbounded.
        items: byte geometry of the model, weight format and storage layout.
        predicted: predicted trace aligned token-by-token with ``trace`` (policies with ``predictor="trace"``).
        split: tokens ``[0, split)`` only profile hot chunks for pinning; simulation starts at ``split``.
        warmup: simulated tokens at the start that are left out of the statistics (cold cache).
        block: tokens unpacked at a time.

    Returns:
        :class:`AccessStats` over tokens ``[split + warmup, T)``.
    """
    t_start = time.perf_counter()
    L, M, N = trace.n_layers, items.n_items, trace.n_neurons
    if N != items.n_neurons:
        raise ValueError(f"trace has {N} neurons per layer, the layout {items.n_neurons}")
    if policy.needs_prediction:
        if predicted is None:
            raise ValueError(f"policy {policy.name!r} needs a predicted trace (or predictor=oracle)")
        check_aligned(trace, predicted)
    if not 0 <= split < trace.n_tokens:
        raise ValueError(f"split {split} leaves no tokens of {trace.n_tokens} to simulate")
    _, n_pin = capacity(policy, budget, L, M)
    if n_pin and split == 0:
        raise ValueError("hot-neuron pinning needs a profiling part of the trace (split > 0): "
                         "profiling and evaluating on the same tokens would flatter it")
    pinned = hot_chunks(trace, items, n_pin, split, block) if n_pin else np.zeros((L, M), bool)
    caps, _ = capacity(policy, budget, L, M, pinned)
    cap = int(caps.max())
    uniform = bool((caps == cap).all())
    kth_rows = [(row, M - int(c)) for row, c in enumerate(caps)]
    n_counted = trace.n_tokens - split - warmup
    if n_counted <= 0:
        raise ValueError("warmup leaves no tokens to count")

    # Branch-free state (masked stores on random masks are slow): touch = last touch + 1 (0 = never), so
    # key = (touch - 1) * M + idx is negative exactly for chunks never seen.
    idx = np.arange(M, dtype=np.int64)
    horizon = trace.n_tokens + 1
    touch = np.zeros((L, M), dtype=np.int64)
    uses = np.zeros((L, M), dtype=np.int64)
    stale = np.int64(4) * horizon * horizon * M  # subtracted from keys outside the window
    any_pinned = bool(pinned.any())
    resident = np.zeros((L, M), dtype=bool)
    fresh = np.zeros((L, N), dtype=bool)       # loaded neurons not used since they were loaded
    ones_items = np.ones((L, M), dtype=bool)
    ones_neurons = np.ones((L, N), dtype=bool)
    no_items = np.zeros((L, M), dtype=bool)
    arrays = {k: np.zeros((n_counted, L), dtype=np.int64) for k in ("dem_req", "dem_bytes", "pf_req", "pf_bytes",
                                                                      "compute")}
    st = AccessStats(policy, budget, n_counted, **arrays, capacity_items=int(caps.sum()), pinned_items=int(pinned.sum()))
    st.pin_load_bytes = int(items.exact_bytes(pinned).sum())
    pinned_bytes = st.pin_load_bytes
    resident_sum = 0.0
    dense, prefetch = policy.fetch == "dense", policy.fetch == "prefetch"
    skip = prefetch and policy.on_miss == "skip"
    use_pred = prefetch and policy.predictor == "trace"
    pred_iter = iter_masks(predicted, split, None, block) if use_pred else None

    for t0, masks in iter_masks(trace, split, None, block):
        pmasks = next(pred_iter)[1] if use_pred else None
        # loads of the counted tokens of this block; their request costs are computed in one batch below
        dem_buf = np.zeros((len(masks), L, M), dtype=bool)
        pf_buf = np.zeros((len(masks), L, M), dtype=bool)
        k_first = None
        for j in range(len(masks)):
            r = t0 + j - split                      # simulated token index
            counted = r >= warmup
            if dense:
                an, a = ones_neurons, ones_items
            else:
                an = masks[j]
                a = items.items(an)
            in_dram = resident | pinned if any_pinned else resident
            if prefetch:
                pn = pmasks[j] if use_pred else an
                p = items.items(pn)
                pf = p & ~in_dram
                avail = in_dram | p
                dem = no_items if skip else a & ~avail
                touched = (a & avail) | p if skip else a | p
            elif dense:
                pf, dem, touched, avail = a & ~in_dram, no_items, a, ones_items
            else:
                pf, dem, touched, avail = no_items, a & ~in_dram, a, in_dram
            loads = pf | dem
            st.accesses += int(np.count_nonzero(an))

            # pollution bookkeeping: neurons of loaded chunks are fresh until used
            if loads.any():
                fresh |= items.neurons(loads)
            used = an if not skip else an & items.neurons(avail)
            fresh &= ~used

            # cache update: keys grow only for touched, unpinned chunks
            new_res = no_items
            if cap > 0:
                tch = touched & ~pinned if any_pinned else touched
                np.maximum(touch, tch * np.int64(r + 1), out=touch)
                if policy.cache == "lfu":
                    uses += a & ~pinned if any_pinned else a
                    key = (uses * horizon + touch - 1) * M + idx
                else:
                    key = (touch - 1) * M + idx
                # candidates: what is in DRAM now (cached or just loaded), within the window
                out = ~(resident | tch)
                if policy.window:
                    out |= touch <= r + 1 - policy.window
                key -= out * stale
                if uniform and cap >= M:
                    new_res = key >= 0
                elif uniform:
                    kth = np.partition(key, M - cap, axis=1)[:, M - cap : M - cap + 1]
                    new_res = key >= np.maximum(kth, 0)
                else:  # per-layer capacities (pinning takes more of some layers than of others)
                    kth = np.array([[np.partition(key[row], k)[k] if k < M else np.iinfo(np.int64).max]
                                    for row, k in kth_rows])
                    kth = np.where(np.array([[k <= 0] for _, k in kth_rows]), 0, kth)
                    new_res = key >= np.maximum(kth, 0)
            evicted = (resident | loads) & ~new_res
            if any_pinned:
                evicted &= ~pinned
            if evicted.any():
                ev = items.neurons(evicted)
                gone = fresh & ev
                st.pollution_bytes += int(np.count_nonzero(gone)) * items.neuron_bytes if counted else 0
                fresh &= ~ev
            transient = loads & ~new_res
            resident = new_res

            if not counted:
                continue
            k = r - warmup
            if k_first is None:
                k_first, j0 = k, j
            dem_buf[j], pf_buf[j] = dem, pf
            n_an = np.count_nonzero(an, axis=1)
            st.needed += int(n_an.sum())
            n_hits = int(np.count_nonzero(an & items.neurons(in_dram)))
            st.hits += n_hits
            # ready: in DRAM when the layer needs it, without a demand load (dense streams everything ahead)
            n_ready = int(np.count_nonzero(an & items.neurons(avail))) if not dense else int(n_an.sum())
            st.ready += n_ready
            if skip:
                st.skipped += int(n_an.sum()) - n_ready
            if dense:
                st.compute[k] = N
            elif prefetch:
                st.compute[k] = np.count_nonzero(pn if skip else pn | an, axis=1)
            else:
                st.compute[k] = n_an
            res_bytes = items.count_bytes(resident) + pinned_bytes
            resident_sum += res_bytes
            st.resident_max = max(st.resident_max, res_bytes)
            if transient.any():  # upper bound: full chunks
                per_layer = int(np.count_nonzero(transient, axis=1).max())
                st.transient_max = max(st.transient_max, per_layer * items.layout.chunk * items.neuron_bytes)
        if k_first is not None:
            ks = slice(k_first, k_first + len(masks) - j0)
            for buf, req, byt in ((dem_buf, st.dem_req, st.dem_bytes), (pf_buf, st.pf_req, st.pf_bytes)):
                n, rd, ex = items.cost(buf[j0:])
                req[ks], byt[ks] = n, rd
                st.exact_bytes += int(ex.sum())
                st.padding_bytes += int(rd.sum() - ex.sum())
    st.resident_mean = resident_sum / n_counted
    st.seconds = time.perf_counter() - t_start
    st.meta = {"split": split, "warmup": warmup, "chunk": items.layout.chunk, "bundling": items.layout.bundling,
               "align": items.layout.align, "coalesce": items.layout.coalesce, "format": items.fmt.name}
    return st


def estimate_time(
    stats: AccessStats,
    profile: DeviceProfile,
    items: ItemLayout,
    queue_depth: int | None = None,
    predictor_bytes_per_token: float = 0.0,
    predictor_flops_per_token: float = 0.0,
) -> dict[str, Any]:
    """Time per token of ``stats`` on ``profile`` (timeline in the module docstring).

    Args:
        stats: output of :func:`simulate`.
        profile: device.
        items: the layout the stats were simulated with (for bytes per neuron and geometry).
        queue_depth: reads kept in flight (capped by the device; ``None`` = device maximum).
        predictor_bytes_per_token: resident predictor weights read per token (spread evenly over layers).
        predictor_flops_per_token: predictor FLOPs per token (spread likewise).

    Returns:
        Per-token means: ``time_per_token_s``, ``tokens_per_s``, ``io_stall_s``, ``compute_s``,
        ``io_busy_s`` and the queue depth used.
    """
    g, fmt = items.geometry, items.fmt
    sm = profile.storage
    q = sm.depth(queue_depth)
    bw, fl = profile.dram_bandwidth, profile.flops
    L = g.n_layers
    c_attn = max(fmt.vector_bytes(g.attn_params) / bw, 2.0 * g.attn_params / fl)
    c_head = max(fmt.vector_bytes(g.head_params) / bw, 2.0 * g.head_params / fl) if g.head_params else 0.0
    c_pred = max(predictor_bytes_per_token / bw, predictor_flops_per_token / fl) / L
    neurons = stats.compute.astype(np.float64)
    c_ffn = np.maximum(neurons * items.neuron_bytes / bw, 2.0 * neurons * g.n_mats * g.hidden_size / fl)
    io_pf = sm.batch_time(stats.pf_req, stats.pf_bytes, q)
    io_dem = sm.batch_time(stats.dem_req, stats.dem_bytes, q)
    d = 1 if stats.policy.fetch == "dense" else stats.policy.lookahead

    T = stats.n_tokens
    now = np.zeros(T)
    io_free = np.zeros(T)
    ready = np.zeros((T, L))
    for j in range(min(d, L - 1) + 1):              # prefetches issued at token start
        io_free = io_free + io_pf[:, j]
        ready[:, j] = io_free
    for layer in range(L):
        if layer > 0 and layer + d < L:
            io_free = np.maximum(io_free, now) + io_pf[:, layer + d]
            ready[:, layer + d] = io_free
        now = now + c_attn + c_pred
        now = np.maximum(now, ready[:, layer])
        has_dem = io_dem[:, layer] > 0
        io_free = np.where(has_dem, np.maximum(io_free, now) + io_dem[:, layer], io_free)
        now = np.where(has_dem, io_free, now)
        now = now + c_ffn[:, layer]
    now = now + c_head
    compute = L * (c_attn + c_pred) + c_ffn.sum(1) + c_head
    tpt = float(now.mean()) if T else 0.0
    return {
        "profile": profile.name,
        "queue_depth": q,
        "time_per_token_s": tpt,
        "tokens_per_s": 1.0 / tpt if tpt > 0 else math.inf,
        "io_stall_s": float((now - compute).mean()) if T else 0.0,
        "compute_s": float(compute.mean()) if T else 0.0,
        "io_busy_s": float((io_pf + io_dem).sum(1).mean()) if T else 0.0,
    }
