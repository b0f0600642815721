"""Models larger than one device: a tiny random Llama spread over CPU memory and disk by accelerate
(``--device-map auto --max-memory cpu=...,disk``) calibrates and evaluates exactly like the whole model.

accelerate's ``AlignDevicesHook`` loads each offloaded block's weights just in time; the tap hooks see every tensor
on its execution device, and the weights the WINA score reads are onloaded one block at a time.
"""

import json

import pytest
import torch

from dormant.cli import main
from dormant.llm.calibration import CalibrationConfig, calibrate
from dormant.llm.configs import ModelConfig
from dormant.llm.evaluate import perplexity
from dormant.llm.models import input_device, load_model
from dormant.llm.sparsify import measure_sparsity, sparsified
from tests.llm.tiny import tiny_model

CAP = 600_000  # bytes of CPU memory: the embedding and block 0 stay, blocks 1-3, the norm and the head go to disk
MAX_MEMORY = f"cpu={CAP // 1000}KB,disk"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 4-layer random Llama (~1 MB of fp32 weights) saved with the stories260K tokenizer (vocab 512)."""
    from transformers import AutoTokenizer

    from dormant.data import resolve

    d = tmp_path_factory.mktemp("llama")
    tiny_model("llama", hidden_size=64, intermediate_size=172, num_hidden_layers=4, vocab_size=512).save_pretrained(d)
    AutoTokenizer.from_pretrained(str(resolve("stories260k"))).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def models(folder, tmp_path_factory):
    whole = load_model(ModelConfig(model=str(folder)))[0]
    spread, _, info = load_model(ModelConfig(model=str(folder), device_map="auto", max_memory=MAX_MEMORY,
                                             offload_folder=str(tmp_path_factory.mktemp("offload"))))
    return whole, spread, info


def _resident(model) -> tuple[int, int]:
    """(bytes of parameters held in memory, bytes of all parameters): offloaded ones sit on the meta device."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta"), total


def test_the_model_is_spread_over_cpu_and_disk(models):
    whole, spread, info = models
    placed = info["device_map"]
    assert "cpu" in placed.values() and "disk" in placed.values(), placed
    assert input_device(spread) == torch.device("cpu")
    resident, total = _resident(spread)
    assert resident <= CAP < total == _resident(whole)[0]
    print(f"\nresident parameters: {resident / 1e3:.0f} KB of {total / 1e3:.0f} KB; map {placed}")


@pytest.mark.parametrize(("site", "score", "allocation", "refine"), [
    ("intermediate", "magnitude", "uniform", 1),  # one streaming pass, and one under the thresholds
    ("linear", "wina", "uniform", 0),  # reads the weight columns of offloaded blocks
    ("linear", "magnitude", "greedy", 0),  # replays offloaded blocks
])
def test_dispatched_model_calibrates_and_evaluates_like_the_whole_model(models, site, score, allocation, refine):
    whole, spread, _ = models
    win = torch.randint(0, 512, (3, 32), generator=torch.Generator().manual_seed(0))
    target = 0.1 if allocation == "greedy" else 0.4  # greedy: fewer steps, each replaying an offloaded block
    cfg = CalibrationConfig(site, [target], score=score, allocation=allocation, refine=refine, greedy_tokens=16,
                            progress=False)
    thr = [calibrate(m, win, cfg) for m in (whole, spread)]
    assert torch.equal(thr[0].values, thr[1].values)
    results = []
    for m, t in zip((whole, spread), thr):
        with sparsified(m, t), measure_sparsity(m, t.taps) as meter:
            results.append((perplexity(m, win, progress=False), meter.summary()["per_tap"]))
    (a, sa), (b, sb) = results
    torch.testing.assert_close(b.ppl, a.ppl, rtol=1e-6, atol=0)
    assert sa == sb
    assert _resident(spread)[0] <= CAP  # the offloaded weights went back to disk after every pass


def test_cli_device_map_equals_the_whole_model(folder, tmp_path, capsys):
    small = ["--model", str(folder), "--seqlen", "64", "--max-windows", "3", "--calib-windows", "3",
             "--calib-seqlen", "64", "--no-progress"]
    spread = ["--device-map", "auto", "--max-memory", MAX_MEMORY, "--offload-folder", str(tmp_path / "off")]
    for name, extra in (("whole", []), ("spread", spread)):
        assert main(["calibrate", *small, "--sparsity", "0.5", "--out", str(tmp_path / f"{name}.safetensors"),
                     *extra]) == 0
        assert main(["eval", *small[:6], *extra, "--thresholds", str(tmp_path / f"{name}.safetensors"),
                     "--json-out", str(tmp_path / f"{name}.json")]) == 0
    from dormant.llm.thresholds import Thresholds

    a, b = (Thresholds.load(tmp_path / f"{n}.safetensors") for n in ("whole", "spread"))
    assert torch.equal(a.values, b.values)
    ea, eb = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("whole", "spread"))
    torch.testing.assert_close(eb["ppl"], ea["ppl"], rtol=1e-6, atol=0)
    assert "disk" in eb["model"]["device_map"].values()


def test_placement_flags_are_checked_before_loading(folder, tmp_path, capsys):
    base = ["eval", "--model", str(folder), "--seqlen", "64", "--max-windows", "1"]
    for flags, says in [(["--max-memory", "cpu=1GiB"], "add --device-map auto"),
                        (["--device-map", "auto", "--max-memory", "cpu=lots"], "DEV=SIZE"),
                        (["--device-map", "auto", "--device", "cpu"], "leave --device auto"),
                        (["--device-map", "auto", "--offload-folder", str(tmp_path)], "'disk'"),
                        (["--device-map", "auto", "--max-memory", "cpu=100KB"], "does not fit")]:
        assert main([*base, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert says in err.strip().splitlines()[-1], err
