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

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dormant.config import add_config_args, config_from_args, field

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: str = field("runs/demo", help="output folder of the demo")
    steps: list[str] = field(default_factory=lambda: list(STEPS), help="steps to run: " + ", ".join(
        ["sparsity", "analysis", "predictors", "offload", "snn", "snn_compare"]))
    windows: int = field(4, help="evaluation windows per sweep point")
    seqlen: int = field(512, help="tokens per window")
    fresh: bool = field(False, help="rerun steps that already finished")


def _sparsity(cfg: DemoConfig, out: Path) -> Path:
    from dormant.llm.models import ModelConfig
    from dormant.llm.sweep import CalibConfig, EvalConfig, SweepConfig, run_sweep

    run_sweep(SweepConfig(
        model=ModelConfig("smollm2-135m"),
        calib=CalibConfig(calib_windows=8, calib_seqlen=cfg.seqlen),
        eval=EvalConfig(seqlen=cfg.seqlen, max_windows=cfg.windows),
        sites=["paper", "intermediate"],
        sparsity=[0.0, 0.3, 0.5],
        out=str(out),
    ))
    return out / "report.md"


def _analysis(cfg: DemoConfig, out: Path) -> Path:
    from dormant.llm.analyze import quick_analysis

    return quick_analysis(out=out, seqlen=cfg.seqlen, windows=2)


def _offload(cfg: DemoConfig, out: Path) -> Path:
    from dormant.offload.sweep import run_offload_demo

    thr = Path(cfg.out) / "sparsity" / "thresholds_intermediate_uniform_0.5.safetensors"
    return run_offload_demo(out=out, thresholds=str(thr) if thr.exists() else None)


def _predictors(cfg: DemoConfig, out: Path) -> Path:
    from dormant.llm.predictors.pipeline import run_predictor_demo

    return run_predictor_demo(out, seqlen=cfg.seqlen, progress=False)


def _snn(cfg: DemoConfig, out: Path) -> Path:
    from dormant.snn.experiment import run_demo

    return run_demo(out)


def _snn_compare(cfg: DemoConfig, out: Path) -> Path:
    from dormant.snn.report import run_report_demo

    return run_report_demo(out)


STEPS: dict[str, tuple[str, Callable[[DemoConfig, Path], Path]]] = {
    "sparsity": ("SmolLM2-135M sparsity vs WikiText-2 perplexity", _sparsity),
    "analysis": ("What sparsity buys: natural sparsity and FFN bytes/FLOPs per token", _analysis),
    "predictors": ("Predicting active neurons before their weights are loaded", _predictors),
    "offload": ("Offloading FFN weights to flash: prefetch simulation", _offload),
    "snn": ("ResNet-20 as a spiking network: plain conversion vs FTBC", _snn),
    "snn_compare": ("Conversion methods compared: accuracy, energy, firing rates (MNIST LeNet)", _snn_compare),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="every part of the project once, on small defaults; writes a report")
    add_config_args(p, DemoConfig)
    p.set_defaults(handler=_demo)


def run_demo(cfg: DemoConfig) -> Path:
    """Run the selected steps (skipping finished ones) and write the index ``report.md``."""
    from dormant.artifacts import append_jsonl, read_jsonl
    from dormant.report import markdown_table, write_markdown

    unknown = [s for s in cfg.steps if s not in STEPS]
    if unknown:
        raise ValueError(f"unknown demo steps {unknown}; choose from {', '.join(STEPS)}")
    root = Path(cfg.out)
    log_path = root / "steps.jsonl"
    done = {} if cfg.fresh else {r["step"]: r for r in read_jsonl(log_path)}
    for name in cfg.steps:
        if name in done and Path(done[name]["report"]).exists():
            log.info("demo step %s already done: %s", name, done[name]["report"])
            continue
        title, fn = STEPS[name]
        log.info("demo step %s: %s", name, title)
        t0 = time.perf_counter()
        report = fn(cfg, root / name)
        done[name] = {"step": name, "report": str(report), "seconds": round(time.perf_counter() - t0, 1)}
        append_jsonl(log_path, done[name])
    rows = [[STEPS[s][0], f"[{Path(done[s]['report']).relative_to(root)}]({Path(done[s]['report']).relative_to(root)})",
             f"{done[s]['seconds']:.0f}"] for s in STEPS if s in done]
    text = ("# dormant demo\n\nEach step ran on small embedded defaults (see `dormant demo --help`); the full-size "
            "commands are in the README.\n\n" + markdown_table(["step", "report", "seconds"], rows))
    return write_markdown(root / "report.md", text)


def _demo(ns: argparse.Namespace) -> int:
    report = run_demo(config_from_args(DemoConfig, ns))
    print(f"demo report: {report}")
    return 0
