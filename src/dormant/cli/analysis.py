"""``dormant analyze | account``: flags map 1:1 onto :class:`~dormant.experiments.analysis.AnalyzeConfig` and
:class:`~dormant.experiments.analysis.AccountConfig` (plus the model, text and calibration configs)."""

from __future__ import annotations

import argparse
import json

from dormant.cli.checks import check_artifact, check_artifacts, check_seqlens, model_context
from dormant.config import add_config_args, config_from_args
from dormant.experiments.configs import AccountConfig, AnalyzeConfig
from dormant.llm.configs import CalibDataConfig, EvalConfig, ModelConfig, check_calibration_text

# Analysis defaults that differ from the evaluation/calibration defaults: a few windows suffice.
ANALYZE_DEFAULTS = {"max_windows": 2, "calib_windows": 8}
ACCOUNT_DEFAULTS = {"max_windows": 1}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="natural sparsity, |a| CDFs, weights, thresholds vs depth, and the "
                                       "per-token FFN bytes/FLOPs of each execution policy; writes a report")
    for cls in (ModelConfig, CalibDataConfig, EvalConfig):
        add_config_args(p, cls)
    add_config_args(p, AnalyzeConfig, skip=("model", "calib", "eval"))
    p.set_defaults(handler=_analyze, **ANALYZE_DEFAULTS)

    p = sub.add_parser("account", help="FFN weight bytes and FLOPs per token of each execution policy at one "
                                       "set of thresholds (or from given traces, including predicted masks)")
    for cls in (ModelConfig, EvalConfig, AccountConfig):
        add_config_args(p, cls)
    p.set_defaults(handler=_account, **ACCOUNT_DEFAULTS)


def _analyze(ns: argparse.Namespace) -> int:
    cfg = config_from_args(
        AnalyzeConfig, ns, model=config_from_args(ModelConfig, ns), calib=config_from_args(CalibDataConfig, ns),
        eval=config_from_args(EvalConfig, ns),
    )
    check_calibration_text(cfg.calib, cfg.eval)
    check_seqlens(model_context(cfg.model), seqlen=cfg.eval.seqlen, calib_seqlen=cfg.calib.calib_seqlen)
    check_artifacts(cfg.stats, "stats", "stats")

    from dormant.experiments.analysis import run_analysis

    print(f"report: {run_analysis(cfg)}")
    return 0


def _account(ns: argparse.Namespace) -> int:
    cfg, mc, ec = (config_from_args(c, ns) for c in (AccountConfig, ModelConfig, EvalConfig))
    check_seqlens(model_context(mc), seqlen=None if cfg.mid_trace else ec.seqlen)
    check_artifact(cfg.thresholds, "thresholds", "thresholds")
    for flag in ("mid_trace", "act_trace", "predicted"):
        check_artifact(getattr(cfg, flag), "trace", flag.replace("_", "-"))

    from dormant.experiments.analysis import run_account

    costs = run_account(mc, ec, cfg)
    rows = [{"policy": c.policy, "format": c.format, "bytes_per_token": round(c.bytes_per_token, 1),
             "rel_bytes": round(c.rel_bytes, 4), "rel_flops": round(c.rel_flops, 4)} for c in costs]
    print(json.dumps(rows, indent=1))
    print(f"written: {cfg.out}/account.{{json,csv,md}}")
    return 0
