"""Natural-sparsity detection (ReLU vs SiLU), stats subsets, weight stats, and report/CLI smoke on stories260K."""

import json

import pytest
import torch

from dormant.llm.adapters import Tap, ffn_layout
from dormant.llm.analyze import analyze_activations, weight_stats
from dormant.llm.hooks import tap_hooks
from tests.llm.tiny import VOCAB, tiny_model

IDS = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))


def test_relu_model_is_naturally_sparse_silu_model_is_not():
    relu = tiny_model("opt")  # ReLU FFN
    _, nat = analyze_activations(relu, IDS, progress=False)
    assert nat.taps == ffn_layout(relu).taps() and Tap.GATE not in nat.taps
    assert float(nat.at(Tap.MID).min()) > 0.3  # random ReLU FFN: about half the neurons are exactly 0
    assert float(nat.at(Tap.ACT).min()) > 0.3
    assert float(nat.at(Tap.UP).max()) < 0.01  # pre-activation: no exact zeros

    silu = tiny_model("llama")
    _, nat = analyze_activations(silu, IDS, progress=False)
    for tap in nat.taps:
        assert float(nat.at(tap).max()) < 0.01, tap  # SiLU leaves (almost) no exact zero anywhere


def test_natural_sparsity_is_exact_and_monotone_in_eps():
    model = tiny_model("opt")
    layout = ffn_layout(model)
    seen = {}
    with torch.inference_mode(), tap_hooks(layout, [Tap.MID, Tap.UP], lambda i, t, x: seen.setdefault((i, t), []).append(x.clone())):
        model(IDS)
    stats, nat = analyze_activations(model, IDS, eps=(1e-2, 1e-3), progress=False)
    assert nat.eps == (0.0, 1e-3, 1e-2)
    for (layer, tap), xs in seen.items():
        x = torch.cat(xs).abs()
        for e in nat.eps:
            assert float(nat.fraction[layer, nat.taps.index(tap), nat.eps.index(e)]) == float((x <= e).double().mean())
    assert (nat.fraction.diff(dim=-1) >= 0).all()
    # the same pass filled the histograms: their exact-zero fraction agrees
    torch.testing.assert_close(stats.zero_fraction(), nat.fraction[..., 0], rtol=0, atol=1e-12)
    assert nat.tokens == IDS.numel()


def test_stats_subset_keeps_the_selected_streams():
    model = tiny_model("llama")
    stats, _ = analyze_activations(model, IDS, progress=False)
    sub = stats.subset((Tap.MID, Tap.GATE))
    full = stats.quantiles(0.5)
    torch.testing.assert_close(sub.quantiles(0.5), full[:, [stats.taps.index(Tap.MID), stats.taps.index(Tap.GATE)]])
    thr = sub.thresholds(0.5, "x")
    assert thr.taps == (Tap.MID, Tap.GATE)
    with pytest.raises(ValueError, match="no tap"):
        stats.subset((Tap.MID,)).subset((Tap.GATE,))


def test_weight_stats_counts_exact_zeros():
    model = tiny_model("llama")
    layout = ffn_layout(model)
    with torch.no_grad():
        layout.weights(1).down[:, :3] = 0.0  # 3 columns of down in layer 1
    w = weight_stats(model)
    assert w.projections == ("gate", "up", "down")
    assert w.zeros.tolist() == [[0, 0, 0], [0, 0, 3 * 32]]
    assert w.total[0].tolist() == [48 * 32] * 3
    assert (w.quantiles(0.5) > 0).all()


def main(argv):
    """Run one of this area's commands (the parser holds only them, so other areas' modules are not needed)."""
    import argparse

    from dormant.cli import COMMAND_MODULES, analysis

    assert "dormant.cli.analysis" in COMMAND_MODULES
    parser = argparse.ArgumentParser(prog="dormant")
    analysis.register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(argv)
    return ns.handler(ns)


@pytest.mark.slow
def test_analyze_and_account_cli_on_stories260k(tmp_path):
    out = tmp_path / "analysis"
    common = ["--model", "stories260k", "--seqlen", "128", "--no-progress"]
    assert main(["analyze", *common, "--max-windows", "2", "--calib-windows", "2", "--calib-seqlen", "128",
                 "--sparsity", "0.3,0.5", "--max-tokens", "128", "--out", str(out)]) == 0
    for f in ("report.md", "analysis.json", "natural_sparsity.csv", "natural_sparsity.png", "cdf.png", "weights.png",
              "thresholds.png", "accounting_bytes.png", "accounting_flops.png", "accounting.csv", "ffn_share.csv",
              "activation_stats.safetensors", "calibration_stats.safetensors", "thresholds/paper_50.safetensors",
              "traces/intermediate_50_mid.safetensors", "traces/gate_act_50_act.safetensors"):
        assert (out / f).is_file(), f
    report = (out / "report.md").read_text()
    for section in ("FFN share", "Natural sparsity", "CDF", "weight magnitudes", "thresholds vs depth",
                    "What sparsity buys", "Llama-3-8B", "gate_first", "oracle"):
        assert section in report, section
    result = json.loads((out / "analysis.json").read_text())
    assert [r["site"] for r in result["accounting"]] == ["dense"] + [s for s in ("paper", "intermediate", "gate_act")
                                                                     for _ in (0.3, 0.5)]
    for r in result["accounting"][1:]:
        rel = {c["policy"]: c["rel_bytes"] for c in r["costs"] if c["format"] == "fp16"}
        assert rel["oracle"] <= rel["gate_first"] <= rel["down_skip"] <= rel["dense"] == 1.0

    # `dormant account` from the saved traces, with the oracle trace as a perfect "prediction"
    from dormant.traces import ActivationTrace

    mid = ActivationTrace.load(out / "traces/paper_50_mid.safetensors")
    ActivationTrace(mid.packed, mid.n_neurons, mid.model, {**mid.source, "kind": "predicted"}).save(tmp_path / "p.safetensors")
    acc = tmp_path / "account"
    assert main(["account", "--model", "stories260k", "--mid-trace", str(out / "traces/paper_50_mid.safetensors"),
                 "--act-trace", str(out / "traces/paper_50_act.safetensors"), "--predicted", str(tmp_path / "p.safetensors"),
                 "--predictor-bytes", "100", "--formats", "fp16", "--out", str(acc), "--no-progress"]) == 0
    costs = {c["policy"]: c for c in json.loads((acc / "account.json").read_text())["costs"]}
    assert costs["predicted"]["extra"]["false_negatives"] == 0 and costs["predicted"]["extra"]["recall"] == 1.0
    assert costs["predicted"]["bytes_per_token"] == costs["oracle"]["bytes_per_token"] + 100
    assert (acc / "account.md").is_file() and (acc / "account.csv").is_file()
