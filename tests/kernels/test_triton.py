"""The Triton kernel equals the reference: on CUDA (``gpu`` marker), or on the CPU through Triton's
interpreter when ``TRITON_INTERPRET=1`` is set and triton is installed (skipped otherwise)."""

import importlib.util
import os

import pytest
import torch

from dormant.kernels import UnsupportedKernelError, sparse_ffn_decode
from dormant.kernels.reference import sparse_ffn as reference
from tests.kernels.helpers import assert_matches, random_ffn, site_thresholds

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
interpreter = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 and the triton package")
SHAPES = [(37, 101), (1, 3), (300, 515)]


def _check_all(device: str, dtype: torch.dtype, shape, activation: str = "silu", interleave: bool = False):
    p, x = random_ffn(*shape, dtype, activation, interleave=interleave, device=device)
    gen = torch.Generator().manual_seed(1)
    masks = [
        None,
        torch.zeros(p.I, dtype=torch.bool),
        torch.ones(p.I, dtype=torch.bool),
        torch.rand(p.I, generator=gen) < 0.3,
    ]
    for site in ("none", "gate_act", "intermediate", "paper", "all"):
        thr = site_thresholds(p, x, site)
        for mask in masks:
            mask = None if mask is None else mask.to(device)
            out = sparse_ffn_decode(p, x, thr, mask, impl="triton")
            assert out.dtype == dtype and out.device == x.device
            assert_matches(out, reference(p, x, thr, mask))
        idx = masks[3].nonzero().view(-1).to(device)
        assert_matches(sparse_ffn_decode(p, x, thr, idx, impl="triton"), reference(p, x, thr, idx))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(4096, 14336)], ids=str)
def test_triton_matches_reference_on_gpu(dtype, shape):
    _check_all("cuda", dtype, shape)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_triton_activation_and_layout_on_gpu(activation):
    _check_all("cuda", torch.bfloat16, (37, 101), activation, interleave=True)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_triton_matches_reference_in_interpreter(dtype, shape):
    _check_all("cpu", dtype, shape)


@interpreter
def test_triton_activation_and_layout_in_interpreter():
    _check_all("cpu", torch.bfloat16, (37, 101), "gelu_tanh", interleave=True)


@pytest.mark.skipif(INTERPRET or torch.cuda.is_available(), reason="triton can run here")
def test_triton_without_gpu_raises_no_fallback():
    p, x = random_ffn(8, 5, torch.bfloat16)
    with pytest.raises(UnsupportedKernelError, match="triton"):
        sparse_ffn_decode(p, x, impl="triton")
