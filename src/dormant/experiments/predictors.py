"""The runs behind ``dormant predictor fit|eval``, ``dormant predictability`` and the predictor demo.

* :func:`fit_predictor`: pairs from calibration text (collected once, reused) -> train -> save the
  predictor and a JSON record with its held-out scores and cost. Per-layer predictors checkpoint after
  every layer (``<out>.partial``), so an interrupted fit resumes. ``init`` re-chooses only the decision
  thresholds of a saved predictor for another recall target or density budget (no retraining).
* :func:`evaluate_predictors`: on evaluation text, the dense and the oracle-thresholded perplexity;
  every predictor watched in the oracle pass (open loop: recall, precision, ... against the oracle
  masks, and optionally the aligned predicted/oracle traces); then one closed-loop pass per predictor
  with its masks applied (perplexity). Each finished unit is appended to ``results.jsonl`` and
  skipped on a rerun (predictors can be added later); ``report.md``, ``results.csv``,
  ``per_layer.csv`` and plots are rewritten. With ``heldout_pairs`` the same is measured on the
  held-out calibration windows of a pair store -- the place to select hyperparameters (e.g. the
  guard size) by perplexity.
* :func:`run_predictability_study`: the perturbation study of :mod:`~dormant.llm.predictors.predictability`
  on a loaded model (resumable), with its report.
* :func:`run_predictor_demo`: a ~2-minute end-to-end run on SmolLM2-135M.

Pair stores split calibration text into train | select | heldout windows: hyperparameters, decision thresholds
and early stopping are chosen on ``select``; the scores a fit reports as held-out come from ``heldout``, which
chooses nothing; the evaluation text is only ever scored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dormant.artifacts import ArtifactError, atomic_write_text
from dormant.experiments.configs import FitRunConfig, PairsConfig, PredictabilityConfig, PredictorEvalConfig
from dormant.experiments.ledger import Ledger, config_key
from dormant.llm.predictors.base import Predictor, evaluate_on_store
from dormant.llm.predictors.data import PairStore, collect_pairs, tensor_sha
from dormant.llm.predictors.predictability import (
    METRICS,
    active_masks,
    independent_baseline,
    layer_metrics,
    perturb,
    perturbation_plan,
)
from dormant.llm.predictors.registry import load_predictor, predictor_class

log = logging.getLogger(__name__)

__all__ = ["PairsConfig", "FitRunConfig", "PredictorEvalConfig", "PredictabilityConfig", "open_or_collect_pairs",
           "fit_predictor", "evaluate_predictors", "evaluate_loaded", "write_eval_report", "run_predictability",
           "run_predictability_study", "write_predictability_report", "run_predictor_demo"]


def _sha(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _thresholds_sha(thr) -> str:
    return tensor_sha(thr.values)


def open_or_collect_pairs(model_cfg, pairs_cfg: PairsConfig, thresholds_path: str, progress: bool = True,
                          loaded: tuple | None = None) -> PairStore:
    """The pair store of ``pairs_cfg``: opened if it exists (and matches the thresholds), else collected.

    Args:
        model_cfg: :class:`dormant.llm.models.ModelConfig` (loaded only when collecting).
        loaded: optional ``(model, tokenizer, info)`` already loaded (and not sparsified).
    """
    from dormant.llm.thresholds import Thresholds

    thr = Thresholds.load(thresholds_path)
    root = Path(pairs_cfg.pairs)
    if (root / "pairs.json").is_file():
        store = PairStore.open(root)
        theirs = (store.meta.get("thresholds") or {}).get("values_sha")
        if theirs != _thresholds_sha(thr):
            raise ArtifactError(f"{root} was collected under other thresholds than {thresholds_path}; use another --pairs")
        return store
    if pairs_cfg.train_data == "wikitext2-test":
        log.warning("collecting predictor training pairs from the evaluation text (wikitext2-test): not held-out")
    from dormant.llm.models import load_model
    from dormant.llm.sparsify import sparsified
    from dormant.llm.text import load_text, make_windows

    model, tok, info = loaded or load_model(model_cfg)
    cal = make_windows(tok, load_text(pairs_cfg.train_data), pairs_cfg.train_seqlen, pairs_cfg.train_windows,
                       source=pairs_cfg.train_data)
    if len(cal.ids) <= pairs_cfg.select_windows + pairs_cfg.heldout_windows:
        raise ValueError(f"{len(cal.ids)} calibration windows leave none for training after "
                         f"{pairs_cfg.select_windows} selection and {pairs_cfg.heldout_windows} held-out ones")
    with sparsified(model, thr, info["id"]):
        return collect_pairs(model, cal.ids, root, pairs_cfg.select_windows, pairs_cfg.heldout_windows, info["id"],
                             cal.describe(), progress)


def _per_layer_fit(p: Predictor) -> bool:
    return not (p.name == "early_layer" and p.config.mode == "nearest")


def fit_predictor(model_cfg, pairs_cfg: PairsConfig, run: FitRunConfig, kind_cfg: Any,
                  loaded: tuple | None = None) -> dict[str, Any]:
    """Train (or re-threshold) one predictor; returns the JSON record also written to ``<out>.json``.

    Args:
        model_cfg: :class:`dormant.llm.models.ModelConfig`.
        kind_cfg: the ``Config`` dataclass of ``run.kind`` (e.g. :class:`LowRankConfig`).
        loaded: optional already loaded ``(model, tokenizer, info)`` for collecting pairs.
    """

    if run.thresholds is None:
        raise ValueError("predictor fit needs --thresholds (the active neurons are defined by them)")
    predictor_class(run.kind)  # an unknown kind fails before any work
    store = open_or_collect_pairs(model_cfg, pairs_cfg, run.thresholds, run.progress, loaded)
    out = Path(run.out)
    t0 = time.perf_counter()
    if run.init:
        pred = load_predictor(run.init)
        if pred.name != run.kind:
            raise ValueError(f"--init holds a {pred.name!r} predictor, not {run.kind!r}")
        recall, ratio = kind_cfg.recall, kind_cfg.density_ratio
        pred.config = dataclasses.replace(pred.config, recall=recall, density_ratio=ratio)
        pred.choose_taus(store, recall, ratio, progress=run.progress)
        pred.info["retargeted_from"] = {"path": str(run.init), "recall": recall, "density_ratio": ratio}
    else:
        pred = _fit_resumably(store, run, kind_cfg, out)
        pred.info["fit"]["seconds_total"] = time.perf_counter() - t0
    if run.guard is not None:
        from dormant.llm.adapters import ffn_layout
        from dormant.llm.models import load_model
        from dormant.llm.predictors.base import guard_neurons

        model = (loaded or load_model(model_cfg))[0]
        pred.guard = guard_neurons(ffn_layout(model), run.guard) if run.guard > 0 else None
        pred.info["guard"] = {"k": run.guard, "rule": "top-k of ||W_gate[i]|| * ||W_up[i]|| per layer"}
    pred.info["pairs"] = {"root": str(store.root), **{f"{split}_tokens": store.n_tokens(split)
                                                        for split in ("train", "select", "heldout")}}
    pred.save(out)
    if not run.init:  # the finished predictor holds every layer's fit record: the resume state can go
        for suffix in (".partial", ".fit.jsonl", ".fit.config.json"):
            out.with_name(out.name + suffix).unlink(missing_ok=True)
    # "select" chose tau and the early stop, so its scores are optimistic; "heldout" chose nothing.
    select = evaluate_on_store(pred, store, "select").summary()
    heldout = evaluate_on_store(pred, store, "heldout").summary() if store.n_windows("heldout") else None
    if heldout is None:
        log.warning("%s has no held-out windows (a store from before the selection split): no held-out scores",
                    store.root)
    record = {"predictor": pred.describe(), "path": str(out), "heldout": heldout, "select": select,
              "pairs": pred.info["pairs"], "fit": pred.info.get("fit"), "seconds": time.perf_counter() - t0}
    atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=1))
    o = (heldout or select)["overall"]
    log.info("%s: %s recall %.4f precision %.3f predicted density %.3f (true %.3f)", run.kind,
             "held-out" if heldout else "selection-split", o["recall"], o["precision"], o["pred_density"],
             o["true_density"])
    return record


def _fit_resumably(store: PairStore, run: FitRunConfig, kind_cfg: Any, out: Path) -> Predictor:
    """Fit ``run.kind`` on ``store``; per-layer predictors record every finished layer in a ledger
    (``<out>.fit.jsonl``) after saving the partial predictor (``<out>.partial``), so a killed fit resumes with the
    layers both hold. The ledger key is the predictor's kind and hyperparameters and the pair store's key."""
    from tqdm.auto import tqdm

    cls = predictor_class(run.kind)
    pred = cls.for_store(store, kind_cfg)
    if not _per_layer_fit(pred):
        pred.fit(store, progress=run.progress)
        return pred
    key_cfg = {"kind": run.kind, "config": dataclasses.asdict(kind_cfg), "pairs": store.meta.get("key")}
    ledger = Ledger(out.with_name(out.name + ".fit.jsonl"), config_key(key_cfg), key_cfg, what="predictor fit")
    partial = out.with_name(out.name + ".partial")
    recorded = {r["layer"] for r in ledger.records}
    if recorded:
        try:
            old = load_predictor(partial)
        except ArtifactError as e:
            log.warning("%s records %d finished layers but %s is unreadable (%s); fitting from scratch",
                        ledger.path, len(recorded), partial, e)
            recorded = set()
        else:
            if recorded <= set(old.predicted_layers()):
                pred = old
                log.info("resuming %s from %s (%d layers done)", run.kind, partial, len(recorded))
            else:
                recorded = set()
    todo = [layer for layer in range(pred.n_layers) if layer not in recorded]
    for layer in tqdm(todo, desc=f"fit {run.kind}", unit="layer", disable=not run.progress):
        pred.fit(store, progress=False, layers=[layer])
        pred.save(partial)  # the state first, then the record: a recorded layer is always in the partial
        ledger.append({"layer": layer, "fit": pred.info["fit"]["per_layer"].get(str(layer))})
    return pred


# -- evaluation ------------------------------------------------------------------------------------
def _names(paths: list[str]) -> list[str]:
    names = []
    for p in paths:
        n = Path(p).name.removesuffix(".safetensors")
        while n in names:
            n += "_"
        names.append(n)
    return names


def evaluate_loaded(
    model, info: dict[str, Any], windows, thresholds, predictors: dict[str, Predictor], out: Path,
    dense: bool = True, closed_loop: bool = True, save_traces: bool = False, progress: bool = True,
    key: str = "", batch_size: int = 1, fingerprints: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate ``predictors`` on a loaded (dense) model; resumable and incremental via ``out/results.jsonl``.

    Units: ``dense`` (perplexity), ``oracle`` (thresholded perplexity; every predictor not yet scored is
    watched in the same pass, open loop), ``open_loop`` (a later pass for predictors added afterwards)
    and ``closed_loop`` per predictor. A predictor is identified by its name and ``fingerprints[name]``
    (e.g. the file hash); a name already scored with another fingerprint is an error.

    Args:
        windows: :class:`dormant.llm.text.Windows` of evaluation text.
        thresholds: the :class:`~dormant.llm.thresholds.Thresholds` defining the oracle masks.
        predictors: ``{name: predictor}``.
        key: identity of model, text and thresholds; records of another key in ``out`` are an error.
    """
    from dormant.llm.adapters import ffn_layout
    from dormant.llm.evaluate import perplexity
    from dormant.llm.predictors.apply import model_meta, observe_predictions, predicted_masks
    from dormant.llm.sparsify import is_sparsified, measure_sparsity, sparsified

    ledger = Ledger(out / "results.jsonl", key, {"model": info["id"], "eval": windows.describe(),
                                                  "thresholds": thresholds.summary()},
                    what="predictor evaluation")
    if is_sparsified(model):
        raise ValueError("evaluate_loaded needs the dense model (it applies the thresholds itself)")
    path, old = ledger.path, ledger.records
    fingerprints = fingerprints or {}
    known: dict[str, str | None] = {}
    for r in old:
        known.update(r.get("fingerprints", {}))
    for n in predictors:
        if n in known and known[n] != fingerprints.get(n):
            raise ArtifactError(f"{path}: a different predictor named {n!r} was already scored here; rename it")
    done = {(r["unit"], r.get("name")) for r in old}
    scored = {n for r in old for n in r.get("open_loop", {})}
    base = {"model": info, "eval": windows.describe(), "thresholds": thresholds.summary()}
    ids = windows.ids
    if dense and ("dense", None) not in done:
        r = perplexity(model, ids, batch_size, progress=progress)
        ledger.append({**base, "unit": "dense", "name": None, **r.to_dict()})
    with sparsified(model, thresholds, info["id"]):
        todo = {n: p for n, p in predictors.items() if n not in scored}
        if ("oracle", None) not in done or todo:
            with contextlib.ExitStack() as stack:
                meter = stack.enter_context(measure_sparsity(model))
                have_oracle = (out / "traces" / "oracle.safetensors").is_file()
                runs = {n: stack.enter_context(observe_predictions(
                    model, p, record=ids.numel() if save_traces else 0, record_true=i == 0 and not have_oracle))
                    for i, (n, p) in enumerate(todo.items())}
                r = perplexity(model, ids, batch_size, progress=progress)
            traces = {}
            if save_traces and runs:
                tdir = out / "traces"
                meta = model_meta(model, ffn_layout(model), info["id"])
                src = {"text": windows.describe(), "thresholds": thresholds.summary()}
                for n, run in runs.items():
                    pred_t, true_t = run.traces(meta, src)
                    pred_t.save(tdir / f"{n}.predicted.safetensors")
                    if true_t is not None:
                        true_t.save(tdir / "oracle.safetensors")
                    traces[n] = {"predicted": str(tdir / f"{n}.predicted.safetensors"),
                                 "oracle": str(tdir / "oracle.safetensors")}
            unit = "oracle" if ("oracle", None) not in done else "open_loop"
            ledger.append({**base, "unit": unit, "name": None, **r.to_dict(),
                           "neuron_sparsity": meter.summary()["neuron"],
                           "open_loop": {n: run.summary() for n, run in runs.items()},
                           "cost": {n: p.cost().summary() for n, p in todo.items()},
                           "describe": {n: p.describe() for n, p in todo.items()},
                           "fingerprints": {n: fingerprints.get(n) for n in todo}, "traces": traces})
        for n, p in predictors.items():
            if not closed_loop or ("closed_loop", n) in done:
                continue
            with predicted_masks(model, p) as run:
                r = perplexity(model, ids, batch_size, progress=progress)
            ledger.append({**base, "unit": "closed_loop", "name": n, **r.to_dict(), "closed_loop": run.summary(),
                           "fingerprints": {n: fingerprints.get(n)}})
    write_eval_report(out, ledger.records)
    return ledger.records


def evaluate_predictors(model_cfg, eval_cfg, cfg: PredictorEvalConfig) -> list[dict[str, Any]]:
    """Load the model, thresholds and predictors, and run :func:`evaluate_loaded` (resumable, incremental)."""
    from dormant.llm.models import load_model
    from dormant.llm.text import load_eval_windows
    from dormant.llm.thresholds import Thresholds

    if cfg.thresholds is None:
        raise ValueError("predictor eval needs --thresholds (the oracle masks are defined by them)")
    names = _names(cfg.predictors)
    preds = {n: load_predictor(p) for n, p in zip(names, cfg.predictors)}
    thr = Thresholds.load(cfg.thresholds)
    for n, p in preds.items():
        theirs = (p.info.get("thresholds") or {}).get("values_sha")
        if theirs and theirs != _thresholds_sha(thr):
            raise ArtifactError(f"predictor {n} was trained under other thresholds than {cfg.thresholds}")
    key_d = {"model": model_cfg.model, "dtype": model_cfg.dtype, "eval": dataclasses.asdict(eval_cfg),
             "thresholds": _sha(cfg.thresholds)}
    key_d["eval"].pop("batch_size")
    if cfg.select_pairs:
        store = PairStore.open(cfg.select_pairs)
        key_d["eval"] = {"select_pairs": store.meta["key"]}
    key = config_key(key_d)
    model, tok, info = load_model(model_cfg)
    if cfg.select_pairs:
        from dormant.llm.text import Windows

        text = store.meta.get("text", {})
        windows = Windows(store.token_ids("select"), bool(text.get("bos", False)),
                          f"{text.get('source')} (selection windows of {cfg.select_pairs})")
    else:
        windows = load_eval_windows(tok, eval_cfg)
    return evaluate_loaded(model, info, windows, thr, preds, Path(cfg.out), cfg.dense, cfg.closed_loop,
                           cfg.save_traces, cfg.progress, key, eval_cfg.batch_size,
                           {n: _sha(p) for n, p in zip(names, cfg.predictors)})


_TABLE = ("recall", "precision", "f1", "jaccard", "pred_density", "true_density", "density_ratio", "mass_recall")


def write_eval_report(out: Path, records: list[dict[str, Any]]) -> Path:
    """``report.md``, ``results.csv``, ``per_layer.csv``, ``per_layer.png`` from evaluation records."""
    from dormant.report import markdown_table, new_figure, save_figure, write_csv, write_markdown

    dense = next((r for r in records if r["unit"] == "dense"), None)
    oracle = next((r for r in records if r["unit"] == "oracle"), None)
    closed = {r["name"]: r for r in records if r["unit"] == "closed_loop"}
    if oracle:  # merge predictors scored in later open-loop passes
        oracle = {**oracle, **{k: dict(oracle.get(k, {})) for k in ("open_loop", "cost", "traces")}}
        for r in records:
            if r["unit"] == "open_loop":
                for k in ("open_loop", "cost", "traces"):
                    oracle[k].update(r.get(k, {}))
    first = records[0]
    ev = first["eval"]
    text = [f"# Active-neuron predictors: {first['model']['id']}\n",
            f"- evaluation text: {ev['windows']} windows x {ev['seqlen']} tokens of {ev['source']} "
            f"(BOS per window: {ev['bos']}); device {first['model']['device']}, dtype {first['model']['dtype']}",
            f"- thresholds: site {first['thresholds']['site']}, target {first['thresholds']['mean_target']:.2f}, "
            f"calibrated on {first['thresholds']['calibration'].get('source')}\n"]
    rows_ppl = []
    if dense:
        rows_ppl.append(["dense", dense["ppl"], "", ""])
    if oracle:
        rows_ppl.append(["oracle thresholds", oracle["ppl"], _pct(oracle, dense), ""])
    for n, r in closed.items():
        rows_ppl.append([f"predicted: {n}", r["ppl"], _pct(r, dense), _pct(r, oracle)])
    text += ["## Perplexity (closed loop: predicted-inactive neurons skipped, thresholds still applied)\n",
             markdown_table(["model", "perplexity", "vs dense", "vs oracle"], rows_ppl)]
    csv_rows = []
    if oracle and oracle.get("open_loop"):
        text += ["## Predicted vs oracle masks (open loop, pooled over tokens and layers)\n",
                 "Every predictor reads the oracle-thresholded model's tensors, so all are scored on identical "
                 "inputs. Unpredicted layers count as all-active. mass_recall = share of sum |MID| (thresholded) "
                 "on predicted neurons.\n"]
        rows = []
        for n, s in oracle["open_loop"].items():
            o, c = s["overall"], oracle["cost"][n]
            cl = closed.get(n, {}).get("closed_loop", {}).get("overall", {})
            rows.append([n, *[o[k] for k in _TABLE], cl.get("recall", float("nan")), c["param_pct_of_ffn_bytes"],
                         c["read_pct_of_ffn_bytes"], c["flops_pct_of_ffn"], closed.get(n, {}).get("ppl", float("nan"))])
            csv_rows.append({"predictor": n, **{k: o[k] for k in _TABLE}, "closed_loop_recall": cl.get("recall"),
                             **c, "ppl": closed.get(n, {}).get("ppl"), "ppl_oracle": oracle["ppl"],
                             "ppl_dense": dense["ppl"] if dense else None})
        text.append(markdown_table(["predictor", *_TABLE, "recall (closed loop)", "params % FFN bytes",
                                    "read/token % FFN bytes", "FLOPs % FFN", "perplexity"], rows))
        text.append("Cost: predictor state at 2 bytes per parameter (bit-packed patterns at 1 bit) vs all FFN weights "
                    "(gate, up, down) at 2 bytes; FLOPs per token vs the dense FFN.\n")
        if oracle.get("traces"):
            text.append("Traces (open loop, token-aligned): " + ", ".join(
                f"{n}: `{t['predicted']}`" for n, t in oracle["traces"].items())
                + f"; oracle: `{next(iter(oracle['traces'].values()))['oracle']}`\n")
        text.append("![per layer](per_layer.png)\n")
        write_csv(out / "results.csv", csv_rows)
        per_layer = []
        for n, s in oracle["open_loop"].items():
            for layer in range(len(s["per_layer"]["recall"])):
                per_layer.append({"predictor": n, "layer": layer, **{k: s["per_layer"][k][layer] for k in _TABLE}})
        write_csv(out / "per_layer.csv", per_layer)
        fig, ax = new_figure(1, 3, size=(4.5, 3.5))
        for n, s in oracle["open_loop"].items():
            pl = s["per_layer"]
            ax[0, 0].plot(pl["recall"], "o-", ms=3, label=n)
            ax[0, 1].plot(pl["precision"], "o-", ms=3, label=n)
            ax[0, 2].plot(pl["pred_density"], "o-", ms=3, label=n)
        first_s = next(iter(oracle["open_loop"].values()))["per_layer"]
        ax[0, 2].plot(first_s["true_density"], "k--", label="true density")
        ax[0, 2].plot([1.3 * d for d in first_s["true_density"]], "k:", label="1.3x true")
        for a, t in zip(ax[0], ("recall", "precision", "predicted density")):
            a.set(xlabel="layer", title=t)
            a.grid(alpha=0.3)
        ax[0, 2].legend(fontsize=7)
        save_figure(fig, out / "per_layer.png")
    write_markdown(out / "report.md", "\n".join(text))
    return out / "report.md"


def _pct(r: dict | None, ref: dict | None) -> str:
    return "" if not r or not ref else f"{100 * (r['ppl'] / ref['ppl'] - 1):+.2f}%"


# -- predictability ----------------------------------------------------------------------------------
def run_predictability(
    model: nn.Module, windows, pool: np.ndarray, cfg: PredictabilityConfig, meta: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Run (or resume) the study on the (thresholded) ``model``; returns all records.

    Args:
        windows: :class:`dormant.llm.text.Windows` with at least ``cfg.samples`` windows.
        pool: the token stream replacements are drawn from.
        meta: run description stored in every record (model, thresholds, text).
    """
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    key_cfg = {"cfg": {k: v for k, v in asdict(cfg).items() if k not in ("out", "progress")}, "meta": meta or {}}
    ledger = Ledger(out / "records.jsonl", config_key(key_cfg), key_cfg, what="predictability study")
    done = {(r["kind"], r["sample"]) for r in ledger.records}
    ids = windows.ids[: cfg.samples]
    if len(ids) < cfg.samples:
        raise ValueError(f"only {len(ids)} windows available for {cfg.samples} samples")
    prev: torch.Tensor | None = None
    for j in tqdm(range(cfg.samples), desc="predictability", unit="text", disable=not cfg.progress):
        need_var = ("variant", j) not in done
        need_unrel = j > 0 and ("unrelated", j - 1) not in done
        if not (need_var or need_unrel):
            prev = None
            continue
        t0 = time.perf_counter()
        a = active_masks(model, ids[j])
        if need_unrel:
            if prev is None:
                prev = active_masks(model, ids[j - 1])
            m = layer_metrics(prev, a, None)
            indep = [independent_baseline(p, q) for p, q in zip(m["density_a"], m["density_b"])]
            m.update({f"indep_{k}": [d[k] for d in indep] for k in ("jaccard", "recall", "hamming")})
            ledger.append({"kind": "unrelated", "sample": j - 1, "other": j, "metrics": m})
        if need_var:
            order, repl = perturbation_plan(ids[j], pool, cfg.seed, j, windows.bos)
            per_sim = {}
            for s in cfg.similarities:
                v, changed = perturb(ids[j], order, repl, s)
                per_sim[f"{s:g}"] = {"replaced": int(changed.sum()), **layer_metrics(a, active_masks(model, v), ~changed)}
            ledger.append({"kind": "variant", "sample": j, "metrics": per_sim, "seconds": time.perf_counter() - t0})
        prev = a
    write_predictability_report(out, ledger.records, cfg, meta or {})
    return ledger.records


def summarize(records: list[dict[str, Any]], similarities: list[float]) -> dict[str, dict[str, np.ndarray]]:
    """``{row: {metric: [mean over samples per layer], metric+'_std': ...}}``; rows are similarities,
    ``unrelated`` and ``independent``."""
    rows: dict[str, dict[str, np.ndarray]] = {}
    var = [r for r in records if r["kind"] == "variant"]
    for s in similarities:
        k = f"{s:g}"
        vals = [r["metrics"][k] for r in var if k in r["metrics"]]
        if vals:
            rows[k] = {m: np.nanmean([v[m] for v in vals], 0) for m in METRICS}
            rows[k].update({f"{m}_std": np.nanstd([v[m] for v in vals], 0) for m in METRICS})
    un = [r["metrics"] for r in records if r["kind"] == "unrelated"]
    if un:
        rows["unrelated"] = {m: np.mean([v[m] for v in un], 0) for m in ("jaccard", "recall", "hamming", "exact")}
        rows["independent"] = {m: np.mean([v[f"indep_{m}"] for v in un], 0) for m in ("jaccard", "recall", "hamming")}
    return rows


def write_predictability_report(out: Path, records: list[dict[str, Any]], cfg: PredictabilityConfig, meta: dict) -> Path:
    """``predictability.csv``, ``report.md`` and ``heatmap_<metric>.png`` from the records."""
    from dormant.report import markdown_table, new_figure, save_figure, write_csv, write_markdown

    rows = summarize(records, cfg.similarities)
    if not rows:
        raise ValueError("no predictability records")
    n_layers = len(next(iter(rows.values()))["jaccard"])
    write_csv(out / "predictability.csv", [[name, layer, *(f"{r[m][layer]:.6f}" if m in r else "" for m in METRICS)]
                                           for name, r in rows.items() for layer in range(n_layers)],
              ["comparison", "layer", *METRICS])
    shown = sorted({0, 1, min(9, n_layers - 1), min(19, n_layers - 1), n_layers - 1})
    n_var = len({r["sample"] for r in records if r["kind"] == "variant"})
    n_un = len([r for r in records if r["kind"] == "unrelated"])
    text = [
        "# Predictability of active-neuron patterns under input perturbation\n",
        f"- model: {meta.get('model', {}).get('id')}; thresholds: {meta.get('thresholds')}",
        f"- texts: {n_var} windows of {meta.get('text', {}).get('seqlen')} tokens of {meta.get('text', {}).get('source')}; "
        f"perturbation seed {cfg.seed}; unrelated-text pairs: {n_un}",
        "- edit: a seeded random set of exactly round((1-s)*n) token positions (never an added BOS) gets tokens "
        "drawn from the text's unigram distribution (never the original token); lower similarities contain the "
        "edits of higher ones. Metrics are per-token means over all positions (module docstring of "
        "`dormant.llm.predictors.predictability`). Layers are 0-indexed.\n",
    ]
    for m, title in (("jaccard", "Jaccard of active sets"), ("recall", "recall of the original active set"),
                     ("hamming", "Hamming agreement"), ("jaccard_unchanged", "Jaccard on unchanged positions"),
                     ("exact", "exact pattern match (fraction of positions)")):
        hdr = ["comparison", *[f"L{layer}" for layer in shown], "mean over layers"]
        body = []
        for name, r in rows.items():
            if m not in r:
                continue
            label = f"{float(name):.0%} similar" if name not in ("unrelated", "independent") else name
            body.append([label, *[float(r[m][layer]) for layer in shown], float(np.nanmean(r[m]))])
        text += [f"## {title}\n", markdown_table(hdr, body), f"![{m}](heatmap_{m}.png)\n"]
    write_markdown(out / "report.md", "\n".join(text))
    for m in ("jaccard", "recall", "hamming", "jaccard_unchanged", "exact"):
        names = [n for n, r in rows.items() if m in r]
        mat = np.stack([rows[n][m] for n in names])
        fig, ax = new_figure(1, 1, size=(min(14, max(6, 2 + 0.4 * n_layers)), 0.45 * len(names) + 1.5))
        im = ax[0, 0].imshow(mat, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax[0, 0].set_yticks(range(len(names)), [f"{float(n):.0%}" if n not in ("unrelated", "independent") else n
                                                for n in names])
        ax[0, 0].set(xlabel="layer", title=f"{m}: original vs perturbed copy, and baselines")
        for i in range(mat.shape[0]):
            for layer in range(mat.shape[1]):
                if n_layers <= 32 and not math.isnan(mat[i, layer]):
                    ax[0, 0].text(layer, i, f"{mat[i, layer]:.2f}"[1:] if mat[i, layer] < 1 else "1",
                                  ha="center", va="center", fontsize=6, color="w" if mat[i, layer] < 0.6 else "k")
        fig.colorbar(im, ax=ax[0, 0])
        save_figure(fig, out / f"heatmap_{m}.png")
    return out / "report.md"


def run_predictability_study(model_cfg, eval_cfg, thresholds: str | None, cfg: PredictabilityConfig,
                             loaded: tuple | None = None) -> Path:
    """Load model (or use ``loaded``), apply ``thresholds`` and run the study on ``eval_cfg``'s text."""
    from dormant.llm.models import load_model
    from dormant.llm.sparsify import sparsified
    from dormant.llm.text import load_text, make_windows
    from dormant.llm.thresholds import Thresholds

    thr = Thresholds.load(thresholds) if thresholds else None
    model, tok, info = loaded or load_model(model_cfg)
    text = load_text(eval_cfg.data)
    windows = make_windows(tok, text, eval_cfg.seqlen, cfg.samples, bos=eval_cfg.bos, source=eval_cfg.data)
    pool = np.asarray(tok(text, add_special_tokens=False).input_ids, dtype=np.int64)
    meta: dict[str, Any] = {"model": {"id": info["id"], "dtype": info["dtype"]}, "text": windows.describe(),
                            "thresholds": None}
    if thr is not None:
        meta["thresholds"] = {"site": thr.site, "mean_target": float(thr.targets.mean()), "sha": _thresholds_sha(thr)}
    with sparsified(model, thr, info["id"]):
        run_predictability(model, windows, pool, cfg, meta)
    return Path(cfg.out) / "report.md"


# -- demo --------------------------------------------------------------------------------------------
def run_predictor_demo(out: str | Path = "runs/demo/predictors", seqlen: int = 512, eval_windows: int = 2,
                       progress: bool = True, model: str = "smollm2-135m") -> Path:
    """A short predictor run on SmolLM2-135M (~2 minutes on 2 CPU cores); returns the report path.

    Calibrates 50% ``intermediate`` thresholds on 4 WikiText-2 validation windows, collects pairs from 8
    more (4 for training, 2 for selection, 2 held out), builds the static hot-neuron mask (``cluster`` k = 1) with and without the
    4-neuron guard (:func:`~dormant.llm.predictors.base.guard_neurons`) and trains a rank-32 ``lowrank``
    predictor with the guard, and scores them on ``eval_windows`` test windows (open-loop metrics,
    perplexity dense / oracle / predicted). Every step resumes from its files.
    """
    from dormant.llm.calibration import calibrate
    from dormant.llm.configs import CalibrationConfig, EvalConfig, ModelConfig
    from dormant.llm.models import load_model
    from dormant.llm.predictors.cluster import ClusterConfig
    from dormant.llm.predictors.lowrank import LowRankConfig
    from dormant.llm.sparsify import sparsified
    from dormant.llm.text import load_eval_windows, load_text, make_windows
    from dormant.llm.thresholds import Thresholds

    out = Path(out)
    model_cfg = ModelConfig(model)
    loaded = load_model(model_cfg)
    model, tok, info = loaded
    thr_path = out / "thresholds.safetensors"
    valid = load_text("wikitext2-valid")
    if not thr_path.is_file():
        cal = make_windows(tok, valid, seqlen, 4, source="wikitext2-valid")
        calibrate(model, cal.ids, CalibrationConfig("intermediate", [0.5], progress=progress), model_id=info["id"],
                  data=cal.describe()).save(thr_path)
    pairs = PairsConfig(pairs=str(out / "pairs"), train_windows=8, train_seqlen=seqlen, select_windows=2,
                        heldout_windows=2)
    # The pair windows are the 8 validation windows after the 4 calibration ones.
    if not (out / "pairs" / "pairs.json").is_file():
        w = make_windows(tok, valid, seqlen, 8, skip=4, source="wikitext2-valid")
        with sparsified(model, Thresholds.load(thr_path), info["id"]):
            collect_pairs(model, w.ids, out / "pairs", 2, 2, info["id"], w.describe(), progress)
    preds = {}
    for name, kind, cfg, init, guard in (
        ("static_k1", "cluster", ClusterConfig(k=1, epochs=1), None, None),
        ("static_k1_guard4", "cluster", ClusterConfig(k=1, epochs=1), out / "static_k1.safetensors", 4),
        ("lowrank_r32_guard4", "lowrank", LowRankConfig(rank=32, epochs=3), None, 4),
    ):
        path = out / f"{name}.safetensors"
        if not path.is_file():
            run = FitRunConfig(kind=kind, thresholds=str(thr_path), out=str(path), progress=progress,
                               init=None if init is None else str(init), guard=guard)
            fit_predictor(model_cfg, pairs, run, cfg, loaded=loaded)
        preds[name] = load_predictor(path)
    windows = load_eval_windows(tok, EvalConfig(seqlen=seqlen, max_windows=eval_windows))
    evaluate_loaded(model, info, windows, Thresholds.load(thr_path), preds, out / "eval", progress=progress,
                    key=f"demo-{seqlen}-{eval_windows}")
    return out / "eval" / "report.md"
