"""The one table of active-neuron predictors (name -> class), and loading any saved predictor through it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dormant.artifacts import ArtifactError, load_artifact
from dormant.llm.predictors.base import Predictor
from dormant.llm.predictors.cluster import ClusterPredictor
from dormant.llm.predictors.configs import PREDICTOR_NAMES
from dormant.llm.predictors.early_layer import EarlyLayerPredictor
from dormant.llm.predictors.lowrank import LowRankPredictor

__all__ = ["PREDICTORS", "predictor_class", "load_predictor"]

PREDICTORS: dict[str, type[Predictor]] = {p.name: p for p in (LowRankPredictor, EarlyLayerPredictor, ClusterPredictor)}
assert tuple(PREDICTORS) == PREDICTOR_NAMES


def predictor_class(name: str) -> type[Predictor]:
    """The predictor class named ``name``; an unknown name raises listing the predictors."""
    if name not in PREDICTORS:
        raise ValueError(f"unknown predictor {name!r}; choose from {', '.join(PREDICTORS)}")
    return PREDICTORS[name]


def load_predictor(path: str | Path) -> Predictor:
    """Load any predictor saved with :meth:`Predictor.save`."""
    tensors, meta, _ = load_artifact(path, Predictor.KIND, (Predictor.VERSION,))
    name = meta.get("predictor")
    if name not in PREDICTORS:
        raise ArtifactError(f"{path}: unknown predictor {name!r}; known: {', '.join(sorted(PREDICTORS))}")
    cls = PREDICTORS[name]
    try:
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(meta["config"]) - fields)
        if unknown:
            raise ArtifactError(f"{path}: {name} predictor config has keys this version does not know: {unknown} "
                                f"(known: {sorted(fields)}); it was saved by another version of dormant")
        config = cls.Config(**meta["config"])
        p = cls(config, **meta["dims"])
        p.tau = tensors.pop("tau").float()
        guard = tensors.pop("guard", None)
        p.guard = None if guard is None else guard.bool()
        p.load_state(tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: inconsistent {name} predictor ({e})") from e
    p.info = meta.get("info", {})
    return p


