"""``dormant trace | simulate | storage-check`` and the offload demo: record traces, simulate, check storage.

**Simulation** (``dormant simulate``): every policy at every DRAM budget on every device profile, with a report.

The trace is split once: tokens ``[0, split)`` profile hot neurons (PowerInfer-style pinning), the
rest is simulated for every policy, so no policy is scored on the tokens it was tuned on. Each
(policy, budget) is simulated once (:func:`~dormant.offload.simulator.simulate`) and timed on every
profile (:func:`~dormant.offload.simulator.estimate_time`). Outputs in ``out``: ``results.json``
(records, configuration, profiles with sources, provenance), ``results.csv`` (one row per policy,
budget and profile), ``report.md``, ``bytes.png`` and ``time.png``.

**Traces** (``dormant trace``): an oracle trace from a real text pass of a (thresholded) model, with the resident
parameter counts the cost model needs. **Storage check** (``dormant storage-check``): real reads on this disk vs
the storage model (:mod:`dormant.offload.storage`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from dormant.experiments.configs import SimulateConfig, StorageCheckConfig, TraceConfig
from dormant.offload.layout import ItemLayout, StorageLayout
from dormant.offload.policies import parse_policy
from dormant.offload.profiles import DeviceProfile, load_profile
from dormant.offload.simulator import estimate_time, simulate
from dormant.offload.storage import ALIGN, DirectReader, fit_profile, replay, write_weight_file
from dormant.offload.traces import FFNGeometry, iter_masks, perturb_trace, synthetic_trace, weight_format
from dormant.report import csv_text
from dormant.traces import ActivationTrace

log = logging.getLogger(__name__)

__all__ = ["SimulateConfig", "run_simulation", "write_report", "TraceConfig", "record_trace", "StorageCheckConfig",
           "storage_check", "run_offload_demo"]



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


def write_report(out: Path, records: list[dict[str, Any]], meta: dict[str, Any],
                 profiles: list[DeviceProfile]) -> Path:
    """``results.json``, ``results.csv``, ``bytes.png``, ``time.png`` and ``report.md`` in ``out``."""
    from dormant.artifacts import atomic_write_text
    from dormant.report import markdown_table, new_figure, save_figure, write_markdown

    atomic_write_text(out / "results.json", json.dumps({"meta": meta, "records": records}, indent=1, default=str))
    atomic_write_text(out / "results.csv", csv_text(records))
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


def record_trace(model_cfg, eval_cfg, cfg: TraceConfig, progress: bool = True) -> ActivationTrace:
    """Record an oracle trace: a real text pass of a (thresholded) model, with its FFN geometry and dtype.

    Args:
        model_cfg: :class:`dormant.llm.models.ModelConfig`.
        eval_cfg: :class:`dormant.llm.text.EvalConfig` -- the text and window length.
        cfg: what to record and where to save it.

    Returns:
        The trace (also saved to ``cfg.out``); ``source`` holds the text, thresholds and resident
        parameter counts (``params``).
    """
    from dormant.llm.adapters import Tap
    from dormant.llm.masks import collect_trace, resident_params
    from dormant.llm.models import load_model
    from dormant.llm.sparsify import sparsified
    from dormant.llm.text import load_eval_windows
    from dormant.llm.thresholds import Thresholds

    thr = Thresholds.load(cfg.thresholds) if cfg.thresholds else None
    model, tok, info = load_model(model_cfg)
    ev = load_eval_windows(tok, eval_cfg)
    src: dict[str, Any] = {"text": ev.describe(), "thresholds_path": cfg.thresholds, "params": resident_params(model)}
    with sparsified(model, thr, info["id"]):
        trace = collect_trace(model, ev.ids, model_id=info["id"], source=src, max_tokens=cfg.max_tokens,
                              progress=progress, tap=Tap(cfg.tap))
    trace.save(cfg.out)
    return trace


def storage_check(cfg: StorageCheckConfig) -> Path:
    """Fit this machine's profile, replay trace batches with real reads, write the comparison; returns report path."""
    from dormant.artifacts import atomic_write_text
    from dormant.report import markdown_table, new_figure, provenance, save_figure, write_markdown
    from dormant.traces import ActivationTrace

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.trace:
        trace = ActivationTrace.load(cfg.trace)
    else:
        trace = synthetic_trace(64, 30, 1536, density=0.5, hidden_size=576, seed=cfg.seed)
    fmt = weight_format(cfg.weight_format, trace)
    geometry = FFNGeometry.from_trace(trace)
    base = ItemLayout(geometry, fmt, StorageLayout(align=ALIGN))
    file_size = base.layer_bytes * geometry.n_layers
    path = Path(cfg.path)
    t0 = time.perf_counter()
    write_weight_file(path, file_size)
    t_write = time.perf_counter() - t0
    try:
        profile, raw = fit_profile(path, file_size, max(cfg.queue_depths), cfg.fit_reads, cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        masks = np.concatenate([m for _, m in iter_masks(trace, 0, min(trace.n_tokens, 512))])
        picks = [(int(rng.integers(masks.shape[1])), masks[int(rng.integers(len(masks)))])
                 for _ in range(cfg.batches)]
        batches = [(layer, m[layer]) for layer, m in picks]
        results = []
        for chunk in cfg.chunks:
            items = ItemLayout(geometry, fmt, StorageLayout(chunk=chunk, align=ALIGN))
            max_req = max(s for layer, m in batches for _, s in items.request_list(layer, items.items(m)) or [(0, 0)])
            for qd in cfg.queue_depths:
                reader = DirectReader(path, max_req, qd)
                try:
                    results.append(replay(reader, items, batches, profile))
                finally:
                    reader.close()
    finally:
        if not cfg.keep_file:
            path.unlink(missing_ok=True)

    atomic_write_text(out / "this-machine.yaml", profile.to_yaml())
    summary = {"config": asdict(cfg), "file_bytes": file_size, "write_seconds": t_write, "fit": raw,
               "profile": profile.to_dict(), "results": results, "provenance": provenance()}
    atomic_write_text(out / "results.json", json.dumps(summary, indent=1))
    fig, axes = new_figure(1, 1, (5.0, 4.5))
    ax = axes[0][0]
    lo, hi = np.inf, 0.0
    for r in results:
        m, p = np.array(r["measured_per_batch"]) * 1e3, np.array(r["predicted_per_batch"]) * 1e3
        ax.scatter(p, m, s=8, label=f"chunk {r['chunk']}, QD {r['queue_depth']}")
        lo, hi = min(lo, m.min(), p.min()), max(hi, m.max(), p.max())
    ax.plot([lo, hi], [lo, hi], color="gray", lw=1, ls=":")
    ax.set(xscale="log", yscale="log", xlabel="modelled ms per batch", ylabel="measured ms per batch",
           title=f"storage model vs real reads ({raw['mode']})")
    ax.legend(fontsize=7)
    save_figure(fig, out / "check.png")
    rows = [[r["chunk"], r["queue_depth"], r["batches"], r["requests_per_batch"], r["bytes_per_batch"] / 1e3,
             r["measured_s"] * 1e3 / r["batches"], r["predicted_s"] * 1e3 / r["batches"], r["ratio_total"],
             r["ratio_median"], f"{r['ratio_p10']:.2f}-{r['ratio_p90']:.2f}"] for r in results]
    sm = profile.storage
    text = "\n".join([
        "# Storage model vs real reads\n",
        f"Weight file: {file_size / 1e6:.1f} MB ({geometry.n_layers} layers x {geometry.intermediate_size} neurons x "
        f"{base.neuron_bytes} B, {fmt.name}, bundled, 4 KiB-aligned), written in {t_write:.1f} s at {path}. "
        f"Page cache bypass: **{raw['mode']}**.\n",
        "Fitted profile (microbenchmarks, not the replayed batches): "
        f"B = {sm.bandwidth / 1e6:.0f} MB/s (4 MiB sequential, QD1), 4 KiB QD1 = {raw['iops_qd1']:.0f} IOPS "
        f"(L = {sm.latency * 1e6:.0f} us), 4 KiB QD{raw['qd']} = {raw['iops_qd']:.0f} IOPS. "
        "Saved as `this-machine.yaml` (usable with `dormant simulate --profiles`).\n",
        "Replay: demand loads of one layer of one token per batch (coalesced runs, 4 KiB-aligned), "
        f"{cfg.batches} random (token, layer) batches of "
        + (f"`{cfg.trace}`" if cfg.trace else "a synthetic trace (SmolLM2-135M geometry, density 0.5)") + ".\n",
        markdown_table(["chunk", "QD", "batches", "requests/batch", "kB/batch", "measured ms/batch",
                        "modelled ms/batch", "total ratio", "median ratio", "p10-p90 ratio"], rows, digits=2),
        "Ratio = measured / modelled time. ![check](check.png)\n",
    ])
    return write_markdown(out / "report.md", text)


def run_offload_demo(out: str | Path = "runs/demo/offload", tokens: int = 512, thresholds: str | None = None,
                     profiles: tuple[str, ...] = ("rpi5-microsd", "rpi5-nvme"), model: str = "smollm2-135m",
                     seqlen: int = 512) -> Path:
    """A short (~1 min on 2 cores) end-to-end simulation on SmolLM2-135M at 50% sparsity; returns the report path.

    Uses the given Thresholds artifact, or calibrates ``intermediate`` thresholds at 50% on 2 x ``seqlen``
    WikiText-2 validation tokens (and says so); records ``tokens`` tokens of WikiText-2 test, and simulates dense,
    demand, window, hot, LRU and a synthetic predictor (5% FN, 7% FP) at 10/25/50/100% budgets.
    """
    from dormant.llm.calibration import calibrate
    from dormant.llm.configs import CalibrationConfig
    from dormant.llm.masks import collect_trace, resident_params
    from dormant.llm.models import load_model
    from dormant.llm.sparsify import sparsified
    from dormant.llm.text import load_text, make_windows
    from dormant.llm.thresholds import Thresholds

    out = Path(out)
    model, tok, info = load_model(model)
    if thresholds:
        thr = Thresholds.load(thresholds)
    else:
        log.warning("offload demo: no thresholds given; calibrating intermediate 50%% on 2 x %d validation tokens",
                    seqlen)
        cal = make_windows(tok, load_text("wikitext2-valid"), seqlen, 2, source="wikitext2-valid")
        thr = calibrate(model, cal.ids, CalibrationConfig("intermediate", [0.5], progress=False),
                        model_id=info["id"], data=cal.describe())
    ev = make_windows(tok, load_text("wikitext2-test"), seqlen, math.ceil(tokens / seqlen), source="wikitext2-test")
    with sparsified(model, thr, info["id"]):
        trace = collect_trace(model, ev.ids, model_id=info["id"], max_tokens=tokens, progress=False,
                              source={"text": ev.describe(), "params": resident_params(model)})
    trace.save(out / "trace.safetensors")
    cfg = SimulateConfig(trace=str(out / "trace.safetensors"), predicted="synthetic",
                         profiles=list(profiles), policies=["dense", "demand", "window", "hot", "lru", "prefetch"],
                         warmup=16,
                         out=str(out))
    run_simulation(cfg, trace=trace)
    return out / "report.md"
