"""Property-based fuzzing of the command line (hypothesis): random values for every flag of every subcommand.

The runs themselves are replaced by a sentinel, so an accepted command stops where it would start working (loading a
model, calibrating, simulating). Properties:

* no invocation ends in a traceback: it is accepted (reaches the sentinel) or refused;
* a refusal exits 2 with one line on stderr, in under a second, without loading any model;
* an accepted invocation carries only finite numbers.

A second, smaller test runs ``dormant calibrate`` for real on the tiny stories260k with random targets: exit 0 always
comes with a valid Thresholds artifact.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dormant.cli import build_parser, main

EXAMPLES = int(os.environ.get("DORMANT_FUZZ_EXAMPLES", "60"))  # per subcommand; more for a longer campaign
README = str(Path(__file__).parents[1] / "README.md")
HERE = str(Path(__file__).parent)
VALUES = ["0", "1", "-1", "2", "3", "0.5", "0.999", "1.0", "1.5", "-0.1", "nan", "inf", "-inf", "1e9", "1e-9", "abc",
          "", ",", "0,nan", "0.3,0.5", "1,2,4", "0,0.3,0.5", "x,y", "/nonexistent/x", README, HERE, "stories260k",
          "smollm2-135m", "resnet20", "lenet", "mnist", "paper", "intermediate", "uniform", "sensitivity", "lowrank",
          "ftbc", "none", "lru:pin=0.5", "lru:pin=abc", "window:k=-1", "rpi5-nvme", "fp16", "int4", "cpu", "cuda:x",
          "auto", "float32", "üñí", "1" * 40, "teal", "wina", "linear:wina:loss", "linear", "q_in", "gguf", "q4_0"]


class Reached(Exception):
    """The command passed every check and is about to run."""


RUNNERS = [
    ("dormant.llm.models", "load_model"),
    ("dormant.experiments.sparsity", "run_sparsity_sweep"),
    ("dormant.experiments.analysis", "run_analysis"),
    ("dormant.experiments.analysis", "run_account"),
    ("dormant.experiments.predictors", "fit_predictor"),
    ("dormant.experiments.predictors", "evaluate_predictors"),
    ("dormant.experiments.predictors", "run_predictability_study"),
    ("dormant.experiments.offload", "record_trace"),
    ("dormant.experiments.offload", "run_simulation"),
    ("dormant.experiments.offload", "storage_check"),
    ("dormant.experiments.snn", "run_snn_sweep"),
    ("dormant.experiments.snn_report", "run_report"),
    ("dormant.experiments.qcfs", "train_qcfs"),
    ("dormant.experiments.demo", "run_demo"),
    ("dormant.experiments.input_prediction", "run_input_prediction"),
    ("dormant.experiments.decode", "generate_text"),
    ("dormant.experiments.lm_eval", "check_tasks"),  # indexes lm-eval's task YAMLs: seconds
    ("dormant.experiments.lm_eval", "run_lm_eval"),
    ("dormant.experiments.lm_eval", "write_next_sentence_task"),
]


def _commands() -> dict[str, argparse.ArgumentParser]:
    """``{"snn sweep": parser, ...}`` for every leaf subcommand."""
    out = {}

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            out[" ".join(prefix)] = parser
            return
        for name, p in subs[0].choices.items():
            walk(p, [*prefix, name])

    walk(build_parser(), [])
    return out


COMMANDS = _commands()


def _flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.dest not in ("help", "verbose", "debug")]


@st.composite
def invocations(draw, command: str):
    actions = _flags(COMMANDS[command])
    chosen = draw(st.lists(st.sampled_from(actions), max_size=5, unique_by=lambda a: a.dest)) if actions else []
    argv = command.split()
    for a in chosen:
        if isinstance(a, argparse.BooleanOptionalAction):
            argv.append(draw(st.sampled_from([s for s in a.option_strings])))
            continue
        if a.nargs == 0:
            argv.append(a.option_strings[0])
            continue
        pool = VALUES + ([str(c) for c in a.choices] if a.choices else [])
        argv += [a.option_strings[0], draw(st.sampled_from(pool) | st.text(max_size=8))]
    return argv


@pytest.fixture
def sentinel(monkeypatch):
    import importlib

    def reached(*args, **kwargs):
        raise Reached

    for module, name in RUNNERS:
        monkeypatch.setattr(importlib.import_module(module), name, reached)


def _finite(x) -> bool:
    if isinstance(x, float):
        return math.isfinite(x)
    if isinstance(x, list | tuple):
        return all(_finite(v) for v in x)
    return True


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_cli_fuzz_never_tracebacks_and_refuses_fast(command, sentinel, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).parent)  # relative output paths never land in the checkout root

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(argv=invocations(command))
    def check(argv):
        capsys.readouterr()
        t0 = time.perf_counter()
        try:
            rc = main(argv)
        except Reached:
            ns = build_parser().parse_args(argv)
            assert all(_finite(v) for v in vars(ns).values()), argv
            return
        except SystemExit as e:  # argparse refused the flag itself
            rc = e.code
        seconds = time.perf_counter() - t0
        err = capsys.readouterr().err.strip()
        if command == "profiles" and rc == 0:
            return
        assert rc == 2, (argv, rc, err)
        assert len(err.splitlines()) == 1, (argv, err)
        # refused before any work: loading the smallest model or dataset takes several seconds; the bound leaves room
        # for a loaded 2-core machine after the heavy imports of earlier tests (1 s flaked there)
        assert seconds < 3.0, (argv, seconds)

    check()


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(target=st.sampled_from(["0", "0.1", "0.5", "0.95", "0.999999", "1", "-0.5", "nan", "inf", "0.3,0.7"]),
       site=st.sampled_from(["paper", "intermediate", "gate_act", "inputs"]))
def test_calibrate_exit_zero_means_a_valid_artifact(tmp_path_factory, target, site):
    from dormant.llm.thresholds import Thresholds

    out = tmp_path_factory.mktemp("cal") / "thr.safetensors"
    rc = main(["calibrate", "--model", "stories260k", "--calib-windows", "1", "--calib-seqlen", "64", "--seqlen",
               "64", "--site", site, "--sparsity", target, "--no-progress", "--out", str(out)])
    if rc != 0:
        assert rc == 2 and not out.exists()
        return
    thr = Thresholds.load(out)
    values = [float(v) for v in target.split(",")]
    assert thr.values.isfinite().all() and (thr.values >= 0).all()
    assert all(0 <= v < 1 for v in values) and len(values) in (1, thr.n_layers)
