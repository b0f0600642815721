"""Conversion experiments: convert a zoo model, calibrate, and measure accuracy after every step (resumable).

One code path serves ``dormant snn convert`` (one T, one method; also saves the converted network) and
``dormant snn sweep`` (several T and methods). Causal calibrations (``none``, ``ftbc``) run once at the largest T;
each T then uses the variant selected for it on held-out training data, and one simulation at the largest T that
shares a variant gives the accuracy after every smaller step too. Every finished unit (ANN accuracy, calibration,
evaluation run) is appended to ``results.jsonl``; calibrations and the converted network are saved as artifacts,
so an interrupted run resumes. Outputs: ``report.md``, ``accuracy_by_T.csv``, ``accuracy_per_step.csv``,
``accuracy.png``, ``firing_rates.csv``.

FTBC: Wu et al., ECCV 2024, arXiv 2403.18388.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dormant import distributed
from dormant.artifacts import ArtifactError
from dormant.experiments.configs import RunConfig
from dormant.experiments.ledger import Ledger, config_key
from dormant.experiments.runtime import torch_threads
from dormant.snn.calibrate import CalibrationData, get_calibration
from dormant.snn.configs import ConvertConfig, CorrectionConfig, FTBCConfig
from dormant.snn.conversion import convert
from dormant.snn.ftbc import FTBCResult

__all__ = ["RunConfig", "run_snn_sweep", "write_report", "run_snn_demo", "served_eval"]

log = logging.getLogger(__name__)


def _key_config(run: RunConfig, conv: ConvertConfig, ftbc: FTBCConfig | None, corr: CorrectionConfig | None = None
                ) -> dict[str, Any]:
    d = asdict(run)
    for k in ("batch_size", "chunk", "engine", "device", "threads", "out", "progress"):
        d.pop(k)
    if d["qcfs"] is None:
        d.pop("qcfs")  # keeps the keys of runs made before QCFS existed
    conv_d = asdict(conv)
    if conv.threshold != "ltb":  # keeps the keys of runs made before threshold balancing existed
        for k in ("ltb_batches", "ltb_batch_size", "ltb_step"):
            conv_d.pop(k)
    d.update(convert=conv_d)
    if ftbc is not None:
        d.update(ftbc=asdict(ftbc))
    if corr is not None:
        d.update(correction=asdict(corr))
    return d


@functools.lru_cache(maxsize=4)
def _load_dataset_cached(name: str, split: str, path: str | None):
    """Datasets are read-only here; a report runs several sweeps on the same splits in one process."""
    from dormant.snn.datasets import load_dataset

    return load_dataset(name, split, path)


def _prepare(run: RunConfig):
    from dormant.snn.datasets import split_holdout
    from dormant.snn.models import load_zoo_model

    load_dataset = _load_dataset_cached
    if run.qcfs:
        from dormant.snn.models import MODELS
        from dormant.snn.qcfs import load_qcfs_model

        model, qmeta = load_qcfs_model(run.qcfs)
        if qmeta["model"] != run.model:
            raise ValueError(f"{run.qcfs} is a QCFS {qmeta['model']}, but --model is {run.model}")
        spec = MODELS[run.model]
    else:
        model, spec = load_zoo_model(run.model, run.weights)
    data = run.data or spec.default_data
    train = load_dataset(data, "train", run.data_path)
    calib, held = split_holdout(train, run.holdout, run.split_seed, run.calib_images)
    test = load_dataset(data, "test", run.data_path).head(run.test_images)
    return model, spec, calib, held, test


def run_snn_sweep(run: RunConfig, conv: ConvertConfig, ftbc: FTBCConfig, T: list[int], methods: list[str],
                  save_network: bool = False, corr: CorrectionConfig | None = None, report: bool = True
                  ) -> list[dict[str, Any]]:
    """Run (or resume) the experiment; returns its records and writes the report files into ``run.out``.

    Args:
        run: model (``run.qcfs``: a trained QCFS checkpoint instead of the ReLU net), data split and execution
            options.
        conv: conversion options.
        ftbc: FTBC options (used by the ``ftbc`` method).
        T: time-step counts to report.
        methods: calibration names (:data:`dormant.snn.calibrate.CALIBRATIONS`).
        save_network: also save the converted network with each method's state for ``max(T)``
            (``snn_<method>_T<T>.safetensors``).
        corr: options of the ``bc``/``pc`` corrections (default :class:`CorrectionConfig`).
        report: write ``report.md``, the CSVs and the plot (``False`` when a caller assembles its own page).
    """
    with torch_threads(run.threads):
        return _sweep(run, conv, ftbc, T, methods, save_network, corr, report)


def _sweep(run, conv, ftbc, T, methods, save_network, corr, report) -> list[dict[str, Any]]:
    from dormant.snn.energy import synaptic_layers
    from dormant.snn.network import SpikingNetwork
    from dormant.snn.simulate import evaluate_ann, evaluate_snn, resolve_device

    for m in methods:
        get_calibration(m)  # fail early on a bad name
    uses_corr = any(m in ("bc", "pc") for m in methods)
    corr = corr or CorrectionConfig()
    method_cfg = {"ftbc": ftbc, "bc": corr, "pc": corr}
    if not T or min(T) < 1:
        raise ValueError("T must list positive step counts")
    out = Path(run.out)
    # the key covers the configs of the methods run here only, so methods can also live in separate folders
    key_cfg = _key_config(run, conv, ftbc if "ftbc" in methods else None, corr if uses_corr else None)
    ledger = Ledger(out / "results.jsonl", config_key(key_cfg), key_cfg, what="SNN sweep", shared=True)  # torchrun
    main = distributed.is_main()  # under torchrun every rank computes, rank 0 alone writes
    records = ledger.records
    device = resolve_device(run.device)
    model, spec, calib, held, test = _prepare(run)
    xc, _ = calib.tensors(spec.mean, spec.std)
    xh, yh = held.tensors(spec.mean, spec.std)
    xt, yt = test.tensors(spec.mean, spec.std)
    base = {"model": run.model, "data": {"calib": calib.describe(), "holdout": held.describe(),
                                          "test": test.describe()}}

    def add(rec: dict[str, Any]) -> dict[str, Any]:
        return ledger.append({**base, **rec, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})

    find = ledger.find

    if find(kind="ann") is None:
        rec = {"kind": "ann", "holdout": evaluate_ann(model, xh, yh, device=device) if len(yh) else None}
        if run.evaluate == "test":
            rec["test"] = evaluate_ann(model, xt, yt, device=device)
        add(rec)
    net_path = out / "converted.safetensors"
    try:
        snn = SpikingNetwork.load(net_path, model).to(device)
    except ArtifactError:
        start = time.perf_counter()
        snn = convert(model, xc, conv, meta={"model": run.model}, device=device, progress=run.progress)
        snn.meta["threshold_data"] = calib.describe()
        if main:
            snn.save(net_path)
        log.info("converted %s in %.1f s (%d neuron layers)", run.model, time.perf_counter() - start, len(snn.neurons))
    snn.engine = run.engine
    if find(kind="costs") is None:
        add({"kind": "costs", "layers": {k: asdict(v) for k, v in synaptic_layers(snn).items()}})
    data = CalibrationData(xc, (xh, yh) if len(yh) else None, run.chunk, run.batch_size, run.progress)
    t_max = max(T)
    for method in methods:
        spec_m = get_calibration(method)
        horizons = [t_max] if spec_m.causal else sorted(set(T))
        for horizon in horizons:
            path = out / f"calib_{method}_T{horizon}.safetensors"
            try:
                outcome = spec_m.load(path)
            except ArtifactError:
                snn.reset_calibration_()
                outcome = spec_m.run(snn, data, horizon, method_cfg.get(method))
                if main:
                    outcome.save(path)
            served = [t for t in sorted(set(T)) if t <= horizon and (spec_m.causal or t == horizon)]
            selected = {t: outcome.select(t) for t in served}
            if find(kind="calibration", method=method, T=horizon) is None:
                rec = {"kind": "calibration", "method": method, "T": horizon, "seconds": outcome.seconds,
                       "selected": {str(t): k for t, k in selected.items()}}
                if isinstance(outcome, FTBCResult):
                    rec["eval_seconds"] = outcome.eval_seconds
                    rec["holdout_accuracy"] = (outcome.holdout_accuracy().tolist()
                                               if outcome.holdout_correct is not None else None)
                    rec["passes_run"] = len(outcome.snapshots) - 1
                add(rec)
            if run.evaluate == "test":
                for k in sorted(set(selected.values())):
                    t_run = max(t for t, kk in selected.items() if kk == k)
                    if find(kind="eval", method=method, calib_T=horizon, snapshot=k, T=t_run) is not None:
                        continue
                    snn.reset_calibration_()
                    outcome.apply_(snn, t_run if spec_m.causal else horizon, k)
                    ev = evaluate_snn(snn, xt, yt, t_run, batch_size=run.batch_size, chunk=run.chunk,
                                      progress=run.progress, desc=f"{method} test T={t_run}")
                    add({"kind": "eval", "method": method, "calib_T": horizon, "snapshot": k, **ev.to_dict(),
                         "T": t_run})
                    log.info("%s (snapshot %d) T=%d: test accuracy %.4f", method, k, t_run, ev.at(t_run))
            if save_network:
                snn.reset_calibration_()
                outcome.apply_(snn, t_max if spec_m.causal else horizon)
                snn.meta["calibration"] = {"method": method, "T": horizon}
                if main:
                    snn.save(out / f"snn_{method}_T{horizon}.safetensors")
    if report and main:
        write_report(out, records, run, conv, ftbc, T, methods)
    return records


def served_eval(records: list[dict[str, Any]], method: str, t: int) -> dict[str, Any] | None:
    """The evaluation record that gives ``method``'s test accuracy at ``T = t``: the run of the calibration
    variant selected for ``t`` (on held-out training data), simulated for at least ``t`` steps."""
    cals = sorted((r for r in records if r["kind"] == "calibration" and r["method"] == method
                   and str(t) in r["selected"]), key=lambda r: r["T"])
    if not cals:
        return None
    c = cals[0]
    k = c["selected"][str(t)]
    return next((e for e in records if e["kind"] == "eval" and e["method"] == method and e["calib_T"] == c["T"]
                 and e["snapshot"] == k and e["T"] >= t), None)


def _table_by_T(records: list[dict[str, Any]], T: list[int], methods: list[str]) -> tuple[list[str], list[list]]:
    """Test accuracy at each T per method (using the variant selected for that T)."""
    rows = []
    for t in sorted(set(T)):
        row: list[Any] = [t]
        for m in methods:
            ev = served_eval(records, m, t)
            row.append("" if ev is None else round(100 * ev["accuracy"][t - 1], 2))
        rows.append(row)
    return ["T"] + methods, rows


def write_report(out: Path, records: list[dict[str, Any]], run: RunConfig, conv: ConvertConfig, ftbc: FTBCConfig,
                 T: list[int], methods: list[str]) -> Path:
    """``report.md``, CSVs and ``accuracy.png`` from the records."""
    from dormant.report import markdown_table, new_figure, provenance, save_figure, write_csv, write_markdown

    ann = next(r for r in records if r["kind"] == "ann")
    first = records[0]
    lines = [f"# ANN -> SNN conversion: {run.model}\n",
             f"- calibration data: {first['data']['calib']['name']} ({first['data']['calib']['n']} images); "
             f"held-out selection data: {first['data']['holdout']['name']} ({first['data']['holdout']['n']} "
             "images, training data)",
             f"- test data: {first['data']['test']['name']} ({first['data']['test']['n']} images)"
             + ("" if run.evaluate == "test" else " -- not evaluated (--evaluate none)"),
             "- ANN accuracy: " + ", ".join(f"{k} {100 * ann[k]:.2f}%" for k in ("holdout", "test")
                                            if ann.get(k) is not None),
             f"- conversion: `{json.dumps(asdict(conv))}`",
             f"- FTBC: `{json.dumps(asdict(ftbc))}`\n"]
    headers, rows = _table_by_T(records, T, methods)
    if run.evaluate == "test":
        lines += ["## Test accuracy (%) at T\n",
                  "Each T uses the calibration variant selected for it on held-out training data; one "
                  "calibration at the largest T serves all T (causal methods).\n",
                  markdown_table(headers + ["ANN"], [r + [round(100 * ann["test"], 2)] for r in rows], digits=2)]
        write_csv(out / "accuracy_by_T.csv", [r + [100 * ann["test"]] for r in rows], headers + ["ANN"])
    cals = [r for r in records if r["kind"] == "calibration"]
    ftbc_cal = [r for r in cals if r.get("holdout_accuracy")]
    if ftbc_cal:
        lines.append("## Held-out training accuracy (%) used for selection\n")
        hrows = []
        for c in ftbc_cal:
            acc = c["holdout_accuracy"]
            for t in sorted(set(T)):
                if str(t) in c["selected"]:
                    k = c["selected"][str(t)]
                    hrows.append([c["method"], t, round(100 * acc[0][t - 1], 2), k, round(100 * acc[k][t - 1], 2)])
        lines.append(markdown_table(["method", "T", "plain (snapshot 0)", "selected pass", "selected"], hrows,
                                    digits=2))
    lines += ["## Calibration time\n",
              markdown_table(["method", "T", "seconds (calibration)", "seconds (held-out evaluation)", "passes"],
                             [[c["method"], c["T"], round(c["seconds"], 2), round(c.get("eval_seconds", 0.0), 2),
                               c.get("passes_run", "")] for c in cals], digits=2)]
    evals = [r for r in records if r["kind"] == "eval"]
    if evals:
        longest = {}
        for e in evals:
            if e["method"] not in longest or e["T"] > longest[e["method"]]["T"]:
                longest[e["method"]] = e
        layers = list(next(iter(longest.values()))["firing_rate"])
        fr_rows = [[name] + [round(longest[m]["firing_rate"].get(name, float("nan")), 4) for m in longest]
                   for name in layers]
        lines += ["## Firing rate per layer (spikes per neuron per step, averaged over the longest run)\n",
                  markdown_table(["layer"] + [f"{m} (T={longest[m]['T']})" for m in longest], fr_rows, digits=4)]
        write_csv(out / "firing_rates.csv", fr_rows, ["layer"] + list(longest))
        cols = [(f"{e['method']}[pass {e['snapshot']}]", e["accuracy"]) for e in evals]
        t_all = max(len(a) for _, a in cols)
        write_csv(out / "accuracy_per_step.csv",
                  [[t + 1] + [a[t] if t < len(a) else "" for _, a in cols] for t in range(t_all)],
                  ["t"] + [c for c, _ in cols])
        fig, ax = new_figure(1, 1, size=(6.5, 4.2))
        a = ax[0, 0]
        for label, acc in cols:
            a.plot(range(1, len(acc) + 1), [100 * v for v in acc], label=label, lw=1.2)
        for j, m in enumerate(methods):
            pts = [(r[0], r[1 + j]) for r in rows if r[1 + j] != ""]
            if pts:
                a.plot(*zip(*pts), "o", ms=4, color=f"C{j}", label=f"{m} at T (selected)")
        if "test" in ann:
            a.axhline(100 * ann["test"], color="k", ls="--", lw=1, label="ANN")
        a.set(xscale="log", xlabel="time step t", ylabel="test accuracy (%)", title=f"{run.model}: accuracy vs step")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
        save_figure(fig, out / "accuracy.png")
        lines += ["![accuracy](accuracy.png)\n",
                  "Per-step accuracies of every simulation are in `accuracy_per_step.csv`.\n"]
    lines += ["## Provenance\n", f"```\n{json.dumps(provenance(), indent=1)}\n```\n"]
    return write_markdown(out / "report.md", "\n".join(lines))


def run_snn_demo(out_dir: str | Path = "runs/demo/snn", images: int = 100, T: list[int] | None = None) -> Path:
    """A short end-to-end SNN run (about 1-2 min on 2 idle CPU cores): ResNet-20 on ``images`` lossless test images.

    Channel-wise 99th-percentile thresholds (the setting selected on held-out training images for ResNet-20),
    FTBC calibrated once at the largest T (default 16) on ``images`` training images (1 pass, selection on
    ``images`` other training images), accuracy after every step for plain conversion and FTBC. Writes
    ``report.md`` (tables, firing rates, calibration time) and ``accuracy.png``; resumable like every sweep.
    """
    batch = min(50, images)
    run = RunConfig(model="resnet20", holdout=images, calib_images=images, test_images=images, batch_size=batch,
                    out=str(out_dir), progress=False)
    ftbc = FTBCConfig(passes=1, batch_size=batch)
    run_snn_sweep(run, ConvertConfig(percentile=99.0, granularity="channel"), ftbc, T=T or [1, 2, 4, 8, 16],
                  methods=["none", "ftbc"])
    return Path(out_dir) / "report.md"
