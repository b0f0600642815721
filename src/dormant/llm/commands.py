"""``dormant calibrate | eval | sweep``: flags map 1:1 onto the config dataclasses of :mod:`dormant.llm`."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from dormant.config import add_config_args, config_from_args, field
from dormant.llm.models import ModelConfig
from dormant.llm.sweep import CalibConfig, EvalConfig, SweepConfig

log = logging.getLogger(__name__)


@dataclass
class CalibrateConfig:
    site: str = field("intermediate", help="paper | intermediate | gate_act | inputs")
    sparsity: list[float] = field(default_factory=lambda: [0.5],
                                  help="target sparsity: one value, or one per layer")
    out: str = field("runs/thresholds.safetensors", help="where to write the Thresholds artifact")
    stats_out: str | None = field(None, help="also save the activation statistics (any target can be read later)")


@dataclass
class EvalCommandConfig:
    thresholds: str | None = field(None, help="Thresholds artifact to apply (dense if unset)")
    json_out: str | None = field(None, help="write the result as JSON here")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="calibrate zero-enforcing thresholds for a target sparsity")
    for cls in (ModelConfig, CalibConfig, EvalConfig, CalibrateConfig):
        add_config_args(p, cls)
    p.set_defaults(handler=_calibrate)

    p = sub.add_parser("eval", help="WikiText-2 perplexity, dense or with thresholds applied")
    for cls in (ModelConfig, EvalConfig, EvalCommandConfig):
        add_config_args(p, cls)
    p.set_defaults(handler=_eval)

    p = sub.add_parser("sweep", help="perplexity vs target sparsity per site (resumable)")
    for cls in (ModelConfig, CalibConfig, EvalConfig):
        add_config_args(p, cls)
    add_config_args(p, SweepConfig, skip=("model", "calib", "eval"))
    p.set_defaults(handler=_sweep)


def _calibrate(ns: argparse.Namespace) -> int:
    from dormant.llm.adapters import ffn_layout
    from dormant.llm.models import load_model
    from dormant.llm.sites import site_taps
    from dormant.llm.stats import StatsConfig, collect_stats, refine_thresholds
    from dormant.llm.sweep import load_calib_windows

    mc, cc, ec, kc = (config_from_args(c, ns) for c in (ModelConfig, CalibConfig, EvalConfig, CalibrateConfig))
    model, tok, info = load_model(mc)
    taps = site_taps(kc.site, ffn_layout(model))
    cal = load_calib_windows(tok, cc, ec)
    desc = {**cal.describe(), "calib_on_eval": cc.calib_on_eval}
    stats = collect_stats(model, cal.ids, taps, StatsConfig(), model_id=info["id"], data=desc)
    if kc.stats_out:
        stats.save(kc.stats_out)
    target = kc.sparsity[0] if len(kc.sparsity) == 1 else kc.sparsity
    thr = stats.thresholds(target, kc.site)
    if cc.refine:
        thr = refine_thresholds(model, cal.ids, thr, target, cc.refine, model_id=info["id"], data=desc)
    thr.save(kc.out)
    print(json.dumps({"thresholds": kc.out, "seconds": round(stats.seconds, 2), "refine_passes": cc.refine,
                      **thr.summary()}, indent=1))
    if cc.calib_on_eval:
        print("NOTE: calibrated on the evaluation text (--calib-on-eval, the paper's protocol); not held-out.")
    return 0


def _eval(ns: argparse.Namespace) -> int:
    from dormant.artifacts import atomic_write_text
    from dormant.llm.models import load_model
    from dormant.llm.perplexity import perplexity
    from dormant.llm.sparsify import measure_sparsity, sparsify_
    from dormant.llm.sweep import load_eval_windows
    from dormant.llm.thresholds import Thresholds

    mc, ec, xc = (config_from_args(c, ns) for c in (ModelConfig, EvalConfig, EvalCommandConfig))
    model, tok, info = load_model(mc)
    taps = ()
    thr = None
    if xc.thresholds:
        thr = Thresholds.load(xc.thresholds)
        sparsify_(model, thr, info["id"])
        taps = thr.taps
    ev = load_eval_windows(tok, ec)
    with measure_sparsity(model, taps) as meter:
        r = perplexity(model, ev.ids, ec.batch_size)
    out = {"model": info, "eval": ev.describe(), **r.to_dict(), "sparsity": meter.summary()["per_tap"],
           "neuron_sparsity": meter.summary()["neuron"], "thresholds": xc.thresholds}
    if thr is not None and thr.calibration.get("calib_on_eval"):
        out["note"] = "thresholds were calibrated on evaluation text (paper protocol)"
    print(json.dumps(out, indent=1))
    if xc.json_out:
        atomic_write_text(Path(xc.json_out), json.dumps(out, indent=1))
    return 0


def _sweep(ns: argparse.Namespace) -> int:
    from dormant.llm.sweep import run_sweep

    cfg = config_from_args(
        SweepConfig, ns, model=config_from_args(ModelConfig, ns), calib=config_from_args(CalibConfig, ns),
        eval=config_from_args(EvalConfig, ns),
    )
    run_sweep(cfg)
    print(f"report: {Path(cfg.out) / 'report.md'}")
    return 0
