"""Calibrated Thresholds drive the engine exactly as they drive the Hugging Face model's hooks."""

import pytest
import torch

from dormant.llm.adapters import ffn_layout
from dormant.llm.calibration import calibrate
from dormant.llm.configs import CalibrationConfig
from dormant.llm.decode import Engine, pack_model
from dormant.llm.decode.from_thresholds import plan_from_thresholds
from dormant.llm.sparsify import sparsified
from tests.llm.decode.helpers import tiny_model

IDS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("site,score", [("linear", "magnitude"), ("linear", "wina"), ("intermediate", "magnitude"),
                                        ("gate_act", "magnitude"), ("linear_head", "magnitude"),
                                        ("linear_head", "wina")])
def test_engine_with_the_plan_of_calibrated_thresholds_is_the_sparsified_hf_model(site, score):
    model = tiny_model("llama")
    thr = calibrate(model, IDS, CalibrationConfig(site, [0.4], score=score, progress=False))
    plan = plan_from_thresholds(thr, ffn_layout(model))
    ids = IDS[0, :12]
    engine = Engine(pack_model(model, "fp32", plan=plan, positions=64), 64)
    got = torch.stack([engine.step(int(t), i) for i, t in enumerate(ids)])
    with torch.no_grad(), sparsified(model, thr):
        want = model(ids[None]).logits[0]
    with torch.no_grad():
        dense = model(ids[None]).logits[0]
    tol = 1e-5 * float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    assert (got - dense).abs().max() > 10 * tol  # the thresholds bite
    density = engine.density()
    assert all(0.3 < d < 0.9 for d in density.values()), density


def test_taps_without_an_engine_path_are_refused_with_the_options():
    model = tiny_model("llama")
    thr = calibrate(model, IDS, CalibrationConfig("paper", [0.4], progress=False))
    with pytest.raises(ValueError, match="no path for tap.*gate.*it thresholds q_in"):
        plan_from_thresholds(thr, ffn_layout(model))


def test_generate_cli_decodes_what_the_sparsified_hf_model_decodes(tmp_path, capsys):
    import json

    from dormant.cli import main
    from dormant.llm.models import load_model

    thr_path = tmp_path / "thr.safetensors"
    assert main(["calibrate", "--model", "stories260k", "--site", "linear", "--sparsity", "0.3", "--calib-windows",
                 "2", "--calib-seqlen", "128", "--out", str(thr_path), "--no-progress"]) == 0
    out = tmp_path / "gen.json"
    before = torch.get_num_threads()
    assert main(["generate", "--model", "stories260k", "--weights", "fp32", "--prompt", "Once upon a time",
                 "--max-new-tokens", "12", "--thresholds", str(thr_path), "--json-out", str(out), "--threads", "1"]) == 0
    assert torch.get_num_threads() == before  # the thread count is put back
    r = json.loads(out.read_text())
    assert "tok/s" in capsys.readouterr().out and r["new_tokens"] == 12 and r["density"]
    from dormant.llm.thresholds import Thresholds

    model, tok, _ = load_model("stories260k")
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    with sparsified(model, Thresholds.load(thr_path)):
        want = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    assert r["text"] == tok.decode(want)
    assert main(["generate", "--model", "stories260k", "--max-new-tokens", "4"]) == 2  # gguf weights need a .gguf
