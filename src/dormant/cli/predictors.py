"""``dormant predictor fit | eval``, ``dormant predictability`` and ``dormant predict-inputs``; flags map 1:1 onto
config dataclasses.

Predictor hyperparameters carry the predictor's prefix: ``--lowrank-rank``, ``--early-layer-mode``,
``--cluster-k`` (only the flags of the chosen ``--kind`` matter).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dormant.cli.checks import check_artifact, check_artifacts, check_seqlens, model_context
from dormant.config import add_config_args, config_from_args
from dormant.experiments.configs import (
    FitRunConfig,
    InputPredictionConfig,
    PairsConfig,
    PredictabilityConfig,
    PredictorEvalConfig,
)
from dormant.llm.configs import CalibDataConfig, EvalConfig, ModelConfig, check_calibration_text
from dormant.llm.predictors.configs import ClusterConfig, EarlyLayerConfig, LowRankConfig

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

    s = sub.add_parser("predict-inputs", help="predict layer l+1's active q/k/v input columns from layer l's "
                                              "residual stream: recall vs density, and simulated prefetch")
    for cls in (ModelConfig, CalibDataConfig, EvalConfig):
        add_config_args(s, cls)
    add_config_args(s, InputPredictionConfig, skip=("model", "calib", "eval"))
    s.set_defaults(handler=_predict_inputs)


def _predict_inputs(ns: argparse.Namespace) -> int:
    cfg = config_from_args(InputPredictionConfig, ns, model=config_from_args(ModelConfig, ns),
                           calib=config_from_args(CalibDataConfig, ns), eval=config_from_args(EvalConfig, ns))
    check_calibration_text(cfg.calib, cfg.eval)
    check_seqlens(model_context(cfg.model), seqlen=cfg.eval.seqlen, calib_seqlen=cfg.calib.calib_seqlen)

    from dormant.experiments.input_prediction import run_input_prediction

    result = run_input_prediction(cfg)
    for r in result["predictor"]:
        print(f"recall target {r['recall_target']:g}: held-out recall {r['recall']:.4f}, density "
              f"{r['pred_density']:.3f} vs {r['true_density']:.3f} ({r['density_ratio']:.2f}x)")
    print(f"report: {Path(cfg.out) / 'report.md'}")
    return 0


def _fit(ns: argparse.Namespace) -> int:
    run, mc, pc = (config_from_args(c, ns) for c in (FitRunConfig, ModelConfig, PairsConfig))
    prefix, cls = KIND_CONFIGS[run.kind]
    kind_cfg = config_from_args(cls, ns, prefix=prefix)
    collecting = not (Path(pc.pairs) / "pairs.json").is_file()  # an existing store was cut when it was collected
    check_seqlens(model_context(mc), train_seqlen=pc.train_seqlen if collecting else None)
    check_artifact(run.thresholds, "thresholds", "thresholds")
    check_artifact(run.init, "predictor", "init")

    from dormant.experiments.predictors import fit_predictor

    rec = fit_predictor(mc, pc, run, kind_cfg)
    scores = rec["heldout"] or rec["select"]
    print(json.dumps({"predictor": rec["path"], "record": str(Path(rec["path"]).with_suffix(".json")),
                      "heldout" if rec["heldout"] else "select (no held-out windows)": scores["overall"],
                      "cost": rec["predictor"]["cost"]}, indent=1))
    return 0


def _eval(ns: argparse.Namespace) -> int:
    cfg, mc, ec = (config_from_args(c, ns) for c in (PredictorEvalConfig, ModelConfig, EvalConfig))
    check_seqlens(model_context(mc), seqlen=None if cfg.select_pairs else ec.seqlen)
    check_artifact(cfg.thresholds, "thresholds", "thresholds")
    check_artifacts(cfg.predictors, "predictor", "predictors")

    from dormant.experiments.predictors import evaluate_predictors

    evaluate_predictors(mc, ec, cfg)
    print(f"report: {Path(cfg.out) / 'report.md'}")
    return 0


def _predictability(ns: argparse.Namespace) -> int:
    cfg, mc, ec = (config_from_args(c, ns) for c in (PredictabilityConfig, ModelConfig, EvalConfig))
    check_seqlens(model_context(mc), seqlen=ec.seqlen)
    check_artifact(ns.thresholds, "thresholds", "thresholds")

    from dormant.experiments.predictors import run_predictability_study

    report = run_predictability_study(mc, ec, ns.thresholds, cfg)
    print(f"report: {report}")
    return 0
