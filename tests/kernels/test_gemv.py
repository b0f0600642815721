"""The batch-1 GEMV kernels equal their torch specification for every format, layout and mode, on odd shapes."""

import numpy as np
import pytest
import torch

from dormant.kernels import blocks, gemv
from dormant.kernels import gemv_reference as ref
from dormant.kernels.base import UnsupportedKernelError

FORMATS = list(blocks.FORMATS)
SHAPES = [(37, 33), (96, 64), (37, 160), (96, 160), (1, 1)]
# Compiled variants: the native build (AVX512-VNNI here), AVX2 and scalar fallbacks.
VARIANTS = {
    "native": (),
    "avx2": ("-mno-avx512f",),
    "scalar": ("-mno-avx2", "-mno-fma", "-mno-f16c", "-mno-avx512f"),
}
# Kernel and reference run the same arithmetic (exact integer block dots for the quantised rows path,
# fp32 products of stored values elsewhere) and differ only in summation order, so the error is bounded
# by a few ulps of sum_i |W_ri x_i|, the scale used for atol.
RTOL, ATOL_SCALE = 1e-5, 2e-6


def assert_gemv_close(actual, expected, w, x):
    scale = (blocks.unpack(w).abs().double() @ x.abs().double()).float()
    atol = ATOL_SCALE * float(scale.max()) + 1e-30
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol)


def make(out_f, in_f, fmt, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen)
    x = torch.randn(in_f, generator=gen)
    return blocks.pack(w, fmt, layout), x, w


@pytest.fixture(params=[1, 2])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dense_rows_matches_reference(fmt, shape, threads):
    w, x, _ = make(*shape, fmt, "rows")
    assert_gemv_close(gemv.gemv(w, x), ref.gemv_rows(w, x), w, x)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_row_gather_matches_reference(fmt, shape, threads):
    w, x, _ = make(*shape, fmt, "rows", seed=1)
    out_f = shape[0]
    rows = torch.tensor([out_f - 1, 0, out_f // 2, 0, (7 * out_f) // 9])  # any order, repeats allowed
    assert_gemv_close(gemv.gemv_gather(w, x, rows), ref.gemv_rows_gather(w, x, rows), w, x)
    assert gemv.gemv_gather(w, x, torch.zeros(0, dtype=torch.long)).numel() == 0


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_column_sparse_matches_reference(fmt, shape, threads):
    w, x, _ = make(*shape, fmt, "cols", seed=2)
    gen = torch.Generator().manual_seed(3)
    for t in (torch.rand(shape[1], generator=gen) * 1.5, 0.7, None):
        for split in (False, True):
            y, n = gemv.gemv_cols(w, x, t, split_columns=split)
            assert_gemv_close(y, ref.gemv_cols(w, x, t), w, x)
            assert n == int((ref.active_columns(x, t) & (x != 0)).sum())


@pytest.mark.parametrize("fmt", FORMATS)
def test_threshold_zero_is_the_dense_column_gemv_exactly(fmt):
    w, x, _ = make(96, 160, fmt, "cols", seed=4)
    dense, n_dense = gemv.gemv_cols(w, x, None)
    zero, n_zero = gemv.gemv_cols(w, x, torch.zeros(160))
    assert torch.equal(dense, zero) and n_dense == n_zero == 160
    assert_gemv_close(dense, ref.gemv_rows(blocks.pack(blocks.unpack(w), "f32", "rows"), x), w, x)


def test_column_sparse_skips_exactly_the_masked_channels():
    w, x, _ = make(37, 64, "f32", "cols", seed=5)
    x[3] = float("nan")  # NaN is not < t: it passes, as masked_fill(|x| < t) leaves it
    t = torch.full((64,), 0.5)
    y, n = gemv.gemv_cols(w, x, t)
    assert torch.isnan(y).all() and n == int((~(x.abs() < t)).sum())


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_compiled_fallbacks_match_reference(variant, fmt):
    flags = VARIANTS[variant]
    assert gemv.simd_level(flags) == {"native": gemv.simd_level(), "avx2": "avx2", "scalar": "scalar"}[variant]
    for shape in [(37, 160), (96, 33)]:
        wr, x, _ = make(*shape, fmt, "rows", seed=6)
        assert_gemv_close(gemv.gemv(wr, x, flags), ref.gemv_rows(wr, x), wr, x)
        rows = torch.arange(shape[0] - 1, -1, -3)
        assert_gemv_close(gemv.gemv_gather(wr, x, rows, flags), ref.gemv_rows_gather(wr, x, rows), wr, x)
        wc, _, _ = make(*shape, fmt, "cols", seed=6)
        t = torch.rand(shape[1]) * 0.8
        assert_gemv_close(gemv.gemv_cols(wc, x, t, flags)[0], ref.gemv_cols(wc, x, t), wc, x)
    xq = torch.randn(100) * 3
    for a, b in zip(gemv.quantize_x(xq, flags), blocks.quantize_activation(xq)):
        assert torch.equal(a, b)


def test_kernel_quantises_inputs_exactly_as_specified():
    x = torch.cat([torch.randn(70), torch.zeros(32), torch.tensor([127.0, -127.0, 0.5, 1e-30])])
    for a, b in zip(gemv.quantize_x(x), blocks.quantize_activation(x)):
        assert torch.equal(a, b)
    q, d, s = blocks.quantize_activation(torch.tensor([1.0, -2.0, 0.5]))  # golden: d = 2/127, q = round(x / d)
    assert d[0] == torch.tensor(2.0) / 127
    assert q[0, :4].tolist() == [64, -127, 32, 0] and s[0] == 64 - 127 + 32  # 63.5 rounds to even 64, 31.75 -> 32


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_blocks_are_gguf_blocks(fmt):
    """Our bytes dequantise with gguf's own reference implementation to the values we unpack."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    w, _, dense = make(8, 96, fmt, "rows", seed=7)
    ours = blocks.unpack(w)
    theirs = dequantize(w.data.numpy(), getattr(GGMLQuantizationType, fmt.upper()))
    np.testing.assert_array_equal(ours.numpy(), np.asarray(theirs, dtype=np.float32).reshape(8, 96))
    err = (ours - dense).abs().max() / dense.abs().max()
    assert err < {"q8_0": 0.005, "q4_0": 0.08, "q4_1": 0.07}[fmt]


def test_q4_0_golden_block():
    # d = 0.5, nibbles 0..15 low, 15..0 high: w[j] = 0.5 * (j - 8), w[j + 16] = 0.5 * (7 - j)
    qs = bytes((j | ((15 - j) << 4)) for j in range(16))
    raw = torch.tensor(list(np.float16(0.5).tobytes() + qs), dtype=torch.uint8)[None]
    w = blocks.unpack(blocks.PackedWeight(raw, "q4_0", "rows", 1, 32))[0]
    expected = [0.5 * (j - 8) for j in range(16)] + [0.5 * (7 - j) for j in range(16)]
    assert w.tolist() == expected


@pytest.mark.parametrize("fmt", FORMATS)
def test_cols_layout_stores_the_same_weight(fmt):
    _, _, dense = make(40, 70, fmt, "rows", seed=8)
    r, c = blocks.pack(dense, fmt, "rows"), blocks.pack(dense, fmt, "cols")
    assert r.nbytes() == blocks.block_format(fmt).row_bytes(70) * 40
    if not blocks.FORMATS[fmt].quantized:
        assert torch.equal(blocks.unpack(r), blocks.unpack(c))
    else:  # blocks run along different dimensions, so the two quantisations differ but are both close
        for p in (r, c):
            assert (blocks.unpack(p) - dense).abs().max() < 0.2 * dense.abs().max()


def test_bad_inputs_raise_clear_errors():
    w, x, _ = make(37, 64, "q4_0", "rows")
    with pytest.raises(IndexError, match=r"\[0, 37\)"):
        gemv.gemv_gather(w, x, torch.tensor([0, 37]))
    with pytest.raises(IndexError):
        gemv.gemv_gather(w, x, torch.tensor([-1]))
    with pytest.raises(ValueError, match="64 entries"):
        gemv.gemv(w, torch.randn(63))
    with pytest.raises(UnsupportedKernelError, match="'cols' layout"):
        gemv.gemv_cols(w, x)
    with pytest.raises(UnsupportedKernelError, match="'rows' layout"):
        gemv.gemv(blocks.pack(torch.randn(37, 64), "f32", "cols"), x)
    c = blocks.pack(torch.randn(37, 64), "q8_0", "cols")
    with pytest.raises(ValueError, match="scalar or a vector of 64"):
        gemv.gemv_cols(c, x, torch.ones(3))
    with pytest.raises(ValueError, match="supported: f32, bf16, q8_0, q4_0, q4_1"):
        blocks.pack(torch.randn(4, 32), "q5_k")
    with pytest.raises(ValueError, match="supported: rows, cols"):
        blocks.pack(torch.randn(4, 32), "f32", "diag")
    with pytest.raises(ValueError, match="must be torch.uint8"):
        blocks.PackedWeight(torch.zeros(37, 10, dtype=torch.uint8), "q4_0", "rows", 37, 64)
    with pytest.raises(ValueError, match="integer tensor"):
        gemv.gemv_gather(w, x, torch.tensor([True, False]))
