"""``dormant snn convert | sweep``: flags map 1:1 onto :class:`RunConfig`, :class:`ConvertConfig` and
:class:`FTBCConfig` (FTBC flags are prefixed ``--ftbc-``)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from dormant.config import add_config_args, config_from_args, field
from dormant.snn.configs import ConvertConfig, FTBCConfig, RunConfig


@dataclass
class ConvertCommandConfig:
    T: int = field(32, help="time steps")
    calibrate: str = field("ftbc", help="calibration method: none | ftbc")


@dataclass
class SweepCommandConfig:
    T: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64], help="time steps to report")
    methods: list[str] = field(default_factory=lambda: ["none", "ftbc"], help="calibration methods")


def _add_common(p: argparse.ArgumentParser) -> None:
    add_config_args(p, RunConfig)
    add_config_args(p, ConvertConfig)
    add_config_args(p, FTBCConfig, prefix="ftbc-")


def register(sub: argparse._SubParsersAction) -> None:
    snn = sub.add_parser("snn", help="ANN->SNN conversion with FTBC (convert, sweep)")
    ssub = snn.add_subparsers(dest="snn_command", required=True, metavar="SNN_COMMAND")
    p = ssub.add_parser("convert", help="convert a model, calibrate, evaluate after every step, save the network")
    add_config_args(p, ConvertCommandConfig)
    _add_common(p)
    p.set_defaults(handler=_convert)
    p = ssub.add_parser("sweep", help="accuracy vs T for several calibration methods (resumable)")
    add_config_args(p, SweepCommandConfig)
    _add_common(p)
    p.set_defaults(handler=_sweep)


def _configs(ns: argparse.Namespace) -> tuple[RunConfig, ConvertConfig, FTBCConfig]:
    return (config_from_args(RunConfig, ns), config_from_args(ConvertConfig, ns),
            config_from_args(FTBCConfig, ns, prefix="ftbc-"))


def _convert(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from dormant.snn.experiment import run_sweep

    cc = config_from_args(ConvertCommandConfig, ns)
    run, conv, ftbc = _configs(ns)
    run_sweep(run, conv, ftbc, T=[cc.T], methods=[cc.calibrate], save_network=True)
    print(f"report: {Path(run.out) / 'report.md'}\nnetwork: {Path(run.out) / f'snn_{cc.calibrate}_T{cc.T}.safetensors'}")
    return 0


def _sweep(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from dormant.snn.experiment import run_sweep

    sc = config_from_args(SweepCommandConfig, ns)
    run, conv, ftbc = _configs(ns)
    run_sweep(run, conv, ftbc, T=sc.T, methods=sc.methods)
    print(f"report: {Path(run.out) / 'report.md'}")
    return 0
