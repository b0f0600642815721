"""``dormant simulate``: every policy at every DRAM budget on every device profile, with a report.

The trace is split once: tokens ``[0, split)`` profile hot neurons (PowerInfer-style pinning), the
rest is simulated for every policy, so no policy is scored on the tokens it was tuned on. Each
(policy, budget) is simulated once (:func:`~dormant.offload.simulator.simulate`) and timed on every
profile (:func:`~dormant.offload.simulator.estimate_time`). Outputs in ``out``: ``results.json``
(records, configuration, profiles with sources, provenance), ``results.csv`` (one row per policy,
budget and profile), ``report.md``, ``bytes.png`` and ``time.png``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from dormant.config import field
from dormant.offload.layout import ItemLayout, StorageLayout
from dormant.offload.policies import parse_policy
from dormant.offload.profiles import DeviceProfile, load_profile
from dormant.offload.simulator import estimate_time, simulate
from dormant.offload.traces import FFNGeometry, perturb_trace, weight_format
from dormant.traces import ActivationTrace

log = logging.getLogger(__name__)

__all__ = ["SimulateConfig", "run_simulation", "write_report", "run_offload_demo"]

DEFAULT_POLICIES = ["dense", "demand", "window", "hot", "lru", "lfu", "prefetch-oracle"]


@dataclass
class SimulateConfig:
    trace: str = field("runs/offload/trace.safetensors", help="oracle ActivationTrace (dormant trace)")
    predicted: str | None = field(None, help="predicted trace aligned with the oracle, or 'synthetic'")
    synthetic_fn: float = field(0.05, help="synthetic predictor: share of active neurons missed")
    synthetic_fp: float = field(0.07, help="synthetic predictor: false positives per active neuron")
    predictor_bytes: float | None = field(None, help="predictor weights read per token (default: from the "
                                                     "predicted trace's source, else 0)")
    profiles: list[str] = field(default_factory=lambda: ["rpi5-microsd", "rpi5-nvme"],
                                help="device profiles: shipped names or YAML paths")
    policies: list[str] = field(default_factory=lambda: list(DEFAULT_POLICIES),
                                help="policies: presets or preset:key=value specs")
    budgets: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0],
                                 help="DRAM for FFN weights, as fractions of the FFN bytes")
    weight_format: str = field("fp16", help="stored weight format: trace | fp32 | fp16 | bf16 | int8 | int4")
    queue_depth: int | None = field(None, help="reads in flight (default: the device maximum)")
    profile_fraction: float = field(0.25, help="leading share of the trace used only to profile hot neurons")
    warmup: int = field(32, help="simulated tokens left out of the statistics (cold caches)")
    max_tokens: int | None = field(None, help="use at most this many tokens of the trace")
    attn_params: int | None = field(None, help="resident non-FFN parameters per layer (default: from the trace, "
                                               "else 4*D^2)")
    head_params: int | None = field(None, help="LM-head parameters read per token (default: from the trace, "
                                               "else vocab*D)")
    out: str = field("runs/offload/sim", help="output folder")


def _predictor_cost(cfg: SimulateConfig, predicted: ActivationTrace | None) -> tuple[float, float]:
    """``(bytes, FLOPs)`` the predictor costs per token: flags first, then the predicted trace's ``source["cost"]``
    (as written by :func:`dormant.llm.predictors.collect_predicted_trace`)."""
    cost = predicted.source.get("cost", {}) if predicted is not None else {}
    cost = cost if isinstance(cost, dict) else {}
    flops = float(cost.get("flops_per_token", 0.0))
    if cfg.predictor_bytes is not None:
        return float(cfg.predictor_bytes), flops
    if predicted is None:
        return 0.0, 0.0
    if "bytes_per_token" in cost:
        return float(cost["bytes_per_token"]), flops
    if predicted.source.get("predictor") != "synthetic":
        log.warning("predicted trace carries no predictor cost; counting 0 bytes (pass --predictor-bytes)")
    return 0.0, flops


def _trim(trace: ActivationTrace, n: int | None) -> ActivationTrace:
    if n is None or n >= trace.n_tokens:
        return trace
    return ActivationTrace(trace.packed[:n].clone(), trace.n_neurons, trace.model, trace.source)


def run_simulation(cfg: SimulateConfig, layout: StorageLayout | None = None,
                   trace: ActivationTrace | None = None) -> list[dict[str, Any]]:
    """Simulate ``cfg.policies`` x ``cfg.budgets`` on ``cfg.profiles``; write results and the report.

    Args:
        cfg: the run.
        layout: weight-file layout (default :class:`StorageLayout`: bundled, 1-neuron chunks, 4 KiB).
        trace: an already loaded oracle trace (else read from ``cfg.trace``).

    Returns:
        One record per (policy, budget, profile).
    """
    from dormant.report import provenance

    layout = layout or StorageLayout()
    trace = _trim(trace if trace is not None else ActivationTrace.load(cfg.trace), cfg.max_tokens)
    policies = [parse_policy(p) for p in cfg.policies]
    profiles = [load_profile(p) for p in cfg.profiles]
    if not 0 <= cfg.profile_fraction < 1:
        raise ValueError("profile_fraction must lie in [0, 1)")
    predicted = None
    if any(p.needs_prediction for p in policies):
        if cfg.predicted is None:
            raise ValueError("policies " + ", ".join(p.name for p in policies if p.needs_prediction)
                             + " need --predicted (a predicted trace, or 'synthetic')")
        if cfg.predicted == "synthetic":
            predicted = perturb_trace(trace, cfg.synthetic_fn, cfg.synthetic_fp)
        else:
            predicted = _trim(ActivationTrace.load(cfg.predicted), cfg.max_tokens)
    fmt = weight_format(cfg.weight_format, trace)
    geometry = FFNGeometry.from_trace(trace)
    if cfg.attn_params is not None or cfg.head_params is not None:
        geometry = replace(geometry, attn_params=geometry.attn_params if cfg.attn_params is None else cfg.attn_params,
                           head_params=geometry.head_params if cfg.head_params is None else cfg.head_params)
    elif "params" not in trace.source:
        log.warning("the trace does not record resident parameter counts; estimating attention as 4*D^2 per layer "
                    "and the LM head as vocab*D (set --attn-params / --head-params)")
    items = ItemLayout(geometry, fmt, layout)
    split = int(cfg.profile_fraction * trace.n_tokens)
    pbytes, pflops = _predictor_cost(cfg, predicted)
    if trace.source.get("kind") == "predicted":
        log.warning("--trace holds a predicted trace; the simulator expects the oracle (true) masks there")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for pol in policies:
        shared = None
        for budget in cfg.budgets:
            if pol.uses_budget or shared is None:
                st = simulate(trace, pol, budget, items, predicted, split=split, warmup=cfg.warmup)
                shared = st
            st = shared if not pol.uses_budget else st
            summ = st.summary()
            summ["budget"] = budget
            log.info("%-16s budget %4.0f%%: %.2f MB/token, hit %.3f (%.1e accesses/s)", pol.name, budget * 100,
                     summ["bytes_per_token"] / 1e6, summ["hit_rate"], summ["sim_accesses_per_s"] or 0)
            for prof in profiles:
                pb, pf = (pbytes, pflops) if pol.needs_prediction else (0.0, 0.0)
                tm = estimate_time(st, prof, items, cfg.queue_depth, pb, pf)
                records.append({**summ, **tm, "budget_used": pol.uses_budget, "predictor_bytes_per_token": pb,
                                "predictor_flops_per_token": pf})
    seconds = time.perf_counter() - t0
    meta = {
        "config": asdict(cfg),
        "layout": asdict(layout),
        "format": asdict(fmt),
        "geometry": asdict(geometry),
        "neuron_bytes": items.neuron_bytes,
        "ffn_bytes": geometry.ffn_bytes(fmt),
        "trace": {"tokens": trace.n_tokens, "split": split, "model": trace.model, "source": trace.source,
                  "density": float(trace.density().mean())},
        "predicted": None if predicted is None else {"source": predicted.source,
                                                    "density": float(predicted.density().mean())},
        "profiles": {p.name: p.to_dict() for p in profiles},
        "seconds": seconds,
        "provenance": provenance(),
    }
    write_report(out, records, meta, profiles)
    return records


def _csv(records: list[dict[str, Any]]) -> str:
    keys = list(records[0]) if records else []
    buf = io.StringIO()
    w = csv.DictWriter(buf, keys)
    w.writeheader()
    w.writerows(records)
    return buf.getvalue()


def write_report(out: Path, records: list[dict[str, Any]], meta: dict[str, Any],
                 profiles: list[DeviceProfile]) -> Path:
    """``results.json``, ``results.csv``, ``bytes.png``, ``time.png`` and ``report.md`` in ``out``."""
    from dormant.artifacts import atomic_write_text
    from dormant.report import markdown_table, new_figure, save_figure, write_markdown

    atomic_write_text(out / "results.json", json.dumps({"meta": meta, "records": records}, indent=1, default=str))
    atomic_write_text(out / "results.csv", _csv(records))
    policies = list(dict.fromkeys(r["policy"] for r in records))
    budgets = sorted(set(r["budget"] for r in records))
    pnames = [p.name for p in profiles]
    ffn = meta["ffn_bytes"]

    def rec(pol, b, prof):
        return next(r for r in records if r["policy"] == pol and r["budget"] == b and r["profile"] == prof)

    # figures
    fig, axes = new_figure(1, 1, (6.5, 4.2))
    ax = axes[0][0]
    for pol in policies:
        ax.plot([b * 100 for b in budgets], [rec(pol, b, pnames[0])["bytes_per_token"] / 1e6 for b in budgets],
                marker="o", label=pol)
    ax.axhline(ffn / 1e6, color="gray", ls=":", lw=1, label="all FFN weights")
    ax.set(xlabel="DRAM budget (% of FFN bytes)", ylabel="MB read from storage per token",
           title=f"{meta['trace']['model'].get('id')} {meta['format']['name']}: bytes per token")
    ax.legend(fontsize=7)
    save_figure(fig, out / "bytes.png")
    ncols = min(3, len(pnames))
    fig, axes = new_figure(math.ceil(len(pnames) / ncols), ncols, (5.0, 4.0))
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(pnames):]:
        ax.set_visible(False)
    for ax, prof in zip(flat, pnames):
        for pol in policies:
            ax.plot([b * 100 for b in budgets], [rec(pol, b, prof)["time_per_token_s"] * 1e3 for b in budgets],
                    marker="o", label=pol)
        ax.set(xlabel="DRAM budget (% of FFN bytes)", ylabel="estimated ms per token", title=prof, yscale="log")
        ax.legend(fontsize=7)
    save_figure(fig, out / "time.png")

    # markdown
    tr = meta["trace"]
    src = tr["source"]
    thr = src.get("thresholds", {})
    lines = [
        "# Prefetch simulation\n",
        f"Trace: `{tr['model'].get('id')}`, {tr['tokens']} tokens ({tr['split']} profile hot neurons, "
        f"the rest simulated; {meta['config']['warmup']} warm-up tokens not counted), mean density "
        f"{tr['density']:.3f}" + (f", thresholds {thr.get('site')} at target {thr.get('mean_target')}" if thr else "")
        + f", kind {src.get('kind')}.",
        f"Weights: {meta['format']['name']}, {meta['neuron_bytes']} B per neuron, {ffn / 1e6:.1f} MB of FFN; "
        f"layout {meta['layout']['bundling']}, chunk {meta['layout']['chunk']}, align {meta['layout']['align']} B, "
        f"coalesce {meta['layout']['coalesce']}.",
    ]
    if meta.get("predicted"):
        p = meta["predicted"]
        lines.append(f"Predicted trace: {p['source'].get('predictor', p['source'].get('kind'))}, density "
                     f"{p['density']:.3f}" + (f" (synthetic: {p['source'].get('fn_rate')} FN, "
                                              f"{p['source'].get('fp_rate')} FP)" if p['source'].get('predictor')
                                             == "synthetic" else "") + ".")
    lines.append(f"Simulation wall time {meta['seconds']:.1f} s.\n")
    lines.append("## MB read from storage per token\n")
    lines.append(markdown_table(["policy"] + [f"{b:.0%}" for b in budgets],
                                [[pol] + [rec(pol, b, pnames[0])["bytes_per_token"] / 1e6 for b in budgets]
                                 for pol in policies], digits=2))
    for prof in profiles:
        est = prof.estimates()
        lines.append(f"## Estimated tokens/s on `{prof.name}`\n")
        lines.append(f"{prof.description}. Estimates in this profile: {', '.join(est) if est else 'none'} "
                     "(see results.json for every number's source).\n")
        lines.append(markdown_table(["policy"] + [f"{b:.0%}" for b in budgets],
                                    [[pol] + [rec(pol, b, prof.name)["tokens_per_s"] for b in budgets]
                                     for pol in policies], digits=2))
    b0 = 0.25 if 0.25 in budgets else budgets[len(budgets) // 2]
    lines.append(f"## Details at a {b0:.0%} budget\n")
    heads = ["policy", "hit rate", "ready rate", "requests/token", "pollution MB/token", "padding MB/token",
             "DRAM footprint MB"] + [f"stall ms ({p})" for p in pnames]
    rows = []
    for pol in policies:
        r = rec(pol, b0, pnames[0])
        rows.append([pol, r["hit_rate"], r["ready_rate"], r["requests_per_token"], r["pollution_bytes_per_token"] / 1e6,
                     r["padding_bytes_per_token"] / 1e6, r["dram_footprint_bytes"] / 1e6]
                    + [rec(pol, b0, p)["io_stall_s"] * 1e3 for p in pnames])
    lines.append(markdown_table(heads, rows, digits=3))
    lines.append("![bytes per token](bytes.png)\n\n![time per token](time.png)\n")
    lines.append("Hit rate: active neurons already in DRAM from earlier tokens (cache or pinned); ready rate: "
                 "in DRAM when the layer runs (also prefetched); pollution: weight bytes loaded and dropped "
                 "unused; padding: alignment over-read. Budget-independent policies (demand) repeat one "
                 "simulation. Timing model: see `dormant.offload.simulator`.\n")
    return write_markdown(out / "report.md", "\n".join(lines))


def run_offload_demo(out: str | Path = "runs/demo/offload", tokens: int = 512, thresholds: str | None = None,
                     profiles: tuple[str, ...] = ("rpi5-microsd", "rpi5-nvme")) -> Path:
    """A short (~1 min on 2 cores) end-to-end simulation on SmolLM2-135M at 50% sparsity; returns the report path.

    Calibrates ``intermediate`` thresholds at 50% on 2 x 512 WikiText-2 validation tokens unless a
    Thresholds artifact is given, records ``tokens`` tokens of WikiText-2 test, and simulates dense,
    demand, window, hot, LRU and a synthetic predictor (5% FN, 7% FP) at 10/25/50/100% budgets.
    """
    from dormant.llm.adapters import ffn_layout
    from dormant.llm.masks import collect_trace
    from dormant.llm.models import load_model
    from dormant.llm.sites import site_taps
    from dormant.llm.sparsify import sparsify_
    from dormant.llm.stats import StatsConfig, collect_stats
    from dormant.llm.text import load_text, make_windows
    from dormant.llm.thresholds import Thresholds
    from dormant.offload.traces import _resident_params

    out = Path(out)
    model, tok, info = load_model("smollm2-135m")
    layout = ffn_layout(model)
    if thresholds:
        thr = Thresholds.load(thresholds)
    else:
        cal = make_windows(tok, load_text("wikitext2-valid"), 512, 2, source="wikitext2-valid")
        stats = collect_stats(model, cal.ids, site_taps("intermediate", layout), StatsConfig(), model_id=info["id"],
                              data=cal.describe())
        thr = stats.thresholds(0.5, "intermediate")
    sparsify_(model, thr, info["id"])
    ev = make_windows(tok, load_text("wikitext2-test"), 512, math.ceil(tokens / 512), source="wikitext2-test")
    trace = collect_trace(model, ev.ids, model_id=info["id"], max_tokens=tokens, progress=False,
                          source={"text": ev.describe(), "params": _resident_params(model, layout)})
    trace.save(out / "trace.safetensors")
    cfg = SimulateConfig(trace=str(out / "trace.safetensors"), predicted="synthetic",
                         profiles=list(profiles), policies=["dense", "demand", "window", "hot", "lru", "prefetch"],
                         warmup=16,
                         out=str(out))
    run_simulation(cfg, trace=trace)
    return out / "report.md"
