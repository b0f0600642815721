"""End to end on the real tiny Llama stories260K: pairs -> every predictor -> eval, predictability, CLI."""

import json

import numpy as np
import pytest

from dormant.cli import main
from dormant.experiments.predictors import (
    PredictabilityConfig,
    evaluate_loaded,
    run_predictability,
    summarize,
)
from dormant.llm.calibration import calibrate
from dormant.llm.configs import CalibrationConfig
from dormant.llm.models import load_model
from dormant.llm.predictors import (
    ClusterConfig,
    ClusterPredictor,
    EarlyLayerConfig,
    EarlyLayerPredictor,
    LowRankConfig,
    LowRankPredictor,
    collect_pairs,
    evaluate_on_store,
    load_predictor,
)
from dormant.llm.sparsify import sparsify_, unsparsify_
from dormant.llm.text import load_text, make_windows
from dormant.traces import ActivationTrace

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    model, tok, info = load_model("stories260k")
    valid = make_windows(tok, load_text("wikitext2-valid"), 96, 10, source="wikitext2-valid")
    thr = calibrate(model, valid.ids[:2], CalibrationConfig("intermediate", [0.5], progress=False), model_id=info["id"])
    thr.save(root / "thr.safetensors")
    sparsify_(model, thr, info["id"])
    store = collect_pairs(model, valid.ids[2:], root / "pairs", select=2, heldout=2, model_id=info["id"],
                          text=valid.describe(), progress=False)
    unsparsify_(model)
    return model, tok, info, thr, store, root


def test_every_predictor_meets_its_recall_target_and_generalises(setup):
    model, tok, info, thr, store, root = setup
    assert store.n_tokens("train") == 4 * 96 and abs(float(store.density().mean()) - 0.5) < 0.05
    preds = {
        "lowrank": LowRankPredictor.for_store(store, LowRankConfig(rank=8, epochs=2)),
        "early_linear": EarlyLayerPredictor.for_store(store, EarlyLayerConfig(rank=8, epochs=2)),
        "early_nearest": EarlyLayerPredictor.for_store(store, EarlyLayerConfig(mode="nearest", bank_size=128,
                                                                               neighbours=8)),
        "cluster": ClusterPredictor.for_store(store, ClusterConfig(k=4, epochs=2)),
    }
    for name, p in preds.items():
        p.fit(store, progress=False)
        chosen = evaluate_on_store(p, store, "select").overall()
        assert chosen["recall"] >= 0.99, name  # tau is chosen on this split for recall 0.99 per layer
        held = evaluate_on_store(p, store, "heldout").overall()  # windows that chose nothing
        assert held["recall"] >= 0.95, (name, held["recall"])
        assert 0 < held["pred_density"] <= 1
        p.save(root / f"{name}.safetensors")
    # Evaluate two of them on test text: dense / oracle / closed loop, and aligned traces.
    test = make_windows(tok, load_text("wikitext2-test"), 64, 2, source="wikitext2-test")
    loaded = {n: load_predictor(root / f"{n}.safetensors") for n in ("lowrank", "early_nearest")}
    recs = evaluate_loaded(model, info, test, thr, loaded, root / "eval", save_traces=True, progress=False, key="t")
    units = {(r["unit"], r["name"]) for r in recs}
    assert units == {("dense", None), ("oracle", None), ("closed_loop", "lowrank"), ("closed_loop", "early_nearest")}
    oracle = next(r for r in recs if r["unit"] == "oracle")
    assert all(np.isfinite(r["ppl"]) for r in recs)
    assert oracle["open_loop"]["early_nearest"]["per_layer"]["recall"][0] == 1.0  # layers <= 1 are not predicted
    p = ActivationTrace.load(oracle["traces"]["lowrank"]["predicted"])
    o = ActivationTrace.load(oracle["traces"]["lowrank"]["oracle"])
    assert p.packed.shape == o.packed.shape and p.source["kind"] == "predicted" and o.source["kind"] == "oracle"
    assert (root / "eval" / "report.md").is_file() and (root / "eval" / "per_layer.csv").is_file()
    # A rerun resumes: nothing is measured twice; a predictor added later gets its own open-loop pass.
    again = evaluate_loaded(model, info, test, thr, loaded, root / "eval", save_traces=True, progress=False, key="t")
    assert len(again) == len(recs)
    loaded["cluster"] = load_predictor(root / "cluster.safetensors")
    more = evaluate_loaded(model, info, test, thr, loaded, root / "eval", progress=False, key="t")
    assert [r["unit"] for r in more[len(recs):]] == ["open_loop", "closed_loop"]
    assert "| cluster |" in (root / "eval" / "report.md").read_text()


def test_predictability_study(setup, tmp_path):
    model, tok, info, thr, store, root = setup
    text = load_text("wikitext2-test")
    windows = make_windows(tok, text, 64, 3, source="wikitext2-test")
    pool = np.asarray(tok(text[:20000], add_special_tokens=False).input_ids)
    cfg = PredictabilityConfig(samples=3, similarities=[0.95, 0.7], out=str(tmp_path / "pred"), progress=False)
    sparsify_(model, thr, info["id"])
    try:
        recs = run_predictability(model, windows, pool, cfg, {"model": {"id": "stories260k"}})
    finally:
        unsparsify_(model)
    rows = summarize(recs, cfg.similarities)
    assert set(rows) == {"0.95", "0.7", "unrelated", "independent"}
    assert rows["0.95"]["jaccard"].mean() > rows["0.7"]["jaccard"].mean() > rows["unrelated"]["jaccard"].mean()
    assert (tmp_path / "pred" / "report.md").is_file() and (tmp_path / "pred" / "heatmap_jaccard.png").is_file()


def test_cli_fit_eval_predictability(setup, tmp_path, capsys):
    model, tok, info, thr, store, root = setup
    common = ["--model", "stories260k", "--no-progress"]
    out = tmp_path / "cl.safetensors"
    assert main(["predictor", "fit", *common, "--kind", "cluster", "--cluster-k", "2", "--cluster-epochs", "1",
                 "--thresholds", str(root / "thr.safetensors"), "--pairs", str(store.root), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["predictor"] == str(out) and out.with_suffix(".json").is_file()
    retarget = tmp_path / "cl13.safetensors"
    assert main(["predictor", "fit", *common, "--kind", "cluster", "--init", str(out), "--cluster-density-ratio", "1.3",
                 "--thresholds", str(root / "thr.safetensors"), "--pairs", str(store.root), "--out", str(retarget)]) == 0
    assert load_predictor(retarget).config.density_ratio == 1.3
    capsys.readouterr()
    fresh = tmp_path / "fresh_pairs"  # fit collects its own pairs when the folder is empty
    assert main(["predictor", "fit", *common, "--kind", "lowrank", "--lowrank-rank", "4", "--lowrank-epochs", "1", "--guard", "2",
                 "--thresholds", str(root / "thr.safetensors"), "--pairs", str(fresh), "--train-windows", "3",
                 "--train-seqlen", "64", "--select-windows", "1", "--heldout-windows", "1", "--out",
                 str(tmp_path / "lr.safetensors")]) == 0
    assert json.loads((fresh / "pairs.json").read_text())["text"]["source"] == "wikitext2-valid"
    assert load_predictor(tmp_path / "lr.safetensors").guard.sum(1).tolist() == [2] * store.n_layers
    capsys.readouterr()
    assert main(["predictor", "eval", *common, "--predictors", f"{out},{retarget}", "--thresholds",
                 str(root / "thr.safetensors"), "--seqlen", "64", "--max-windows", "1", "--out",
                 str(tmp_path / "ev")]) == 0
    assert (tmp_path / "ev" / "results.csv").read_text().count("\n") == 3
    assert main(["predictor", "eval", *common, "--predictors", str(out), "--thresholds", str(root / "thr.safetensors"),
                 "--select-pairs", str(store.root), "--out", str(tmp_path / "ev_select")]) == 0
    assert "selection windows" in (tmp_path / "ev_select" / "report.md").read_text()
    assert main(["predictability", *common, "--thresholds", str(root / "thr.safetensors"), "--samples", "2",
                 "--seqlen", "48", "--similarities", "0.9", "--out", str(tmp_path / "pa")]) == 0
    assert (tmp_path / "pa" / "predictability.csv").is_file()
