"""The reference sparse FFN (the specification): golden values by hand and equivalences."""

import math

import pytest
import torch
import torch.nn.functional as F

from dormant.kernels import FFNThresholds, PackedFFN, pack_ffn, sparse_ffn_decode
from dormant.kernels.reference import as_mask, sparse_ffn, zero_below
from tests.kernels.helpers import random_ffn


def _silu(v: float) -> float:
    return v / (1 + math.exp(-v))


def test_golden_values_by_hand():
    # D = 2, I = 3, x = [1, 2]: gate x = [1, -2, 0.5], up x = [2, 1, -4].
    gate = torch.tensor([[1.0, 0.0], [0.0, -1.0], [0.5, 0.0]])
    up = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, -2.0]])
    down = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 1.0]])
    x = torch.tensor([1.0, 2.0])
    p = pack_ffn(gate, up, down)
    h = [_silu(1.0) * 2, _silu(-2.0) * 1, _silu(0.5) * -4]  # [1.4621, -0.2384, -1.2490]
    dense = [h[0] + 2 * h[1] + 3 * h[2], -h[0] + h[2]]
    torch.testing.assert_close(sparse_ffn(p, x, FFNThresholds()), torch.tensor(dense), rtol=1e-6, atol=1e-6)
    # ACT threshold 0.5 keeps |silu(g)| = [0.731, 0.238, 0.311] >= 0.5: neuron 0 only.
    torch.testing.assert_close(
        sparse_ffn(p, x, FFNThresholds(act=0.5)), torch.tensor([h[0], -h[0]]), rtol=1e-6, atol=1e-6
    )
    # GATE threshold 0.75 keeps |g| >= 0.75 (neurons 0, 1); UP threshold 1.5 keeps |u| >= 1.5 (neurons 0, 2).
    torch.testing.assert_close(
        sparse_ffn(p, x, FFNThresholds(gate=0.75, up=1.5)), torch.tensor([h[0], -h[0]]), rtol=1e-6, atol=1e-6
    )
    # MID threshold 1.0 keeps |h| >= 1 (neurons 0 and 2); an OUT threshold 2.5 then zeroes y_0.
    y_mid = [h[0] + 3 * h[2], -h[0] + h[2]]
    torch.testing.assert_close(
        sparse_ffn(p, x, FFNThresholds(mid=1.0)), torch.tensor(y_mid), rtol=1e-6, atol=1e-6
    )
    y_out = [v if abs(v) >= 2.5 else 0.0 for v in y_mid]  # |y| = [2.285, 2.711] -> [0, -2.711]
    assert y_out[0] == 0.0 and y_out[1] != 0.0
    torch.testing.assert_close(
        sparse_ffn(p, x, FFNThresholds(mid=1.0, out=2.5)), torch.tensor(y_out), rtol=1e-6, atol=1e-6
    )
    # A neuron mask keeps neuron 1 only; indices give the same.
    mask = torch.tensor([False, True, False])
    expected = torch.tensor([2 * h[1], 0.0])
    torch.testing.assert_close(sparse_ffn(p, x, FFNThresholds(), mask), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        sparse_ffn(p, x, FFNThresholds(), torch.tensor([1])), expected, rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_no_thresholds_equals_dense_ffn(activation):
    p, x = random_ffn(37, 101, torch.float32, activation)
    act = F.silu if activation == "silu" else (lambda g: F.gelu(g, approximate="tanh"))
    dense = F.linear(act(F.linear(x, p.gate)) * F.linear(x, p.up), p.down_t.T)
    assert torch.equal(sparse_ffn(p, x, FFNThresholds()), dense)
    full = torch.ones(p.I, dtype=torch.bool)
    assert torch.equal(sparse_ffn(p, x, FFNThresholds(), full), dense)
    assert torch.equal(
        sparse_ffn(p, x, FFNThresholds(), torch.zeros(p.I, dtype=torch.bool)), torch.zeros(p.D)
    )


def test_zero_below_matches_sparsify_rule():
    v = torch.tensor([-2.0, -0.5, 0.0, 0.5, 1.0, float("nan")])
    out = zero_below(v, 0.5)
    torch.testing.assert_close(out, torch.tensor([-2.0, -0.5, 0.0, 0.5, 1.0, float("nan")]), equal_nan=True)
    torch.testing.assert_close(
        zero_below(v, 0.6), torch.tensor([-2.0, 0, 0, 0, 1.0, float("nan")]), equal_nan=True
    )
    assert zero_below(v, 0.0) is v
    # bf16 compares in bf16: 1.001 rounds to 1.0, so 1.0 is kept.
    b = torch.tensor([1.0], dtype=torch.bfloat16)
    assert zero_below(b, 1.001).item() == 1.0
    assert FFNThresholds(act=1.001).rounded(torch.bfloat16).act == 1.0


def test_mask_forms_and_validation():
    assert torch.equal(as_mask(torch.tensor([0, 3]), 5), torch.tensor([True, False, False, True, False]))
    with pytest.raises(ValueError, match="shape"):
        as_mask(torch.ones(4, dtype=torch.bool), 5)
    with pytest.raises(ValueError, match=">= 0"):
        FFNThresholds(act=-1.0)


def test_pack_layouts():
    p, _ = random_ffn(8, 5, torch.float32)
    gate, up, down = p.gate, p.up, p.down_t.T
    sep = pack_ffn(gate, up, down)
    assert sep.gate.data_ptr() == gate.data_ptr() and sep.up.data_ptr() == up.data_ptr()  # shared, not copied
    assert sep.down_t.is_contiguous() and torch.equal(sep.down_t, down.T)
    inter = pack_ffn(gate, up, down, interleave=True)
    assert inter.gate.stride(0) == 3 * 8 and inter.up.data_ptr() == inter.gate.data_ptr() + 8 * 4
    assert torch.equal(inter.gate, gate) and torch.equal(inter.up, up) and torch.equal(inter.down_t, down.T)
    assert sep.nbytes() == 3 * 8 * 5 * 4
    with pytest.raises(ValueError, match="activation"):
        PackedFFN(gate, up, down.T.contiguous(), "relu")
    with pytest.raises(ValueError, match="expected gate/up"):
        pack_ffn(gate, up, down.T)
    with pytest.raises(ValueError, match="one token"):
        sparse_ffn_decode(sep, torch.zeros(1, 8))
