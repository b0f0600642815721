"""A whole decode step of a generic pre-norm decoder in one C call: ``csrc/decode_step.cpp`` via ctypes.

:mod:`dormant.kernels` knows tensors, not Hugging Face: :class:`DecoderWeights` describes the block
(the equations are in ``csrc/decode_step.cpp``; the torch specification is
:mod:`dormant.llm.decode.reference`) with every projection a :class:`~dormant.kernels.blocks.PackedWeight`,
and :class:`DecodeStep` runs ``token, pos -> logits`` for one KV-cache slot with no per-op Python.

Sparsity is part of the description: a projection in the ``cols`` layout reads only the input
channels that survive its threshold vector (``thresholds[name]``, ``[in]``); ``mid`` and ``act`` are the
FFN's intermediate and ``act(gate)`` (CATS) thresholds. :data:`LAYOUT_RULES` says which layout each
choice needs; :meth:`DecoderWeights.validate` raises on any other combination (no silent fallback).
Projections reading one tensor with one threshold vector (q/k/v, gate/up) may be stored fused, one
cols weight each (:attr:`LayerWeights.qkv`, :attr:`LayerWeights.gate_up`): the same numbers, longer
contiguous columns.
"""

from __future__ import annotations

import ctypes
import hashlib
import threading
from dataclasses import dataclass, field

import torch

from dormant.kernels import build as _build
from dormant.kernels.blocks import LAYOUTS, PackedWeight

__all__ = [
    "PROJECTIONS",
    "ACTIVATIONS",
    "LAYOUT_RULES",
    "LayerWeights",
    "DecoderWeights",
    "DecodeStep",
    "TRACE_SITES",
    "PHASES",
    "library",
]

SOURCE = _build.CSRC / "decode_step.cpp"
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}
LAYOUT_RULES = {
    "dense projection": "rows",
    "projection with an input threshold vector": "cols",
    "down when mid or act is set": "cols",
    "up when act is set (CATS row gather)": "rows",
    "embedding": "rows",
    "LM head": "rows, or cols with head_thresholds (input sparsity; vocab a multiple of 32)",
    "fused qkv / gate_up (one threshold vector for the parts)": "cols",
}
# Phases DecodeStep.profile() reports, in step order (thread 0's wall time, waits at barriers included;
# "qkv" includes the attention norm, "act" the FFN activation, "head" the final norm).
PHASES = ("qkv", "rope", "attention", "o", "gate_up", "act", "down", "head")
# Tensors DecodeStep.step(trace=...) can record per layer, and their width (a DecoderWeights attribute).
TRACE_SITES = {"attn_in": "dim", "o_in": "attn_dim", "ffn_in": "dim", "act": "inter", "mid": "inter"}


@dataclass
class LayerWeights:
    """One decoder layer.

    Attributes:
        attn_norm, ffn_norm: RMSNorm weights ``[dim]`` (float32; Gemma's ``1 + w`` already folded in).
        q, k, v, o, gate, up, down: the projections (``[out, in]`` as ``nn.Linear``); None for parts of a fused weight.
        q_bias, k_bias, v_bias, o_bias: ``[out]`` float32 or None.
        q_norm, k_norm: per-head RMSNorm weights ``[head_dim]`` (Qwen3) or None.
        thresholds: projection name -> input threshold vector ``[in]`` float32 (that projection is cols).
        mid: threshold on ``act(g) * u`` (None: off).
        act: threshold on ``act(g)`` (None: off).
        qkv: q, k and v stacked along the output in one cols weight ``[H hd + 2 H_kv hd, dim]`` (or None), when
            their input thresholds are one vector: each input channel's column is then one longer run of bytes.
            q/k/v must be None and ``thresholds["q"]`` (= k = v) applies.
        qkv_bias: ``[bq | bk | bv]`` of a fused qkv with biases (the q/k/v biases are then None).
        gate_up: gate and up stacked likewise (``[2 inter, dim]``, cols; not with act).
    """

    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    q: PackedWeight | None
    k: PackedWeight | None
    v: PackedWeight | None
    o: PackedWeight
    gate: PackedWeight | None
    up: PackedWeight | None
    down: PackedWeight
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    thresholds: dict[str, torch.Tensor] = field(default_factory=dict)
    mid: float | None = None
    act: float | None = None
    qkv: PackedWeight | None = None
    gate_up: PackedWeight | None = None
    qkv_bias: torch.Tensor | None = None

    def fused_of(self, name: str) -> PackedWeight | None:
        """The fused weight projection ``name`` is part of, or None."""
        if name in ("q", "k", "v"):
            return self.qkv
        if name in ("gate", "up"):
            return self.gate_up
        return None

    def weights(self) -> list[PackedWeight]:
        """Every stored projection weight (fused ones once)."""
        out = [getattr(self, p) for p in PROJECTIONS if getattr(self, p) is not None]
        return out + [w for w in (self.qkv, self.gate_up) if w is not None]

    def expected_layout(self, name: str) -> str:
        """The layout projection ``name`` must have under this layer's sparsity (see :data:`LAYOUT_RULES`)."""
        if name == "up" and self.act is not None:
            return "rows"
        if name == "down" and (self.mid is not None or self.act is not None):
            return "cols"
        return "cols" if name in self.thresholds else "rows"


@dataclass
class DecoderWeights:
    """A decoder-only transformer in engine form.

    Attributes:
        dim, n_heads, n_kv_heads, head_dim, inter, vocab: the shapes.
        eps: RMSNorm epsilon. emb_scale: embedding multiplier (Gemma: ``sqrt(dim)``; else 1).
        attn_scale: score scale (``head_dim ** -0.5`` for these families).
        activation: ``"silu"`` or ``"gelu_tanh"``.
        embedding, head: ``[vocab, dim]``; the embedding rows layout, the head too (the same data when the
            embedding is tied) unless ``head_thresholds`` is set: then the head is a cols weight.
        final_norm: ``[dim]``.
        rope_cos, rope_sin: ``[max_positions, head_dim]`` float32 (``rotate_half`` convention).
        layers: the layers.
        head_thresholds: input threshold vector ``[dim]`` float32 of the LM head (None: dense).
    """

    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    inter: int
    vocab: int
    eps: float
    attn_scale: float
    activation: str
    embedding: PackedWeight
    head: PackedWeight
    final_norm: torch.Tensor
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor
    layers: list[LayerWeights]
    emb_scale: float = 1.0
    head_thresholds: torch.Tensor | None = None

    @property
    def attn_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def nbytes(self) -> int:
        """Bytes of weights a dense step reads (projections and the LM head; the embedding reads one row)."""
        total = self.head.nbytes()
        for layer in self.layers:
            total += sum(w.nbytes() for w in layer.weights())
        return total

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistency (shapes, layouts, sparsity)."""
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} not supported; supported: {', '.join(ACTIVATIONS)}")
        if self.n_heads % self.n_kv_heads or self.head_dim % 2:
            raise ValueError("n_heads must be a multiple of n_kv_heads and head_dim even")
        if self.rope_cos.shape != self.rope_sin.shape or self.rope_cos.shape[1:] != (self.head_dim,):
            raise ValueError(f"rope tables must be [positions, {self.head_dim}], got {tuple(self.rope_cos.shape)}")
        head_layout = "rows" if self.head_thresholds is None else "cols"
        for name, w, layout in (("embedding", self.embedding, "rows"), ("head", self.head, head_layout)):
            if w.shape != (self.vocab, self.dim) or w.layout != layout:
                raise ValueError(f"{name} must be {layout}-layout [{self.vocab}, {self.dim}], got {w.layout} "
                                 f"{list(w.shape)}")
        if self.head_thresholds is not None:
            t = self.head_thresholds
            if t.dtype != torch.float32 or t.shape != (self.dim,):
                raise ValueError(f"head_thresholds must be float32 [{self.dim}], got {t.dtype} {list(t.shape)}")
            if self.vocab % 32:
                raise ValueError(f"a cols LM head needs the vocabulary in whole blocks of 32, got {self.vocab}")
        d, a, kv, i = self.dim, self.attn_dim, self.n_kv_heads * self.head_dim, self.inter
        shapes = {"q": (a, d), "k": (kv, d), "v": (kv, d), "o": (d, a), "gate": (i, d), "up": (i, d), "down": (d, i)}
        for n, layer in enumerate(self.layers):
            if layer.act is not None and "up" in layer.thresholds:
                raise ValueError(
                    f"layer {n}: act (CATS) reads active up rows (rows layout) and an up input threshold needs the "
                    "cols layout; set one of them"
                )
            for t, v in (("mid", layer.mid), ("act", layer.act)):
                if v is not None and not v > 0:
                    raise ValueError(f"layer {n}: {t} threshold must be > 0 or None, got {v}")
            for fused, parts in (("qkv", ("q", "k", "v")), ("gate_up", ("gate", "up"))):
                fw = getattr(layer, fused)
                if fw is None:
                    continue
                rows = sum(shapes[p][0] for p in parts)
                if fw.shape != (rows, d) or fw.layout != "cols" or any(getattr(layer, p) is not None for p in parts):
                    raise ValueError(f"layer {n}: {fused} must be a cols [{rows}, {d}] weight with {'/'.join(parts)} None")
                if any(shapes[p][0] % 32 for p in parts):
                    raise ValueError(f"layer {n}: {fused} needs each part's outputs in whole blocks of 32")
                t = [layer.thresholds.get(p) for p in parts]
                if t[0] is None or any(x is None or not torch.equal(x, t[0]) for x in t):
                    raise ValueError(f"layer {n}: {fused} needs one threshold vector for {', '.join(parts)}")
                if fused == "gate_up" and layer.act is not None:
                    raise ValueError(f"layer {n}: gate_up cannot be fused with act (CATS gathers up rows)")
            for p in PROJECTIONS:
                w = getattr(layer, p)
                if w is None:
                    if layer.fused_of(p) is None:
                        raise ValueError(f"layer {n} {p}: missing weight")
                    continue
                if w.shape != shapes[p]:
                    raise ValueError(f"layer {n} {p}: expected shape {list(shapes[p])}, got {list(w.shape)}")
                want = layer.expected_layout(p)
                if w.layout != want:
                    raise ValueError(
                        f"layer {n} {p}: the plan needs the {want!r} layout, the weight is {w.layout!r} "
                        f"(rules: {LAYOUT_RULES})"
                    )
                t = layer.thresholds.get(p)
                if t is not None and (t.shape != (shapes[p][1],) or t.dtype != torch.float32):
                    raise ValueError(f"layer {n} {p}: thresholds must be float32 [{shapes[p][1]}], got {t.dtype} {list(t.shape)}")
            for p in layer.thresholds:
                if p not in PROJECTIONS:
                    raise ValueError(f"layer {n}: unknown projection {p!r}; projections: {', '.join(PROJECTIONS)}")


# ctypes mirrors of csrc/decode_step.cpp ----------------------------------------------------------

_p, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


class _Mat(ctypes.Structure):
    _fields_ = [("data", _p), ("out", _i64), ("in_", _i64), ("fmt", _i32), ("layout", _i32), ("thr", _p), ("bias", _p)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", _p), ("ffn_norm", _p), ("q_norm", _p), ("k_norm", _p)] + [
        (p, _Mat) for p in PROJECTIONS
    ] + [("mid", _f32), ("act", _f32), ("qkv", _Mat), ("gate_up", _Mat)]


class _Model(ctypes.Structure):
    _fields_ = [
        ("n_layers", _i64), ("dim", _i64), ("n_heads", _i64), ("n_kv_heads", _i64), ("head_dim", _i64),
        ("inter", _i64), ("vocab", _i64), ("max_seq", _i64), ("eps", _f32), ("emb_scale", _f32),
        ("attn_scale", _f32), ("act_fn", _i32), ("emb", _Mat), ("head", _Mat), ("final_norm", _p),
        ("rope_cos", _p), ("rope_sin", _p), ("layers", ctypes.POINTER(_Layer)),
    ]  # fmt: skip


class _Trace(ctypes.Structure):
    _fields_ = [(name, _p) for name in TRACE_SITES]


_LOCK = threading.Lock()
_LIBS: dict[tuple[str, ...], ctypes.CDLL] = {}


def library(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The loaded decode-step library (built on first call; it includes ``gemv.cpp``, whose hash is a build flag
    so that editing it rebuilds this library too). ``extra_flags`` builds a variant (A/B timing, fallbacks)."""
    with _LOCK:
        if extra_flags not in _LIBS:
            gemv_hash = hashlib.sha256((_build.CSRC / "gemv.cpp").read_bytes()).hexdigest()[:16]
            lib = _build.load(SOURCE, (f"-DDORMANT_GEMV_SOURCE={gemv_hash}", *extra_flags))
            lib.dormant_decode_create.argtypes = [ctypes.POINTER(_Model), _p, _i64]
            lib.dormant_decode_create.restype = _p
            lib.dormant_decode_destroy.argtypes = [_p]
            lib.dormant_decode_destroy.restype = None
            lib.dormant_decode_step.argtypes = [_p, _i64, _i64, _i64, _p, _i32, ctypes.POINTER(_Trace)]
            lib.dormant_decode_step.restype = _i32
            lib.dormant_decode_step_batch.argtypes = [_p, _p, _p, _p, _i64, _p, _i32]
            lib.dormant_decode_step_batch.restype = _i32
            lib.dormant_decode_set_split.argtypes = [_p, _i32]
            lib.dormant_decode_set_split.restype = None
            lib.dormant_decode_profile.argtypes = [_p, _p, _i32, _i32]
            lib.dormant_decode_profile.restype = None
            lib.dormant_decode_counts.argtypes = [_p, _p, _i32]
            lib.dormant_decode_counts.restype = _i64
            _LIBS[extra_flags] = lib
        return _LIBS[extra_flags]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _f32(t: torch.Tensor | None, keep: list) -> torch.Tensor | None:
    if t is None:
        return None
    t = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
    keep.append(t)
    return t


def _mat(w: PackedWeight | None, thr: torch.Tensor | None, bias: torch.Tensor | None, keep: list) -> _Mat:
    if w is None:
        return _Mat()  # all zero: absent (a part of a fused weight, or no fused weight)
    keep.append(w.data)
    return _Mat(w.data.data_ptr(), w.out_features, w.in_features, w.format.code, LAYOUTS[w.layout],
                _ptr(_f32(thr, keep)), _ptr(_f32(bias, keep)))  # fmt: skip


COLUMN_SPLIT = {"outputs": 0, "columns": 1, "auto": 2}
# Below this many weight bytes per thread a step runs on fewer threads: each step has ~7 barriers per
# layer, and waking a thread for a few KB of weights costs more than it saves (tiny models, tests).
MIN_BYTES_PER_THREAD = 1 << 21


class DecodeStep:
    """The C engine for one :class:`DecoderWeights`: ``slots`` KV caches of ``max_seq`` positions each.

    Args:
        weights: the model (validated here).
        max_seq: positions per KV slot (at most ``rope_cos.shape[0]``).
        slots: independent sequences (KV caches).
        threads: OpenMP threads per step; None: ``torch.get_num_threads()`` at each step, capped at one thread
            per :data:`MIN_BYTES_PER_THREAD` of weights.
        extra_flags: compiler flags of a library variant (e.g. ``("-mno-avx512f",)``; see :func:`library`).
        column_split: how threads share a cols projection: ``"outputs"`` (each thread its output blocks: the
            same sums for any thread count), ``"columns"`` (each thread whole active columns into a private
            partial, summed in thread order) or ``"auto"`` (columns when a thread's part of each column is
            under 64 blocks: scattered short chunks read slowly from DRAM).
    """

    def __init__(self, weights: DecoderWeights, max_seq: int, slots: int = 1, threads: int | None = None,
                 extra_flags: tuple[str, ...] = (), column_split: str = "auto"):  # fmt: skip
        weights.validate()
        if not 0 < max_seq <= weights.rope_cos.shape[0]:
            raise ValueError(f"max_seq must be in [1, {weights.rope_cos.shape[0]}] (the rope table), got {max_seq}")
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if column_split not in COLUMN_SPLIT:
            raise ValueError(f"column_split {column_split!r} not supported; supported: {', '.join(COLUMN_SPLIT)}")
        self.weights, self.max_seq, self.slots, self.threads = weights, max_seq, slots, threads
        self._max_threads = max(1, weights.nbytes() // MIN_BYTES_PER_THREAD)
        w = weights
        self._keep: list = []
        layers = (_Layer * w.n_layers)()
        for n, lw in enumerate(w.layers):
            bias = {"q": lw.q_bias, "k": lw.k_bias, "v": lw.v_bias, "o": lw.o_bias}
            layers[n] = _Layer(
                _ptr(_f32(lw.attn_norm, self._keep)), _ptr(_f32(lw.ffn_norm, self._keep)),
                _ptr(_f32(lw.q_norm, self._keep)), _ptr(_f32(lw.k_norm, self._keep)),
                *[_mat(getattr(lw, p), lw.thresholds.get(p), bias.get(p), self._keep) for p in PROJECTIONS],
                lw.mid or 0.0, lw.act or 0.0,
                _mat(lw.qkv, lw.thresholds.get("q"), lw.qkv_bias, self._keep),
                _mat(lw.gate_up, lw.thresholds.get("gate"), None, self._keep),
            )  # fmt: skip
        self._layers = layers
        cos, sin = _f32(w.rope_cos[:max_seq], self._keep), _f32(w.rope_sin[:max_seq], self._keep)
        self._model = _Model(
            w.n_layers, w.dim, w.n_heads, w.n_kv_heads, w.head_dim, w.inter, w.vocab, max_seq, w.eps, w.emb_scale,
            w.attn_scale, ACTIVATIONS[w.activation], _mat(w.embedding, None, None, self._keep),
            _mat(w.head, w.head_thresholds, None, self._keep), _ptr(_f32(w.final_norm, self._keep)), cos.data_ptr(), sin.data_ptr(),
            ctypes.cast(layers, ctypes.POINTER(_Layer)),
        )  # fmt: skip
        self.kv = torch.zeros(slots, w.n_layers, 2, w.n_kv_heads, max_seq, w.head_dim, dtype=torch.float32)
        self._lib = library(extra_flags)
        self._handle = self._lib.dormant_decode_create(ctypes.byref(self._model), self.kv.data_ptr(), slots)
        if not self._handle:
            raise ValueError("the C engine rejected the weights description (validate() passed; this is a bug)")
        self._lib.dormant_decode_set_split(self._handle, COLUMN_SPLIT[column_split])

    def __del__(self):
        handle = getattr(self, "_handle", None)
        if handle:
            self._lib.dormant_decode_destroy(handle)
            self._handle = None

    def n_threads(self) -> int:
        """Threads the next step uses."""
        if self.threads is not None:
            return self.threads
        return min(torch.get_num_threads(), self._max_threads)

    def step(
        self, token: int, pos: int, slot: int = 0, out: torch.Tensor | None = None, trace: dict | None = None
    ) -> torch.Tensor:
        """Logits ``[vocab]`` float32 of ``token`` at position ``pos`` in KV slot ``slot`` (writes the cache there).

        ``trace``: a dict to fill with this step's per-layer tensors (keys of :data:`TRACE_SITES`, each
        ``[n_layers, width]``), for calibration.
        """
        if not 0 <= pos < self.max_seq:
            raise IndexError(f"position {pos} outside the KV cache [0, {self.max_seq})")
        if not 0 <= token < self.weights.vocab:
            raise IndexError(f"token {token} outside the vocabulary [0, {self.weights.vocab})")
        if not 0 <= slot < self.slots:
            raise IndexError(f"slot {slot} outside [0, {self.slots})")
        logits = torch.empty(self.weights.vocab, dtype=torch.float32) if out is None else out
        tr = None
        if trace is not None:
            bufs = {k: torch.zeros(self.weights.n_layers, getattr(self.weights, w)) for k, w in TRACE_SITES.items()}
            trace.update(bufs)
            tr = ctypes.byref(_Trace(*[bufs[k].data_ptr() for k in TRACE_SITES]))
        rc = self._lib.dormant_decode_step(self._handle, token, pos, slot, logits.data_ptr(), self.n_threads(), tr)
        if rc != 0:
            raise RuntimeError(f"decode step failed with code {rc}")
        return logits

    def step_batch(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, vocab]``: row ``b`` is :meth:`step` of ``tokens[b]`` at ``positions[b]`` in ``slots[b]``."""
        tokens, positions, slots = (torch.as_tensor(t, dtype=torch.int64).reshape(-1).contiguous()
                                    for t in (tokens, positions, slots))  # fmt: skip
        n = tokens.numel()
        if positions.numel() != n or slots.numel() != n:
            raise ValueError("tokens, positions and slots must have the same length")
        for name, t, hi in (("token", tokens, self.weights.vocab), ("position", positions, self.max_seq),
                            ("slot", slots, self.slots)):  # fmt: skip
            if n and (int(t.min()) < 0 or int(t.max()) >= hi):
                raise IndexError(f"{name}s must lie in [0, {hi})")
        logits = torch.empty(n, self.weights.vocab, dtype=torch.float32)
        rc = self._lib.dormant_decode_step_batch(
            self._handle, tokens.data_ptr(), positions.data_ptr(), slots.data_ptr(), n, logits.data_ptr(),
            self.n_threads(),
        )
        if rc != 0:
            raise RuntimeError(f"decode step failed with code {rc}")
        return logits

    def counts(self, reset: bool = False) -> tuple[torch.Tensor, int, int]:
        """Channels (cols projections) or rows (the CATS up gather) read, ``[n_layers, 7]`` summed over steps, the LM
        head's input channels read (a cols head), and the number of steps. Dense projections count 0."""
        n = self.weights.n_layers * len(PROJECTIONS)
        out = torch.zeros(n + 1, dtype=torch.int64)
        steps = self._lib.dormant_decode_counts(self._handle, out.data_ptr(), int(reset))
        return out[:n].view(self.weights.n_layers, len(PROJECTIONS)), int(out[n]), int(steps)

    def profile(self, enable: bool = True, reset: bool = True) -> dict[str, float]:
        """Seconds spent per phase (:data:`PHASES`) since profiling was last reset; then turn profiling on or off."""
        out = torch.zeros(len(PHASES), dtype=torch.int64)
        self._lib.dormant_decode_profile(self._handle, out.data_ptr(), int(enable), int(reset))
        return {p: float(v) * 1e-9 for p, v in zip(PHASES, out.tolist())}

    def reset(self) -> None:
        """Zero every KV slot."""
        self.kv.zero_()
