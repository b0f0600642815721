"""``dormant lm-eval | lm-eval-task``: lm-evaluation-harness tasks on the model ``dormant eval`` measures, and a
local multiple-choice task to run offline. Flags map 1:1 onto :class:`~dormant.experiments.configs.LmEvalRunConfig`
(with :class:`~dormant.llm.configs.ModelConfig` and :class:`~dormant.experiments.configs.LmEvalConfig`) and
:class:`~dormant.experiments.configs.NextSentenceTaskConfig`."""

from __future__ import annotations

import argparse
import json

from dormant.cli.checks import check_artifact, model_facts
from dormant.config import add_config_args, config_from_args
from dormant.experiments.configs import LmEvalConfig, LmEvalRunConfig, NextSentenceTaskConfig
from dormant.llm.configs import ModelConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lm-eval", help="lm-eval (EleutherAI harness) task scores, dense or with thresholds")
    add_config_args(p, ModelConfig)
    add_config_args(p, LmEvalConfig)
    add_config_args(p, LmEvalRunConfig, skip=("model", "lm_eval"))
    p.set_defaults(handler=_lm_eval)

    p = sub.add_parser("lm-eval-task", help="write a local multiple-choice lm-eval task (which sentence comes next)")
    add_config_args(p, NextSentenceTaskConfig)
    p.set_defaults(handler=_lm_eval_task)


def _lm_eval(ns: argparse.Namespace) -> int:
    cfg = config_from_args(LmEvalRunConfig, ns, model=config_from_args(ModelConfig, ns),
                           lm_eval=config_from_args(LmEvalConfig, ns))
    model_facts(cfg.model)
    check_artifact(cfg.thresholds, "thresholds", "thresholds")

    from dormant.experiments import lm_eval as runs

    runs.require_lm_eval()
    runs.check_tasks(cfg.lm_eval)  # indexes lm-eval's task YAMLs (seconds), still before the model loads
    out = runs.run_lm_eval(cfg)

    from lm_eval.utils import make_table

    print(make_table(out))
    d = out["dormant"]
    print(f"-- {d['model']['id']} ({'thresholds ' + d['thresholds'] if d['thresholds'] else 'dense'}"
          f"{', sparse decode' if d['sparse_decode'] else ''}): load {d['load_seconds']:.1f} s, "
          f"lm-eval {d['eval_seconds']:.1f} s" + (f"; results: {cfg.out}" if cfg.out else ""))
    return 0


def _lm_eval_task(ns: argparse.Namespace) -> int:
    from dormant.experiments.lm_eval import write_next_sentence_task

    print(json.dumps(write_next_sentence_task(config_from_args(NextSentenceTaskConfig, ns)), indent=1))
    return 0
