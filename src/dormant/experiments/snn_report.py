"""``dormant snn report``: one page comparing the conversion methods of a model.

For one zoo model it runs (resumably, through :func:`dormant.experiments.snn.run_snn_sweep`) the ReLU network with the
registered calibrations (plain, BC, PC, RTS, FTBC; :mod:`dormant.snn.calibrate`), optionally the same network with
thresholds from local threshold balancing ("LTB", "LTB+FTBC"; Bu, Li, Yu, CVPR 2025) and, given a trained QCFS
checkpoint (:mod:`dormant.snn.qcfs`), the QCFS network with plain conversion and FTBC ("QCFS", "QCFS+FTBC"). It
writes into ``out``:

* ``report.md``: test accuracy vs T (with the ANN's), calibration time per method (and the QCFS training time),
  synaptic operations and energy vs the ANN (:mod:`dormant.snn.energy`), firing rates per layer, the data used;
* ``accuracy.png``, ``energy.png``, ``firing_rates.png``, ``calibration_time.png``;
* ``comparison.csv`` (one row per method and T), ``firing_rates.csv`` and ``comparison.json`` (everything).

Each method's sweep lives in ``out/<relu|ltb|qcfs>/<method>`` (its ``results.jsonl`` and artifacts) and resumes on its own, so methods
can also be run as separate processes (``dormant snn sweep --methods <m> --out <out>/<family>/<m>`` with the same
flags) before the page is assembled. FTBC: Wu et al., ECCV 2024,
arXiv 2403.18388; BC/PC: Li et al., ICML 2021; RTS: Deng & Gu, ICLR 2021; QCFS: Bu et al., ICLR 2022.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from dormant import distributed
from dormant.experiments.snn import RunConfig
from dormant.snn.configs import ConvertConfig, CorrectionConfig, EnergyConfig, FTBCConfig

__all__ = ["run_report", "write_comparison", "run_report_demo", "method_label"]

_LABELS = {("relu", "none"): "plain", ("relu", "bc"): "BC", ("relu", "pc"): "PC", ("relu", "rts"): "RTS",
           ("relu", "ftbc"): "FTBC", ("qcfs", "none"): "QCFS", ("qcfs", "ftbc"): "QCFS+FTBC", ("ltb", "none"): "LTB"}
_PREFIX = {"qcfs": "QCFS+", "ltb": "LTB+"}  # families p<q>: FTBC with the q-th percentile thresholds


def method_label(family: str, method: str) -> str:
    """Display name of ``method`` applied to the ``family`` (``"relu"`` or ``"qcfs"``) network."""
    if family.startswith("p"):
        return f"{method.upper()} ({family})"
    return _LABELS.get((family, method), _PREFIX.get(family, "") + method.upper())


def run_report(run: RunConfig, conv: ConvertConfig, ftbc: FTBCConfig, corr: CorrectionConfig,
               energy: EnergyConfig, T: list[int], methods: list[str],
               qcfs_methods: list[str] | None = None, ltb_methods: list[str] | None = None,
               ftbc_percentiles: list[float] | None = None) -> Path:
    """Run (or resume) every sweep of the comparison and write the page; returns ``out/report.md``.

    Args:
        run: model, data and execution options; ``run.qcfs`` (a QCFS checkpoint) adds the QCFS family.
        conv, ftbc, corr: conversion, FTBC and BC/PC options (shared by both families).
        energy: energy constants.
        T: time-step counts.
        methods: calibrations of the ReLU network.
        qcfs_methods: calibrations of the QCFS network (default ``none, ftbc``).
        ltb_methods: calibrations of the ReLU network converted with LTB thresholds (``conv`` with
            ``threshold="ltb"``; family ``ltb``, e.g. ``none, ftbc`` for "LTB", "LTB+FTBC"); none by default.
        ftbc_percentiles: more threshold percentiles to run FTBC with (families ``p<q>``, rows "FTBC (p<q>)");
            the page then adds "FTBC (p per T)": for each T the percentile (``conv``'s or one of these) whose FTBC
            scores best on the held-out training images, with its test accuracy.
    """
    from dormant.experiments.snn import run_snn_sweep

    out = Path(run.out)
    plan = {"relu": (replace(run, qcfs=None), conv, list(methods))}
    if ltb_methods:
        plan["ltb"] = (replace(run, qcfs=None), replace(conv, threshold="ltb"), list(ltb_methods))
    for q in ftbc_percentiles or []:
        if conv.threshold == "percentile" and q != conv.percentile:
            plan[f"p{q:g}"] = (replace(run, qcfs=None), replace(conv, percentile=q), ["ftbc"])
    if run.qcfs:
        plan["qcfs"] = (run, conv, list(qcfs_methods or ["none", "ftbc"]))
    families: dict[str, list[dict[str, Any]]] = {}
    for fam, (r, c, ms) in plan.items():
        families[fam] = []
        for m in ms:  # one resumable sweep folder per method: out/<family>/<method>
            families[fam] += run_snn_sweep(replace(r, out=str(out / fam / m)), c, ftbc, T, [m], corr=corr,
                                       report=False)
    used = {fam: ms for fam, (_, _, ms) in plan.items()}
    qmeta = None
    if run.qcfs:
        from dormant.artifacts import load_artifact
        from dormant.snn.qcfs import CHECKPOINT_KIND, CHECKPOINT_VERSION

        _, qmeta, _ = load_artifact(run.qcfs, CHECKPOINT_KIND, (CHECKPOINT_VERSION,))
        qmeta["path"] = str(run.qcfs)
    if not distributed.is_main():  # under torchrun rank 0 writes the page
        return out / "report.md"
    return write_comparison(out, families, used, run.model, sorted(set(T)), energy, qmeta,
                            {"convert": asdict(conv), "ftbc": asdict(ftbc), "correction": asdict(corr)})


_PER_T = "FTBC (p per T)"


def _holdout_at(records: list[dict[str, Any]], method: str, t: int) -> float | None:
    """Held-out accuracy after step ``t`` of the calibration variant selected for ``t`` (FTBC records)."""
    for r in records:
        if r["kind"] == "calibration" and r["method"] == method and str(t) in r["selected"] \
                and r.get("holdout_accuracy") is not None:
            return r["holdout_accuracy"][r["selected"][str(t)]][t - 1]
    return None


def _percentile_per_T(families: dict[str, list[dict[str, Any]]], rows: list[dict[str, Any]],
                      methods: dict[str, list[str]], T: list[int], main_pct: float | None) -> dict[int, str]:
    """Add the rows of "FTBC (p per T)": per T, the FTBC family (the main percentile ``relu`` or an extra ``p<q>``)
    with the best held-out accuracy (ties: the main one); returns ``{T: family}`` ({} without extra families)."""
    fams = [f for f in families if (f == "relu" or f.startswith("p")) and "ftbc" in methods.get(f, [])]
    if len(fams) < 2:
        return {}
    by = {(r["family"], r["calibration"], r["T"]): r for r in rows}
    chosen = {}
    for t in T:
        scores = {f: _holdout_at(families[f], "ftbc", t) for f in fams}
        scores = {f: v for f, v in scores.items() if v is not None}
        if not scores:
            continue
        best = max(scores.values())
        chosen[t] = next(f for f in fams if scores.get(f) == best)
        src = by.get((chosen[t], "ftbc", t))
        if src is not None:
            pct = main_pct if chosen[t] == "relu" else float(chosen[t][1:])
            rows.append({**src, "method": _PER_T, "family": chosen[t], "chosen_percentile": pct,
                         "holdout_accuracy": 100 * best})
    return chosen


def _layer_costs(records: list[dict[str, Any]]):
    from dormant.snn.energy import SynapticLayer

    rec = next((r for r in records if r["kind"] == "costs"), None)
    return None if rec is None else {k: SynapticLayer(**v) for k, v in rec["layers"].items()}


def write_comparison(out: Path, families: dict[str, list[dict[str, Any]]], methods: dict[str, list[str]],
                     model: str, T: list[int], energy: EnergyConfig, qcfs_meta: dict[str, Any] | None = None,
                     configs: dict[str, Any] | None = None) -> Path:
    """Write ``report.md``, the CSV/JSON files and the plots from the sweeps' records.

    Args:
        families: ``{"relu" | "ltb" | "qcfs": records of run_sweep}``.
        methods: ``{family: calibration names}``.
        qcfs_meta: the QCFS checkpoint's meta (training data, epochs, history), if any.
        configs: configs to print.
    """
    from dormant.artifacts import atomic_write_text
    from dormant.experiments.snn import served_eval
    from dormant.report import markdown_table, new_figure, provenance, save_figure, write_csv, write_markdown
    from dormant.snn.energy import energy_estimate

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    anns: dict[str, float | None] = {}
    fr: dict[str, dict[str, float]] = {}
    calib: list[dict[str, Any]] = []
    labels: list[str] = []
    ann_energy = None
    for fam, recs in families.items():
        ann = next(r for r in recs if r["kind"] == "ann")  # every method folder has the same ANN record
        anns["QCFS ANN" if fam == "qcfs" else "ANN"] = ann.get("test")
        costs = _layer_costs(recs)
        for m in methods[fam]:
            label = method_label(fam, m)
            labels.append(label)
            for t in T:
                ev = served_eval(recs, m, t)
                row: dict[str, Any] = {"method": label, "family": fam, "calibration": m, "T": t,
                                       "accuracy": None if ev is None else 100 * ev["accuracy"][t - 1]}
                if ev is not None and costs is not None and ev.get("synaptic_rate_per_step"):
                    est = energy_estimate(costs, ev["synaptic_rate_per_step"], t, energy)
                    row.update(sops=est.sops, macs=est.macs, energy_uj=est.energy_pj * 1e-6,
                               ann_energy_uj=est.ann_energy_pj * 1e-6, energy_ratio=est.ratio)
                    ann_energy = est.ann_energy_pj * 1e-6, est.ann_macs
                rows.append(row)
            ev = served_eval(recs, m, max(T))
            if ev is not None:
                per = ev.get("firing_rate_per_step")
                fr[label] = ({k: sum(v[: max(T)]) / max(T) for k, v in per.items()} if per else ev["firing_rate"])
            cals = [r for r in recs if r["kind"] == "calibration" and r["method"] == m]
            calib.append({"method": label, "horizons": len(cals), "seconds": sum(r["seconds"] for r in cals),
                          "eval_seconds": sum(r.get("eval_seconds", 0.0) for r in cals)})
    chosen = _percentile_per_T(families, rows, methods, T, (configs or {}).get("convert", {}).get("percentile"))
    if chosen:
        labels.append(_PER_T)
    first = families["relu"][0]["data"]
    by = {(r["method"], r["T"]): r for r in rows}

    def cell(label: str, t: int, key: str, scale: float = 1.0, digits: int = 2) -> Any:
        v = by.get((label, t), {}).get(key)
        return "" if v is None else round(v * scale, digits)

    lines = [f"# Spiking conversion of {model}: method comparison\n",
             "## Data\n",
             f"- test: {first['test']['name']} ({first['test']['n']} images)",
             f"- thresholds and calibration: {first['calib']['name']} ({first['calib']['n']} training images); "
             f"selection (FTBC pass per T): {first['holdout']['name']} ({first['holdout']['n']} held-out "
             "training images). No choice uses test images."]
    if "ltb" in families and configs:
        cv = configs.get("convert", {})
        lines.append(f"- LTB network: the same ReLU ANN with thresholds by local threshold balancing (Bu, Li, Yu, "
                     f"CVPR 2025): {cv.get('ltb_batches')} updates of {cv.get('ltb_batch_size')} calibration images, "
                     f"step c = {cv.get('ltb_step')}, {cv.get('granularity')}-wise; LTB+FTBC calibrates FTBC on it.")
    if qcfs_meta is not None:
        h = qcfs_meta.get("history", [])
        tr = qcfs_meta.get("data", {}).get("train") or {}
        lines.append(f"- QCFS network: `{qcfs_meta.get('path')}`, L = {qcfs_meta['levels']}, fine-tuned from the "
                     f"pretrained ReLU {qcfs_meta['model']} for {qcfs_meta['epoch']} epochs on {tr.get('name')} "
                     f"({tr.get('n')} images"
                     + (", lossy JPEG: not the official CIFAR-10 pixels" if "jpeg" in str(tr.get("name")) else "")
                     + f"); held-out accuracy after the last epoch {100 * (h[-1].get('val_acc') or 0):.2f}% on "
                     f"{(qcfs_meta.get('data', {}).get('val') or {}).get('name')} (monitoring only).")
    lines.append("- ANN accuracy: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in anns.items() if v is not None)
                 + "\n")
    lines += ["## Test accuracy (%) vs T\n",
              "Each T uses the calibration selected for it on held-out training data; causal methods (plain, FTBC) "
              "are calibrated once at the largest T, BC, PC and RTS at every T.\n",
              markdown_table(["T"] + labels + list(anns),
                             [[t] + [cell(lb, t, "accuracy") for lb in labels]
                              + [round(100 * v, 2) if v is not None else "" for v in anns.values()] for t in T],
                             digits=2)]
    if chosen:
        pct = {t: by[(_PER_T, t)]["chosen_percentile"] for t in T if (_PER_T, t) in by}
        lines.append(f"\n{_PER_T}: for each T, the threshold percentile whose FTBC scores best on the held-out "
                     "training images (never test images): " + ", ".join(f"T = {t}: {p:g}" for t, p in pct.items())
                     + ".\n")
    if ann_energy is not None:
        lines += [f"## Synaptic operations and energy per image (ANN: {ann_energy[1] / 1e6:.2f} M MACs, "
                  f"{ann_energy[0]:.2f} uJ)\n",
                  f"SOP = sum over steps of input spike rate x MACs per layer; analog-input layers cost MACs "
                  f"({energy.analog_input.replace('_', ' ')}); E = {energy.e_mac_pj} pJ/MAC, {energy.e_ac_pj} pJ/AC "
                  "(Horowitz, ISSCC 2014, 45 nm). Formulas: `dormant.snn.energy`.\n",
                  "SOPs (millions):\n",
                  markdown_table(["T"] + labels, [[t] + [cell(lb, t, "sops", 1e-6) for lb in labels] for t in T]),
                  "Energy relative to the ANN (SNN / ANN):\n",
                  markdown_table(["T"] + labels,
                                 [[t] + [cell(lb, t, "energy_ratio", 1.0, 3) for lb in labels] for t in T],
                                 digits=3)]
    lines += ["## Calibration time\n",
              "Wall time on this machine (noisy when it is shared). FTBC's held-out evaluations, used to select the "
              "pass per T, are listed apart.\n",
              markdown_table(["method", "calibrations (T values)", "seconds", "held-out evaluation seconds"],
                             [[c["method"], c["horizons"], round(c["seconds"], 1), round(c["eval_seconds"], 1)]
                              for c in calib], digits=1)]
    if qcfs_meta is not None:
        secs = sum(h.get("seconds", 0.0) for h in qcfs_meta.get("history", []))
        lines.append(f"QCFS fine-tuning: {qcfs_meta['epoch']} epoch(s), {secs:.0f} s "
                     f"(device {qcfs_meta.get('device', qcfs_meta.get('config', {}).get('device'))}).\n")
    layer_names = list(next(iter(fr.values()))) if fr else []
    if fr:
        lines += [f"## Firing rate per layer at T = {max(T)} (spikes per neuron per step)\n",
                  markdown_table(["layer"] + list(fr), [[n] + [round(fr[lb].get(n, float("nan")), 4) for lb in fr]
                                                        for n in layer_names], digits=4)]
    lines += ["![accuracy](accuracy.png)\n", "![energy](energy.png)\n", "![firing rates](firing_rates.png)\n",
              "![calibration time](calibration_time.png)\n"]
    if configs:
        lines += ["## Configuration\n", "```\n" + json.dumps(configs, indent=1) + "\n```\n"]
    lines += ["## Provenance\n", f"```\n{json.dumps(provenance(), indent=1)}\n```\n"]

    # ---- files ------------------------------------------------------------------------------------------------
    keys = ["method", "family", "calibration", "T", "accuracy", "sops", "macs", "energy_uj", "ann_energy_uj",
            "energy_ratio"]
    write_csv(out / "comparison.csv", [{k: ("" if r.get(k) is None else r.get(k)) for k in keys} for r in rows], keys)
    write_csv(out / "firing_rates.csv", [[n] + [fr[lb].get(n, "") for lb in fr] for n in layer_names],
              ["layer"] + list(fr))
    atomic_write_text(out / "comparison.json", json.dumps(
        {"model": model, "T": T, "data": first, "ann_accuracy": anns, "rows": rows, "calibration": calib,
         "firing_rates": fr, "energy": asdict(energy), "qcfs": qcfs_meta, "configs": configs,
         "provenance": provenance()}, indent=1))

    # ---- plots -------------------------------------------------------------------------------------------------
    acc_lines = [(100 * v, "--" if i == 0 else ":", k) for i, (k, v) in enumerate(anns.items()) if v is not None]
    _plot_vs_T(out / "accuracy.png", by, labels, T, "accuracy", acc_lines, ylabel="test accuracy (%)",
               title=f"{model}: accuracy vs T")
    _plot_vs_T(out / "energy.png", by, labels, T, "energy_uj",
               [] if ann_energy is None else [(ann_energy[0], "--", "ANN")], ylabel="energy per image (uJ)",
               title=f"{model}: estimated energy", yscale="log")

    fig, ax = new_figure(1, 1, size=(7.5, 4.2))
    a = ax[0, 0]
    for j, lb in enumerate(fr):
        a.plot(range(len(layer_names)), [fr[lb].get(n, float("nan")) for n in layer_names], "o-", ms=3, lw=1,
               label=lb, color=f"C{labels.index(lb) if lb in labels else j}")
    a.set_xticks(range(len(layer_names)), layer_names, rotation=90, fontsize=6)
    a.set(ylabel="firing rate", title=f"{model}: firing rate per layer at T = {max(T)}")
    a.grid(alpha=0.3)
    a.legend(fontsize=7)
    save_figure(fig, out / "firing_rates.png")

    fig, ax = new_figure(1, 1, size=(6.0, 3.6))
    a = ax[0, 0]
    a.bar([c["method"] for c in calib], [max(c["seconds"], 1e-3) for c in calib], color="C0", label="calibration")
    a.bar([c["method"] for c in calib], [c["eval_seconds"] for c in calib],
          bottom=[max(c["seconds"], 1e-3) for c in calib], color="C1", label="held-out selection")
    a.set(ylabel="seconds (all T)", title="calibration time")
    a.tick_params(axis="x", labelsize=7)
    a.legend(fontsize=7)
    save_figure(fig, out / "calibration_time.png")
    return write_markdown(out / "report.md", "\n".join(lines))


def _plot_vs_T(path: Path, by: dict, labels: list[str], T: list[int], key: str,
               hlines: list[tuple[float, str, str]], yscale: str = "linear", **labels_kw: str) -> None:
    """One line per method of ``by[(label, T)][key]`` against log T, with horizontal reference lines."""
    from dormant.report import new_figure, save_figure

    fig, ax = new_figure(1, 1, size=(6.5, 4.2))
    a = ax[0, 0]
    for j, lb in enumerate(labels):
        pts = [(t, by[(lb, t)][key]) for t in T if by.get((lb, t), {}).get(key) is not None]
        if pts:
            a.plot(*zip(*pts), "o-", ms=3, lw=1.2, color=f"C{j}", label=lb)
    for y, ls, name in hlines:
        a.axhline(y, color="k", ls=ls, lw=1, label=name)
    a.set(xscale="log", yscale=yscale, xlabel="time steps T", **labels_kw)
    a.set_xticks(T, [str(t) for t in T])
    a.minorticks_off()
    a.grid(alpha=0.3)
    a.legend(fontsize=7)
    save_figure(fig, path)


def run_report_demo(out_dir: str | Path = "runs/demo/snn_report", images: int = 200, T: list[int] | None = None,
                    qcfs_images: int = 2000) -> Path:
    """The short comparison (about 1-2 min on 2 CPU cores): the MNIST LeNet (max pooling), ``images`` test images.

    Converts with channel-wise 99.9th-percentile thresholds; plain, BC, PC, RTS and FTBC at T = 1, 2, 4, 8; and a
    QCFS LeNet (L = 4) fine-tuned for one epoch on ``qcfs_images`` MNIST training images, converted plain and with
    FTBC. Calibration uses ``images`` training images, selection ``images`` other training images. Resumable like
    every sweep.

    Returns:
        Path of the report's ``report.md``.
    """
    from dormant.experiments.qcfs import QCFSTrainConfig, train_qcfs

    out = Path(out_dir)
    batch = min(100, images)
    qcfs = train_qcfs(QCFSTrainConfig(model="lenet", levels=4, data="mnist", train_images=qcfs_images,
                                      val_images=images, epochs=1, batch_size=batch, lr=0.01, augment=False,
                                      init_images=images, out=str(out / "qcfs_train"), progress=False))
    run = RunConfig(model="lenet", qcfs=str(qcfs), holdout=images, calib_images=images, test_images=images,
                    batch_size=batch, out=str(out), progress=False)
    return run_report(run, ConvertConfig(percentile=99.9, granularity="channel"),
                      FTBCConfig(passes=2, batch_size=batch), CorrectionConfig(batches=2, batch_size=batch),
                      EnergyConfig(), T=T or [1, 2, 4, 8], methods=["none", "bc", "pc", "rts", "ftbc"])
