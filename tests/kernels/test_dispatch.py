"""One explicit table of implementations: unknown names and unsupported devices raise, listing options."""

import pytest
import torch

from dormant.kernels import (
    IMPLS,
    Impl,
    UnsupportedKernelError,
    check_impl,
    default_impl,
    resolve_impl,
    sparse_ffn_decode,
)
from tests.kernels.helpers import random_ffn


def test_every_impl_has_a_table_entry():
    assert set(IMPLS) == set(Impl)
    assert resolve_impl("cpu") is Impl.CPU and resolve_impl(Impl.TRITON) is Impl.TRITON


def test_unknown_impl_lists_the_options():
    with pytest.raises(UnsupportedKernelError, match="reference, cpu, triton"):
        resolve_impl("numba")
    p, x = random_ffn(8, 5, torch.float32)
    with pytest.raises(UnsupportedKernelError, match="choose from"):
        sparse_ffn_decode(p, x, impl="fast")


def test_default_impl_by_device_never_reference():
    assert default_impl("cpu") is Impl.CPU
    assert default_impl("cuda") is Impl.TRITON
    with pytest.raises(UnsupportedKernelError, match="cpu.*cuda"):
        default_impl("meta")


def test_no_silent_fallback_between_impls():
    # Weights on the CPU in float16: the CPU kernel refuses rather than handing over to the reference.
    with pytest.raises(UnsupportedKernelError, match="supports float32, bfloat16"):
        check_impl("cpu", "cpu", torch.float16)
    with pytest.raises(UnsupportedKernelError, match="runs on the CPU"):
        check_impl("cpu", "meta", torch.float32)
    assert check_impl("reference", "cpu", torch.float16) is Impl.REFERENCE


def test_reference_impl_runs_anywhere():
    p, x = random_ffn(8, 5, torch.float16)
    assert sparse_ffn_decode(p, x, impl="reference").dtype == torch.float16
