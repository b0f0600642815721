"""Weight-loading policies: how FFN neuron chunks get from storage into DRAM, and which stay there.

A :class:`Policy` composes three independent choices:

* **fetch** -- ``dense``: stream every FFN weight each token (a perfectly predictable stream, double
  buffered one layer ahead); ``demand``: load exactly the active chunks when the layer needs them
  (oracle mask, no lookahead); ``prefetch``: load the chunks a predictor marks active ``lookahead``
  layers ahead, then load the mispredicted (missing) active chunks on demand (``on_miss="load"``) or
  skip them (``"skip"``, the predictor's masks are final, at an accuracy cost).
* **cache** -- what stays in DRAM after a token, under the DRAM budget: ``none``; ``lru`` (keep the most
  recently used chunks); ``lfu`` (keep the most frequently used, perfect counts, ties by recency);
  optionally limited to chunks used in the last ``window`` tokens -- the sliding window of LLM in a
  flash (Alizadeh et al. 2024, §3.1), which with an unbounded budget keeps exactly the union of the
  last ``window`` tokens' active sets and loads only the newly active neurons.
* **pin** -- a share of the budget pinned to the chunks most often active on a separate profiling part
  of the trace (PowerInfer's hot neurons, Song et al. 2024, §5; with equal-size chunks its ILP
  placement reduces to taking the most frequent chunks). Pinned chunks are loaded once at start-up.

Presets (:data:`PRESETS`) name the usual combinations; :func:`parse_policy` also reads
``name:key=value,...`` strings, e.g. ``lru:pin=0.3``, ``window:k=8``, ``prefetch:d=2,cache=lfu``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

__all__ = ["Policy", "PRESETS", "parse_policy"]


@dataclass(frozen=True)
class Policy:
    """One weight-loading policy.

    Attributes:
        name: label in results.
        fetch: ``dense`` | ``demand`` | ``prefetch``.
        cache: ``none`` | ``lru`` | ``lfu``.
        window: keep only chunks used in the last ``window`` tokens (0 = no age limit).
        pin: share of the DRAM budget pinned to profiled hot chunks (0..1).
        lookahead: prefetch distance in layers (0 = at the layer's start, overlapping its attention).
        predictor: ``trace`` (the predicted trace given to the simulator) or ``oracle`` (perfect).
        on_miss: ``load`` (mispredicted active chunks are loaded on demand) or ``skip``.
    """

    name: str
    fetch: Literal["dense", "demand", "prefetch"]
    cache: Literal["none", "lru", "lfu"] = "none"
    window: int = 0
    pin: float = 0.0
    lookahead: int = 1
    predictor: Literal["trace", "oracle"] = "trace"
    on_miss: Literal["load", "skip"] = "load"

    def __post_init__(self):
        if self.fetch not in ("dense", "demand", "prefetch"):
            raise ValueError(f"fetch must be dense, demand or prefetch, got {self.fetch!r}")
        if self.cache not in ("none", "lru", "lfu"):
            raise ValueError(f"cache must be none, lru or lfu, got {self.cache!r}")
        if self.window < 0 or self.lookahead < 0:
            raise ValueError("window and lookahead must be >= 0")
        if not 0 <= self.pin <= 1:  # also refuses nan
            raise ValueError("pin must lie in [0, 1]")
        if self.predictor not in ("trace", "oracle") or self.on_miss not in ("load", "skip"):
            raise ValueError("predictor must be trace|oracle and on_miss load|skip")
        if self.window and self.cache == "none":
            raise ValueError("a window needs a cache (lru or lfu) to hold it")

    @property
    def needs_prediction(self) -> bool:
        return self.fetch == "prefetch" and self.predictor == "trace"

    @property
    def uses_budget(self) -> bool:
        return self.cache != "none" or self.pin > 0


PRESETS: dict[str, Policy] = {
    "dense": Policy("dense", "dense", cache="lru"),
    "demand": Policy("demand", "demand"),
    "lru": Policy("lru", "demand", cache="lru"),
    "lfu": Policy("lfu", "demand", cache="lfu"),
    "window": Policy("window", "demand", cache="lru", window=5),
    "hot": Policy("hot", "demand", pin=1.0),
    "hot+lru": Policy("hot+lru", "demand", cache="lru", pin=0.5),
    "prefetch": Policy("prefetch", "prefetch", cache="lru", lookahead=1),
    "prefetch-oracle": Policy("prefetch-oracle", "prefetch", cache="lru", lookahead=1, predictor="oracle"),
}
_KEYS = {"cache": "cache", "k": "window", "window": "window", "pin": "pin", "d": "lookahead",
         "lookahead": "lookahead", "predictor": "predictor", "miss": "on_miss", "on_miss": "on_miss",
         "fetch": "fetch"}


def parse_policy(spec: str | Policy) -> Policy:
    """``"lru"``, ``"window:k=8"``, ``"prefetch:d=2,cache=lfu,miss=skip"`` -> :class:`Policy`.

    The part before ``:`` is a preset of :data:`PRESETS`; each ``key=value`` overrides one field
    (keys: cache, k/window, pin, d/lookahead, predictor, miss/on_miss, fetch). The spec string becomes
    the policy's name.
    """
    if isinstance(spec, Policy):
        return spec
    base, _, rest = spec.partition(":")
    if base not in PRESETS:
        raise ValueError(f"unknown policy {base!r}; presets: {', '.join(PRESETS)} (add :key=value to modify)")
    changes: dict = {"name": spec}
    for item in filter(None, rest.split(",")):
        k, eq, v = item.partition("=")
        if not eq or k not in _KEYS:
            raise ValueError(f"bad policy option {item!r} in {spec!r}; keys: {', '.join(sorted(_KEYS))}")
        f = _KEYS[k]
        try:
            changes[f] = int(v) if f in ("window", "lookahead") else float(v) if f == "pin" else v
        except ValueError:
            kind = "an integer" if f in ("window", "lookahead") else "a number"
            raise ValueError(f"policy option {k}={v!r} in {spec!r} must be {kind}") from None
        if f == "pin" and not 0 <= changes[f] <= 1:  # also refuses nan
            raise ValueError(f"policy option pin={v!r} in {spec!r} must lie in [0, 1]")
    return replace(PRESETS[base], **changes)
