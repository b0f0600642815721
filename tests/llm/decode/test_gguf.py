"""GGUF files load natively, byte for byte (q/k un-permuted), or re-packed where the plan or the type needs it."""

import numpy as np
import pytest
import torch

from dormant.kernels.blocks import unpack
from dormant.llm.decode import Engine, ReferenceStep, UnsupportedDecodeError, pack_gguf, pack_model
from tests.llm.decode.helpers import quantile_plan, shared_input_plan, tiny_model, widths_of, write_tiny_gguf
from tests.llm.decode.test_step import TOL

TYPES = {"embedding": "Q8_0", "q": "Q4_0", "k": "Q4_1", "v": "Q8_0", "o": "F32", "gate": "Q4_0", "up": "Q4_1",
         "down": "Q8_0"}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    model = tiny_model("llama")
    return model, write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model, TYPES)


def gguf_floats(path, name):
    import gguf
    from gguf.quants import dequantize

    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)
    return torch.from_numpy(np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32))


def test_native_tensors_are_the_files_blocks(tiny_gguf):
    model, path = tiny_gguf
    w = pack_gguf(path, positions=32)
    layer = w.decoder.layers[0]
    assert w.info["conversions"] == [] and w.info["tied_head"]
    assert {p: getattr(layer, p).fmt for p in TYPES if p != "embedding"} == {
        p: t.lower() for p, t in TYPES.items() if p != "embedding"
    }
    assert torch.equal(unpack(layer.v), gguf_floats(path, "blk.0.attn_v.weight"))
    # q and k: the file's rows, un-permuted back to HF order; the values are the file's dequantised blocks
    hf_q = model.model.layers[0].self_attn.q_proj.weight
    assert (unpack(layer.q) - hf_q).abs().max() < 0.2 * hf_q.abs().max()  # q4 of the same matrix, same row order
    from dormant.llm.decode.weights import _unpermute

    assert torch.equal(unpack(layer.q), gguf_floats(path, "blk.0.attn_q.weight")[_unpermute(4, 64)])


def test_gguf_engine_matches_reference_and_hf(tiny_gguf):
    model, path = tiny_gguf
    ids = torch.arange(3, 13)
    w = pack_gguf(path, positions=32)
    engine, ref = Engine(w, 32), ReferenceStep(w.decoder, 32)
    got = torch.stack([engine.step(int(t), i) for i, t in enumerate(ids)])
    want = torch.stack([ref.step(int(t), i) for i, t in enumerate(ids)])
    torch.testing.assert_close(got, want, rtol=0, atol=TOL["q4_0"] * float(want.abs().max()))
    # transformers' own GGUF loader (dequantise + un-permute) gives the same weights in fp32; the native
    # engine differs from it only by quantising activations to 8 bits for the integer dots
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True).eval()
    exact = Engine(pack_model(hf, "fp32", positions=32), 32)
    dequant = torch.stack([exact.step(int(t), i) for i, t in enumerate(ids)])
    assert (got - dequant).abs().max() < 0.02 * dequant.abs().max()


def test_sparse_plans_repack_the_columns_they_need(tiny_gguf):
    model, path = tiny_gguf
    plan = quantile_plan(2, widths_of(model.config), 0.4, mid=0.02, projections=["q", "down"])
    w = pack_gguf(path, plan=plan, positions=32)
    assert w.decoder.layers[0].q.layout == "cols" and w.decoder.layers[0].q.fmt == "q4_0"
    assert w.decoder.layers[0].k.layout == "rows"
    assert any("blk.1.ffn_down.weight: Q8_0 -> q8_0 cols" == c for c in w.info["conversions"])
    fused = pack_gguf(path, plan=shared_input_plan(2, widths_of(model.config), 0.4), positions=32, convert_to="q8_0")
    assert fused.decoder.layers[0].qkv.fmt == "q8_0" and fused.decoder.layers[0].q is None
    with pytest.raises(UnsupportedDecodeError, match="fusing q/k/v needs one target format"):
        pack_gguf(path, plan=shared_input_plan(2, widths_of(model.config), 0.4), positions=32)
    ids = torch.arange(6)
    for weights in (w, fused):
        engine, ref = Engine(weights, 32), ReferenceStep(weights.decoder, 32)
        for i, t in enumerate(ids):
            a, b = engine.step(int(t), i), ref.step(int(t), i)
            torch.testing.assert_close(a, b, rtol=0, atol=TOL["q4_0"] * float(b.abs().max()))


def test_types_without_a_kernel_need_an_explicit_conversion(tmp_path):
    model = tiny_model("llama")
    path = write_tiny_gguf(tmp_path / "f16.gguf", model, {**TYPES, "up": "F16"})
    with pytest.raises(UnsupportedDecodeError, match="F16; natively read GGUF types: F32, BF16, Q8_0, Q4_0, Q4_1"):
        pack_gguf(path)
    w = pack_gguf(path, convert_to="bf16", positions=16)
    assert w.decoder.layers[0].up.fmt == "bf16" and w.decoder.layers[0].gate.fmt == "bf16"  # convert_to: all re-packed
    assert pack_gguf(path, fmt="q8_0", positions=16).decoder.layers[0].o.fmt == "q8_0"
