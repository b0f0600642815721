"""``dormant analyze`` and ``dormant account``: what sparsity buys, measured and written up.

:func:`run_analysis` measures natural sparsity, |a| CDFs and weights (:mod:`dormant.llm.analyze`), reads the
calibrated thresholds vs depth, and accounts FFN weight bytes and FLOPs per token under each execution policy of
:mod:`dormant.llm.accounting` across target sparsities -- what the paper (Dhar et al., IPCCC 2024, Insight 3,
"~50% FFN memory/compute reduction") only asserts. It writes ``report.md``, the plots and the raw numbers.
:func:`run_account` accounts one set of thresholds (or given traces, including predicted masks).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from dormant.experiments.configs import AccountConfig, AnalyzeConfig
from dormant.llm.accounting import (
    ARCHS,
    FORMATS,
    FFNDims,
    PolicyCost,
    PredictorCost,
    model_breakdown,
    neuron_counts,
    policy_costs,
)
from dormant.llm.adapters import FFNLayout, ffn_layout
from dormant.llm.analyze import NaturalSparsity, WeightStats, analyze_activations, weight_stats
from dormant.llm.configs import CalibDataConfig, EvalConfig, ModelConfig
from dormant.llm.stats import ActivationStats, StatsConfig, collect_stats
from dormant.report import csv_text

log = logging.getLogger(__name__)

__all__ = ["AnalyzeConfig", "run_analysis", "quick_analysis", "AccountConfig", "run_account", "write_analysis_report",
           "plot_natural_sparsity", "plot_cdfs", "plot_weights", "plot_thresholds", "plot_accounting"]

CDF_GRID = torch.logspace(-5, 2, 281, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------
# Accounting over target sparsities


def _account_point(model, windows, thr, dims: FFNDims, formats, max_tokens, model_id, progress,
                   strawman: bool, trace_dir: Path | None = None, tag: str = "") -> dict[str, Any]:
    from dormant.llm.accounting import collect_policy_traces, previous_token_prediction

    mid, act = collect_policy_traces(model, windows, thr, max_tokens=max_tokens, model_id=model_id, progress=progress)
    if trace_dir is not None:
        mid.save(trace_dir / f"{tag}_mid.safetensors")
        if act is not None:
            act.save(trace_dir / f"{tag}_act.safetensors")
    pred = previous_token_prediction(mid) if strawman else None
    counts = neuron_counts(mid, act, pred)
    costs = policy_costs(dims, counts, formats, PredictorCost(0.0, 0.0, "previous-token") if strawman else None)
    gs = counts.gate_sparsity()
    return {
        "tokens": counts.n_tokens,
        "neuron_sparsity": float(counts.sparsity().mean()),
        "neuron_sparsity_per_layer": counts.sparsity().tolist(),
        "gate_sparsity": None if gs is None else float(gs.mean()),
        "costs": [c.to_dict() for c in costs],
    }


# ----------------------------------------------------------------------------------------------------
# The report


def _calibration_stats(model, tok, info, cfg: AnalyzeConfig, layout: FFNLayout, ev) -> dict[str, ActivationStats]:
    from dormant.artifacts import ArtifactError
    from dormant.llm.sites import site_taps
    from dormant.llm.text import load_calib_windows

    ours = layout.describe()["fingerprint"]
    loaded = []
    for p in cfg.stats:
        s = ActivationStats.load(p)
        if s.model.get("fingerprint") != ours:
            raise ArtifactError(f"{p}: statistics of another model ({s.model.get('id')})")
        loaded.append((p, s))
    out: dict[str, ActivationStats] = {}
    for site in cfg.sites:
        taps = site_taps(site, layout)
        for _, s in loaded:
            if set(taps) <= set(s.taps):
                out[site] = s.subset(taps)
                break
    todo = [s for s in cfg.sites if s not in out]
    if todo:
        taps = tuple(dict.fromkeys(t for s in todo for t in site_taps(s, layout)))
        cal = load_calib_windows(tok, cfg.calib, cfg.eval, ev)
        desc = {**cal.describe(), "calib_on_eval": cfg.calib.calib_on_eval}
        log.info("calibrating %s on %s", ",".join(todo), desc)
        s = collect_stats(model, cal.ids, taps, StatsConfig(progress=cfg.progress), model_id=info["id"], data=desc)
        s.save(Path(cfg.out) / "calibration_stats.safetensors")
        for site in todo:
            out[site] = s.subset(site_taps(site, layout))
    return out


def run_analysis(cfg: AnalyzeConfig) -> Path:
    """Run the whole analysis of one model and write ``report.md``, PNG plots and raw JSON/CSV to ``cfg.out``.

    Writes: ``report.md``; ``natural_sparsity.{png,csv}``, ``cdf.png``, ``weights.png``,
    ``thresholds.png``, ``accounting_{bytes,flops}.png``, ``accounting.csv``, ``ffn_share.csv``,
    ``analysis.json`` (every number); artifacts ``activation_stats.safetensors`` (analysis text),
    ``thresholds/*.safetensors`` and ``traces/*.safetensors``.
    """
    from tqdm.auto import tqdm

    from dormant.llm.models import load_model
    from dormant.llm.sites import site_taps
    from dormant.llm.text import load_eval_windows

    for site in cfg.sites:
        site_taps(site)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tok, info = load_model(cfg.model)
    layout = ffn_layout(model)
    dims = FFNDims.from_layout(layout)
    ev = load_eval_windows(tok, cfg.eval)
    stats, natural = analyze_activations(model, ev.ids, cfg.eps, model_id=info["id"], data=ev.describe(),
                                         progress=cfg.progress)
    stats.save(out / "activation_stats.safetensors")
    wstats = weight_stats(model, layout)
    calib = _calibration_stats(model, tok, info, cfg, layout, ev)
    thr_dir = out / "thresholds"
    thresholds = {}
    for site, s in calib.items():
        for target in sorted({0.5, *cfg.sparsity}):
            thr = s.thresholds(target, site)
            thr.save(thr_dir / f"{site}_{round(100 * target)}.safetensors")
            thresholds[(site, target)] = thr

    records = []
    if cfg.account:
        trace_dir = out / "traces"
        points = [(s, t) for s in cfg.sites for t in cfg.sparsity]
        bar = tqdm(points, desc="accounting", unit="point", disable=not cfg.progress)
        dense = _account_point(model, ev.ids, None, dims, cfg.formats, cfg.max_tokens, info["id"], False,
                               cfg.strawman)
        records.append({"site": "dense", "target": 0.0, **dense})
        for site, target in bar:
            bar.set_postfix_str(f"{site} @ {target:g}")
            save = target in cfg.save_traces
            rec = _account_point(model, ev.ids, thresholds[(site, target)], dims, cfg.formats, cfg.max_tokens,
                                 info["id"], False, cfg.strawman, trace_dir if save else None,
                                 f"{site}_{round(100 * target)}")
            records.append({"site": site, "target": target, **rec})

    breakdowns = [model_breakdown(model, info["id"])] + [a.breakdown() for a in ARCHS.values()]
    result = {
        "model": {**info, **layout.describe()},
        "text": ev.describe(),
        "calibration": {site: s.data for site, s in calib.items()},
        "natural_sparsity": natural.to_dict(),
        "weights": {"projections": list(wstats.projections), "zero_fraction": wstats.zero_fraction().tolist(),
                    "median": wstats.quantiles(0.5).tolist(), "q99": wstats.quantiles(0.99).tolist()},
        "thresholds": {f"{site}@{t:g}": {"taps": [x.value for x in thr.taps], "values": thr.values.tolist()}
                       for (site, t), thr in thresholds.items()},
        "ffn_share": [b.summary(cfg.formats) for b in breakdowns],
        "formats": {f: FORMATS[f].describe() for f in cfg.formats},
        "accounting": records,
        "nonffn_bytes_per_token": {f: breakdowns[0].bytes_per_token(f) - breakdowns[0].bytes_per_token(f, ["ffn"])
                                   for f in cfg.formats},
        "seconds": time.perf_counter() - t0,
        "config": asdict(cfg),
    }
    from dormant.report import provenance

    result["provenance"] = provenance()
    write_analysis_report(out, result, stats, natural, wstats, thresholds)
    return out / "report.md"


def quick_analysis(out: str | Path = "runs/demo/analysis", model: str = "smollm2-135m", seqlen: int = 512,
                   windows: int = 2, progress: bool = True) -> Path:
    """A short analysis + accounting run (about 1-2 minutes for SmolLM2-135M on 2 CPU cores).

    ``windows`` WikiText-2 test windows of ``seqlen`` tokens for the analysis and the traces; thresholds
    calibrated on 4 validation windows (one pass for both sites); sites ``paper`` and ``intermediate`` at
    30/50/70% target. Writes the full report (see :func:`run_analysis`) without traces; returns the path
    of ``report.md``.
    """
    cfg = AnalyzeConfig(
        model=ModelConfig(model),
        calib=CalibDataConfig(calib_windows=4, calib_seqlen=seqlen),
        eval=EvalConfig(seqlen=seqlen, max_windows=windows),
        sites=["paper", "intermediate"],
        sparsity=[0.3, 0.5, 0.7],
        max_tokens=seqlen * windows,
        save_traces=[],
        out=str(out),
        progress=progress,
    )
    return run_analysis(cfg)


# ----------------------------------------------------------------------------------------------------
# Report writing


def _accounting_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        for c in r["costs"]:
            x = c.get("extra", {})
            rows.append({
                "site": r["site"], "target": r["target"], "neuron_sparsity": r["neuron_sparsity"],
                "gate_sparsity": r["gate_sparsity"], "policy": c["policy"], "format": c["format"],
                "bytes_per_token": c["bytes_per_token"], "rel_bytes": c["rel_bytes"],
                "flops_per_token": c["flops_per_token"], "rel_flops": c["rel_flops"],
                "false_positives": x.get("false_positives", ""), "false_negatives": x.get("false_negatives", ""),
                "recall": x.get("recall", ""), "precision": x.get("precision", ""),
            })
    return rows


def _cost(record: dict[str, Any], policy: str, fmt: str) -> dict[str, Any] | None:
    return next((c for c in record["costs"] if c["policy"] == policy and c["format"] == fmt), None)


def _mib(b: float) -> str:
    if b >= 2**30:
        return f"{b / 2**30:.2f} GiB"
    return f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def write_analysis_report(out: Path, result: dict[str, Any], stats: ActivationStats, natural: NaturalSparsity,
                          wstats: WeightStats, thresholds: dict) -> Path:
    """Write ``report.md``, the plots and the raw numbers of one :func:`run_analysis` result."""
    from dormant.artifacts import atomic_write_text
    from dormant.report import markdown_table, write_markdown

    atomic_write_text(out / "analysis.json", json.dumps(result, indent=1, default=str))
    atomic_write_text(out / "natural_sparsity.csv", csv_text(natural.rows()))
    atomic_write_text(out / "ffn_share.csv", csv_text(result["ffn_share"]))
    records = result["accounting"]
    if records:
        atomic_write_text(out / "accounting.csv", csv_text(_accounting_rows(records)))
    plot_natural_sparsity(natural, out / "natural_sparsity.png")
    plot_cdfs(stats, out / "cdf.png")
    plot_weights(wstats, out / "weights.png")
    plot_thresholds(thresholds, out / "thresholds.png")
    fmts = list(result["formats"])
    main_fmt = "fp16" if "fp16" in fmts else fmts[0]
    if records:
        plot_accounting(records, out / "accounting_bytes.png", "rel_bytes", main_fmt)
        plot_accounting(records, out / "accounting_flops.png", "rel_flops", main_fmt)

    m, text = result["model"], result["text"]
    L = m["n_layers"]
    md = [
        f"# What sparsity buys: {m['id']}\n",
        f"- model: `{m['model_type']}`, {L} layers, D = {m['hidden_size']}, I = {m['intermediate_size']}, "
        f"{'gated' if m['gated'] else 'non-gated'} FFN, activation `{m['activation']}`; weights {m['dtype']} on "
        f"{m['device']}",
        f"- analysis text: {text['windows']} windows x {text['seqlen']} tokens of {text['source']} "
        f"({natural.tokens} tokens)",
    ]
    for site, c in result["calibration"].items():
        md.append(f"- thresholds `{site}`: calibrated on {c.get('windows')} x {c.get('seqlen')} tokens of "
                  f"{c.get('source')}" + (" (**the evaluation text**)" if c.get("calib_on_eval") else " (held out)"))
    prov = result["provenance"]
    md.append(f"- commit {prov.get('commit')}, torch {prov['torch']}, {prov['processor']}; "
              f"{result['seconds']:.0f} s\n")

    # 1. FFN share
    md.append("## 1. FFN share of parameters and of per-token weight bytes\n")
    md.append("Per-token bytes: batch-1 decoding reads every block weight, the output layer (V x D) and one "
              "embedding row per token. `loaded` = counted from this model's weights; the rest from their "
              "configurations (sources in `ffn_share.csv`).\n")
    rows = []
    for i, s in enumerate(result["ffn_share"]):
        rows.append([s["model"] + (" (loaded)" if i == 0 else ""), f"{s['params'] / 1e6:,.1f} M",
                     f"{s['ffn_params'] / 1e6:,.1f} M", f"{100 * s['ffn_share_params']:.1f}%",
                     f"{100 * s['ffn_share_block_params']:.1f}%", _mib(s.get(f"bytes_per_token_{main_fmt}", 0)),
                     f"{100 * s.get(f'ffn_share_bytes_{main_fmt}', 0):.1f}%"])
    md.append(markdown_table(["model", "params", "FFN params", "FFN / params", "FFN / block params",
                              f"bytes/token {main_fmt}", f"FFN / bytes/token {main_fmt}"], rows))

    # 2. Natural sparsity
    md.append("\n## 2. Natural sparsity (no thresholds)\n")
    md.append("Fraction of entries with |a| <= eps over all tokens and neurons of a layer; mean over layers "
              "[min, max]. `mid` exact zeros = natural neuron-level sparsity.\n")
    rows = []
    for tap in natural.taps:
        row = [tap.value]
        for e in natural.eps:
            v = natural.at(tap, e)
            row.append(f"{100 * float(v.mean()):.2f}% [{100 * float(v.min()):.2f}, {100 * float(v.max()):.2f}]")
        rows.append(row)
    md.append(markdown_table(["tap"] + ["exact 0" if e == 0 else f"<= {e:g}" for e in natural.eps], rows))
    md.append("\n![natural sparsity per layer](natural_sparsity.png)\n")

    # 3. CDFs
    md.append("## 3. |activation| CDF per layer and tap (the paper's Figs 5-7)\n")
    md.append("Median |a| per layer (first / middle / last), read from the histograms:\n")
    med = stats.quantiles(0.5)
    rows = [[t.value, float(med[0, j]), float(med[L // 2, j]), float(med[-1, j])] for j, t in enumerate(stats.taps)]
    md.append(markdown_table(["tap", "layer 0", f"layer {L // 2}", f"layer {L - 1}"], rows, digits=4))
    md.append("\n![CDFs](cdf.png)\n")

    # 4. Weights
    md.append("## 4. FFN weight magnitudes (the paper's Fig 2)\n")
    zf = wstats.zero_fraction()
    q50, q99 = wstats.quantiles(0.5), wstats.quantiles(0.99)
    rows = [[p, f"{100 * float(zf[:, j].mean()):.4f}%", float(q50[:, j].mean()), float(q99[:, j].mean())]
            for j, p in enumerate(wstats.projections)]
    md.append(markdown_table(["projection", "exact zeros", "median |w| (mean over layers)", "99th pct |w|"], rows,
                             digits=4))
    md.append("\n![weights](weights.png)\n")

    # 5. Thresholds
    md.append("## 5. Calibrated thresholds vs depth (target 50%)\n")
    rows = []
    for (site, target), thr in sorted(thresholds.items()):
        if target != 0.5:
            continue
        for j, t in enumerate(thr.taps):
            v = thr.values[:, j]
            rows.append([site, t.value, float(v[0]), float(v[L // 2]), float(v[-1]),
                         f"{float(v[-1] / v[0]):.1f}x" if v[0] > 0 else "-"])
    md.append(markdown_table(["site", "tap", "layer 0", f"layer {L // 2}", f"layer {L - 1}", "last / first"], rows,
                             digits=4))
    md.append("\n![thresholds](thresholds.png)\n")

    # 6. Accounting
    if records:
        md += _accounting_section(result, records, main_fmt)
    write_markdown(out / "report.md", "\n".join(md))
    return out / "report.md"


_POLICY_NOTE = (
    "Policies (per token and layer; A = active neurons, MID != 0; G = act(gate) != 0): `dense` reads all "
    "gate/up rows and down columns; `down_skip` computes gate and up fully and skips the down columns of "
    "inactive neurons (all that thresholding buys without a predictor); `gate_first` computes gate fully, "
    "then up rows in G and down columns in A; `oracle` touches only A's bundles (a perfect predictor); "
    "`predicted` fetches the predicted bundles plus demand loads of missed active neurons, plus the "
    "predictor's own cost. Storage and formulas: `dormant.llm.accounting`."
)


def _accounting_section(result, records, fmt: str) -> list[str]:
    from dormant.report import markdown_table

    pols = list(dict.fromkeys(c["policy"] for r in records for c in r["costs"]))
    dense_rec = records[0]
    md = ["## 6. What sparsity buys: FFN weight bytes and FLOPs per token\n", _POLICY_NOTE + "\n",
          f"Traced {dense_rec['tokens']} tokens per point. `predicted` here is a **strawman**: token t is "
          "predicted to use token t-1's active set, at zero predictor cost (it exercises the interface; real "
          "predictors come with their own issue). Formats: "
          + "; ".join(result["formats"].values()) + ".\n"]
    d = _cost(dense_rec, "dense", fmt)
    md.append(f"Dense FFN: {_mib(d['bytes_per_token'])} and {d['flops_per_token'] / 1e6:.1f} MFLOP per token "
              f"({fmt}); whole model {_mib(d['bytes_per_token'] + result['nonffn_bytes_per_token'][fmt])} per "
              f"token. Measured natural neuron sparsity (dense): {100 * dense_rec['neuron_sparsity']:.2f}%.\n")
    for site in dict.fromkeys(r["site"] for r in records[1:]):
        md.append(f"### site `{site}` -- FFN bytes/token relative to dense ({fmt}), FLOPs in parentheses\n")
        rows = []
        for r in (r for r in records if r["site"] == site):
            row = [r["target"], f"{100 * r['neuron_sparsity']:.1f}%",
                   "-" if r["gate_sparsity"] is None else f"{100 * r['gate_sparsity']:.1f}%"]
            for p in pols:
                c = _cost(r, p, fmt)
                row.append("-" if c is None else f"{100 * c['rel_bytes']:.1f}% ({100 * c['rel_flops']:.1f}%)")
            rows.append(row)
        md.append(markdown_table(["target", "neuron sparsity", "act(gate) sparsity", *pols], rows))
        md.append("")
    at50 = [r for r in records[1:] if r["target"] == 0.5]
    if at50:
        fmts = list(result["formats"])
        nonffn = result["nonffn_bytes_per_token"][fmt]
        md.append("### At 50% target: FFN bytes per token in every format\n")
        md.append(f"`whole model` adds the non-FFN bytes every token reads ({_mib(nonffn)} in {fmt}).\n")
        rows = []
        for r in at50:
            for p in pols:
                c = _cost(r, p, fmt)
                if c is None:
                    continue
                whole = (c["bytes_per_token"] + nonffn) / (_cost(r, "dense", fmt)["bytes_per_token"] + nonffn)
                rows.append([r["site"], p, *[_mib(_cost(r, p, f)["bytes_per_token"]) for f in fmts],
                             f"{100 * c['rel_bytes']:.1f}%", f"{100 * whole:.1f}%", f"{c['flops_per_token'] / 1e6:.2f}"])
        md.append(markdown_table(["site", "policy", *fmts, "FFN vs dense", f"whole model vs dense ({fmt})",
                                  "FFN MFLOP/token"], rows))
        pred = [(r["site"], _cost(r, "predicted", fmt)) for r in at50]
        pred = [(s, c) for s, c in pred if c is not None]
        if pred:
            md.append("\nStrawman `predicted` at 50%: mispredictions per token\n")
            md.append(markdown_table(
                ["site", "recall", "precision", "false pos./token", "false neg./token", "FN demand bytes",
                 "bytes if misses skipped (output changes)"],
                [[s, c["extra"]["recall"], c["extra"]["precision"], c["extra"]["false_positives"],
                  c["extra"]["false_negatives"], _mib(c["extra"]["fn_bytes"]),
                  _mib(c["extra"]["bytes_if_misses_skipped"])] for s, c in pred]))
    md.append("\n![bytes](accounting_bytes.png)\n\n![flops](accounting_flops.png)\n")
    return md


# ----------------------------------------------------------------------------------------------------
# Plots


def plot_natural_sparsity(natural: NaturalSparsity, path: Path) -> None:
    from dormant.report import new_figure, save_figure

    fig, ax = new_figure(1, len(natural.eps), size=(4.2, 3.4))
    layers = range(natural.fraction.shape[0])
    for k, e in enumerate(natural.eps):
        a = ax[0, k]
        for j, tap in enumerate(natural.taps):
            a.plot(layers, 100 * natural.fraction[:, j, k].numpy(), "o-", ms=3, label=tap.value)
        a.set(xlabel="layer", ylabel="% of entries", title="exact zeros" if e == 0 else f"|a| <= {e:g}", ylim=(-2, 102))
        a.grid(alpha=0.3)
    ax[0, 0].legend(fontsize=8)
    save_figure(fig, path)


def _layer_colors(n: int):
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return [cmap(i / max(1, n - 1)) for i in range(n)]


def plot_cdfs(stats: ActivationStats, path: Path) -> None:
    from dormant.report import new_figure, save_figure

    n = len(stats.taps)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, ax = new_figure(rows, cols, size=(4.2, 3.4))
    cdf = stats.cdf(CDF_GRID.float())
    colors = _layer_colors(stats.n_layers)
    x = CDF_GRID.numpy()
    for j, tap in enumerate(stats.taps):
        a = ax[j // cols, j % cols]
        labelled = {0, stats.n_layers // 2, stats.n_layers - 1}
        for layer in range(stats.n_layers):
            a.plot(x, cdf[layer, j].numpy(), color=colors[layer], lw=1,
                   label=f"layer {layer}" if layer in labelled else None)
        a.set(xscale="log", xlabel="|a|", ylabel="fraction below", title=f"{tap.value} (colour = depth)", ylim=(0, 1))
        a.grid(alpha=0.3)
        a.legend(fontsize=7, loc="upper left")
    for j in range(n, rows * cols):
        ax[j // cols, j % cols].axis("off")
    save_figure(fig, path)


def plot_weights(w: WeightStats, path: Path, per_octave: int = 4) -> None:
    from dormant.report import new_figure, save_figure

    fig, ax = new_figure(1, 2, size=(5, 3.6))
    h = w.hist
    step = (1 << h.mantissa_bits) // per_octave
    edges = h.bin_edges()[::step]
    counts = h.counts.view(w.n_layers, len(w.projections), -1).sum(0)
    counts = counts.view(len(w.projections), -1, step).sum(-1)
    for j, p in enumerate(w.projections):
        c = counts[j].double().numpy()
        nz = c[1:].nonzero()[0] + 1  # bin 0 holds the exact zeros (reported in the table, not on a log axis)
        if not len(nz):
            continue
        lo, hi = max(nz.min() - 1, 1), min(nz.max() + 2, len(c))
        ax[0, 0].stairs(c[lo:hi], edges[lo : hi + 1].numpy(), label=p)
    ax[0, 0].set(xscale="log", yscale="log", xlabel="|w|", ylabel="count (all layers)", title="FFN weight magnitudes")
    layers = range(w.n_layers)
    q50, q99 = w.quantiles(0.5), w.quantiles(0.99)
    for j, p in enumerate(w.projections):
        line = ax[0, 1].plot(layers, q50[:, j].numpy(), "o-", ms=3, label=f"{p} median")[0]
        ax[0, 1].plot(layers, q99[:, j].numpy(), "s--", ms=3, color=line.get_color(), label=f"{p} 99th pct")
    ax[0, 1].set(yscale="log", xlabel="layer", ylabel="|w|", title="per layer")
    ax[0, 1].xaxis.get_major_locator().set_params(integer=True)
    for a in ax[0]:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    save_figure(fig, path)


def plot_thresholds(thresholds: dict, path: Path) -> None:
    from dormant.report import new_figure, save_figure

    sites = list(dict.fromkeys(s for s, _ in thresholds))
    fig, ax = new_figure(1, max(1, len(sites)), size=(4.2, 3.4))
    for k, site in enumerate(sites):
        a = ax[0, k]
        for target, style in ((0.5, "o-"), (0.3, "s:")):
            thr = thresholds.get((site, target))
            if thr is None:
                continue
            for j, t in enumerate(thr.taps):
                a.plot(range(thr.n_layers), thr.values[:, j].numpy(), style, ms=3, color=f"C{j}",
                       label=f"{t.value} @ {target:g}")
        a.set(yscale="log", xlabel="layer", ylabel="threshold T", title=f"site {site}")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    save_figure(fig, path)


def plot_accounting(records: list[dict[str, Any]], path: Path, key: str, fmt: str) -> None:
    from dormant.report import new_figure, save_figure

    sites = list(dict.fromkeys(r["site"] for r in records[1:]))
    fig, ax = new_figure(1, max(1, len(sites)), size=(4.4, 3.6))
    pols = list(dict.fromkeys(c["policy"] for r in records for c in r["costs"]))
    for k, site in enumerate(sites):
        a = ax[0, k]
        rs = sorted((r for r in records if r["site"] == site), key=lambda r: r["target"])
        xs = [r["target"] for r in rs]
        for p in pols:
            ys = [_cost(r, p, fmt) for r in rs]
            if all(y is None for y in ys):
                continue
            label = "predicted (prev-token strawman)" if p == "predicted" else p
            a.plot(xs, [100 * y[key] if y else float("nan") for y in ys], "o-", ms=3, label=label)
        a.plot(xs, [100 * (1 - r["neuron_sparsity"]) for r in rs], ":", color="gray", label="active neurons")
        what = "FFN bytes/token" if key == "rel_bytes" else "FFN FLOPs/token"
        a.set(xlabel="target sparsity", ylabel=f"{what}, % of dense", title=f"{site} ({fmt})", ylim=(0, 105))
        a.grid(alpha=0.3)
        a.legend(fontsize=7, loc="lower left")
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------
# `dormant account`: one point, from traces or from a model + thresholds


def run_account(model_cfg: ModelConfig, eval_cfg: EvalConfig, cfg: AccountConfig) -> list[PolicyCost]:
    """Account one model at one set of thresholds (or given traces); writes ``account.{json,csv,md}``."""
    from dormant.artifacts import atomic_write_text
    from dormant.llm.accounting import collect_policy_traces
    from dormant.llm.models import load_model
    from dormant.llm.text import load_eval_windows
    from dormant.llm.thresholds import Thresholds
    from dormant.report import markdown_table, write_markdown
    from dormant.traces import ActivationTrace

    model, tok, info = load_model(model_cfg)
    layout = ffn_layout(model)
    dims = FFNDims.from_layout(layout)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.mid_trace:
        mid = ActivationTrace.load(cfg.mid_trace)
        act = ActivationTrace.load(cfg.act_trace) if cfg.act_trace else None
        if mid.model.get("fingerprint") != layout.describe()["fingerprint"]:
            raise ValueError(f"{cfg.mid_trace} was traced on another model ({mid.model.get('id')})")
        text = mid.source
    else:
        ev = load_eval_windows(tok, eval_cfg)
        thr = Thresholds.load(cfg.thresholds) if cfg.thresholds else None
        mid, act = collect_policy_traces(model, ev.ids, thr, cfg.max_tokens, info["id"], cfg.progress)
        if cfg.save_traces:
            mid.save(Path(cfg.save_traces) / "mid.safetensors")
            if act is not None:
                act.save(Path(cfg.save_traces) / "act.safetensors")
        text = {**ev.describe(), "thresholds": cfg.thresholds}
    pred = ActivationTrace.load(cfg.predicted) if cfg.predicted else None
    predictor = PredictorCost(cfg.predictor_bytes, cfg.predictor_flops, (pred.source.get("predictor", "") if pred else ""))
    counts = neuron_counts(mid, act, pred)
    costs = policy_costs(dims, counts, cfg.formats, predictor if pred else None)
    result = {"model": info, "dims": asdict(dims), "text": text, "tokens": counts.n_tokens,
              "neuron_sparsity": float(counts.sparsity().mean()),
              "formats": {f: FORMATS[f].describe() for f in cfg.formats}, "costs": [c.to_dict() for c in costs]}
    atomic_write_text(out / "account.json", json.dumps(result, indent=1, default=str))
    rec = {"site": "-", "target": "-", "neuron_sparsity": result["neuron_sparsity"],
           "gate_sparsity": None if counts.gate_sparsity() is None else float(counts.gate_sparsity().mean()),
           "costs": result["costs"]}
    atomic_write_text(out / "account.csv", csv_text(_accounting_rows([rec])))
    rows = [[c.policy, c.format, _mib(c.bytes_per_token), f"{100 * c.rel_bytes:.1f}%", c.flops_per_token / 1e6,
             f"{100 * c.rel_flops:.1f}%"] for c in costs]
    write_markdown(out / "account.md", "\n".join([
        f"# FFN accounting: {info['id']}\n",
        f"{counts.n_tokens} tokens; measured neuron sparsity {100 * result['neuron_sparsity']:.2f}%.\n",
        _POLICY_NOTE + "\n",
        markdown_table(["policy", "format", "bytes/token", "vs dense", "MFLOP/token", "vs dense"], rows),
    ]))
    return costs

