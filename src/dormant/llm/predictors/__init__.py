"""Active-neuron predictors for thresholded FFNs, and the predictability study.

Dhar et al. (IPCCC 2024, arXiv 2412.12178, Sec. V) propose predicting the active FFN neurons before
their weights are loaded. This package builds and scores three predictors behind one interface
(:class:`Predictor`): ``early_layer`` (the paper's layer-1 idea), ``lowrank`` (Deja Vu / ShadowLLM
style per-layer networks) and ``cluster`` (the authors' follow-up, arXiv 2507.14179).

Flow: :func:`collect_pairs` -> :class:`PairStore` -> ``Predictor.for_store(store, config).fit(store)``
-> :meth:`Predictor.save` / :func:`load_predictor`; :func:`evaluate_on_store` (metrics on a split),
:func:`predicted_masks` (run the model with predicted masks), :func:`collect_predicted_trace`
(aligned predicted/oracle :class:`~dormant.traces.ActivationTrace` pair). The perturbation study's verbs are in
:mod:`dormant.llm.predictors.predictability`; the CLI runs and the demo in :mod:`dormant.experiments.predictors`.
"""

from dormant.llm.predictors.apply import (
    PredictionRun,
    collect_predicted_trace,
    observe_predictions,
    predicted_masks,
)
from dormant.llm.predictors.base import (
    PREDICTORS,
    Predictor,
    PredictorCostReport,
    choose_tau,
    evaluate_on_store,
    guard_neurons,
    load_predictor,
)
from dormant.llm.predictors.cluster import ClusterConfig, ClusterPredictor
from dormant.llm.predictors.data import PairStore, collect_pairs
from dormant.llm.predictors.early_layer import EarlyLayerConfig, EarlyLayerPredictor
from dormant.llm.predictors.lowrank import LowRankConfig, LowRankPredictor
from dormant.llm.predictors.metrics import MaskConfusion, mask_metrics, scores_from_counts

__all__ = [
    "PREDICTORS",
    "Predictor",
    "PredictorCostReport",
    "choose_tau",
    "guard_neurons",
    "evaluate_on_store",
    "load_predictor",
    "PairStore",
    "collect_pairs",
    "LowRankConfig",
    "LowRankPredictor",
    "EarlyLayerConfig",
    "EarlyLayerPredictor",
    "ClusterConfig",
    "ClusterPredictor",
    "MaskConfusion",
    "mask_metrics",
    "scores_from_counts",
    "PredictionRun",
    "predicted_masks",
    "observe_predictions",
    "collect_predicted_trace",
]
