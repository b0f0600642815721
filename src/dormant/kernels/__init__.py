"""Sparse FFN kernels: a plain-torch reference (the specification) and fast CPU and Triton implementations.

``sparse_ffn_decode(pack_ffn(gate, up, down), x, FFNThresholds(act=t), impl="cpu")`` runs one token
through one gated FFN layer reading only the rows of active neurons. See :mod:`dormant.kernels.base`
for the layout, :mod:`dormant.kernels.ffn` for modes and dispatch, :mod:`dormant.kernels.reference` for the exact semantics, and
:mod:`dormant.llm.sparse_decode` for using them inside a Hugging Face model. Importing this package
builds nothing and imports neither triton nor transformers.
"""

from dormant.kernels.base import FFNThresholds, Impl, PackedFFN, UnsupportedKernelError, pack_ffn
from dormant.kernels.ffn import IMPLS, check_impl, default_impl, resolve_impl, sparse_ffn_decode

__all__ = [
    "IMPLS",
    "FFNThresholds",
    "Impl",
    "PackedFFN",
    "UnsupportedKernelError",
    "check_impl",
    "default_impl",
    "pack_ffn",
    "resolve_impl",
    "sparse_ffn_decode",
]
