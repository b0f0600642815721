"""The C++ CPU kernel equals the reference on odd shapes, both dtypes, every mode and thread count."""

import pytest
import torch

from dormant.kernels import FFNThresholds, UnsupportedKernelError, sparse_ffn_decode
from dormant.kernels import build as kernel_build
from dormant.kernels import cpu as cpu_kernel
from dormant.kernels.reference import sparse_ffn as reference
from tests.kernels.helpers import assert_matches, random_ffn, site_thresholds

DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(37, 101), (1, 3), (8, 5), (576, 64)]
SITES = ["none", "gate_act", "intermediate", "paper", "all"]


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("interleave", [False, True])
def test_gate_first_matches_reference(dtype, shape, interleave):
    p, x = random_ffn(*shape, dtype, interleave=interleave)
    for site in SITES:
        thr = site_thresholds(p, x, site)
        assert_matches(sparse_ffn_decode(p, x, thr, impl="cpu"), reference(p, x, thr))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_given_set_matches_reference(dtype, shape):
    p, x = random_ffn(*shape, dtype, seed=1)
    gen = torch.Generator().manual_seed(2)
    masks = {
        "empty": torch.zeros(p.I, dtype=torch.bool),
        "full": torch.ones(p.I, dtype=torch.bool),
        "half": torch.rand(p.I, generator=gen) < 0.5,
        "one": torch.arange(p.I) == p.I // 2,
    }
    for site in ("none", "gate_act", "all"):
        thr = site_thresholds(p, x, site)
        for mask in masks.values():
            expected = reference(p, x, thr, mask)
            assert_matches(sparse_ffn_decode(p, x, thr, mask, impl="cpu"), expected)
            idx = mask.nonzero().view(-1)
            assert_matches(sparse_ffn_decode(p, x, thr, idx, impl="cpu"), expected)
        assert torch.equal(
            sparse_ffn_decode(p, x, thr, masks["empty"], impl="cpu"), torch.zeros(p.D, dtype=dtype)
        )


def test_full_set_equals_gate_first():
    p, x = random_ffn(37, 101, torch.float32)
    thr = site_thresholds(p, x, "paper")
    full = torch.arange(p.I)
    torch.testing.assert_close(
        cpu_kernel.sparse_ffn(p, x, thr, full), cpu_kernel.sparse_ffn(p, x, thr), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_thread_counts(threads, n):
    # 256 x 1024 fp32 is 3 MiB, enough for the kernel to use up to 3 threads; 7 exceeds the work split.
    p, x = random_ffn(256, 1024, torch.float32, activation="gelu_tanh")
    thr = site_thresholds(p, x, "all")
    threads(n)
    assert_matches(cpu_kernel.sparse_ffn(p, x, thr), reference(p, x, thr))
    assert_matches(
        cpu_kernel.sparse_ffn(p, x, thr, torch.arange(0, p.I, 3)),
        reference(p, x, thr, torch.arange(0, p.I, 3)),
    )


def test_bf16_rounding_is_emulated_exactly():
    # Intermediates are rounded to bf16 where the dense module rounds them: no mask decision differs,
    # so with the reference's own thresholds the outputs agree to within the output's last bit.
    p, x = random_ffn(576, 1536, torch.bfloat16, seed=3)
    thr = site_thresholds(p, x, "all")
    out, ref = cpu_kernel.sparse_ffn(p, x, thr), reference(p, x, thr)
    assert ((out == 0) == (ref == 0)).all()
    assert_matches(out, ref)


def test_bad_indices_and_unsupported_inputs_raise():
    p, x = random_ffn(8, 5, torch.float32)
    for bad in (torch.tensor([3, 1]), torch.tensor([1, 1]), torch.tensor([5]), torch.tensor([-1])):
        with pytest.raises(IndexError, match="strictly increasing"):
            cpu_kernel.sparse_ffn(p, x, FFNThresholds(), bad)
    with pytest.raises(ValueError, match="shape"):
        cpu_kernel.sparse_ffn(p, x, FFNThresholds(), torch.ones(4, dtype=torch.bool))
    p16, x16 = random_ffn(8, 5, torch.float16)
    with pytest.raises(UnsupportedKernelError, match="float32, bfloat16"):
        sparse_ffn_decode(p16, x16, impl="cpu")


def test_missing_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setattr(kernel_build.shutil, "which", lambda name: None)
    with pytest.raises(cpu_kernel.KernelBuildError, match="g\\+\\+"):
        cpu_kernel.build(force=True)


def test_build_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DORMANT_CACHE", str(tmp_path))
    path = cpu_kernel.build()
    assert path.is_file() and path.parent == tmp_path / "kernels"
    mtime = path.stat().st_mtime_ns
    assert cpu_kernel.build() == path and path.stat().st_mtime_ns == mtime
    assert not [f for f in path.parent.iterdir() if f.name.startswith(".")]  # no temp files left
