"""``dormant demo``: the main job on embedded defaults, small enough for a laptop CPU (~10 minutes on 2 cores).

It runs a short sparsity-perplexity sweep on SmolLM2-135M and writes a report; every step resumes
from its result files if the demo is interrupted and started again.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from dormant.config import add_config_args, config_from_args, field


@dataclass
class DemoConfig:
    out: str = field("runs/demo", help="output folder of the demo")
    windows: int = field(4, help="evaluation windows per point")
    seqlen: int = field(512, help="tokens per window")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="short end-to-end run on SmolLM2-135M; writes a report")
    add_config_args(p, DemoConfig)
    p.set_defaults(handler=_demo)


def run_demo(cfg: DemoConfig) -> Path:
    from dormant.llm.models import ModelConfig
    from dormant.llm.sweep import CalibConfig, EvalConfig, SweepConfig, run_sweep

    out = Path(cfg.out)
    sweep = SweepConfig(
        model=ModelConfig("smollm2-135m"),
        calib=CalibConfig(calib_windows=8, calib_seqlen=cfg.seqlen),
        eval=EvalConfig(seqlen=cfg.seqlen, max_windows=cfg.windows),
        sites=["paper", "intermediate"],
        sparsity=[0.0, 0.3, 0.5],
        out=str(out / "sweep"),
    )
    run_sweep(sweep)
    return out / "sweep" / "report.md"


def _demo(ns: argparse.Namespace) -> int:
    report = run_demo(config_from_args(DemoConfig, ns))
    print(f"demo report: {report}")
    return 0
