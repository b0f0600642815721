"""``dormant snn convert | sweep | report | train-qcfs``: flags map 1:1 onto :class:`RunConfig`,
:class:`ConvertConfig`, :class:`FTBCConfig` (prefixed ``--ftbc-``), :class:`CorrectionConfig` (``--corr-``),
:class:`EnergyConfig` (``--energy-``) and :class:`QCFSTrainConfig`."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from dormant.cli.checks import check_artifact
from dormant.config import UsageError, add_config_args, checked, config_from_args, field
from dormant.experiments.configs import QCFSTrainConfig, RunConfig
from dormant.snn.configs import CALIBRATION_NAMES, ConvertConfig, CorrectionConfig, EnergyConfig, FTBCConfig


@dataclass
@checked
class ConvertCommandConfig:
    T: int = field(32, help="time steps", ge=1)
    calibrate: str = field("ftbc", help="calibration method: none | bc | pc | rts | ftbc", choices=CALIBRATION_NAMES)


@dataclass
@checked
class SweepCommandConfig:
    T: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64], help="time steps to report", ge=1,
                         nonempty=True)
    methods: list[str] = field(default_factory=lambda: ["none", "ftbc"], help="calibration methods",
                               choices=CALIBRATION_NAMES, nonempty=True)


@dataclass
@checked
class ReportCommandConfig:
    T: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64], help="time steps to report", ge=1,
                         nonempty=True)
    methods: list[str] = field(default_factory=lambda: ["none", "bc", "pc", "rts", "ftbc"],
                               help="calibrations of the ReLU network", choices=CALIBRATION_NAMES, nonempty=True)
    qcfs_methods: list[str] = field(default_factory=lambda: ["none", "ftbc"], choices=CALIBRATION_NAMES,
                                    help="calibrations of the QCFS network (with --qcfs)")
    ftbc_percentiles: list[float] = field(default_factory=list, gt=0.0, le=100.0,
                                          help="more threshold percentiles to run FTBC with; adds 'FTBC (p per T)': "
                                               "per T the percentile best on held-out training images")
    ltb_methods: list[str] = field(default_factory=list, choices=CALIBRATION_NAMES,
                                   help="calibrations of the ReLU network with LTB thresholds (--ltb-* options), "
                                        "e.g. none,ftbc for LTB and LTB+FTBC; none by default")


def _add_common(p: argparse.ArgumentParser) -> None:
    add_config_args(p, RunConfig)
    add_config_args(p, ConvertConfig)
    add_config_args(p, FTBCConfig, prefix="ftbc-")
    add_config_args(p, CorrectionConfig, prefix="corr-")


def register(sub: argparse._SubParsersAction) -> None:
    snn = sub.add_parser("snn", help="ANN->SNN conversion with FTBC (convert, sweep, report, train-qcfs)")
    ssub = snn.add_subparsers(dest="snn_command", required=True, metavar="SNN_COMMAND")
    p = ssub.add_parser("convert", help="convert a model, calibrate, evaluate after every step, save the network")
    add_config_args(p, ConvertCommandConfig)
    _add_common(p)
    p.set_defaults(handler=_data_parallel(_convert))
    p = ssub.add_parser("sweep", help="accuracy vs T for several calibration methods (resumable)")
    add_config_args(p, SweepCommandConfig)
    _add_common(p)
    p.set_defaults(handler=_data_parallel(_sweep))
    p = ssub.add_parser("report", help="one page comparing plain, BC, PC, RTS, FTBC (and QCFS, QCFS+FTBC with --qcfs): "
                                       "accuracy vs T, calibration time, SOPs/energy, firing rates")
    add_config_args(p, ReportCommandConfig)
    _add_common(p)
    add_config_args(p, EnergyConfig, prefix="energy-")
    p.set_defaults(handler=_data_parallel(_report))
    p = ssub.add_parser("train-qcfs", help="fine-tune a zoo ReLU CNN into a QCFS CNN (resumable, checkpoint per epoch)")
    add_config_args(p, QCFSTrainConfig)
    p.set_defaults(handler=_train_qcfs)


def _data_parallel(handler):
    """``handler`` inside ``torchrun``'s process group when launched by it with ``WORLD_SIZE > 1``
    (:mod:`dormant.distributed`; gloo on the CPU, nccl on CUDA): each rank simulates a share of the images and of
    every FTBC batch, counts and errors are summed across ranks, rank 0 writes every file and prints; BC and PC
    are single-process and refused. One process runs ``handler`` as it is."""

    @functools.wraps(handler)
    def run(ns: argparse.Namespace) -> int:
        from dormant import distributed

        if distributed.requested_world() <= 1:
            return handler(ns)
        run_cfg = config_from_args(RunConfig, ns)
        asked = set(getattr(ns, "methods", None) or []) | {getattr(ns, "calibrate", None)} \
            | set(getattr(ns, "ltb_methods", None) or []) | set(getattr(ns, "qcfs_methods", None) or [])
        if asked & {"bc", "pc"}:
            raise UsageError(f"--methods {','.join(sorted(asked & {'bc', 'pc'}))}: bias/potential correction runs in "
                             "one process; under torchrun use none, rts or ftbc")
        from dormant.snn.simulate import resolve_device

        device = resolve_device(run_cfg.device)
        with distributed.launched("nccl" if device.type == "cuda" else "gloo", device.index), \
                contextlib.ExitStack() as quiet:
            if not distributed.is_main():
                logging.getLogger().setLevel(logging.ERROR)
                quiet.enter_context(contextlib.redirect_stdout(quiet.enter_context(open(os.devnull, "w"))))
            return handler(ns)

    return run


def _configs(ns: argparse.Namespace) -> tuple[RunConfig, ConvertConfig, FTBCConfig]:
    run = config_from_args(RunConfig, ns)
    check_artifact(run.qcfs, "qcfs", "qcfs")
    return run, config_from_args(ConvertConfig, ns), config_from_args(FTBCConfig, ns, prefix="ftbc-")


def _corr(ns: argparse.Namespace) -> CorrectionConfig:
    return config_from_args(CorrectionConfig, ns, prefix="corr-")


def _convert(ns: argparse.Namespace) -> int:
    cc = config_from_args(ConvertCommandConfig, ns)
    run, conv, ftbc = _configs(ns)
    corr = _corr(ns)

    from dormant.experiments.snn import run_snn_sweep

    run_snn_sweep(run, conv, ftbc, T=[cc.T], methods=[cc.calibrate], save_network=True, corr=corr)
    print(f"report: {Path(run.out) / 'report.md'}\nnetwork: {Path(run.out) / f'snn_{cc.calibrate}_T{cc.T}.safetensors'}")
    return 0


def _sweep(ns: argparse.Namespace) -> int:
    sc = config_from_args(SweepCommandConfig, ns)
    run, conv, ftbc = _configs(ns)
    corr = _corr(ns)

    from dormant.experiments.snn import run_snn_sweep

    run_snn_sweep(run, conv, ftbc, T=sc.T, methods=sc.methods, corr=corr)
    print(f"report: {Path(run.out) / 'report.md'}")
    return 0


def _report(ns: argparse.Namespace) -> int:
    rc = config_from_args(ReportCommandConfig, ns)
    run, conv, ftbc = _configs(ns)
    corr, energy = _corr(ns), config_from_args(EnergyConfig, ns, prefix="energy-")

    from dormant.experiments.snn_report import run_report

    path = run_report(run, conv, ftbc, corr, energy, T=rc.T, methods=rc.methods, qcfs_methods=rc.qcfs_methods,
                      ltb_methods=rc.ltb_methods, ftbc_percentiles=rc.ftbc_percentiles)
    print(f"report: {path}")
    return 0


def _train_qcfs(ns: argparse.Namespace) -> int:
    cfg = config_from_args(QCFSTrainConfig, ns)

    from dormant.experiments.qcfs import train_qcfs

    path = train_qcfs(cfg)
    print(f"QCFS model: {path}")
    return 0
