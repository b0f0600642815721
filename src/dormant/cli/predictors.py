"""``dormant predictor fit | eval`` and ``dormant predictability``; flags map 1:1 onto config dataclasses.

Predictor hyperparameters carry the predictor's prefix: ``--lowrank-rank``, ``--early-layer-mode``,
``--cluster-k`` (only the flags of the chosen ``--kind`` matter).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dormant.config import add_config_args, config_from_args
from dormant.experiments.predictors import (
    FitRunConfig,
    PairsConfig,
    PredictabilityConfig,
    PredictorEvalConfig,
)
from dormant.llm.models import ModelConfig
from dormant.llm.predictors.cluster import ClusterConfig
from dormant.llm.predictors.early_layer import EarlyLayerConfig
from dormant.llm.predictors.lowrank import LowRankConfig
from dormant.llm.text import EvalConfig

KIND_CONFIGS = {"lowrank": ("lowrank-", LowRankConfig), "early_layer": ("early-layer-", EarlyLayerConfig),
                "cluster": ("cluster-", ClusterConfig)}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predictor", help="train and score active-neuron predictors")
    psub = p.add_subparsers(dest="predictor_command", required=True, metavar="ACTION")

    f = psub.add_parser("fit", help="train a predictor on (FFN input -> active mask) pairs of calibration text")
    for cls in (ModelConfig, PairsConfig, FitRunConfig):
        add_config_args(f, cls)
    for prefix, cls in KIND_CONFIGS.values():
        add_config_args(f, cls, prefix=prefix)
    f.set_defaults(handler=_fit)

    e = psub.add_parser("eval", help="open-loop mask metrics and perplexity with predicted masks (resumable)")
    for cls in (ModelConfig, EvalConfig, PredictorEvalConfig):
        add_config_args(e, cls)
    e.set_defaults(handler=_eval)

    s = sub.add_parser("predictability", help="active-pattern similarity of perturbed texts (paper Table II)")
    for cls in (ModelConfig, EvalConfig, PredictabilityConfig):
        add_config_args(s, cls, skip=("max_windows", "batch_size"))
    s.add_argument("--thresholds", default=None, help="Thresholds artifact to apply (dense if unset)")
    s.set_defaults(handler=_predictability)


def _fit(ns: argparse.Namespace) -> int:
    from dormant.experiments.predictors import fit_predictor

    run = config_from_args(FitRunConfig, ns)
    prefix, cls = KIND_CONFIGS[run.kind]
    rec = fit_predictor(config_from_args(ModelConfig, ns), config_from_args(PairsConfig, ns), run,
                        config_from_args(cls, ns, prefix=prefix))
    print(json.dumps({"predictor": rec["path"], "record": str(Path(rec["path"]).with_suffix(".json")),
                      "heldout": rec["heldout"]["overall"], "cost": rec["predictor"]["cost"]}, indent=1))
    return 0


def _eval(ns: argparse.Namespace) -> int:
    from dormant.experiments.predictors import evaluate_predictors

    cfg = config_from_args(PredictorEvalConfig, ns)
    evaluate_predictors(config_from_args(ModelConfig, ns), config_from_args(EvalConfig, ns), cfg)
    print(f"report: {Path(cfg.out) / 'report.md'}")
    return 0


def _predictability(ns: argparse.Namespace) -> int:
    from dormant.experiments.predictors import run_predictability_study

    cfg = config_from_args(PredictabilityConfig, ns)
    report = run_predictability_study(config_from_args(ModelConfig, ns), config_from_args(EvalConfig, ns),
                                      ns.thresholds, cfg)
    print(f"report: {report}")
    return 0
