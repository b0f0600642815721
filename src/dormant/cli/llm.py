"""``dormant calibrate | eval | sweep | generate``: flags map 1:1 onto the config dataclasses of :mod:`dormant.llm`,
of the sparsity sweep (:mod:`dormant.experiments.sparsity`) and of the decode engine's runner
(:mod:`dormant.experiments.decode`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from dormant import distributed
from dormant.cli.checks import check_artifact, check_layer_targets, check_seqlens, model_context, model_facts
from dormant.config import UsageError, add_config_args, checked, config_from_args, field, in_file, out_file
from dormant.experiments.configs import GenerateConfig, LmEvalConfig, SweepConfig
from dormant.llm.configs import (
    CalibDataConfig,
    CalibrationConfig,
    EvalConfig,
    ModelConfig,
    check_calibration_text,
    parse_method,
)

log = logging.getLogger(__name__)


@dataclass
@checked
class CalibrateOutputConfig:
    method: str | None = field(None, help="a named method (teal, teal-greedy, wina, chess, dormant, ... as in dormant "
                               "sweep) or site:score:allocation; sets --site, --score and --allocation")
    out: str = field("runs/thresholds.safetensors", help="where to write the Thresholds artifact", check=out_file)
    stats_out: str | None = field(None, help="also save the activation statistics (any target can be read later)",
                                  check=out_file)
    sens_windows: int = field(2, help="calibration windows for the sensitivity profile (--allocation sensitivity)",
                              ge=1)
    sens_seqlen: int = field(512, help="tokens per sensitivity window", ge=2)


@dataclass
@checked
class EvalCommandConfig:
    thresholds: str | None = field(None, help="Thresholds artifact to apply (dense if unset)", check=in_file)
    json_out: str | None = field(None, help="write the result as JSON here", check=out_file)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="calibrate zero-enforcing thresholds for a target sparsity")
    for cls in (ModelConfig, CalibDataConfig, EvalConfig, CalibrateOutputConfig):
        add_config_args(p, cls)
    add_config_args(p, CalibrationConfig, skip=("batch_size",))  # windows per pass: --batch-size of EvalConfig
    p.set_defaults(handler=_data_parallel(_calibrate))

    p = sub.add_parser("eval", help="WikiText-2 perplexity, dense or with thresholds applied")
    for cls in (ModelConfig, EvalConfig, EvalCommandConfig):
        add_config_args(p, cls)
    p.set_defaults(handler=_data_parallel(_eval))

    p = sub.add_parser("sweep", help="perplexity vs target sparsity per site (resumable)")
    for cls in (ModelConfig, CalibDataConfig, EvalConfig):
        add_config_args(p, cls)
    add_config_args(p, SweepConfig, skip=("model", "calib", "eval", "lm_eval"))
    add_config_args(p, LmEvalConfig, prefix="lm-eval-")  # lm-eval scores beside perplexity (dormant.cli.lm_eval)
    p.set_defaults(handler=_data_parallel(_sweep))

    p = sub.add_parser("generate", help="greedy decode with the lean C++ engine, dense or with thresholds")
    add_config_args(p, ModelConfig)
    add_config_args(p, GenerateConfig, skip=("model",))
    p.set_defaults(handler=_generate)


def _data_parallel(handler):
    """``handler`` inside ``torchrun``'s process group when launched by it with ``WORLD_SIZE > 1`` (gloo for a CPU
    model, nccl for a CUDA one; :mod:`dormant.distributed`): the verbs shard their windows and sum across ranks,
    rank 0 writes every file, and the other ranks print nothing (their stdout is dropped, their logging keeps
    errors only). One process runs ``handler`` as it is."""

    @functools.wraps(handler)
    def run(ns: argparse.Namespace) -> int:
        from dormant import distributed

        if distributed.requested_world() <= 1:
            return handler(ns)
        mc = config_from_args(ModelConfig, ns)  # refuses bad model flags before torch is imported

        from dormant.llm.models import main_device

        device = main_device(mc)
        with distributed.launched("nccl" if device.type == "cuda" else "gloo", device.index), \
                contextlib.ExitStack() as quiet:
            if not distributed.is_main():
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
                logging.getLogger().setLevel(logging.ERROR)
                quiet.enter_context(contextlib.redirect_stdout(quiet.enter_context(open(os.devnull, "w"))))
            return handler(ns)

    return run


def _calibrate(ns: argparse.Namespace) -> int:
    mc, dc, ec, oc = (config_from_args(c, ns) for c in (ModelConfig, CalibDataConfig, EvalConfig,
                                                        CalibrateOutputConfig))
    cc = config_from_args(CalibrationConfig, ns, batch_size=ec.batch_size)
    if oc.method:
        _, site, score, allocation = parse_method(oc.method)
        cc = dataclasses.replace(cc, site=site, score=score, allocation=allocation)
    check_calibration_text(dc, ec)
    facts = model_facts(mc)
    check_layer_targets(facts.layers, cc.sparsity)
    check_seqlens(facts.context, calib_seqlen=dc.calib_seqlen, seqlen=ec.seqlen if dc.calib_on_eval else None,
                  sens_seqlen=oc.sens_seqlen if cc.allocation == "sensitivity" else None)

    from dormant.llm.calibration import calibrate, calibration_stats
    from dormant.llm.models import load_model
    from dormant.llm.sites import site_taps
    from dormant.llm.stats import StatsConfig
    from dormant.llm.text import calib_description, load_calib_windows, load_text, make_windows

    model, tok, info = load_model(mc)
    cal = load_calib_windows(tok, dc, ec)
    desc = calib_description(dc, cal)
    stats = None
    if oc.stats_out:
        from dormant.llm.adapters import ffn_layout

        stats = calibration_stats(model, cal.ids, site_taps(cc.site, ffn_layout(model)), cc.score,
                                  StatsConfig(batch_size=cc.batch_size, progress=cc.progress), model_id=info["id"],
                                  data=desc)
        if distributed.is_main():
            stats.save(oc.stats_out)
    sens_windows = None
    if cc.allocation == "sensitivity":
        sens_windows = make_windows(tok, load_text(dc.calib_data), oc.sens_seqlen, oc.sens_windows, bos=ec.bos).ids
    thr = calibrate(model, cal.ids, cc, stats=stats, sensitivity_windows=sens_windows, model_id=info["id"], data=desc)
    if distributed.is_main():  # under torchrun every rank holds the same thresholds
        thr.save(oc.out)
    seconds = thr.calibration["seconds"] + (stats.seconds if stats is not None else 0.0)
    print(json.dumps({"thresholds": oc.out, "seconds": round(seconds, 2), "refine_passes": cc.refine, **thr.summary()},
                     indent=1))
    if dc.calib_on_eval:
        print("NOTE: calibrated on the evaluation text (--calib-on-eval, the paper's protocol); not held-out.")
    bad = int(thr.nonfinite.sum())
    if bad:
        log.warning("%d NaN/Inf activations were seen during calibration and left out of the thresholds", bad)
    return 0


def _eval(ns: argparse.Namespace) -> int:
    mc, ec, xc = (config_from_args(c, ns) for c in (ModelConfig, EvalConfig, EvalCommandConfig))
    check_seqlens(model_context(mc), seqlen=ec.seqlen)
    check_artifact(xc.thresholds, "thresholds", "thresholds")

    from dormant.artifacts import atomic_write_text
    from dormant.llm.evaluate import perplexity
    from dormant.llm.models import load_model
    from dormant.llm.sparsify import measure_sparsity, sparsified
    from dormant.llm.text import load_eval_windows
    from dormant.llm.thresholds import Thresholds

    thr = Thresholds.load(xc.thresholds) if xc.thresholds else None
    model, tok, info = load_model(mc)
    ev = load_eval_windows(tok, ec)
    with sparsified(model, thr, info["id"]), measure_sparsity(model, thr.taps if thr else ()) as meter:
        r = perplexity(model, ev.ids, ec.batch_size)  # under torchrun: each rank's share, summed
    from dormant.llm.accounting import skipped_linear_bytes
    from dormant.llm.adapters import ffn_layout

    skipped = skipped_linear_bytes(ffn_layout(model), meter.zero(), ["fp16", "int4"])
    out = {"model": info, "eval": ev.describe(), **r.to_dict(), "sparsity": meter.summary()["per_tap"],
           "neuron_sparsity": meter.summary()["neuron"], "thresholds": xc.thresholds,
           "linear_bytes_skipped": {f: {k: v[k] for k in ("fraction", "fraction_no_head")} for f, v in skipped.items()}}
    if thr is not None and thr.calibration.get("calib_on_eval"):
        out["note"] = "thresholds were calibrated on evaluation text (paper protocol)"
    print(json.dumps(out, indent=1))
    if xc.json_out and distributed.is_main():
        atomic_write_text(Path(xc.json_out), json.dumps(out, indent=1))
    return 0


def _sweep(ns: argparse.Namespace) -> int:
    cfg = config_from_args(
        SweepConfig, ns, model=config_from_args(ModelConfig, ns), calib=config_from_args(CalibDataConfig, ns),
        eval=config_from_args(EvalConfig, ns), lm_eval=config_from_args(LmEvalConfig, ns, prefix="lm-eval-"),
    )
    check_calibration_text(cfg.calib, cfg.eval)
    check_seqlens(model_context(cfg.model), seqlen=cfg.eval.seqlen, calib_seqlen=cfg.calib.calib_seqlen,
                  sens_seqlen=cfg.sens_seqlen if "sensitivity" in cfg.allocation else None)
    if cfg.lm_eval.tasks:
        from dormant.experiments.lm_eval import check_tasks

        check_tasks(cfg.lm_eval, "--lm-eval-tasks")

    from dormant.experiments.sparsity import run_sparsity_sweep

    run_sparsity_sweep(cfg)
    print(f"report: {Path(cfg.out) / 'report.md'}")
    return 0


def _generate(ns: argparse.Namespace) -> int:
    cfg = config_from_args(GenerateConfig, ns, model=config_from_args(ModelConfig, ns))
    if cfg.model.device_map is not None:
        raise UsageError("--device-map: generate packs the weights into its own CPU engine; leave the model whole")
    check_artifact(cfg.thresholds, "thresholds", "thresholds")
    facts = model_facts(cfg.model)
    if facts.context is not None and (cfg.max_seq or cfg.max_new_tokens) > facts.context:
        raise UsageError(f"--max-seq / --max-new-tokens exceed the model's context of {facts.context} tokens")

    from dormant.artifacts import atomic_write_text
    from dormant.experiments.decode import generate_text
    from dormant.llm.models import gguf_file

    if cfg.weights == "gguf" and gguf_file(cfg.model.model) is None:
        raise UsageError(f"--weights gguf needs a .gguf model; {cfg.model.model!r} is not one: choose fp32, bf16, "
                         "q8_0, q4_0 or q4_1")

    r = generate_text(cfg)
    print(r["text"])
    density = "" if r["density"] is None else "; density " + ", ".join(f"{k} {v:.2f}" for k, v in r["density"].items())
    print(f"-- {r['new_tokens']} tokens, decode {r['decode_tok_s']:.1f} tok/s, prefill {r['prefill_tok_s']:.1f} tok/s "
          f"({r['weights']}, {r['threads']} thread{'s' if r['threads'] != 1 else ''}{density})")
    if cfg.json_out:
        atomic_write_text(Path(cfg.json_out), json.dumps(r, indent=1))
    return 0
