"""Downstream-task scores of a sparsified model with EleutherAI's lm-evaluation-harness (``lm-eval``, arXiv 2405.14782).

The model is the one ``dormant eval`` measures: loaded by :func:`dormant.llm.models.load_model` (HF id, folder,
``.gguf``, alias), thresholds enforced by the hooks of :func:`dormant.llm.sparsify.sparsify_`, optionally 1-token
decode steps through the sparse kernels (:func:`dormant.llm.sparse_decode.enable_sparse_decode_`). lm-eval sees it
through its own ``HFLM`` wrapper (:class:`dormant.experiments.lm_eval_backend.DormantLM`), so tokenisation, batching
and scoring are lm-eval's: with no thresholds the scores equal those of lm-eval's ``hf`` backend.

* :func:`run_lm_eval` -- ``dormant lm-eval``: load, sparsify, score, write lm-eval's results JSON.
* :func:`evaluate_tasks` -- score a model already in memory as it is now (the sweep calls it inside ``sparsified``).
* :func:`register_backend` -- the name ``dormant`` in lm-eval's model registry, for
  ``lm_eval.simple_evaluate(model="dormant", model_args="pretrained=...,thresholds=...")``. lm-eval's own CLI
  (0.4.13) has no plugin or entry-point mechanism for models, so ``lm_eval --model dormant`` cannot find it.
* :func:`write_next_sentence_task` -- a local multiple-choice task (offline): the true next sentence of a text
  against sentences from elsewhere in it.

lm-eval is optional (``pip install 'dormant[eval]'``) and imported only when a score is asked for.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import random
import re
import time
from pathlib import Path
from typing import Any

from dormant.config import UsageError, UserError
from dormant.experiments.configs import LmEvalConfig, LmEvalRunConfig, NextSentenceTaskConfig

__all__ = ["LmEvalConfig", "LmEvalRunConfig", "NextSentenceTaskConfig", "require_lm_eval", "register_backend",
           "task_manager", "check_tasks", "evaluate_tasks", "run_lm_eval", "scores", "main_score",
           "write_next_sentence_task"]

INSTALL = "pip install 'dormant[eval]' (or pip install 'lm-eval>=0.4')"


def require_lm_eval():
    """The ``lm_eval`` module, or a :class:`~dormant.config.UserError` saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise UserError(f"lm-eval (EleutherAI lm-evaluation-harness) is not installed: {INSTALL}") from None
    return lm_eval


def register_backend() -> None:
    """Register the model name ``dormant`` in lm-eval's model registry (this process only; idempotent)."""
    require_lm_eval()
    import dormant.experiments.lm_eval_backend  # noqa: F401  (its class registers itself)


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None = None):
    """lm-eval's ``TaskManager`` over its own tasks and those under ``include_path`` (built once per path: it indexes
    some 15,000 task YAMLs, a few seconds)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def check_tasks(cfg: LmEvalConfig, flag: str = "--tasks"):
    """Refuse task names lm-eval does not know (before any model is loaded); returns the task manager."""
    tm = task_manager(cfg.include_path)
    unknown = [t for t in cfg.tasks if not tm.match_tasks([t]) and not os.path.isfile(t)]
    if unknown:
        where = f"lm-eval's tasks or {cfg.include_path}" if cfg.include_path else (
            f"lm-eval's tasks (a local task YAML needs {flag.replace('tasks', 'include-path')} DIR)")
        raise UsageError(f"{flag} {','.join(cfg.tasks)}: {', '.join(map(repr, unknown))} not found among {where}; "
                         "`lm-eval ls tasks` lists them")
    return tm


def scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval's ``results`` (the filter suffix ``,none`` dropped; stderrs kept as
    ``<metric>_stderr``; values that are not numbers, such as ``N/A`` stderrs, left out)."""
    out = {}
    for task, metrics in results["results"].items():
        row = {}
        for key, value in metrics.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            row[metric if filt == "none" else key] = float(value)
        out[task] = row
    return out


def main_score(metrics: dict[str, float]) -> tuple[str, float] | None:
    """The metric a table shows for a task: ``acc``, else ``acc_norm``, ``exact_match``, else the first one."""
    for name in ("acc", "acc_norm", "exact_match"):
        if name in metrics:
            return name, metrics[name]
    rest = [(k, v) for k, v in metrics.items() if not k.endswith("_stderr")]
    return rest[0] if rest else None


def _simple_evaluate(lm, cfg: LmEvalConfig, log_samples: bool = False) -> dict[str, Any]:
    import lm_eval

    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                                  task_manager=task_manager(cfg.include_path), log_samples=log_samples)
    out["seconds"] = time.perf_counter() - t0
    return out


def evaluate_tasks(model, tokenizer, cfg: LmEvalConfig, log_samples: bool = False) -> dict[str, Any]:
    """Score ``model`` as it is now (thresholds that hooks enforce stay enforced) on ``cfg.tasks``.

    Returns lm-eval's results dict (``results``, ``configs``, ``n-samples``, ...; ``samples`` with
    ``log_samples``) plus ``seconds``, the wall time. The tokenizer is copied (lm-eval sets a pad token on it).
    """
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    from dormant.experiments.lm_eval_backend import quiet_wrapping

    with quiet_wrapping():
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=cfg.batch_size)
    return _simple_evaluate(lm, cfg, log_samples)


def run_lm_eval(cfg: LmEvalRunConfig, log_samples: bool = False) -> dict[str, Any]:
    """``dormant lm-eval``: load the model, enforce ``cfg.thresholds``, score ``cfg.lm_eval.tasks``; write the
    results to ``cfg.out`` (JSON) when given. The results carry ``dormant``: the model, the thresholds' summary,
    load and evaluation wall times."""
    require_lm_eval()
    from dormant.artifacts import atomic_write_text
    from dormant.experiments.lm_eval_backend import DormantLM

    m = cfg.model
    t0 = time.perf_counter()
    lm = DormantLM(pretrained=m.model, device=m.device, dtype=m.dtype, online=m.online, device_map=m.device_map,
                   max_memory=m.max_memory, offload_folder=m.offload_folder, thresholds=cfg.thresholds,
                   sparse_decode=cfg.sparse_decode, batch_size=cfg.lm_eval.batch_size)
    load_seconds = time.perf_counter() - t0
    out = _simple_evaluate(lm, cfg.lm_eval, log_samples)
    out["dormant"] = {**lm.dormant, "load_seconds": round(load_seconds, 2), "eval_seconds": round(out["seconds"], 2),
                      "scores": scores(out)}
    if cfg.out:
        from lm_eval.utils import handle_non_serializable

        kept = {k: v for k, v in out.items() if k != "samples"}
        atomic_write_text(Path(cfg.out), json.dumps(kept, indent=1, default=handle_non_serializable))
    return out


# -- a local task: which sentence comes next? ---------------------------------------------------------------------
_DETOK = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" , ", ", "), (" . ", ". "), (" ; ", "; "), (" : ", ": "),
          (" 's ", "'s "), ("( ", "("), (" )", ")")]
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[\"A-Z])")


def _sentences(paragraph: str) -> list[str]:
    text = f" {paragraph.strip()} "
    for a, b in _DETOK:
        text = text.replace(a, b)
    text = re.sub(r"\s+([.!?,;:])(?=\s|$)", r"\1", text).strip()
    return [s.strip() for s in _SPLIT.split(text) if s.strip()]


def write_next_sentence_task(cfg: NextSentenceTaskConfig) -> dict[str, Any]:
    """Write ``<name>.jsonl`` and ``<name>.yaml`` to ``cfg.out``: a multiple-choice lm-eval task whose items are
    ``cfg.context`` consecutive sentences of a paragraph of ``cfg.data`` and, as choices, the sentence that follows
    them and ``cfg.choices - 1`` sentences of other paragraphs of similar length (2/3x to 3/2x its words; the true
    one's place is random). Scored by lm-eval's ``acc`` (sum of log-probabilities) and ``acc_norm`` (per byte).

    Sentences are split at ``. ! ?`` before a capital, WikiText's tokenisation (``@-@``, spaced commas) undone;
    sentences of fewer than 5 or more than 40 words, or with ``<unk>``, are left out. The YAML names the JSONL by
    its absolute path (move both together by writing them again). Returns what was written.
    """
    from dormant.artifacts import atomic_write_text
    from dormant.llm.text import load_text

    paragraphs = [p for p in load_text(cfg.data).split("\n") if p.strip() and not p.strip().startswith("=")]
    sents = [[s for s in _sentences(p) if 5 <= len(s.split()) <= 40 and "<unk>" not in s] for p in paragraphs]
    pool = [(i, s) for i, ss in enumerate(sents) for s in ss]
    starts = [(i, j) for i, ss in enumerate(sents) for j in range(len(ss) - cfg.context)]
    rng = random.Random(cfg.seed)
    rng.shuffle(starts)
    items = []
    for i, j in starts:
        if len(items) == cfg.items:
            break
        answer = sents[i][j + cfg.context]
        n = len(answer.split())
        near = [s for k, s in pool if k != i and 2 * n <= 3 * len(s.split()) <= 4.5 * n]
        if len(near) < cfg.choices - 1:
            continue
        choices = rng.sample(near, cfg.choices - 1)
        label = rng.randrange(cfg.choices)
        choices.insert(label, answer)
        items.append({"context": " ".join(sents[i][j: j + cfg.context]), "choices": choices, "label": label,
                      "paragraph": i})
    if len(items) < cfg.items:
        raise UsageError(f"--items {cfg.items}: {cfg.data} yields only {len(items)} items of {cfg.context} context "
                         "sentences and a next one")
    folder = Path(cfg.out)
    folder.mkdir(parents=True, exist_ok=True)
    data = (folder / f"{cfg.name}.jsonl").resolve()
    atomic_write_text(data, "".join(json.dumps(it) + "\n" for it in items))
    yaml = "\n".join([
        f"# dormant lm-eval-task: {cfg.items} items from {cfg.data}, {cfg.choices} choices, {cfg.context} context "
        f"sentences, seed {cfg.seed}",
        f"task: {cfg.name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data))}",
        "test_split: test",
        "output_type: multiple_choice",
        'doc_to_text: "{{context}}"',
        'doc_to_choice: "{{choices}}"',
        'doc_to_target: "{{label}}"',
        'target_delimiter: " "',
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
        "",
    ])
    atomic_write_text(folder / f"{cfg.name}.yaml", yaml)
    return {"task": cfg.name, "yaml": str(folder / f"{cfg.name}.yaml"), "data": str(data), "items": len(items),
            "chance": 1 / cfg.choices}
