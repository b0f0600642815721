"""Active-neuron predictors for thresholded FFNs, and the predictability study.

Dhar et al. (IPCCC 2024, arXiv 2412.12178, Sec. V) propose predicting the active FFN neurons before
their weights are loaded. This package builds and scores three predictors behind one interface
(:class:`Predictor`, one table :data:`~dormant.llm.predictors.registry.PREDICTORS`): ``early_layer`` (the paper's layer-1 idea), ``lowrank`` (Deja Vu / ShadowLLM
style per-layer networks) and ``cluster`` (the authors' follow-up, arXiv 2507.14179).

Flow: :func:`collect_pairs` -> :class:`PairStore` -> ``Predictor.for_store(store, config).fit(store)``
-> :meth:`Predictor.save` / :func:`load_predictor`; :func:`evaluate_on_store` (metrics on a split),
:func:`predicted_masks` (run the model with predicted masks), :func:`collect_predicted_trace`
(aligned predicted/oracle :class:`~dormant.traces.ActivationTrace` pair). The perturbation study's verbs are in
:mod:`dormant.llm.predictors.predictability`; the CLI runs and the demo in :mod:`dormant.experiments.predictors`.
"""

from importlib import import_module

_EXPORTS = {
    "PredictionRun": "apply", "collect_predicted_trace": "apply", "observe_predictions": "apply",
    "predicted_masks": "apply", "Predictor": "base", "PredictorCostReport": "base", "choose_tau": "base",
    "evaluate_on_store": "base", "guard_neurons": "base", "PREDICTORS": "registry",
    "load_predictor": "registry", "predictor_class": "registry", "ClusterConfig": "configs",
    "ClusterPredictor": "cluster", "PairStore": "data", "collect_pairs": "data",
    "EarlyLayerConfig": "configs", "EarlyLayerPredictor": "early_layer", "LowRankConfig": "configs",
    "LowRankPredictor": "lowrank", "MaskConfusion": "metrics", "mask_metrics": "metrics",
    "scores_from_counts": "metrics",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):  # names are imported on first use: the CLI reads the configs without torch
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dormant.llm.predictors' has no attribute {name!r}")
    return getattr(import_module(f"dormant.llm.predictors.{_EXPORTS[name]}"), name)
