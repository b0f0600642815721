"""``dormant demo``: every part of the project once, on embedded defaults, small enough for 2 CPU cores.

Steps (each writes its own report under ``--out``; ``report.md`` there links them all):

=============  ========================================================================================
sparsity       SmolLM2-135M sparsity-perplexity sweep (paper and intermediate sites, 0/30/50%)
analysis       natural sparsity, |a| CDFs and per-token FFN bytes/FLOPs under each execution policy
predictors     active-neuron predictors (static hot set, low-rank) scored open and closed loop
offload        prefetch simulation of FFN weights on a Raspberry Pi 5 (microSD and NVMe)
snn            ResNet-20 to a spiking network, plain conversion vs FTBC, accuracy after every step
snn_compare    MNIST LeNet: plain, BC, PC, RTS, FTBC, QCFS, QCFS+FTBC; SOPs, energy, firing rates
=============  ========================================================================================

A finished step is recorded in ``steps.jsonl`` and skipped when the demo is run again (``--fresh``
reruns everything); the sweep itself resumes point by point.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from dormant.experiments.configs import DemoConfig

log = logging.getLogger(__name__)


def _sparsity(cfg: DemoConfig, out: Path) -> Path:
    from dormant.experiments.sparsity import SweepConfig, run_sparsity_sweep
    from dormant.llm.configs import CalibDataConfig, EvalConfig, ModelConfig

    run_sparsity_sweep(SweepConfig(
        model=ModelConfig(cfg.model),
        calib=CalibDataConfig(calib_windows=8, calib_seqlen=cfg.seqlen),
        eval=EvalConfig(seqlen=cfg.seqlen, max_windows=cfg.windows),
        sites=["paper", "intermediate"],
        sparsity=[0.0, 0.3, 0.5],
        out=str(out),
    ))
    return out / "report.md"


def _analysis(cfg: DemoConfig, out: Path) -> Path:
    from dormant.experiments.analysis import quick_analysis

    return quick_analysis(out=out, model=cfg.model, seqlen=cfg.seqlen, windows=2)


def _offload(cfg: DemoConfig, out: Path) -> Path:
    from dormant.experiments.offload import run_offload_demo

    thr = Path(cfg.out) / "sparsity" / "thresholds_intermediate_uniform_0.5.safetensors"
    if not thr.exists():
        log.warning("demo step offload: %s is missing (run the sparsity step first); the step calibrates its own", thr)
    return run_offload_demo(out=out, model=cfg.model, seqlen=cfg.seqlen, thresholds=str(thr) if thr.exists() else None)


def _predictors(cfg: DemoConfig, out: Path) -> Path:
    from dormant.experiments.predictors import run_predictor_demo

    return run_predictor_demo(out, model=cfg.model, seqlen=cfg.seqlen, progress=False)


def _snn(cfg: DemoConfig, out: Path) -> Path:
    from dormant.experiments.snn import run_snn_demo

    return run_snn_demo(out, images=cfg.snn_images, T=cfg.snn_T)


def _snn_compare(cfg: DemoConfig, out: Path) -> Path:
    from dormant.experiments.snn_report import run_report_demo

    return run_report_demo(out, images=cfg.compare_images, T=cfg.compare_T, qcfs_images=cfg.qcfs_images)


STEPS: dict[str, tuple[str, Callable[[DemoConfig, Path], Path]]] = {  # names: configs.DEMO_STEPS
    "sparsity": ("SmolLM2-135M sparsity vs WikiText-2 perplexity", _sparsity),
    "analysis": ("What sparsity buys: natural sparsity and FFN bytes/FLOPs per token", _analysis),
    "predictors": ("Predicting active neurons before their weights are loaded", _predictors),
    "offload": ("Offloading FFN weights to flash: prefetch simulation", _offload),
    "snn": ("ResNet-20 as a spiking network: plain conversion vs FTBC", _snn),
    "snn_compare": ("Conversion methods compared: accuracy, energy, firing rates (MNIST LeNet)", _snn_compare),
}


def run_demo(cfg: DemoConfig) -> Path:
    """Run the selected steps (skipping finished ones) and write the index ``report.md``.

    Finished steps are records of the demo's ledger (``steps.jsonl``), keyed by the sizes in ``cfg``; the last
    record of a step wins, so ``fresh`` reruns add records and keep the old ones.
    """
    from dormant.experiments.ledger import Ledger, config_key
    from dormant.report import markdown_table, write_markdown

    unknown = [s for s in cfg.steps if s not in STEPS]
    if unknown:
        raise ValueError(f"unknown demo steps {unknown}; choose from {', '.join(STEPS)}")
    root = Path(cfg.out)
    key_cfg = {k: v for k, v in asdict(cfg).items() if k not in ("out", "steps", "fresh")}
    ledger = Ledger(root / "steps.jsonl", config_key(key_cfg), key_cfg, what="demo")
    done = {} if cfg.fresh else {r["step"]: r for r in ledger.records}
    for name in cfg.steps:
        if name in done and (root / done[name]["report"]).exists():
            log.info("demo step %s already done: %s", name, root / done[name]["report"])
            continue
        title, fn = STEPS[name]
        log.info("demo step %s: %s", name, title)
        t0 = time.perf_counter()
        report = Path(fn(cfg, root / name)).relative_to(root)  # relative: the folder can move
        done[name] = ledger.append({"step": name, "report": str(report), "seconds": round(time.perf_counter() - t0, 1)})
    rows = [[STEPS[s][0], f"[{done[s]['report']}]({done[s]['report']})", f"{done[s]['seconds']:.0f}"]
            for s in STEPS if s in done]
    text = ("# dormant demo\n\nEach step ran on small embedded defaults (see `dormant demo --help`); the full-size "
            "commands are in the README.\n\n" + markdown_table(["step", "report", "seconds"], rows))
    return write_markdown(root / "report.md", text)
