"""Targets per layer *and tap* for a model-wide budget of linear weight bytes: TEAL's greedy search, and dormant's.

Both spread one target ``S`` -- the fraction of the site's linear weight bytes whose input entries are zero,
``sum_(l,p) bytes_p * s_(l,p) / sum_(l,p) bytes_p`` -- over every (layer, tap) of a site. Thresholds then come from
the calibration statistics at each (layer, tap)'s own target; calibration text only, never the evaluation text.

**greedy** (TEAL, Liu et al., ICLR 2025, arXiv 2408.14690, Sec. 4.2 and ``teal/greedyopt.py``): for each layer on
its own, start every projection at 0 and repeatedly raise the one whose next step increases the *block output
error* least -- the L2 distance between the layer's output with and without sparsity, on the layer's dense
calibration inputs, averaged over the last quarter of every window's positions -- until the layer's weighted mean
sparsity reaches ``S``. Steps are ``0.05 / w_p`` with ``w_p`` the projection's size relative to ``q``, so every step
adds the same number of skipped weights. The cost is a few hundred replays of each layer. TEAL keeps ``S`` in every
layer (it never moves sparsity between layers).

**loss** (dormant, beyond TEAL): spread the budget over *tap types* (q, k, v, o, gate, up, down, the head) by
their measured marginal loss at the operating point, not by a proxy. The loss is the mean per-token
``KL(dense || sparse)`` of the next-token distributions on a few hundred calibration tokens (always positive and
much smoother under small changes than NLL differences, which the sparsity noise swamps at this size). Each round
measures it at the current per-type targets and once more per type with that type's target raised by ``delta``
(``n_taps + 1`` forwards), giving each type's marginal loss per skipped byte ``g_p``. Loss grows about
exponentially with sparsity (on SmolLM2-135M any one type's loss at 70% is 7-12x its loss at 40%), so with
``g_p(x) = g_p exp(k (x - s_p))`` the targets that equalise marginal loss per byte under the byte budget are
``s_p + (log lambda - log g_p) / k``, ``lambda`` found by bisection, each move capped at ``max_step`` (a trust
region: the model is local); later rounds re-measure at the new point and correct. Every layer of a type gets its
type's target (as TEAL keeps every layer's). Measuring at the operating point matters: loss curves measured with
one type sparse at a time (an earlier version of this allocation) add up to the joint loss near uniform targets
but badly underestimate it far from them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dormant import distributed
from dormant.llm.adapters import FFNLayout, Linear, Tap, ffn_layout
from dormant.llm.hooks import tap_hooks
from dormant.llm.models import input_device
from dormant.llm.stats import ActivationStats

log = logging.getLogger(__name__)

__all__ = ["linear_of", "tap_bytes", "site_byte_fraction", "greedy_block_targets", "loss_targets", "QuantileTable"]

CAP = 0.95  # the highest target any tap is given
ROUNDS, DELTA, CURVATURE, MAX_STEP = 4, 0.1, 8.0, 0.1  # loss allocation: rounds, probe step, curvature, step cap


def linear_of(layout: FFNLayout, tap: Tap) -> Linear:
    lin = next((lin for lin in layout.linears() if lin.tap is tap), None)
    if lin is None:
        raise ValueError(f"{tap.value} is not the input of a linear layer: this allocation works on input taps "
                         "(sites linear, linear_head)")
    return lin


def tap_bytes(layout: FFNLayout, taps: Sequence[Tap]) -> torch.Tensor:
    """``[n_layers, n_taps]`` weights of each (layer, tap)'s linear (the head counted once, under the last layer)."""
    out = torch.zeros(layout.n_layers, len(taps), dtype=torch.float64)
    for j, t in enumerate(taps):
        lin = linear_of(layout, t)
        if t is Tap.HEAD_IN:
            out[-1, j] = lin.in_features * lin.out_features
        else:
            out[:, j] = lin.in_features * lin.out_features
    return out


def site_byte_fraction(layout: FFNLayout, taps: Sequence[Tap], targets: torch.Tensor) -> float:
    """The weight-weighted mean of ``[n_layers, n_taps]`` per-tap targets: the fraction of the site's linear
    weights whose inputs the targets zero."""
    size = tap_bytes(layout, taps)
    return float((size * targets.to(torch.float64)).sum() / size.sum())


class QuantileTable:
    """Fast per-stream quantiles of an :class:`ActivationStats`' histograms (one scalar per call)."""

    def __init__(self, stats: ActivationStats):
        h = stats.hist
        self.stats = stats
        self.counts = h.counts.double()
        self.cum = self.counts.cumsum(-1)
        self.edges = h.bin_edges()

    def threshold(self, layer: int, tap: Tap, q: float) -> float:
        s = self.stats.stream(layer, tap)
        cum, total = self.cum[s], float(self.cum[s, -1])
        if q <= 0 or total == 0:
            return 0.0
        k = q * total
        b = int(torch.searchsorted(cum, torch.tensor([k], dtype=torch.float64))[0].clamp(max=len(cum) - 1))
        prev = float(cum[b - 1]) if b > 0 else 0.0
        frac = min(max((k - prev) / max(float(self.counts[s, b]), 1.0), 0.0), 1.0)
        return float(self.edges[b] + frac * (self.edges[b + 1] - self.edges[b]))


def _channel_threshold(stats: ActivationStats, table: QuantileTable, layer: int, tap: Tap, q: float):
    t = table.threshold(layer, tap, q)
    if tap not in stats.scales:
        return t
    s = stats.scales[tap][layer]
    return torch.where(s > 0, t / s.clamp(min=1e-30), torch.full_like(s, math.inf))


def _layer_calls(model: nn.Module, layout: FFNLayout, windows: torch.Tensor) -> list[list[tuple]]:
    """Per decoder layer, the ``(args, kwargs)`` of each of its calls during one dense pass over ``windows``."""
    calls: list[list[tuple]] = [[] for _ in layout.layers]
    handles = []
    for layer, block in enumerate(layout.layers):
        def grab(module, args, kwargs, layer=layer):
            calls[layer].append((tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                                 dict(kwargs)))

        handles.append(block.register_forward_pre_hook(grab, with_kwargs=True))
    try:
        device = input_device(model)
        for i in range(len(windows)):
            model(windows[i : i + 1].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return calls


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.inference_mode()
def greedy_block_targets(model: nn.Module, stats: ActivationStats, windows: torch.Tensor, taps: Sequence[Tap],
                         targets: Sequence[float], base_step: float = 0.05, last_fraction: float = 0.25,
                         progress: bool = True) -> dict[float, torch.Tensor]:
    """TEAL's greedy search (module docstring): ``{target: [n_layers, n_taps] per-tap targets}``.

    One search per layer reaches the largest target; every smaller target is read off its path, as TEAL's
    lookup tables are. ``windows`` ``[n, seqlen]`` are the calibration tokens the layers are replayed on.
    """
    from tqdm.auto import tqdm

    layout = ffn_layout(model)
    taps = tuple(taps)
    if Tap.HEAD_IN in taps:
        raise ValueError("greedy allocation searches within decoder blocks; use site 'linear' (no LM head)")
    table = QuantileTable(stats)
    size = torch.tensor([linear_of(layout, t).in_features * linear_of(layout, t).out_features for t in taps],
                        dtype=torch.float64)
    q_size = float(size.min()) if Tap.Q_IN not in taps else float(size[taps.index(Tap.Q_IN)])
    weight = size / q_size  # TEAL's weights: parameters relative to q
    step = base_step / weight
    goal = max(targets)
    out = {t: torch.zeros(layout.n_layers, len(taps), dtype=torch.float64) for t in targets}
    calls = _layer_calls(model, layout, distributed.shard(windows))  # under torchrun: this rank's windows
    bar = tqdm(range(layout.n_layers), desc="greedy (TEAL)", unit="layer",
               disable=not progress or not distributed.is_main())
    for layer in bar:
        path = _greedy_layer(layout, stats, table, calls[layer], taps, layer, weight, step, sorted(targets),
                             last_fraction)
        for t, s in path.items():
            out[t][layer] = s
        bar.set_postfix(goal=goal)
    return out


def _greedy_layer(layout, stats, table, calls, taps, layer, weight, step, targets, last_fraction):
    current: dict[Tap, object] = {t: 0.0 for t in taps}
    block = layout.layers[layer]

    def enforce(_layer: int, tap: Tap, x: torch.Tensor):
        t = current[tap]
        if isinstance(t, torch.Tensor):
            return x.masked_fill(x.abs() < t.to(device=x.device, dtype=x.dtype), 0)
        return x.masked_fill(x.abs() < t, 0) if t > 0 else None

    path: dict[float, torch.Tensor] = {}
    with tap_hooks(layout, taps, enforce, layers=[layer]):
        dense = [_output(block(*a, **k)) for a, k in calls]

        def error() -> float:
            errs = []
            for (a, k), y0 in zip(calls, dense):
                y = _output(block(*a, **k))
                start = int(y.shape[1] * (1 - last_fraction))
                errs.append((y[:, start:] - y0[:, start:]).float().norm(dim=-1).mean())
            # every rank's window errors in window order: the mean one process takes, on every rank
            return float(distributed.gather_cat(torch.stack(errs) if errs else torch.zeros(0)).mean())

        s = torch.zeros(len(taps), dtype=torch.float64)
        pending = list(targets)
        while pending:
            effective = float((s * weight).sum() / weight.sum())
            while pending and effective >= pending[0] - 1e-9:
                path[pending.pop(0)] = s.clone()
            if not pending:
                break
            best, best_err = None, math.inf
            for j, tap in enumerate(taps):
                trial = float(s[j] + step[j])
                if trial > 0.99:
                    continue
                current[tap] = _channel_threshold(stats, table, layer, tap, trial)
                err = error()
                current[tap] = _channel_threshold(stats, table, layer, tap, float(s[j]))
                if err < best_err:
                    best, best_err = j, err
            if best is None:  # every projection at its cap: this layer cannot reach the remaining targets
                for t in pending:
                    path[t] = s.clone()
                break
            s[best] += step[best]
            current[taps[best]] = _channel_threshold(stats, table, layer, taps[best], float(s[best]))
    return path


@torch.inference_mode()
def loss_targets(model: nn.Module, stats: ActivationStats, windows: torch.Tensor, taps: Sequence[Tap],
                 targets: Sequence[float], rounds: int = ROUNDS, delta: float = DELTA, curvature: float = CURVATURE,
                 max_step: float = MAX_STEP, progress: bool = True) -> tuple[dict[float, torch.Tensor], dict[str, Any]]:
    """dormant's allocation (module docstring): ``({target: [n_layers, n_taps]}, {target: per-round log})``.

    ``windows`` are the few calibration tokens the loss is measured on; ``rounds x (n_taps + 1)`` forwards over
    them per target.
    """
    from tqdm.auto import tqdm

    from dormant.llm.sparsify import sparsified

    layout = ffn_layout(model)
    taps = tuple(taps)
    n_layers = layout.n_layers
    size = tap_bytes(layout, taps)
    device = input_device(model)
    windows = distributed.shard(windows)  # under torchrun: this rank's windows; the KL sums are gathered below
    dense = [model(w[None].to(device), use_cache=False).logits.float().log_softmax(-1).to(torch.bfloat16)
             for w in windows]
    share = size.sum(0) / size.sum()  # each tap's share of the site's weights
    owners = torch.zeros(n_layers, len(taps), dtype=torch.bool)
    for j, t in enumerate(taps):
        owners[-1 if t is Tap.HEAD_IN else slice(None), j] = True

    def matrix(s: torch.Tensor) -> torch.Tensor:
        return torch.where(owners, s.expand(n_layers, -1), torch.zeros((), dtype=torch.float64))

    def nll(s: torch.Tensor) -> float:  # mean KL(dense || sparse) per token: smoother than NLL differences
        parts, count = [], torch.zeros((), dtype=torch.int64)
        with sparsified(model, stats.thresholds(matrix(s), "probe")):
            for w, p_log in zip(windows, dense):
                q_log = model(w[None].to(device), use_cache=False).logits.float().log_softmax(-1)
                p_log = p_log.float()
                parts.append(float((p_log.exp() * (p_log - q_log)).sum(-1).sum()))
                count += p_log.shape[1]
        total = 0.0
        for v in distributed.gather_cat(torch.tensor(parts, dtype=torch.float64)).tolist():  # in window order
            total += v
        return total / int(distributed.all_reduce_sum_(count))

    out, logs = {}, {}
    bar = tqdm(total=len(targets) * rounds * (len(taps) + 1), desc="loss allocation", unit="pass",
               disable=not progress or not distributed.is_main())
    for target in sorted(targets):
        s = torch.full((len(taps),), float(target), dtype=torch.float64)
        log_rounds = []
        for _ in range(rounds):
            base = nll(s)
            bar.update()
            grad = torch.empty(len(taps), dtype=torch.float64)
            for j in range(len(taps)):
                trial = s.clone()
                trial[j] = min(float(s[j]) + delta, CAP)
                grad[j] = max(nll(trial) - base, 0.0) / max(float(trial[j] - s[j]) * float(share[j]), 1e-12)
                bar.update()
            s_next = _equalize(s, grad, share, float(target), curvature, max_step)
            log_rounds.append({"kl": base, "targets": s.tolist(), "marginal": grad.tolist()})
            log.info("loss allocation @ %.2f: KL %.4f at %s; marginal loss per byte share %s", target, base,
                     [round(v, 3) for v in s.tolist()], [round(v, 3) for v in grad.tolist()])
            s = s_next
        out[target] = matrix(s)
        logs[f"{target:g}"] = log_rounds
    bar.close()
    return out, logs


def _equalize(s: torch.Tensor, grad: torch.Tensor, share: torch.Tensor, target: float, k: float,
              max_step: float = 1.0) -> torch.Tensor:
    """Targets with equal marginal loss per skipped byte under ``g_j(x) = g_j exp(k (x - s_j))``, holding the
    weighted mean at ``target``: ``x_j = s_j + (log lam - log g_j) / k``, each within ``max_step`` of ``s_j``
    (a trust region: the model is local) and ``[0, CAP]`` (bisection on ``log lam``)."""
    log_g = grad.clamp(min=1e-9).log()
    lo_x, hi_x = (s - max_step).clamp(min=0.0), (s + max_step).clamp(max=CAP)

    def spread(log_lam: float) -> torch.Tensor:
        return torch.minimum(torch.maximum(s + (log_lam - log_g) / k, lo_x), hi_x)

    lo, hi = float(log_g.min()) - k * 2, float(log_g.max()) + k * 2
    for _ in range(100):
        mid = (lo + hi) / 2
        if float((spread(mid) * share).sum()) < target:
            lo = mid
        else:
            hi = mid
    return spread((lo + hi) / 2)
