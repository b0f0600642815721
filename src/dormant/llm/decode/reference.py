"""The specification of one engine decode step, in plain torch: what ``csrc/decode_step.cpp`` must compute.

:class:`ReferenceStep` runs the block of :mod:`dormant.kernels.decode_step` on the same
:class:`~dormant.kernels.decode_step.DecoderWeights` with every projection computed by its GEMV
specification (:mod:`dormant.kernels.gemv_reference`): a dense ``rows`` projection of a quantised
format quantises its input to 8-bit blocks and sums integer block dots (llama.cpp's numerics); a
``cols`` projection is ``W Z(x, t)`` in float. The FFN::

    g = Wg f;  a = act(g)
    plain / mid:  h = Z(a * Wu f, mid)                       y = Wd h      (Wd in cols: Wd Z(h, t_down))
    CATS (act):   a = Z(a, act);  h = Z(Z(a * Wu f, mid), t_down)  (up rows of a = 0 are never needed)

and ``logits = W_head Z(rmsnorm(x), t_head)`` (a cols head), with ``Z(v, t) = 0 where |v| < t``. In fp32
formats this is the Hugging Face model with those tensors zeroed by hooks; the C step matches it within the
tolerances of ``tests/llm/decode``. Slow (it recomputes dequantised block integers each call): a specification,
not an implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dormant.kernels import gemv_reference as gref
from dormant.kernels.blocks import PackedWeight, unpack
from dormant.kernels.decode_step import DecoderWeights
from dormant.kernels.reference import zero_below

__all__ = ["ReferenceStep", "ACTIVATIONS"]

ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh")}


def _rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _project(w, x: torch.Tensor, thr: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    y = gref.gemv_rows(w, x) if w.layout == "rows" else gref.gemv_cols(w, x, thr)
    return y if bias is None else y + bias


class ReferenceStep:
    """The torch twin of :class:`~dormant.kernels.decode_step.DecodeStep` (same constructor and :meth:`step`)."""

    def __init__(self, weights: DecoderWeights, max_seq: int, slots: int = 1):
        weights.validate()
        self.w, self.max_seq, self.slots = weights, max_seq, slots
        w = weights
        self.kv = torch.zeros(slots, w.n_layers, 2, w.n_kv_heads, max_seq, w.head_dim)

    def reset(self) -> None:
        self.kv.zero_()

    @torch.no_grad()
    def step(self, token: int, pos: int, slot: int = 0) -> torch.Tensor:
        """Logits ``[vocab]`` float32 of ``token`` at ``pos`` in KV slot ``slot``."""
        w = self.w
        hd, group = w.head_dim, w.n_heads // w.n_kv_heads
        act = ACTIVATIONS[w.activation]
        x = _row(w.embedding, token) * w.emb_scale
        cos, sin = w.rope_cos[pos], w.rope_sin[pos]
        for n, L in enumerate(w.layers):
            t = L.thresholds
            a = _rmsnorm(x, L.attn_norm, w.eps)
            if L.qkv is not None:  # one cols weight [q | k | v]: the same numbers as three
                q, k, v = _project(L.qkv, a, t.get("q"), L.qkv_bias).split([w.attn_dim, *(2 * [w.n_kv_heads * hd])])
            else:
                q, k, v = (_project(L.q, a, t.get("q"), L.q_bias), _project(L.k, a, t.get("k"), L.k_bias),
                           _project(L.v, a, t.get("v"), L.v_bias))  # fmt: skip
            q, k, v = q.view(w.n_heads, hd), k.view(w.n_kv_heads, hd), v.view(w.n_kv_heads, hd)
            if L.q_norm is not None:
                q, k = _rmsnorm(q, L.q_norm, w.eps), _rmsnorm(k, L.k_norm, w.eps)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.kv[slot, n, 0, :, pos], self.kv[slot, n, 1, :, pos] = k, v
            keys = self.kv[slot, n, 0, :, : pos + 1].repeat_interleave(group, 0)  # [H, pos+1, hd]
            vals = self.kv[slot, n, 1, :, : pos + 1].repeat_interleave(group, 0)
            p = torch.softmax((keys @ q[:, :, None])[..., 0] * w.attn_scale, -1)  # [H, pos+1]
            o = (p[:, None, :] @ vals)[:, 0].reshape(-1)
            x = x + _project(L.o, o, t.get("o"), L.o_bias)
            f = _rmsnorm(x, L.ffn_norm, w.eps)
            if L.gate_up is not None:
                g, u = _project(L.gate_up, f, t.get("gate"), None).split([w.inter, w.inter])
            else:
                g = _project(L.gate, f, t.get("gate"), None)
                u = _project(L.up, f, t.get("up"), None)
            ga = act(g)
            if L.act is not None:
                ga = zero_below(ga, L.act)
            h = zero_below(ga * u, L.mid or 0.0)
            if L.act is not None:  # the C step applies down's input thresholds while gathering
                h = torch.where(gref.active_columns(h, t.get("down")), h, torch.zeros_like(h))
                x = x + gref.gemv_cols(L.down, h, None)
            else:
                x = x + _project(L.down, h, t.get("down"), None)
        return _project(w.head, _rmsnorm(x, w.final_norm, w.eps), w.head_thresholds, None)


def _rotate_half(v: torch.Tensor) -> torch.Tensor:
    h = v.shape[-1] // 2
    return torch.cat([-v[..., h:], v[..., :h]], -1)


def _row(w: PackedWeight, r: int) -> torch.Tensor:
    """Row ``r`` of a rows-layout weight, dequantised."""
    one = PackedWeight(w.data[r : r + 1].contiguous(), w.fmt, "rows", 1, w.in_features)
    return unpack(one)[0]
