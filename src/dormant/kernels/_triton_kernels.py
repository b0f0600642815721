"""Triton kernels of :mod:`dormant.kernels.triton_gpu` (this module imports triton; import it lazily).

Triton resolves the helpers a kernel calls among module globals, so the kernels live here at module
level rather than inside a function.
"""

import triton
import triton.language as tl

__all__ = ["gate_up", "down"]


@triton.jit
def _zero_below(v, t):
    return tl.where(tl.abs(v) < t, 0.0, v)


@triton.jit
def _round(v, DT: tl.constexpr):
    # v (fp32) rounded to DT and back, to nearest even. bf16 by bit arithmetic: the Triton interpreter
    # truncates .to(tl.bfloat16), and this makes both backends round alike.
    if DT == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    return v.to(DT).to(tl.float32)


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 0:  # silu
        return g / (1.0 + tl.exp(-g))
    z = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # gelu, tanh form; tanh(z) = 2 sigmoid(2z) - 1
    return 0.5 * g * (2.0 * tl.sigmoid(2.0 * z))


@triton.jit
def gate_up(
    x_ptr,
    gate_ptr,
    up_ptr,
    h_ptr,
    mask_ptr,
    D,
    N,
    s_gate,
    s_up,
    t_gate,
    t_up,
    t_act,
    t_mid,
    HAS_MASK: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    DT = gate_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < N
    if HAS_MASK:
        live = live & (tl.load(mask_ptr + rows, mask=live, other=0) != 0)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        xv = tl.load(x_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        w = tl.load(
            gate_ptr + rows[:, None] * s_gate + cols[None, :],
            mask=live[:, None] & (cols < D)[None, :],
            other=0.0,
            eviction_policy="evict_first",
        )
        acc += w.to(tl.float32) * xv[None, :]
    g = _zero_below(_round(tl.sum(acc, axis=1), DT), t_gate)
    a = _zero_below(_round(_act(g, ACT), DT), t_act)
    live = live & (a != 0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        xv = tl.load(x_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        w = tl.load(
            up_ptr + rows[:, None] * s_up + cols[None, :],
            mask=live[:, None] & (cols < D)[None, :],
            other=0.0,
            eviction_policy="evict_first",
        )
        acc += w.to(tl.float32) * xv[None, :]
    u = _zero_below(_round(tl.sum(acc, axis=1), DT), t_up)
    h = _zero_below(_round(a * u, DT), t_mid)
    tl.store(h_ptr + rows, tl.where(live, h, 0.0), mask=rows < N)


@triton.jit
def down(
    h_ptr, down_ptr, y_ptr, D, N, s_down, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr
):
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    r0 = tl.program_id(1) * ROWS
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for r in range(0, ROWS, BLOCK_N):
        rows = r0 + r + tl.arange(0, BLOCK_N)
        h = tl.load(h_ptr + rows, mask=rows < N, other=0.0)
        w = tl.load(
            down_ptr + rows[:, None] * s_down + cols[None, :],
            mask=(h != 0.0)[:, None] & (cols < D)[None, :],
            other=0.0,
            eviction_policy="evict_first",
        )
        acc += w.to(tl.float32) * h[:, None]
    tl.atomic_add(y_ptr + cols, tl.sum(acc, axis=0), mask=cols < D)
