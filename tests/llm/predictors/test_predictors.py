"""Every predictor memorises a deterministic pattern (recall 1.0) and survives a save/load round trip."""

import pytest
import torch

from dormant.artifacts import ArtifactError
from dormant.llm.adapters import Tap
from dormant.llm.predictors import (
    ClusterConfig,
    ClusterPredictor,
    EarlyLayerConfig,
    EarlyLayerPredictor,
    LowRankConfig,
    LowRankPredictor,
    PairStore,
    evaluate_on_store,
    load_predictor,
)
from dormant.llm.predictors.data import write_pairs

W, T, L, D, I, CLASSES = 8, 64, 3, 8, 16, 4  # noqa: E741 (I = intermediate size, as in the docs)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Tokens of 4 classes; each class has a fixed FFN input (plus noise) and a fixed mask per layer."""
    g = torch.Generator().manual_seed(0)
    proto = 3 * torch.randn(CLASSES, L, D, generator=g)
    patterns = torch.rand(CLASSES, L, I, generator=g) < 0.5
    cls = torch.randint(0, CLASSES, (W, T), generator=g)
    x = proto[cls] + 0.05 * torch.randn(W, T, L, D, generator=g)
    return write_pairs(tmp_path_factory.mktemp("pairs"), x, patterns[cls], select=2, heldout=2, model={"gated": True})


def test_store_reads_back(store):
    again = PairStore.open(store.root)
    assert again.n_tokens("train") == 4 * T and again.n_tokens("select") == again.n_tokens("heldout") == 2 * T
    assert again.inputs(1, "heldout").shape == (2 * T, D) and again.inputs(1).dtype == torch.float16
    assert again.masks(2, "train").shape == (4 * T, I)
    assert sum(len(x) for x, _ in again.iter_layer(0, "train")) == 4 * T
    assert again.source(0, Tap.MID).dtype == torch.bool
    with pytest.raises(ValueError):
        again.shards("test")


PREDICTORS = {
    "lowrank": lambda: LowRankPredictor, "early_linear": lambda: EarlyLayerPredictor,
    "early_nearest": lambda: EarlyLayerPredictor, "cluster": lambda: ClusterPredictor,
}
CONFIGS = {
    "lowrank": LowRankConfig(rank=8, recall=1.0, epochs=40, patience=40, batch_size=64, lr=5e-2),
    "early_linear": EarlyLayerConfig(mode="linear", source_layer=0, rank=4, recall=1.0, epochs=40, patience=40, batch_size=64,
                                     lr=2e-2),
    "early_nearest": EarlyLayerConfig(mode="nearest", source_layer=0, bank_size=64, neighbours=4, recall=1.0),
    "cluster": ClusterConfig(k=8, recall=1.0, epochs=60, batch_size=64, lr=2e-2),
}


@pytest.fixture(scope="module")
def fitted(store):
    out = {}
    for name, cfg in CONFIGS.items():
        p = PREDICTORS[name]().for_store(store, cfg)
        p.fit(store, progress=False)
        out[name] = p
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_memorises_deterministic_pattern(fitted, store, name):
    """Recall 1.0 is the target on the selection split (tau is chosen there); on held-out windows, which chose
    nothing, the class patterns must still be recovered almost exactly."""
    p = fitted[name]
    assert evaluate_on_store(p, store, "select").overall()["recall"] == 1.0
    s = evaluate_on_store(p, store, "heldout")
    assert s.overall()["recall"] >= 0.99, name
    for layer in p.predicted_layers():
        assert s.layer(layer)["precision"] >= 0.99, (name, layer)
    expected = [1, 2] if name == "early_nearest" else [0, 1, 2]
    assert p.predicted_layers() == expected


def test_sources(fitted):
    assert fitted["lowrank"].source(2) == (2, Tap.FFN_IN)
    assert fitted["early_linear"].source(2) == (0, Tap.FFN_IN) and fitted["early_linear"].source(0) == (0, Tap.FFN_IN)
    assert fitted["early_nearest"].source(0) is None and fitted["early_nearest"].source(1) == (0, Tap.MID)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_load_round_trip(fitted, store, tmp_path, name):
    p = fitted[name]
    path = p.save(tmp_path / f"{name}.safetensors")
    q = load_predictor(path)
    assert type(q) is type(p) and q.config == p.config and q.info == p.info
    torch.testing.assert_close(q.tau, p.tau, rtol=0, atol=0)
    assert q.cost().summary() == p.cost().summary()
    for layer in p.predicted_layers():
        src = p.source(layer)
        x = store.source(src[0], src[1], "heldout")
        fp, fq = p.features(src[0], src[1], x), q.features(src[0], src[1], x)
        torch.testing.assert_close(q.scores(layer, fq), p.scores(layer, fp), rtol=0, atol=0)


def test_cost_formulas(fitted):
    c = fitted["lowrank"].cost(weight_bytes=2)
    r = fitted["lowrank"].config.rank
    params = D * r + r + r * I + I  # A, c, B, b
    assert c.param_bytes == [2 * params] * L and c.flops == [2 * (D * r + r * I)] * L
    assert c.ffn_bytes == 3 * D * I * 2 and c.ffn_flops == 2 * 3 * D * I
    assert c.summary()["param_pct_of_ffn_bytes"] == pytest.approx(100 * params / (3 * D * I))
    k = fitted["cluster"].params[0]["C"].shape[0]
    assert fitted["cluster"].layer_cost(0) == (2 * (D * k + k) + k * I // 8, 2 * (D * k + k) + I // 8, 2 * D * k)
    nb = fitted["early_nearest"].cost()
    assert nb.param_bytes[0] == 0 and nb.param_bytes[1] == 2 * 64 * I // 8  # own bank column + the search bank


def test_load_rejects_other_artifacts(tmp_path):
    from dormant.artifacts import save_artifact

    path = save_artifact(tmp_path / "x.safetensors", "dormant.Predictor", 1, {"tau": torch.zeros(1)},
                         {"predictor": "nope", "config": {}, "dims": {}})
    with pytest.raises(ArtifactError, match="unknown predictor"):
        load_predictor(path)


def test_load_refuses_unknown_config_keys(fitted, tmp_path):
    """A key this version does not know is refused, not dropped: dropping it would load another predictor."""
    from dormant.artifacts import load_artifact, save_artifact

    tensors, meta, _ = load_artifact(fitted["cluster"].save(tmp_path / "c.safetensors"), "dormant.Predictor", (1,))
    meta["config"]["future_knob"] = 3
    path = save_artifact(tmp_path / "c2.safetensors", "dormant.Predictor", 1, tensors, meta)
    with pytest.raises(ArtifactError, match="future_knob"):
        load_predictor(path)


def test_retarget_density_budget(fitted, store):
    import copy

    p = copy.deepcopy(fitted["lowrank"])
    p.choose_taus(store, recall=0.99, density_ratio=0.5)  # half the true density: recall must fall to ~0.5
    o = evaluate_on_store(p, store, "heldout").overall()
    assert o["density_ratio"] == pytest.approx(0.5, abs=0.05) and o["recall"] < 0.6


def test_guard_is_always_predicted_and_saved(fitted, store, tmp_path):
    import copy

    p = copy.deepcopy(fitted["cluster"])
    p.guard = torch.zeros(L, I, dtype=torch.bool)
    p.guard[:, 3] = True
    p.tau[:] = float("inf")  # nothing passes the threshold: only the guard is predicted
    x = store.inputs(0, "heldout").float()
    m = p.predict(0, x)
    assert m[:, 3].all() and m.sum() == len(x)
    assert p.cost().param_bytes[0] == fitted["cluster"].cost().param_bytes[0] + I // 8
    q = load_predictor(p.save(tmp_path / "g.safetensors"))
    assert torch.equal(q.guard, p.guard)
