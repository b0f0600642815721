"""Weight storage for the batch-1 GEMV kernels: formats, the two layouts, packing and unpacking, in plain torch.

Formats (:data:`FORMATS`) are GGUF's tensor types, stored byte for byte as GGUF stores them, so a
``.gguf`` tensor of a supported type is used as is (ggml ``block_q8_0`` / ``block_q4_0`` /
``block_q4_1``; GGUF spec, github.com/ggml-org/ggml/blob/master/docs/gguf.md)::

    f32    float32
    bf16   bfloat16
    q8_0   blocks of 32: fp16 d, int8 q[32]                     w = d * q           (34 bytes, 8.5 bits/w)
    q4_0   blocks of 32: fp16 d, uint8 qs[16]                   w = d * (q - 8)     (18 bytes, 4.5 bits/w)
    q4_1   blocks of 32: fp16 d, fp16 m, uint8 qs[16]           w = d * q + m       (20 bytes, 5 bits/w)

with the 4-bit ``q[j] = qs[j] & 15`` and ``q[j + 16] = qs[j] >> 4`` for ``j < 16``.

Layouts of a weight ``W`` ``[out, in]`` (``y = W x``):

* ``rows`` -- row-major, blocks along the input dimension (GGUF's own layout): data
  ``[out, ceil(in / 32) * block_bytes]``. Dense GEMV and row gathers read it.
* ``cols`` -- input-major: each input channel's column is contiguous, in blocks of 32 along the output
  dimension: data ``[in, ceil(out / 32) * block_bytes]``. Column-sparse GEMV (skip inactive input
  channels) reads it. A quantised column holds the bytes of its ``nb`` blocks regrouped: every block's
  ``d`` (fp16 ``[nb]``), for q4_1 every ``m`` (fp16 ``[nb]``), then every block's quants (``[nb, 32]``
  int8 or ``[nb, 16]`` nibble bytes), so the kernel converts a column's scales 8 or 16 at a time.

A dimension that is not a multiple of 32 is zero-padded to whole blocks (the kernels never read or
write the padding's outputs, and padded inputs are zero). Quantisation rounds half to even and stores
scales as fp16: ``q8_0`` ``d = max|w| / 127``; ``q4_0`` ``d = -w* / 8`` with ``w*`` the entry of
largest magnitude (so it maps to ``q = 0`` exactly); ``q4_1`` ``d = (max - min) / 15``, ``m = min``.

:func:`quantize_activation` is the other half of the integer GEMV numerics (llama.cpp's): the input
vector is quantised once to 8 bits per block of 32 -- ``d = max|x| / 127``, ``q = round(x / d)`` with
``1 / d`` taken in fp32 -- and every block dot product is an exact integer sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "QK",
    "BlockFormat",
    "FORMATS",
    "LAYOUTS",
    "PackedWeight",
    "block_format",
    "pack",
    "unpack",
    "from_gguf_rows",
    "quantize_blocks",
    "dequantize_blocks",
    "block_ints",
    "quantize_activation",
]

QK = 32  # weights per quantisation block


@dataclass(frozen=True)
class BlockFormat:
    """One weight format.

    Attributes:
        name: GGUF type name, lower case.
        code: the format's number in ``csrc/gemv.cpp``.
        block_bytes: bytes per block of :data:`QK` weights (0 for float formats).
        dtype: element dtype of float formats.
    """

    name: str
    code: int
    block_bytes: int = 0
    dtype: torch.dtype | None = None

    @property
    def quantized(self) -> bool:
        return self.block_bytes > 0

    def bits_per_weight(self) -> float:
        if self.quantized:
            return 8.0 * self.block_bytes / QK
        return 8.0 * torch.finfo(self.dtype).bits / 8

    def row_bytes(self, n: int) -> int:
        """Bytes of one stored vector of ``n`` weights (padded to whole blocks)."""
        if self.quantized:
            return -(-n // QK) * self.block_bytes
        return n * torch.finfo(self.dtype).bits // 8


FORMATS: dict[str, BlockFormat] = {
    "f32": BlockFormat("f32", 0, dtype=torch.float32),
    "bf16": BlockFormat("bf16", 1, dtype=torch.bfloat16),
    "q8_0": BlockFormat("q8_0", 2, 34),
    "q4_0": BlockFormat("q4_0", 3, 18),
    "q4_1": BlockFormat("q4_1", 4, 20),
}
LAYOUTS = {"rows": 0, "cols": 1}


def block_format(name: str) -> BlockFormat:
    """The format called ``name``; an unknown name raises an error listing the formats."""
    if name not in FORMATS:
        raise ValueError(f"unknown weight format {name!r}; supported: {', '.join(FORMATS)}")
    return FORMATS[name]


@dataclass
class PackedWeight:
    """A weight ``W`` ``[out_features, in_features]`` in one format and layout.

    Attributes:
        data: float formats: ``[out, in]`` (rows) or ``[in, out]`` (cols) of the format's dtype;
            quantised formats: uint8 ``[out, row_bytes(in)]`` (rows) or ``[in, row_bytes(out)]`` (cols).
        fmt: a key of :data:`FORMATS`.
        layout: ``"rows"`` or ``"cols"``.
        out_features, in_features: the logical shape.
    """

    data: torch.Tensor
    fmt: str
    layout: str
    out_features: int
    in_features: int

    def __post_init__(self):
        f = block_format(self.fmt)
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; supported: {', '.join(LAYOUTS)}")
        n_vec, n_len = (
            (self.out_features, self.in_features) if self.layout == "rows" else (self.in_features, self.out_features)
        )
        if f.quantized:
            want, dtype = (n_vec, f.row_bytes(n_len)), torch.uint8
        else:
            want, dtype = (n_vec, n_len), f.dtype
        if tuple(self.data.shape) != want or self.data.dtype != dtype:
            raise ValueError(
                f"{self.fmt} {self.layout} data for a [{self.out_features}, {self.in_features}] weight must be "
                f"{dtype} {list(want)}, got {self.data.dtype} {list(self.data.shape)}"
            )
        if self.data.device.type != "cpu" or not self.data.is_contiguous():
            raise ValueError("packed weights must be contiguous CPU tensors")

    @property
    def format(self) -> BlockFormat:
        return FORMATS[self.fmt]

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def nbytes(self) -> int:
        """Bytes a dense GEMV reads."""
        return self.data.numel() * self.data.element_size()


def _fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """``[..., 1]`` float -> ``[..., 2]`` uint8 (little-endian fp16)."""
    return v.to(torch.float16).contiguous().view(torch.uint8)


def _fp16_from(b: torch.Tensor) -> torch.Tensor:
    """``[..., 2]`` uint8 -> ``[...]`` float32."""
    return b.contiguous().view(torch.float16)[..., 0].float()


def quantize_blocks(v: torch.Tensor, fmt: str) -> torch.Tensor:
    """Quantise blocks ``v`` ``[..., 32]`` (float) to GGUF block bytes ``[..., block_bytes]``."""
    v = v.float()
    if fmt == "q8_0":
        d = v.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
        q = torch.round(v * inv).clamp(-127, 127).to(torch.int8)
        return torch.cat([_fp16_bytes(d), q.view(torch.uint8)], -1)
    if fmt == "q4_0":
        idx = v.abs().argmax(-1, keepdim=True)
        d = v.gather(-1, idx) / -8
        d = d.to(torch.float16).float()  # quantise with the stored scale
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        q = (torch.round(v * inv) + 8).clamp(0, 15).to(torch.uint8)
        return torch.cat([_fp16_bytes(d), q[..., :16] | (q[..., 16:] << 4)], -1)
    if fmt == "q4_1":
        lo, hi = v.amin(-1, keepdim=True), v.amax(-1, keepdim=True)
        d = ((hi - lo) / 15).to(torch.float16).float()
        m = lo.to(torch.float16).float()
        inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
        q = torch.round((v - m) * inv).clamp(0, 15).to(torch.uint8)
        return torch.cat([_fp16_bytes(d), _fp16_bytes(m), q[..., :16] | (q[..., 16:] << 4)], -1)
    raise ValueError(f"{fmt!r} is not a block format; block formats: q8_0, q4_0, q4_1")


def block_ints(b: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Split GGUF block bytes ``[..., block_bytes]`` into ``(q, d, m)``.

    Returns:
        ``q`` int32 ``[..., 32]`` with the offset applied where the format has one (q4_0: ``q - 8``), so
        ``w = d * q`` (+ ``m`` for q4_1); ``d`` float32 ``[...]``; ``m`` float32 ``[...]`` or ``None``.
    """
    if fmt == "q8_0":
        return b[..., 2:].contiguous().view(torch.int8).int(), _fp16_from(b[..., 0:2]), None
    if fmt in ("q4_0", "q4_1"):
        off = 2 if fmt == "q4_0" else 4
        qs = b[..., off : off + 16].int()
        q = torch.cat([qs & 15, qs >> 4], -1)
        if fmt == "q4_0":
            return q - 8, _fp16_from(b[..., 0:2]), None
        return q, _fp16_from(b[..., 0:2]), _fp16_from(b[..., 2:4])
    raise ValueError(f"{fmt!r} is not a block format; block formats: q8_0, q4_0, q4_1")


def dequantize_blocks(b: torch.Tensor, fmt: str) -> torch.Tensor:
    """GGUF block bytes ``[..., block_bytes]`` -> float32 weights ``[..., 32]`` (``d * q`` (+ ``m``), in fp32)."""
    q, d, m = block_ints(b, fmt)
    w = d[..., None] * q.float()
    return w if m is None else w + m[..., None]


def _header_bytes(fmt: str) -> int:
    return 4 if fmt == "q4_1" else 2


def _regroup(blocks: torch.Tensor, fmt: str) -> torch.Tensor:
    """GGUF blocks ``[n, nb, bb]`` -> the cols layout's ``[n, nb * bb]`` (scales first, then quants)."""
    n, nb, _ = blocks.shape
    parts = [blocks[..., 0:2].reshape(n, -1)]
    if fmt == "q4_1":
        parts.append(blocks[..., 2:4].reshape(n, -1))
    parts.append(blocks[..., _header_bytes(fmt) :].reshape(n, -1))
    return torch.cat(parts, -1).contiguous()


def _ungroup(data: torch.Tensor, fmt: str, bb: int) -> torch.Tensor:
    """The cols layout's ``[n, nb * bb]`` -> GGUF blocks ``[n, nb, bb]``."""
    n = data.shape[0]
    nb = data.shape[1] // bb
    parts = [data[:, : 2 * nb].reshape(n, nb, 2)]
    if fmt == "q4_1":
        parts.append(data[:, 2 * nb : 4 * nb].reshape(n, nb, 2))
    h = _header_bytes(fmt) * nb
    parts.append(data[:, h:].reshape(n, nb, bb - _header_bytes(fmt)))
    return torch.cat(parts, -1)


def _pack_vectors(v: torch.Tensor, f: BlockFormat, layout: str) -> torch.Tensor:
    """Vectors ``[n, L]`` (rows of W for ``rows``, columns for ``cols``) -> stored data."""
    if not f.quantized:
        return v.detach().to(f.dtype).contiguous()
    n, length = v.shape
    nb = -(-length // QK)
    padded = torch.zeros(n, nb * QK, dtype=torch.float32)
    padded[:, :length] = v.detach().float()
    blocks = quantize_blocks(padded.view(n, nb, QK), f.name)
    if layout == "cols":
        return _regroup(blocks, f.name)
    return blocks.reshape(n, nb * f.block_bytes).contiguous()


def _unpack_vectors(data: torch.Tensor, f: BlockFormat, length: int, layout: str) -> torch.Tensor:
    if not f.quantized:
        return data.float()
    n = data.shape[0]
    blocks = _ungroup(data, f.name, f.block_bytes) if layout == "cols" else data.view(n, -1, f.block_bytes)
    w = dequantize_blocks(blocks, f.name)
    return w.reshape(n, -1)[:, :length].contiguous()


def pack(w: torch.Tensor, fmt: str, layout: str = "rows") -> PackedWeight:
    """Store a float weight ``w`` ``[out, in]`` (an ``nn.Linear`` weight) in ``fmt`` and ``layout``.

    Quantised formats quantise blocks of 32 along the input dimension (``rows``) or along the output
    dimension (``cols``); see the module docstring for the rounding rules.
    """
    f = block_format(fmt)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; supported: {', '.join(LAYOUTS)}")
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    with torch.no_grad():
        v = w.detach().cpu().float()
        data = _pack_vectors(v if layout == "rows" else v.T, f, layout)
    return PackedWeight(data, fmt, layout, out_f, in_f)


def unpack(p: PackedWeight) -> torch.Tensor:
    """The float32 weight ``[out, in]`` a packed weight stores (exact: every stored value is an fp32)."""
    if p.layout == "rows":
        return _unpack_vectors(p.data, p.format, p.in_features, "rows")
    return _unpack_vectors(p.data, p.format, p.out_features, "cols").T.contiguous()


def from_gguf_rows(data, fmt: str, out_features: int, in_features: int) -> PackedWeight:
    """Wrap a GGUF tensor's bytes (numpy or torch, ``[out, row_bytes]`` or float ``[out, in]``) without copying."""
    t = data if isinstance(data, torch.Tensor) else torch.from_numpy(np.array(data))  # a copy: GGUF maps are read-only
    f = block_format(fmt)
    if f.quantized:
        t = t.reshape(out_features, f.row_bytes(in_features))
    elif t.dtype != f.dtype:
        t = t.view(f.dtype) if t.element_size() != torch.finfo(f.dtype).bits // 8 else t
    return PackedWeight(t.contiguous(), fmt, "rows", out_features, in_features)


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise an input vector ``x`` ``[n]`` to 8 bits per block of 32, as the integer GEMV kernels do.

    ``x`` is zero-padded to whole blocks; per block ``d = max|x| / 127`` and ``q = round_half_even(x * (1 / d))``
    (``q = 0`` where ``d = 0``), all in fp32.

    Returns:
        ``q`` int32 ``[nb, 32]``, ``d`` float32 ``[nb]``, ``s`` int32 ``[nb]`` (the block sums of ``q``).
    """
    x = x.detach().float().reshape(-1)
    nb = -(-x.numel() // QK)
    xp = torch.zeros(nb * QK, dtype=torch.float32)
    xp[: x.numel()] = x
    xb = xp.view(nb, QK)
    d = xb.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv[:, None]).clamp(-127, 127).int()
    return q, d, q.sum(-1, dtype=torch.int32)
