"""``dormant analyze | account``: flags map 1:1 onto :class:`~dormant.experiments.analysis.AnalyzeConfig` and
:class:`~dormant.experiments.analysis.AccountConfig` (plus the model, text and calibration configs)."""

from __future__ import annotations

import argparse
import json

from dormant.config import add_config_args, config_from_args
from dormant.experiments.analysis import AccountConfig, AnalyzeConfig
from dormant.llm.models import ModelConfig
from dormant.llm.text import CalibDataConfig, EvalConfig

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
    from dormant.experiments.analysis import run_analysis

    cfg = config_from_args(
        AnalyzeConfig, ns, model=config_from_args(ModelConfig, ns), calib=config_from_args(CalibDataConfig, ns),
        eval=config_from_args(EvalConfig, ns),
    )
    print(f"report: {run_analysis(cfg)}")
    return 0


def _account(ns: argparse.Namespace) -> int:
    from dormant.experiments.analysis import run_account

    cfg = config_from_args(AccountConfig, ns)
    costs = run_account(config_from_args(ModelConfig, ns), config_from_args(EvalConfig, ns), cfg)
    rows = [{"policy": c.policy, "format": c.format, "bytes_per_token": round(c.bytes_per_token, 1),
             "rel_bytes": round(c.rel_bytes, 4), "rel_flops": round(c.rel_flops, 4)} for c in costs]
    print(json.dumps(rows, indent=1))
    print(f"written: {cfg.out}/account.{{json,csv,md}}")
    return 0
