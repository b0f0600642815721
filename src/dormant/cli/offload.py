"""``dormant trace | simulate | profiles | storage-check``: flags map 1:1 onto the config dataclasses of
:mod:`dormant.offload` and :mod:`dormant.experiments.offload`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dormant.cli.checks import check_artifact, check_seqlens, model_context
from dormant.config import add_config_args, config_from_args
from dormant.experiments.configs import SimulateConfig, StorageCheckConfig, TraceConfig
from dormant.llm.configs import EvalConfig, ModelConfig
from dormant.offload.configs import StorageLayout


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="record an activation trace (active FFN neurons per token) of a text pass")
    for cls in (ModelConfig, EvalConfig, TraceConfig):
        add_config_args(p, cls)
    p.set_defaults(handler=_trace)

    p = sub.add_parser("simulate", help="simulate weight-loading policies x DRAM budgets on device profiles")
    add_config_args(p, SimulateConfig)
    add_config_args(p, StorageLayout)
    p.set_defaults(handler=_simulate)

    p = sub.add_parser("profiles", help="list the shipped device profiles, or validate and show profile files")
    p.add_argument("files", nargs="*", help="profile names or YAML paths to validate and print")
    p.set_defaults(handler=_profiles)

    p = sub.add_parser("storage-check", help="real reads of neuron chunks on this disk vs the storage model")
    add_config_args(p, StorageCheckConfig)
    p.set_defaults(handler=_storage_check)


def _trace(ns: argparse.Namespace) -> int:
    mc, ec, tc = (config_from_args(c, ns) for c in (ModelConfig, EvalConfig, TraceConfig))
    check_seqlens(model_context(mc), seqlen=ec.seqlen)
    check_artifact(tc.thresholds, "thresholds", "thresholds")

    from dormant.experiments.offload import record_trace

    trace = record_trace(mc, ec, tc)
    print(json.dumps({"trace": tc.out, "tokens": trace.n_tokens, "layers": trace.n_layers,
                      "neurons": trace.n_neurons, "density": float(trace.density().mean())}, indent=1))
    return 0


def _simulate(ns: argparse.Namespace) -> int:
    cfg, layout = config_from_args(SimulateConfig, ns), config_from_args(StorageLayout, ns)
    check_artifact(cfg.trace, "trace", "trace")
    check_artifact(None if cfg.predicted == "synthetic" else cfg.predicted, "trace", "predicted")

    from dormant.experiments.offload import run_simulation

    run_simulation(cfg, layout)
    print(f"report: {Path(cfg.out) / 'report.md'}")
    return 0


def _profiles(ns: argparse.Namespace) -> int:
    from dormant.offload.profiles import list_profiles, load_profile

    if not ns.files:
        for name in list_profiles():
            p = load_profile(name)
            sm = p.storage
            print(f"{name:24s} {p.description}  [B {sm.bandwidth / 1e6:.0f} MB/s, L {sm.latency * 1e6:.0f} us, "
                  f"{sm.max_iops:.0f} IOPS max, QD {sm.max_queue_depth}; {len(p.estimates())} estimates]")
        return 0
    for f in ns.files:
        print(load_profile(f).to_yaml())
    return 0


def _storage_check(ns: argparse.Namespace) -> int:
    cfg = config_from_args(StorageCheckConfig, ns)
    check_artifact(cfg.trace, "trace", "trace")

    from dormant.experiments.offload import storage_check

    report = storage_check(cfg)
    print(f"report: {report}")
    return 0
