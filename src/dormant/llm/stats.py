"""Streaming, memory-bounded summaries of |activation| per (layer, tap), read back as quantiles.

:class:`MagnitudeHistogram` bins ``|x|`` by the top bits of its float32 bit pattern: the 8 exponent
bits and the top ``m`` mantissa bits. That is a log-linear grid -- ``2**m`` equal bins per octave,
relative bin width ``2**-m`` -- computed with one shift and one ``bincount``, without storing any
activation. Values below ``2**min_exp`` (including exact zeros) fall in the first bin, values above
``2**max_exp`` in the last; NaN/Inf (exponent 255) are dropped and counted.

Accuracy: a quantile is read by linear interpolation inside the bin where the cumulative count
crosses ``q*N``. Its rank error is bounded by the mass of one bin (at most the mass of one octave
divided by ``2**m``) and, for smooth densities, is far smaller; with the default ``m = 8`` the tests
check a rank error below 1e-3 against ``numpy.percentile`` on real activations. A summary costs
``n_bins * 8`` bytes per stream (128 KiB by default), whatever the number of tokens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dormant import distributed
from dormant.artifacts import load_artifact, save_artifact
from dormant.config import UserError
from dormant.llm.adapters import Tap, ffn_layout
from dormant.llm.hooks import tap_hooks
from dormant.llm.models import input_device
from dormant.llm.sparsify import sparsified, sparsify_state
from dormant.llm.thresholds import Thresholds, normalize_targets

__all__ = ["MagnitudeHistogram", "ActivationStats", "StatsConfig", "CalibrationError", "collect_stats"]


class CalibrationError(UserError, ValueError):
    """The calibration text gave nothing to read a threshold from (e.g. only NaN/Inf activations)."""


class MagnitudeHistogram:
    """Log-linear histograms of ``|x|`` for ``n_streams`` independent streams.

    Args:
        n_streams: number of independent streams (e.g. layers x taps).
        mantissa_bits: bins per octave are ``2**mantissa_bits``.
        min_exp, max_exp: the binned range is ``[2**min_exp, 2**max_exp)``; outside values are clamped.
    """

    def __init__(self, n_streams: int, mantissa_bits: int = 8, min_exp: int = -40, max_exp: int = 24):
        if not 0 <= mantissa_bits <= 12:
            raise ValueError("mantissa_bits must be in [0, 12]")
        if not -126 <= min_exp < max_exp <= 127:
            raise ValueError("need -126 <= min_exp < max_exp <= 127")
        self.mantissa_bits, self.min_exp, self.max_exp = mantissa_bits, min_exp, max_exp
        self.shift = 23 - mantissa_bits
        self.lo_code = (min_exp + 127) << mantissa_bits
        self.hi_code = (max_exp + 127) << mantissa_bits
        self.n_bins = self.hi_code - self.lo_code
        self._counts = torch.zeros(n_streams, self.n_bins, dtype=torch.int64)
        self._nonfinite = torch.zeros(n_streams, dtype=torch.int64)
        self._zeros = torch.zeros(n_streams, dtype=torch.int64)
        self._dev: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def n_streams(self) -> int:
        return self._counts.shape[0]

    @property
    def counts(self) -> torch.Tensor:
        """``[n_streams, n_bins]`` int64 bin counts (finite values only)."""
        return self.sync()._counts

    @property
    def nonfinite(self) -> torch.Tensor:
        """``[n_streams]`` number of NaN/Inf values dropped."""
        return self.sync()._nonfinite

    @property
    def zeros(self) -> torch.Tensor:
        """``[n_streams]`` number of exact zeros (and float32 subnormals below about ``2**-134``)."""
        return self.sync()._zeros

    def update(self, stream: int, x: torch.Tensor) -> None:
        """Add all elements of ``x`` (any shape, any float dtype, any device) to ``stream``."""
        codes = x.detach().float().abs().view(torch.int32) >> self.shift
        raw = torch.bincount(codes.flatten(), minlength=256 << self.mantissa_bits)
        finite_end = 255 << self.mantissa_bits
        counts, nonfinite, zeros = self._device_buffers(x.device)
        binned = raw[self.lo_code : self.hi_code].clone()
        binned[0] += raw[: self.lo_code].sum()
        binned[-1] += raw[self.hi_code : finite_end].sum()
        counts[stream] += binned
        nonfinite[stream] += raw[finite_end:].sum()
        zeros[stream] += raw[0]

    def _device_buffers(self, device: torch.device):
        if device not in self._dev:
            self._dev[device] = (
                torch.zeros_like(self._counts, device=device),
                torch.zeros_like(self._nonfinite, device=device),
                torch.zeros_like(self._zeros, device=device),
            )
        return self._dev[device]

    def sync(self) -> MagnitudeHistogram:
        """Fold per-device accumulators into the CPU tensors (call before reading counts)."""
        for c, n, z in self._dev.values():
            self._counts += c.cpu()
            self._nonfinite += n.cpu()
            self._zeros += z.cpu()
        self._dev.clear()
        return self

    def all_reduce_(self) -> MagnitudeHistogram:
        """Sum the counts of every rank into every rank's (exact: int64), in place; the identity in one process."""
        self.sync()
        for t in (self._counts, self._nonfinite, self._zeros):
            distributed.all_reduce_sum_(t)
        return self

    def bin_edges(self) -> torch.Tensor:
        """Lower edges of all bins and the upper edge of the last, as float64 ``[n_bins + 1]``."""
        codes = torch.arange(self.lo_code, self.hi_code + 1, dtype=torch.int64)
        edges = (codes << self.shift).to(torch.int32).view(torch.float32).double()
        edges[0] = 0.0  # the first bin also holds everything below 2**min_exp
        return edges

    def quantile(self, q: float | torch.Tensor) -> torch.Tensor:
        """Per stream, the value ``T`` with a fraction ``q`` of the finite ``|x|`` below it.

        ``q`` is a scalar or a ``[n_streams]`` tensor. Streams with no data give NaN.
        """
        counts = self.counts.double()
        q = torch.as_tensor(q, dtype=torch.float64).expand(self.n_streams)
        if ((q < 0) | (q > 1)).any():
            raise ValueError("quantiles must lie in [0, 1]")
        cum = counts.cumsum(-1)
        total = cum[:, -1]
        k = q * total
        b = torch.searchsorted(cum, k.unsqueeze(-1)).squeeze(-1).clamp(max=self.n_bins - 1)
        prev = torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
        in_bin = counts.gather(1, b.unsqueeze(-1)).squeeze(-1)
        frac = ((k - prev) / in_bin.clamp(min=1)).clamp(0, 1)
        edges = self.bin_edges()
        t = edges[b] + frac * (edges[b + 1] - edges[b])
        t = torch.where(q <= 0, torch.zeros_like(t), t)
        return torch.where(total > 0, t, torch.full_like(t, math.nan))

    def cdf(self, values: torch.Tensor) -> torch.Tensor:
        """Per stream, the fraction of ``|x|`` below each of ``values`` (``[n_values]``) -> ``[n_streams, n_values]``."""
        edges = self.bin_edges()
        cum = torch.cat([torch.zeros(self.n_streams, 1, dtype=torch.float64), self.counts.double().cumsum(-1)], -1)
        total = cum[:, -1:].clamp(min=1)
        v = values.double().clamp(min=0)
        idx = (torch.searchsorted(edges, v, right=True) - 1).clamp(0, self.n_bins - 1)
        frac = ((v - edges[idx]) / (edges[idx + 1] - edges[idx])).clamp(0, 1)
        below = cum[:, idx] + frac * (cum[:, idx + 1] - cum[:, idx])
        return below / total

    def state(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts, "nonfinite": self.nonfinite, "zeros": self.zeros}

    def params(self) -> dict[str, int]:
        return {"mantissa_bits": self.mantissa_bits, "min_exp": self.min_exp, "max_exp": self.max_exp}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], params: dict[str, int]) -> MagnitudeHistogram:
        h = cls(tensors["counts"].shape[0], **params)
        if tensors["counts"].shape[1] != h.n_bins:
            raise ValueError("histogram counts do not match their bin parameters")
        h._counts, h._nonfinite, h._zeros = (tensors[k].clone() for k in ("counts", "nonfinite", "zeros"))
        return h


@dataclass
class ActivationStats:
    """|activation| summaries of one model, per (layer, tap), from one pass over calibration text.

    The stream of layer ``l`` and tap ``taps[j]`` is ``l * len(taps) + j``. Version 1.
    """

    hist: MagnitudeHistogram
    taps: tuple[Tap, ...]
    model: dict[str, Any]  # FFNLayout.describe() plus "id"
    data: dict[str, Any] = field(default_factory=dict)  # what text, how many windows/tokens
    seconds: float = 0.0
    scales: dict[Tap, torch.Tensor] = field(default_factory=dict)  # per-channel score scales [n_layers, C]
    score: str = "magnitude"

    KIND = "dormant.ActivationStats"
    VERSION = 1

    @property
    def n_layers(self) -> int:
        return self.model["n_layers"]

    def stream(self, layer: int, tap: Tap) -> int:
        return layer * len(self.taps) + self.taps.index(tap)

    def quantiles(self, q: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
        """``[n_layers, n_taps]`` values below which a fraction ``q`` (scalar, per layer ``[n_layers]`` or per tap
        ``[n_layers, n_taps]``) of the scores lies."""
        q = torch.as_tensor(q, dtype=torch.float64)
        if q.ndim == 2:
            if tuple(q.shape) != (self.n_layers, len(self.taps)):
                raise ValueError(f"per-tap targets {tuple(q.shape)} do not match {self.n_layers} x {len(self.taps)}")
            q = q.flatten()
        elif q.ndim == 1:
            if len(q) != self.n_layers:
                raise ValueError(f"got {len(q)} per-layer targets for {self.n_layers} layers")
            q = q.repeat_interleave(len(self.taps))
        return self.hist.quantile(q).view(self.n_layers, len(self.taps)).float()

    def cdf(self, values: torch.Tensor) -> torch.Tensor:
        """``[n_layers, n_taps, n_values]`` fraction of |a| below each value."""
        return self.hist.cdf(values).view(self.n_layers, len(self.taps), -1)

    def nonfinite(self) -> torch.Tensor:
        """``[n_layers, n_taps]`` int64 number of NaN/Inf activations dropped (not counted in any quantile)."""
        return self.hist.nonfinite.view(self.n_layers, len(self.taps))

    def zero_fraction(self) -> torch.Tensor:
        """``[n_layers, n_taps]`` fraction of exact zeros (natural sparsity)."""
        h = self.hist
        return (h.zeros.double() / h.counts.sum(-1).clamp(min=1).double()).view(self.n_layers, len(self.taps))

    def thresholds(self, sparsity: float | Sequence[float] | dict[int, float], site: str) -> Thresholds:
        """The :class:`~dormant.llm.thresholds.Thresholds` reaching ``sparsity`` (one value, or per layer)."""
        targets = normalize_targets(sparsity, self.n_layers)
        finite = self.hist.counts.sum(-1).view(self.n_layers, len(self.taps))
        expected = torch.ones_like(finite, dtype=torch.bool)
        if Tap.HEAD_IN in self.taps:  # the LM head is read once, under the last layer only
            expected[:-1, self.taps.index(Tap.HEAD_IN)] = False
        empty = ((finite == 0) & expected).nonzero().tolist()
        if empty:
            layer, j = empty[0]
            raise CalibrationError(
                f"calibration saw no finite activation at layer {layer}, tap {self.taps[j].value} "
                f"({int(self.nonfinite()[layer, j])} NaN/Inf values dropped, {len(empty)} (layer, tap) pairs empty): "
                "no threshold can be read; check the model's dtype and the calibration text")
        values = self.quantiles(targets)
        values[~expected] = 0.0
        if targets.ndim == 2:
            targets = targets.clone()
            targets[~expected] = 0.0
        return Thresholds(
            values=values,
            targets=targets,
            taps=self.taps,
            site=site,
            model=dict(self.model),
            calibration=dict(self.data),
            nonfinite=self.nonfinite().clone(),
            scales={t: v.clone() for t, v in self.scales.items()},
            score=self.score,
        )

    def subset(self, taps: Sequence[Tap]) -> ActivationStats:
        """The statistics of ``taps`` only (e.g. one site's taps out of a multi-site calibration pass)."""
        missing = [t.value for t in taps if t not in self.taps]
        if missing:
            raise ValueError(f"statistics hold no tap(s) {missing}; they hold {[t.value for t in self.taps]}")
        idx = torch.tensor([self.stream(layer, t) for layer in range(self.n_layers) for t in taps])
        state = {k: v[idx] for k, v in self.hist.state().items()}
        hist = MagnitudeHistogram.from_state(state, self.hist.params())
        return ActivationStats(hist, tuple(taps), dict(self.model), dict(self.data), self.seconds,
                               {t: v for t, v in self.scales.items() if t in taps}, self.score)

    def save(self, path: str | Path) -> Path:
        meta = {
            "taps": [t.value for t in self.taps],
            "model": self.model,
            "data": self.data,
            "seconds": self.seconds,
            "hist": self.hist.params(),
            "score": self.score,
        }
        tensors = {**self.hist.state(), **{f"scale.{t.value}": v for t, v in self.scales.items()}}
        return save_artifact(path, self.KIND, self.VERSION, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> ActivationStats:
        tensors, meta, _ = load_artifact(path, cls.KIND, (cls.VERSION,))
        hist = MagnitudeHistogram.from_state({k: v for k, v in tensors.items() if not k.startswith("scale.")},
                                             meta["hist"])
        scales = {Tap(k.removeprefix("scale.")): v for k, v in tensors.items() if k.startswith("scale.")}
        return cls(hist, tuple(Tap(t) for t in meta["taps"]), meta["model"], meta["data"], meta["seconds"], scales,
                   meta.get("score", "magnitude"))


@dataclass
class StatsConfig:
    batch_size: int = 1  # windows per forward pass
    mantissa_bits: int = 8  # bins per octave = 2**mantissa_bits
    progress: bool = True


def collect_stats(
    model: nn.Module,
    windows: torch.Tensor,
    taps: Sequence[Tap],
    config: StatsConfig | None = None,
    model_id: str | None = None,
    data: dict[str, Any] | None = None,
    under: Thresholds | None = None,
    scales: dict[Tap, torch.Tensor] | None = None,
    score: str = "magnitude",
) -> ActivationStats:
    """One streaming pass over ``windows`` (``[n, seqlen]`` token ids) summarising |a| at ``taps``.

    ``scales``: per-channel score scales ``{tap: [n_layers, C]}``; those taps are summarised as ``|a_c| * s_c``
    (WINA, CHESS; :mod:`dormant.llm.thresholds`), and the statistics carry the scales to their thresholds.

    No activation is stored: each hooked tensor is binned and dropped. Thresholds for any target are
    read from the result afterwards (:meth:`ActivationStats.thresholds`).

    Under ``torchrun`` each rank streams its contiguous share of ``windows`` and the histograms (and NaN/Inf and zero
    counts) are summed across ranks, so every rank returns the statistics one process would compute over all of
    ``windows``; ``data`` then records ``world_size`` and each rank's ``rank_windows`` (``[start, stop)``).

    ``under``: thresholds enforced during the pass (on a model that is otherwise dense). Each tap is
    observed *before* its own threshold applies but after every upstream tap's, so thresholds read from
    the result fit the activations the sparsified model really produces (:func:`dormant.llm.calibration.refine`).
    """
    from tqdm.auto import tqdm

    config = config or StatsConfig()
    layout = ffn_layout(model)
    taps = tuple(taps)
    hist = MagnitudeHistogram(layout.n_layers * len(taps), mantissa_bits=config.mantissa_bits)
    index = {tap: j for j, tap in enumerate(taps)}
    scales = {Tap(t): torch.as_tensor(v, dtype=torch.float32) for t, v in (scales or {}).items()}
    on_device: dict[tuple[int, Tap], torch.Tensor] = {}

    def observe(layer: int, tap: Tap, x: torch.Tensor) -> None:
        if tap in scales:
            s = on_device.get((layer, tap))
            if s is None or s.device != x.device:
                s = on_device[(layer, tap)] = scales[tap][layer].to(x.device)
            x = x.detach().float().abs() * s
        hist.update(layer * len(taps) + index[tap], x)

    if under is not None and sparsify_state(model) is not None:
        raise ValueError("collect_stats(under=...) needs a dense model; call unsparsify_(model) first")
    device = input_device(model)
    t0 = time.perf_counter()
    # The observers are registered before the thresholds of ``under``, so they see each tap before its threshold.
    mine = distributed.shard(windows)
    with torch.inference_mode(), tap_hooks(layout, taps, observe), sparsified(model, under, model_id):
        for i in tqdm(range(0, len(mine), config.batch_size), desc="calibrate", unit="batch",
                      disable=not config.progress or not distributed.is_main()):
            model(mine[i : i + config.batch_size].to(device), use_cache=False)
    hist.all_reduce_()
    meta = {"id": model_id or getattr(model.config, "_name_or_path", None), **layout.describe()}
    data = dict(data or {})
    data.update(windows=int(windows.shape[0]), seqlen=int(windows.shape[1]), tokens=int(windows.numel()),
                **distributed.describe_shards(int(windows.shape[0])))
    if under is not None:
        data["under_thresholds"] = {"site": under.site, "mean_target": float(under.targets.mean())}
    return ActivationStats(hist, taps, meta, data, time.perf_counter() - t0, scales, score)
