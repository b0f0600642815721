"""The sparsity-perplexity trade-off: calibrate once per site, then evaluate every target sparsity.

Each finished point is appended to ``results.jsonl`` in the output folder as soon as it is measured (through the
run's :class:`~dormant.experiments.ledger.Ledger`); activation statistics and sensitivity profiles are cached under
names keyed by the model, text and taps that produced them. A rerun with the same configuration skips what is
done, so an interrupted sweep resumes where it stopped. The sweep ends with ``report.md`` and ``sweep.png``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from dormant.artifacts import ArtifactError, atomic_write_text
from dormant.experiments.configs import SweepConfig
from dormant.experiments.ledger import Ledger
from dormant.llm.allocate import Sensitivity, measure_sensitivity
from dormant.llm.calibration import calibrate
from dormant.llm.configs import ALLOCATIONS, CalibrationConfig
from dormant.llm.text import calib_description

log = logging.getLogger(__name__)

__all__ = ["SweepConfig", "run_sparsity_sweep", "write_sweep_report"]


def run_sparsity_sweep(cfg: SweepConfig) -> list[dict[str, Any]]:
    """Run (or resume) a sweep; returns all records of this configuration."""
    from dormant.llm.adapters import ffn_layout
    from dormant.llm.evaluate import perplexity
    from dormant.llm.models import load_model
    from dormant.llm.sites import site_taps
    from dormant.llm.sparsify import measure_sparsity, sparsified
    from dormant.llm.text import load_calib_windows, load_eval_windows

    for site in cfg.sites:
        site_taps(site)  # fail early on a bad site name
    bad = set(cfg.allocation) - set(ALLOCATIONS)
    if bad:
        raise ValueError(f"unknown allocation {sorted(bad)}; choose from {', '.join(ALLOCATIONS)}")
    out = Path(cfg.out)
    ledger = Ledger(out / "results.jsonl", cfg.key(), cfg.key_config(), what="sweep")
    done = {(r["site"], r.get("allocation", "uniform"), r["target"]) for r in ledger.records}
    todo = [(s, a, t) for s in cfg.sites for a in cfg.allocation for t in cfg.sparsity
            if t > 0 and (s, a, t) not in done]
    need_dense = 0.0 in cfg.sparsity and ("dense", "uniform", 0.0) not in done
    if not todo and not need_dense:
        log.info("all %d points already measured in %s", len(ledger.records), ledger.path)
        write_sweep_report(out, ledger.records, cfg)
        return ledger.records

    model, tokenizer, info = load_model(cfg.model)
    layout = ffn_layout(model)
    ev = load_eval_windows(tokenizer, cfg.eval)
    cal = load_calib_windows(tokenizer, cfg.calib, cfg.eval, ev)
    desc = calib_description(cfg.calib, cal)
    base = {"model": info, "eval": ev.describe(), "calibration": desc}

    def evaluate(site: str, target: float, taps, allocation: str = "uniform", extra=None) -> dict[str, Any]:
        with measure_sparsity(model, taps) as meter:
            r = perplexity(model, ev.ids, cfg.eval.batch_size, progress=cfg.progress)
        m = meter.summary()
        site_sparsity = sum(m["per_tap"][t.value] for t in taps) / len(taps) if taps else 0.0
        rec = ledger.append({**base, "site": site, "allocation": allocation, "target": target, **r.to_dict(),
                             **(extra or {}), "site_sparsity": site_sparsity, "neuron_sparsity": m["neuron"],
                             "per_tap": m["per_tap"], "per_layer": m["per_layer"],
                             "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        log.info("%s/%s @ %.2f: ppl %.3f, site sparsity %.3f, neuron sparsity %.3f", site, allocation, target, r.ppl,
                 site_sparsity, m["neuron"])
        return rec

    if need_dense:
        evaluate("dense", 0.0, ())
    for site in cfg.sites:
        points = [(a, t) for s, a, t in todo if s == site]
        if not points:
            continue
        taps = site_taps(site, layout)
        # The statistics depend on the model and the calibration text only (the evaluation text too when it is
        # the calibration text), not on the targets: one pass per site serves every point.
        inputs = {**cfg.key_config(), "taps": [t.value for t in taps]}
        if not cfg.calib.calib_on_eval:
            inputs.pop("eval")
        stats = _cached_stats(ledger.cache_path(f"stats_{site}", inputs, ".safetensors"), model, cal, taps, cfg,
                              info, desc)
        sens = None
        for allocation, target in points:
            if allocation == "sensitivity" and sens is None:
                sens = _sensitivity(model, tokenizer, stats, cfg, site,
                                    ledger.cache_path(f"sensitivity_{site}", {**inputs, "sens": [
                                        cfg.sens_windows, cfg.sens_seqlen]}, ".json"))
            ccfg = CalibrationConfig(site, [target], allocation, cfg.refine, cfg.eval.batch_size, cfg.progress)
            thr = calibrate(model, cal.ids, ccfg, stats=stats, sensitivity=sens, model_id=info["id"], data=desc)
            thr.save(out / f"thresholds_{site}_{allocation}_{target:g}.safetensors")
            extra = {"layer_targets": thr.calibration["layer_targets"]} if allocation == "sensitivity" else None
            with sparsified(model, thr, info["id"]):
                evaluate(site, target, taps, allocation, extra)
    write_sweep_report(out, ledger.records, cfg)
    return ledger.records


def _cached_stats(path: Path, model, cal, taps, cfg: SweepConfig, info, desc):
    from dormant.llm.stats import ActivationStats, StatsConfig, collect_stats

    try:
        return ActivationStats.load(path)
    except ArtifactError:
        stats = collect_stats(model, cal.ids, taps, StatsConfig(batch_size=cfg.eval.batch_size, progress=cfg.progress),
                              model_id=info["id"], data=desc)
        stats.save(path)
        return stats


def _sensitivity(model, tokenizer, stats, cfg: SweepConfig, site: str, path: Path) -> Sensitivity:
    """Per-layer sensitivity on calibration text (cached as JSON under a name keyed by its inputs)."""
    from dormant.llm.text import load_eval_windows, load_text, make_windows

    if path.exists():
        try:
            return Sensitivity.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError) as e:
            log.warning("ignoring unreadable sensitivity cache %s (%s); measuring again", path, e)
    if cfg.calib.calib_on_eval:
        w = load_eval_windows(tokenizer, cfg.eval).ids[: cfg.sens_windows]
    else:
        w = make_windows(tokenizer, load_text(cfg.calib.calib_data), cfg.sens_seqlen, cfg.sens_windows,
                         bos=cfg.eval.bos).ids
    sens = measure_sensitivity(model, stats, w, site, progress=cfg.progress)
    atomic_write_text(path, json.dumps(sens.to_dict()))
    return sens


def write_sweep_report(out: Path, records: list[dict[str, Any]], cfg: SweepConfig | None = None) -> Path:
    """``report.md`` (table) and ``sweep.png`` (perplexity and measured sparsity vs target) from records."""
    from dormant.report import markdown_table, new_figure, save_figure, write_markdown

    if not records:
        raise ValueError("no sweep records to report")
    dense = next((r for r in records if r["site"] == "dense"), None)
    def label(r):
        return r["site"] if r.get("allocation", "uniform") == "uniform" else f"{r['site']} ({r['allocation']})"

    sites = list(dict.fromkeys(label(r) for r in records if r["site"] != "dense"))
    rows = []
    if dense:
        rows.append(["dense", 0.0, dense["ppl"], "", 0.0, dense["neuron_sparsity"]])
    for site in sites:
        for r in sorted((r for r in records if label(r) == site), key=lambda r: r["target"]):
            delta = f"{100 * (r['ppl'] / dense['ppl'] - 1):+.1f}%" if dense else ""
            rows.append([site, r["target"], r["ppl"], delta, r["site_sparsity"], r["neuron_sparsity"]])
    first = records[0]
    ev, cal = first["eval"], first["calibration"]
    held_out = "**no** -- calibrated on the evaluation windows (paper protocol)" if cal.get("calib_on_eval") else (
        f"yes -- {cal['windows']} windows of {cal['seqlen']} tokens from {cal['source']}")
    text = [
        f"# Sparsity vs perplexity: {first['model']['id']}\n",
        f"- evaluation: {ev['windows']} windows x {ev['seqlen']} tokens of {ev['source']} (BOS per window: {ev['bos']})",
        f"- calibration held out: {held_out}",
        f"- device {first['model']['device']}, dtype {first['model']['dtype']}\n",
        "Site sparsity = measured zero fraction of the thresholded tensors (mean over layers and taps); neuron "
        "sparsity = fraction of FFN intermediate entries (neurons per token) that are zero. `uniform`: one target "
        "for every layer (the paper); `sensitivity`: per-layer targets with the same mean, allocated from "
        "per-layer loss sensitivity measured on calibration text (`dormant.llm.allocate`).\n",
        markdown_table(["site", "target", "perplexity", "vs dense", "site sparsity", "neuron sparsity"], rows),
        "![sweep](sweep.png)\n",
    ]
    write_markdown(out / "report.md", "\n".join(text))
    fig, ax = new_figure(1, 2, size=(5.5, 4))
    for site in sites:
        rs = sorted((r for r in records if label(r) == site), key=lambda r: r["target"])
        xs = ([0.0] if dense else []) + [r["target"] for r in rs]
        ax[0, 0].plot(xs, ([dense["ppl"]] if dense else []) + [r["ppl"] for r in rs], "o-", label=site)
        line = ax[0, 1].plot([r["target"] for r in rs], [r["site_sparsity"] for r in rs], "o-", label=f"{site}: site")[0]
        ax[0, 1].plot([r["target"] for r in rs], [r["neuron_sparsity"] for r in rs], "s--", color=line.get_color(),
                      label=f"{site}: neuron")
    ax[0, 0].set(xlabel="target sparsity", ylabel="WikiText-2 perplexity", title="perplexity")
    ax[0, 1].plot([0, max(r["target"] for r in records)], [0, max(r["target"] for r in records)], ":", color="gray",
                  label="target")
    ax[0, 1].set(xlabel="target sparsity", ylabel="measured zero fraction", title="measured sparsity")
    for a in ax[0]:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    save_figure(fig, out / "sweep.png")
    return out / "report.md"


