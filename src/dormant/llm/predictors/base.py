"""The one interface of active-neuron predictors: fit, score, predict, cost, save/load.

Dhar et al. (arXiv 2412.12178, Sec. V) propose predicting which FFN neurons will be active *before*
their weights are loaded, so that only those are prefetched; Deja Vu (Liu et al., ICML 2023) and
LLM-in-a-flash (Alizadeh et al., ACL 2024) do it with small per-layer networks. Every predictor
here, for each layer ``l`` it predicts:

* reads one **source** tensor ``source(l) = (layer s <= l, tap)``: the FFN input ``FFN_IN`` of some
  layer (float ``[N, D]``) or the active mask ``MID != 0`` of an earlier layer (bool ``[N, I]``);
  ``None`` means "not predicted": all neurons of ``l`` are treated as active (fetched);
* turns it once into ``features`` (shared by every layer reading the same source), then into
  per-neuron ``scores`` ``[N, I]`` (higher = more likely active);
* predicts ``scores >= tau[l]``, with ``tau`` chosen on the store's selection split to meet a recall target
  (:func:`choose_tau`), OR'ed with an optional static **guard** set (:func:`guard_neurons`): the few
  neurons per layer with the largest gate-row x up-row norms, which fire rarely but then carry
  "massive activations" (e.g. on the first token of a sequence); a predictor that averages patterns
  over tokens misses them, and one miss can wreck the residual stream.

A predictor knows its own cost (:meth:`Predictor.cost`): resident parameter bytes, bytes read and
FLOPs per token, per layer, and the same figures for the FFN it guards. It saves itself as one
versioned safetensors artifact (kind ``dormant.Predictor``); :func:`~dormant.llm.predictors.registry.load_predictor`
dispatches on the
stored predictor name through :data:`dormant.llm.predictors.registry.PREDICTORS`.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from dormant.artifacts import ArtifactError, save_artifact
from dormant.llm.adapters import Tap
from dormant.llm.predictors.metrics import MaskConfusion

__all__ = [
    "Predictor",
    "PredictorCostReport",
    "choose_tau",
    "guard_neurons",
    "operating_point",
    "evaluate_on_store",
    "layer_params_tensors",
    "layer_params_from",
]

def layer_params_tensors(params: list[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor]:
    """Per-layer parameter dicts -> flat ``{"<name>.<layer>": tensor}`` for an artifact (skipped layers left out)."""
    return {f"{k}.{layer}": v for layer, p in enumerate(params) if p is not None for k, v in p.items()}


def layer_params_from(tensors: dict[str, torch.Tensor], n_layers: int, names: tuple[str, ...]
                      ) -> list[dict[str, torch.Tensor] | None]:
    """Inverse of :func:`layer_params_tensors`: layers whose ``names[0]`` is absent come back as ``None``."""
    return [{k: tensors[f"{k}.{layer}"].float() for k in names} if f"{names[0]}.{layer}" in tensors else None
            for layer in range(n_layers)]


@dataclass
class PredictorCostReport:
    """What a predictor costs per token (batch 1), per layer, next to the FFN it guards.

    Attributes:
        param_bytes: ``[n_layers]`` resident predictor state (parameters, pattern banks).
        read_bytes: ``[n_layers]`` predictor bytes touched per token (what a memory-bound run reads).
        flops: ``[n_layers]`` predictor FLOPs per token (a multiply-add counts 2; a bit compare 1).
        ffn_bytes: weight bytes of one dense FFN layer (gate, up, down), at ``weight_bytes`` per weight.
        ffn_flops: FLOPs of one dense FFN layer per token.
        weight_bytes: bytes per weight assumed for both predictor and FFN (2 = float16).
    """

    param_bytes: list[int]
    read_bytes: list[int]
    flops: list[int]
    ffn_bytes: int
    ffn_flops: int
    weight_bytes: int = 2

    @property
    def bytes_per_token(self) -> int:
        return int(sum(self.read_bytes))

    @property
    def flops_per_token(self) -> int:
        return int(sum(self.flops))

    def summary(self) -> dict[str, Any]:
        n = len(self.param_bytes)
        total_ffn_bytes, total_ffn_flops = n * self.ffn_bytes, n * self.ffn_flops
        return {
            "param_bytes": int(sum(self.param_bytes)),
            "bytes_per_token": self.bytes_per_token,
            "flops_per_token": self.flops_per_token,
            "ffn_bytes": total_ffn_bytes,
            "ffn_flops_per_token": total_ffn_flops,
            "param_pct_of_ffn_bytes": 100 * sum(self.param_bytes) / total_ffn_bytes,
            "read_pct_of_ffn_bytes": 100 * self.bytes_per_token / total_ffn_bytes,
            "flops_pct_of_ffn": 100 * self.flops_per_token / total_ffn_flops,
            "weight_bytes": self.weight_bytes,
        }

    def as_accounting(self, name: str = ""):
        """The :class:`dormant.llm.accounting.PredictorCost` of this predictor (bytes and FLOPs per token)."""
        from dormant.llm.accounting import PredictorCost

        return PredictorCost(bytes_per_token=self.bytes_per_token, flops_per_token=self.flops_per_token, name=name)


def choose_tau(pos_scores: torch.Tensor, recall: float) -> float:
    """The largest decision threshold whose recall on ``pos_scores`` reaches ``recall``.

    Args:
        pos_scores: ``[P]`` scores of the truly active (positive) entries of selection data.
        recall: target fraction of positives with ``score >= tau``.

    Returns:
        ``tau`` such that ``(pos_scores >= tau).mean() >= recall`` (``-inf`` if there are no positives).
    """
    if pos_scores.numel() == 0:
        return float("-inf")
    s = pos_scores.float().flatten()
    miss = int((1.0 - recall) * s.numel() + 1e-6)  # positives we may lose (1e-6: float slack)
    if miss <= 0:
        return float(s.min())
    return float(torch.kthvalue(s, miss + 1).values) if miss < s.numel() else float(s.max())


def guard_neurons(layout, k: int) -> torch.Tensor:
    """Bool ``[L, I]``: per layer, the ``k`` neurons with the largest ``||W_gate[i]|| * ||W_up[i]||``
    (``||W_up[i]||`` for non-gated FFNs). Weight-only, no data.

    Why: on SmolLM2-135M the neurons that carry the first token's massive activations (e.g. layer 11
    #1229, layer 28 #678 at 50% intermediate sparsity) are among the rarest in their layer (active on
    < 0.5% of tokens) and have the largest gate and up rows of their layer.
    """
    out = torch.zeros(layout.n_layers, layout.intermediate_size, dtype=torch.bool)
    if k <= 0:
        return out
    for layer in range(layout.n_layers):
        w = layout.weights(layer)
        score = w.up.detach().float().norm(dim=1)
        if w.gate is not None:
            score = score * w.gate.detach().float().norm(dim=1)
        out[layer, score.topk(min(k, len(score))).indices] = True
    return out


def operating_point(
    scores: torch.Tensor, true: torch.Tensor, recall: float, density_ratio: float | None = None
) -> dict[str, float]:
    """Decision threshold for selection-split ``scores`` ``[N, I]`` against ``true`` masks, and its quality.

    With ``density_ratio`` unset, ``tau`` is the largest threshold meeting ``recall`` (:func:`choose_tau`);
    with it set, ``tau`` makes the predicted density ``density_ratio`` times the true density (a
    bandwidth budget) and recall is whatever it gives. ``loss`` is what early stopping minimises:
    the predicted density (recall target) or ``1 - recall`` (density budget).
    """
    if density_ratio is None:
        tau = choose_tau(scores[true], recall)
    else:
        frac = min(1.0, density_ratio * float(true.float().mean()))
        s = scores.float().flatten()
        k = int(round((1 - frac) * s.numel()))  # entries to leave out
        if k <= 0:
            tau = float("-inf")
        elif k >= s.numel():
            tau = float("inf")
        else:  # just above the k-th smallest score
            v = torch.kthvalue(s, k).values
            tau = float(torch.nextafter(v, torch.tensor(float("inf"))))
    pred = scores >= tau
    density = float(pred.float().mean())
    rec = float((pred & true).sum() / true.sum().clamp(min=1))
    return {"tau": tau, "density": density, "recall": rec, "loss": density if density_ratio is None else 1 - rec}


class Predictor(ABC):
    """Base class; see the module docstring. Subclasses set ``name`` and ``Config`` and implement
    :meth:`source`, :meth:`scores`, :meth:`fit`, :meth:`state_tensors`, :meth:`load_state` and
    :meth:`layer_cost`.

    Args:
        config: the subclass's ``Config`` dataclass instance (hyperparameters).
        n_layers, hidden_size, n_neurons: the model's FFN shape (``L``, ``D``, ``I``).
        gated: whether the FFN has a gate projection (3 weight matrices instead of 2).
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    KIND = "dormant.Predictor"
    VERSION = 1

    def __init__(self, config: Any, n_layers: int, hidden_size: int, n_neurons: int, gated: bool = True):
        self.config = config
        self.n_layers, self.hidden_size, self.n_neurons, self.gated = n_layers, hidden_size, n_neurons, gated
        self.tau = torch.zeros(n_layers)
        self.guard: torch.Tensor | None = None  # bool [L, I]: always predicted active (see guard_neurons)
        self.info: dict[str, Any] = {}  # provenance: model, thresholds, data, fit record

    @classmethod
    def for_store(cls, store, config: Any = None) -> Predictor:
        """A predictor shaped for the model whose pairs ``store`` holds (default hyperparameters if ``config`` is None)."""
        m = store.meta["model"]
        p = cls(config or cls.Config(), store.n_layers, store.hidden_size, store.n_neurons, bool(m.get("gated", True)))
        p.info = {"model": m, "thresholds": store.meta.get("thresholds"), "text": store.meta.get("text")}
        return p

    # -- prediction -------------------------------------------------------------------------------
    @abstractmethod
    def source(self, layer: int) -> tuple[int, Tap] | None:
        """``(source layer, tap)`` read to predict ``layer``, or ``None`` if ``layer`` is not predicted."""

    def features(self, layer: int, tap: Tap, x: torch.Tensor) -> Any:
        """Features of a source tensor (computed once, shared by all layers reading it). Default: ``x``.

        Args:
            x: float ``[N, D]`` for ``FFN_IN``, bool ``[N, I]`` for ``MID``.
        """
        return x

    @abstractmethod
    def scores(self, layer: int, feats: Any) -> torch.Tensor:
        """Float ``[N, I]`` activity scores of ``layer``'s neurons."""

    @torch.no_grad()
    def predict(self, layer: int, feats: Any) -> torch.Tensor:
        """Bool ``[N, I]`` predicted-active masks: ``scores >= tau``, OR the guard set."""
        m = self.scores(layer, feats) >= self.tau[layer]
        return m if self.guard is None else m | self.guard[layer]

    def predicted_layers(self) -> list[int]:
        return [layer for layer in range(self.n_layers) if self.source(layer) is not None]

    def sources(self) -> set[tuple[int, Tap]]:
        return {s for s in (self.source(layer) for layer in range(self.n_layers)) if s is not None}

    # -- training ---------------------------------------------------------------------------------
    @abstractmethod
    def fit(self, store, progress: bool = True, layers: list[int] | None = None) -> dict[str, Any]:
        """Train on ``store``'s ``train`` split; choose ``tau`` (and stop early) on its ``select`` split
        (never on ``heldout``, which is kept for reporting).

        Args:
            layers: train only these layers (the others keep their state); per-layer predictors use it
                to checkpoint between layers. Predictors trained jointly may train all layers.

        Returns a JSON-ready record of the fit (also kept in ``self.info["fit"]``).
        """

    @torch.no_grad()
    def choose_taus(
        self, store, recall: float, density_ratio: float | None = None, split: str = "select",
        layers: list[int] | None = None, progress: bool = False,
    ) -> None:
        """Set ``tau[l]`` of each predicted layer on ``split`` of ``store`` (see :func:`operating_point`)."""
        from tqdm.auto import tqdm

        cache: dict[tuple[int, Tap], Any] = {}
        todo = self.predicted_layers() if layers is None else layers
        for layer in tqdm(todo, desc="decision thresholds", unit="layer", disable=not progress):
            feats = self._store_features(store, self.source(layer), split, cache)
            true = store.masks(layer, split)
            scores = torch.cat([self.scores(layer, f) for f, _ in _chunks(feats, true)])
            self.tau[layer] = operating_point(scores, true, recall, density_ratio)["tau"]

    def _store_features(self, store, src: tuple[int, Tap], split: str, cache: dict) -> list[Any]:
        """Features of ``src`` on ``split``, in token chunks (cached across layers)."""
        if src not in cache:
            x = store.source(src[0], src[1], split)
            cache[src] = [self.features(src[0], src[1], x[i : i + _CHUNK]) for i in range(0, len(x), _CHUNK)]
        return cache[src]

    # -- cost -------------------------------------------------------------------------------------
    @abstractmethod
    def layer_cost(self, layer: int, weight_bytes: int = 2) -> tuple[int, int, int]:
        """``(param_bytes, read_bytes_per_token, flops_per_token)`` of the predictor of ``layer``."""

    def cost(self, weight_bytes: int = 2) -> PredictorCostReport:
        """Per-layer cost, next to a dense FFN layer (``(3 if gated else 2) * D * I`` weights)."""
        rows = [self.layer_cost(layer, weight_bytes) if self.source(layer) else (0, 0, 0) for layer in range(self.n_layers)]
        if self.guard is not None:  # one bit mask per predicted layer
            g = math.ceil(self.n_neurons / 8)
            rows = [(a + g, b + g, c) if self.source(layer) else (a, b, c) for layer, (a, b, c) in enumerate(rows)]
        mats = 3 if self.gated else 2
        return PredictorCostReport(
            param_bytes=[r[0] for r in rows],
            read_bytes=[r[1] for r in rows],
            flops=[r[2] for r in rows],
            ffn_bytes=mats * self.hidden_size * self.n_neurons * weight_bytes,
            ffn_flops=2 * mats * self.hidden_size * self.n_neurons,
            weight_bytes=weight_bytes,
        )

    # -- persistence ------------------------------------------------------------------------------
    @abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors that, with the config and ``tau``, define the trained predictor."""

    @abstractmethod
    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_tensors`."""

    def describe(self) -> dict[str, Any]:
        return {"predictor": self.name, "config": dataclasses.asdict(self.config),
                "predicted_layers": self.predicted_layers(), "cost": self.cost().summary()}

    def save(self, path: str | Path) -> Path:
        meta = {
            "predictor": self.name,
            "config": dataclasses.asdict(self.config),
            "dims": {"n_layers": self.n_layers, "hidden_size": self.hidden_size, "n_neurons": self.n_neurons,
                     "gated": self.gated},
            "info": self.info,
        }
        tensors = {**self.state_tensors(), "tau": self.tau}
        if self.guard is not None:
            tensors["guard"] = self.guard.to(torch.uint8)
        return save_artifact(path, self.KIND, self.VERSION, tensors, meta)

    def check_model(self, layout) -> None:
        """Raise :class:`ArtifactError` if this predictor was trained for another FFN shape."""
        d = layout.describe()
        if (d["n_layers"], d["hidden_size"], d["intermediate_size"]) != (self.n_layers, self.hidden_size, self.n_neurons):
            raise ArtifactError(
                f"predictor {self.name!r} was trained for L={self.n_layers}, D={self.hidden_size}, "
                f"I={self.n_neurons}; this model has L={d['n_layers']}, D={d['hidden_size']}, I={d['intermediate_size']}"
            )
        fp = (self.info.get("model") or {}).get("fingerprint")
        if fp and fp != d["fingerprint"]:
            raise ArtifactError(f"predictor was trained on model fingerprint {fp}, this model has {d['fingerprint']}")


_CHUNK = 4096  # tokens scored at once when evaluating on a store (bounds [N, I] score tensors)


def _chunks(feats: list[Any], true: torch.Tensor):
    i = 0
    for f in feats:
        n = _len(f)
        yield f, true[i : i + n]
        i += n


def _len(f: Any) -> int:
    if isinstance(f, torch.Tensor):
        return f.shape[0]
    if isinstance(f, (tuple, list)):
        return _len(f[0])
    raise TypeError(f"cannot tell the token count of features of type {type(f).__name__}")


@torch.no_grad()
def evaluate_on_store(predictor: Predictor, store, split: str = "heldout") -> MaskConfusion:
    """Confusion counts of ``predictor`` on ``split`` of a pair store (teacher-forced: true inputs).

    Layers that are not predicted count as all-active predictions (recall 1, density 1).
    """
    conf = MaskConfusion(predictor.n_layers)
    cache: dict[tuple[int, Tap], Any] = {}
    for layer in range(predictor.n_layers):
        true = store.masks(layer, split)
        src = predictor.source(layer)
        if src is None:
            conf.update(layer, torch.ones_like(true), true)
            continue
        for f, t in _chunks(predictor._store_features(store, src, split, cache), true):
            conf.update(layer, predictor.predict(layer, f), t)
    return conf
