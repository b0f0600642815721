"""Random FFN layers and tolerances shared by the kernel tests."""

from __future__ import annotations

import torch

from dormant.kernels import FFNThresholds, PackedFFN, pack_ffn
from dormant.kernels.reference import ACTIVATIONS

# Per-dtype tolerances of a kernel against the reference. Both accumulate in fp32 and round the
# intermediates to the weight dtype at the same points, so they differ only by summation order:
# ~1e-6 relative in fp32; in bf16 the output rounding can land one ulp (2^-8 relative) apart.
# ``atol`` is relative to the largest |y| (cancellation makes small outputs' relative error large).
TOL = {
    torch.float32: {"rtol": 1e-5, "atol_scale": 1e-5},
    torch.bfloat16: {"rtol": 8e-3, "atol_scale": 8e-3},
    torch.float16: {"rtol": 1e-3, "atol_scale": 1e-3},
}


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    tol = TOL[expected.dtype]
    atol = tol["atol_scale"] * max(float(expected.float().abs().max()), 1e-30)
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), rtol=tol["rtol"], atol=atol)


def random_ffn(
    d: int,
    i: int,
    dtype: torch.dtype,
    activation: str = "silu",
    seed: int = 0,
    interleave: bool = False,
    device: str = "cpu",
) -> tuple[PackedFFN, torch.Tensor]:
    """A random layer (weights ~ N(0, 1/d)) and a token ``x`` ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    gate = torch.randn(i, d, generator=gen) / d**0.5
    up = torch.randn(i, d, generator=gen) / d**0.5
    down = torch.randn(d, i, generator=gen) / i**0.5
    x = torch.randn(d, generator=gen)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return pack_ffn(cast(gate), cast(up), cast(down), activation, interleave), cast(x)


def safe_threshold(v: torch.Tensor, q: float) -> float:
    """A threshold near the ``q``-quantile of ``|v|``, halfway between two distinct magnitudes.

    A kernel and the reference sum in different orders, so a value within rounding distance of a
    threshold could land on either side; a midpoint keeps every value clear of it.
    """
    m = v.float().abs().flatten().unique().sort().values
    if len(m) < 2:
        return float(m[0]) / 2 if len(m) else 0.0
    k = min(max(int(q * (len(m) - 1)), 0), len(m) - 2)
    return float((m[k] + m[k + 1]) / 2)


def site_thresholds(packed: PackedFFN, x: torch.Tensor, site: str, q: float = 0.5) -> FFNThresholds:
    """Thresholds of ``site`` (``none``, ``gate_act``, ``intermediate``, ``paper``, ``all``) at about quantile ``q``."""
    xs = x.to(packed.dtype)
    g = torch.nn.functional.linear(xs, packed.gate)
    u = torch.nn.functional.linear(xs, packed.up)
    a = ACTIVATIONS[packed.activation](g)
    y = torch.nn.functional.linear(a * u, packed.down_t.T)
    if site == "none":
        return FFNThresholds()
    if site == "gate_act":
        return FFNThresholds(act=safe_threshold(a, q))
    if site == "intermediate":
        return FFNThresholds(mid=safe_threshold(a * u, q))
    if site == "paper":
        return FFNThresholds(gate=safe_threshold(g, q), up=safe_threshold(u, q), out=safe_threshold(y, q))
    if site == "all":
        return FFNThresholds(
            gate=safe_threshold(g, q / 3),
            up=safe_threshold(u, q / 3),
            act=safe_threshold(a, q / 2),
            mid=safe_threshold(a * u, q),
            out=safe_threshold(y, q / 2),
        )
    raise ValueError(site)
