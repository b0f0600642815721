"""``dormant demo``: every part of the project once, on embedded defaults (:mod:`dormant.experiments.demo`)."""

from __future__ import annotations

import argparse

from dormant.config import add_config_args, config_from_args
from dormant.experiments.configs import DemoConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="every part of the project once, on small defaults; writes a report")
    add_config_args(p, DemoConfig)
    p.set_defaults(handler=_demo)


def _demo(ns: argparse.Namespace) -> int:
    cfg = config_from_args(DemoConfig, ns)

    from dormant.experiments.demo import run_demo

    report = run_demo(cfg)
    print(f"demo report: {report}")
    return 0
