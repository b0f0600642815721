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
from dataclasses import replace
from pathlib import Path
from typing import Any

from dormant import distributed
from dormant.artifacts import ArtifactError, atomic_write_text
from dormant.experiments.configs import SweepConfig
from dormant.experiments.ledger import Ledger
from dormant.llm.allocate import Sensitivity, measure_sensitivity
from dormant.llm.calibration import TAP_ALLOCATIONS, TapTargets, calibrate
from dormant.llm.configs import ALLOCATIONS, CalibrationConfig, parse_method
from dormant.llm.text import calib_description

log = logging.getLogger(__name__)

__all__ = ["SweepConfig", "run_sparsity_sweep", "write_sweep_report"]

BYTE_FORMATS = ("fp16", "bf16", "fp32", "int8", "int4")  # int8 / int4 = GGUF Q8_0 / Q4_0 blocks


def run_sparsity_sweep(cfg: SweepConfig) -> list[dict[str, Any]]:
    """Run (or resume) a sweep; returns all records of this configuration."""
    from dormant.llm.accounting import skipped_linear_bytes
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
    ledger = Ledger(out / "results.jsonl", cfg.key(), cfg.key_config(), what="sweep", shared=True)  # torchrun
    done = {(r["site"], r.get("allocation", "uniform"), r["target"]) for r in ledger.records if "method" not in r}
    todo = [(s, a, t) for s in cfg.sites for a in cfg.allocation for t in cfg.sparsity
            if t > 0 and (s, a, t) not in done]
    methods = [parse_method(m) for m in cfg.methods]
    done_methods = {(r["method"], r.get("search"), r["target"]) for r in ledger.records if "method" in r}
    method_todo = [(m, t) for m in methods for t in cfg.sparsity
                   if t > 0 and (m[0], _search_key(cfg, m[3]), t) not in done_methods]
    need_dense = (0.0 in cfg.sparsity or methods) and ("dense", "uniform", 0.0) not in done
    if not todo and not need_dense and not method_todo:
        log.info("all %d points already measured in %s", len(ledger.records), ledger.path)
        if distributed.is_main():
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
        skipped = skipped_linear_bytes(layout, meter.zero(), BYTE_FORMATS)
        if cfg.lm_eval.tasks:  # the same model, thresholds still enforced (dormant.experiments.lm_eval)
            from dormant.experiments.lm_eval import evaluate_tasks, scores

            res = evaluate_tasks(model, tokenizer, cfg.lm_eval)
            extra = {**(extra or {}), "lm_eval": scores(res), "lm_eval_seconds": res["seconds"]}
        rec = ledger.append({**base, "site": site, "allocation": allocation, "target": target, **r.to_dict(),
                             **(extra or {}), "site_sparsity": site_sparsity, "neuron_sparsity": m["neuron"],
                             "per_tap": m["per_tap"], "per_layer": m["per_layer"], "bytes_skipped": skipped,
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
            ccfg = CalibrationConfig(site, [target], allocation=allocation, refine=cfg.refine,
                                     batch_size=cfg.eval.batch_size, progress=cfg.progress)
            thr = calibrate(model, cal.ids, ccfg, stats=stats, sensitivity=sens, model_id=info["id"], data=desc)
            if distributed.is_main():  # under torchrun every rank holds the same thresholds; one writes them
                thr.save(out / f"thresholds_{site}_{allocation}_{target:g}.safetensors")
            extra = {"layer_targets": thr.calibration["layer_targets"]} if allocation == "sensitivity" else None
            with sparsified(model, thr, info["id"]):
                evaluate(site, target, taps, allocation, extra)
    for method in methods:
        name, site, score, allocation = method
        points = [t for m, t in method_todo if m == method]
        if not points:
            continue
        taps = site_taps(site, layout)
        inputs = {**cfg.key_config(), "taps": [t.value for t in taps], "score": score}
        if not cfg.calib.calib_on_eval:
            inputs.pop("eval")
        stats = _cached_stats(ledger.cache_path(f"stats_{site}_{score}", inputs, ".safetensors"), model, cal, taps,
                              cfg, info, desc, score)
        ccfg = CalibrationConfig(site, [points[0]], score=score, allocation=allocation, greedy_tokens=cfg.greedy_tokens,
                                 probe_tokens=cfg.probe_tokens, refine=cfg.refine, batch_size=cfg.eval.batch_size,
                                 progress=cfg.progress)
        searched = None
        if allocation in TAP_ALLOCATIONS:  # one search serves every target (cached: greedy takes a while)
            searched = _cached_search(ledger.cache_path(f"search_{site}_{score}_{allocation}", {
                **inputs, "search": _search_key(cfg, allocation), "targets": points}, ".json"), model, stats, cal,
                ccfg, points)
        for target in points:
            thr = calibrate(model, cal.ids, replace(ccfg, sparsity=[target]), stats=stats, tap_targets=searched,
                            model_id=info["id"], data=desc)
            if distributed.is_main():
                thr.save(out / f"thresholds_{name.replace(':', '-')}_{target:g}.safetensors")
            extra = {"method": name, "score": score, "search": _search_key(cfg, allocation),
                     "calibration_seconds": stats.seconds + thr.calibration["seconds"]
                     + (searched.meta["search_seconds"] if searched else 0.0),
                     "tap_targets": thr.calibration.get("tap_targets")}
            with sparsified(model, thr, info["id"]):
                evaluate(site, target, taps, allocation, extra)
    if distributed.is_main():
        write_sweep_report(out, ledger.records, cfg)
    return ledger.records


def _search_key(cfg: SweepConfig, allocation: str) -> str | None:
    """What besides the configuration key identifies a method's points: its search budget."""
    if allocation == "greedy":
        return f"greedy_tokens={cfg.greedy_tokens}"
    if allocation == "loss":
        return f"probe_tokens={cfg.probe_tokens}"
    return None


def _cached_search(path: Path, model, stats, cal, ccfg: CalibrationConfig, targets) -> TapTargets:
    import torch

    from dormant.llm.calibration import search_tap_targets

    try:
        saved = json.loads(path.read_text())
        return TapTargets({float(t): torch.tensor(v, dtype=torch.float64) for t, v in saved["targets"].items()},
                          saved["meta"])
    except FileNotFoundError:
        pass
    except (ValueError, KeyError) as e:
        log.warning("ignoring unreadable search cache %s (%s); searching again", path, e)
    found = search_tap_targets(model, stats, cal.ids, ccfg, targets)
    if distributed.is_main():
        atomic_write_text(path, json.dumps({"targets": {str(t): v.tolist() for t, v in found.targets.items()},
                                            "meta": found.meta}))
    return found


def _cached_stats(path: Path, model, cal, taps, cfg: SweepConfig, info, desc, score: str = "magnitude"):
    from dormant.llm.calibration import calibration_stats
    from dormant.llm.stats import ActivationStats, StatsConfig

    try:
        return ActivationStats.load(path)
    except ArtifactError:
        stats = calibration_stats(model, cal.ids, taps, score,
                                  StatsConfig(batch_size=cfg.eval.batch_size, progress=cfg.progress),
                                  model_id=info["id"], data=desc)
        if distributed.is_main():
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
    if distributed.is_main():
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

    sites = list(dict.fromkeys(label(r) for r in records if r["site"] != "dense" and "method" not in r))
    tasks = _lm_eval_columns(records)
    rows = []
    if dense:
        rows.append(["dense", 0.0, dense["ppl"], "", 0.0, dense["neuron_sparsity"], *_lm_eval_cells(dense, tasks)])
    for site in sites:
        for r in sorted((r for r in records if label(r) == site), key=lambda r: r["target"]):
            delta = f"{100 * (r['ppl'] / dense['ppl'] - 1):+.1f}%" if dense else ""
            rows.append([site, r["target"], r["ppl"], delta, r["site_sparsity"], r["neuron_sparsity"],
                         *_lm_eval_cells(r, tasks)])
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
        markdown_table(["site", "target", "perplexity", "vs dense", "site sparsity", "neuron sparsity",
                        *(f"{t} {m}" for t, m in tasks)], rows),
        "![sweep](sweep.png)\n",
    ]
    if not sites:  # methods only: the site table and its figure would be empty
        text = text[:4]
    write_markdown(out / "report.md", "\n".join(text))
    if any("method" in r for r in records):
        _write_bytes_section(out, records, dense, "\n".join(text))
    if not sites:
        return out / "report.md"
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


def _lm_eval_columns(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """``(task, metric)`` of the lm-eval scores the records carry (``dormant sweep --lm-eval-tasks``)."""
    from dormant.experiments.lm_eval import main_score

    cols: dict[tuple[str, str], None] = {}
    for r in records:
        for task, metrics in r.get("lm_eval", {}).items():
            best = main_score(metrics)
            if best is not None:
                cols[(task, best[0])] = None
    return list(cols)


def _lm_eval_cells(r: dict[str, Any], columns: list[tuple[str, str]]) -> list[Any]:
    return [r.get("lm_eval", {}).get(task, {}).get(metric, "") for task, metric in columns]


def interpolate_at(points: list[tuple[float, float]], x: float) -> float | None:
    """``y`` at ``x`` on the piecewise-linear curve through ``points`` (x, y), ``None`` outside their range."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (x - x0) / (x1 - x0) * (y1 - y0)
    return None


def _bytes_fraction(r: dict[str, Any], fmt: str = "fp16", key: str = "fraction") -> float:
    return float(r.get("bytes_skipped", {}).get(fmt, {}).get(key, 0.0))


def _write_bytes_section(out: Path, records: list[dict[str, Any]], dense: dict[str, Any] | None, head: str) -> None:
    """Append the methods' table, their perplexity at 40% / 50% of linear weight bytes skipped, and ``bytes.png``."""
    from dormant.llm.configs import parse_method
    from dormant.report import markdown_table, new_figure, save_figure, write_markdown

    methods = list(dict.fromkeys(r["method"] for r in records if "method" in r))
    if dense is None:
        raise ValueError("the methods' section compares with the dense model: the sweep has no dense record")
    rows, curves = [], {}
    for name in methods:
        rs = sorted((r for r in records if r.get("method") == name), key=lambda r: r["target"])
        _, site, score, allocation = parse_method(name)
        curves[name] = [(0.0, dense["ppl"])] + [(_bytes_fraction(r), r["ppl"]) for r in rs]
        for r in rs:
            rows.append([name, f"{site}:{score}:{allocation}", r["target"], r["ppl"],
                         f"{100 * (r['ppl'] / dense['ppl'] - 1):+.1f}%", _bytes_fraction(r),
                         _bytes_fraction(r, key="fraction_no_head"), _bytes_fraction(r, "int4"),
                         r["neuron_sparsity"], round(r.get("calibration_seconds", 0.0), 1)])
    at = []
    for name in methods:
        cells = [name]
        for x in (0.3, 0.4, 0.5):
            y = interpolate_at(curves[name], x)
            cells.append("beyond range" if y is None else f"{y:.3f} ({100 * (y / dense['ppl'] - 1):+.1f}%)")
        at.append(cells)
    first = records[0]
    ev, cal = first["eval"], first["calibration"]
    protocol = (
        f"Protocol: thresholds from {cal['windows']} x {cal['seqlen']} tokens of {cal['source']}"
        f"{' (the evaluation text: not held out)' if cal.get('calib_on_eval') else ' (held out)'}; perplexity on "
        f"{ev['windows']} x {ev['seqlen']} tokens of {ev['source']} with every token of every window sparsified. "
        "TEAL reports perplexity on another corpus and leaves part of each sequence dense (its prefill); sparsifying "
        "every position, as here, is the stricter test and the one a sparse decoder pays.")
    text = [
        head,
        "## Perplexity vs linear weight bytes skipped\n",
        protocol + "\n",
        "Bytes skipped = weight bytes per token that the measured zeros (held-out text) let a sparse executor leave "
        "unread: a zero input skips its weight column, a zero act(gate) the neuron's up row "
        "(`dormant.llm.accounting.skipped_linear_bytes`); `all` counts every block linear and the LM head, `blocks` "
        "the decoder blocks only; in fp16, and in GGUF Q4_0 blocks (fp16 scale per 32 weights). A method is "
        "`site:score:allocation` (`dormant.llm.configs.METHODS`).\n",
        markdown_table(["method", "site:score:allocation", "target", "perplexity", "vs dense", "bytes skipped (all)",
                        "bytes skipped (blocks)", "Q4_0 (all)", "neuron sparsity", "calibration s"], rows),
        "Perplexity at a fraction of all linear weight bytes skipped, interpolated linearly between measured "
        "points (dense = 0):\n",
        markdown_table(["method", "30% skipped", "40% skipped", "50% skipped"], at),
        "![bytes](bytes.png)\n",
    ]
    write_markdown(out / "report.md", "\n".join(text))
    fig, ax = new_figure(1, 1, size=(7, 4.5))
    for name in methods:
        xs, ys = zip(*sorted(curves[name]))
        ax[0, 0].plot(xs, ys, "o-", label=name, markersize=4)
    ax[0, 0].set_yscale("log")
    ax[0, 0].set(xlabel="fraction of linear weight bytes skipped per token (all linears + LM head)",
                 ylabel=f"{ev['source']} perplexity", title=first["model"]["id"])
    ax[0, 0].grid(alpha=0.3, which="both")
    ax[0, 0].legend(fontsize=8)
    save_figure(fig, out / "bytes.png")


