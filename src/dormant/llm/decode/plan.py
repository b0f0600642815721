"""Which activations the lean decode engine zeroes: :class:`SparsityPlan`, a versioned artifact.

Per layer, three kinds of zero-enforcing thresholds, each with the rule ``Z(v, t) = 0 where |v| < t``
(masked_fill; NaN passes; ``t = 0`` changes nothing) -- exactly what forward hooks zeroing the same
tensors of the Hugging Face model compute:

* ``inputs[p]`` -- a float32 vector ``[in_features]`` on the input of projection ``p`` in
  :data:`PROJECTIONS` (a pre-hook on ``q_proj`` ... ``down_proj`` masking ``|x_i| < t_i``). One scalar for
  all channels is TEAL (Liu et al. 2024, arXiv 2408.14690); ``t_i = T / ||W[:, i]||`` is WINA
  (arXiv 2505.19427); per-channel values are CHESS (arXiv 2409.01366) -- one mechanism.
  The engine reads only the active input channels (columns) of that projection.
* ``mid`` -- a scalar on ``act(gate(x)) * up(x)``, the input of ``down_proj`` (the ``intermediate``
  site): down reads only surviving columns.
* ``act`` -- a scalar on ``act(gate(x))`` (CATS, Lee et al. 2024, arXiv 2404.08763; the ``gate_act``
  site): only surviving neurons' up rows and down columns are read.

Beside the layers, ``head`` -- a float32 vector ``[dim]`` on the LM head's input (the final norm's output):
the engine then reads only the head's active input columns (TEAL stops at the blocks; dormant's ``linear_head``
site goes on).

``mid`` and ``inputs["down"]`` both threshold the input of down; both apply. ``act`` together with
``inputs["up"]`` is rejected (the CATS up gather reads rows, input sparsity reads columns).
``None`` everywhere is dense. Plans are produced from calibration elsewhere; this module only holds,
checks, saves and loads them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from dormant.artifacts import ArtifactError, load_artifact, save_artifact

__all__ = ["PROJECTIONS", "LayerPlan", "SparsityPlan"]

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
KIND, VERSION = "dormant.decode.sparsity_plan", 2  # 2: the LM head's input thresholds


def _threshold_vector(name: str, t) -> torch.Tensor:
    """``t`` checked as a 1-D tensor of finite thresholds >= 0, as contiguous float32 (``name`` for errors)."""
    if not isinstance(t, torch.Tensor) or t.ndim != 1:
        raise ValueError(f"{name} must be a 1-D tensor of per-channel thresholds")
    if not bool(torch.all(t >= 0)) or not bool(torch.all(torch.isfinite(t))):
        raise ValueError(f"{name}: thresholds must be finite and >= 0")
    return t.detach().to(torch.float32).contiguous()


@dataclass
class LayerPlan:
    """Thresholds of one layer.

    Attributes:
        inputs: projection name -> float32 thresholds ``[in_features]`` on that projection's input.
        mid: threshold on ``act(g) * u`` (None: off).
        act: threshold on ``act(g)`` (None: off).
    """

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    mid: float | None = None
    act: float | None = None

    def __post_init__(self):
        for p in self.inputs:
            if p not in PROJECTIONS:
                raise ValueError(f"unknown projection {p!r}; projections: {', '.join(PROJECTIONS)}")
        self.inputs = {p: _threshold_vector(f"inputs[{p!r}]", t) for p, t in self.inputs.items()}
        for name in ("mid", "act"):
            v = getattr(self, name)
            if v is not None:
                v = float(v)
                if not (v >= 0 and v != float("inf")):
                    raise ValueError(f"{name} threshold must be finite and >= 0, got {v}")
                setattr(self, name, v if v > 0 else None)  # 0 changes nothing: the same as off
        if self.act is not None and "up" in self.inputs:
            raise ValueError("act (CATS: gather active up rows) and an up input threshold cannot both be set")

    @property
    def dense(self) -> bool:
        return not self.inputs and self.mid is None and self.act is None


@dataclass
class SparsityPlan:
    """Per-layer thresholds for :class:`dormant.llm.decode.Engine`. Version 2.

    Attributes:
        layers: one :class:`LayerPlan` per decoder layer.
        meta: free-form description (how it was made: method, targets, calibration data).
        head: float32 thresholds ``[dim]`` on the LM head's input (None: dense).
    """

    layers: list[LayerPlan]
    meta: dict[str, Any] = field(default_factory=dict)
    head: torch.Tensor | None = None

    def __post_init__(self):
        if self.head is not None:
            t = _threshold_vector("head", self.head)
            self.head = t if bool((t > 0).any()) else None  # all zero: dense

    @classmethod
    def dense(cls, n_layers: int) -> SparsityPlan:
        return cls([LayerPlan() for _ in range(n_layers)], {"kind": "dense"})

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def is_dense(self) -> bool:
        return self.head is None and all(layer.dense for layer in self.layers)

    def sparse_projections(self, layer: int) -> set[str]:
        """Projections of ``layer`` the engine must store column-major (their input is sparse)."""
        lp = self.layers[layer]
        out = set(lp.inputs)
        if lp.mid is not None or lp.act is not None:
            out.add("down")
        return out

    def check(self, n_layers: int, in_features: dict[str, int]) -> None:
        """Raise ``ValueError`` unless the plan fits a model of ``n_layers`` with these projection input sizes."""
        if self.n_layers != n_layers:
            raise ValueError(f"the plan has {self.n_layers} layers, the model {n_layers}")
        if self.head is not None and self.head.numel() != in_features["head"]:
            raise ValueError(f"head: {self.head.numel()} thresholds for {in_features['head']} input channels")
        for n, lp in enumerate(self.layers):
            for p, t in lp.inputs.items():
                if t.numel() != in_features[p]:
                    raise ValueError(f"layer {n} {p}: {t.numel()} thresholds for {in_features[p]} input channels")

    def save(self, path: str | os.PathLike) -> None:
        tensors = {f"{n}.{p}": t for n, lp in enumerate(self.layers) for p, t in lp.inputs.items()}
        if self.head is not None:
            tensors["head"] = self.head
        scalars = [{"mid": lp.mid, "act": lp.act} for lp in self.layers]
        save_artifact(path, KIND, VERSION, tensors, {"layers": scalars, "meta": self.meta})

    @classmethod
    def load(cls, path: str | os.PathLike) -> SparsityPlan:
        tensors, meta, _ = load_artifact(path, KIND, (1, VERSION))
        try:
            head = tensors.pop("head", None)
            layers = [LayerPlan({}, s["mid"], s["act"]) for s in meta["layers"]]
            for key, t in tensors.items():
                n, p = key.split(".")
                layers[int(n)].inputs[p] = t
            for lp in layers:
                lp.__post_init__()
            return cls(layers, meta.get("meta", {}), head)
        except (KeyError, ValueError, IndexError) as e:
            raise ArtifactError(f"{path}: malformed sparsity plan ({e})") from e
