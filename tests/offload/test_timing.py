"""The per-token timeline of estimate_time on hand-made access statistics."""

import math

import numpy as np
import pytest

from dormant.offload import FFNGeometry, ItemLayout, StorageLayout, parse_policy, weight_format
from dormant.offload.profiles import DeviceProfile, Figure
from dormant.offload.simulator import AccessStats, estimate_time


def profile(bw_MBps=1.0, iops1=100.0, dram_GBps=1.0, gflops=1e6) -> DeviceProfile:
    f = {
        "storage.seq_read_MBps": Figure(bw_MBps, "test"),
        "storage.rand_read_4k_qd1_iops": Figure(iops1, "test"),
        "storage.rand_read_4k_max_iops": Figure(1e6, "test"),
        "storage.max_queue_depth": Figure(1, "test"),
        "dram.capacity_GB": Figure(1, "test"),
        "dram.bandwidth_GBps": Figure(dram_GBps, "test"),
        "compute.GFLOPs": Figure(gflops, "test"),
    }
    return DeviceProfile("t", "test", f)


def stats(policy, pf=None, dem=None, compute=None, L=2):
    z = np.zeros((1, L), dtype=np.int64)
    pf_b = np.array([pf], dtype=np.int64) if pf is not None else z
    dem_b = np.array([dem], dtype=np.int64) if dem is not None else z
    return AccessStats(parse_policy(policy), 0.0, 1, (dem_b > 0).astype(np.int64), dem_b, (pf_b > 0).astype(np.int64),
                       pf_b, np.array([compute or [0] * L], dtype=np.int64))


@pytest.fixture
def items():
    g = FFNGeometry(2, 8, 4, attn_params=1000, head_params=0)
    return ItemLayout(g, weight_format("fp16"), StorageLayout(align=1))


def test_compute_only(items):
    prof = profile(dram_GBps=1.0)
    r = estimate_time(stats("lru", compute=[4, 2]), prof, items)
    c_attn = 2 * 1000 / 1e9
    c_ffn = (4 + 2) * items.neuron_bytes / 1e9
    assert math.isclose(r["time_per_token_s"], 2 * c_attn + c_ffn)
    assert r["io_stall_s"] == pytest.approx(0.0, abs=1e-15)


def test_demand_loads_stall_in_full(items):
    prof = profile()
    sm = prof.storage
    r = estimate_time(stats("demand", dem=[1000, 3000]), prof, items)
    io = sm.batch_time(1, 1000) + sm.batch_time(1, 3000)
    assert math.isclose(r["io_stall_s"], io) and math.isclose(r["io_busy_s"], io)


def test_prefetch_hides_io_behind_compute(items):
    prof = profile()
    sm = prof.storage
    t1 = sm.batch_time(1, 1000)
    # layer 0's prefetch is issued at token start and cannot hide; layer 1's overlaps layer 0's compute
    big = int(t1 * 1e9 / items.neuron_bytes) + 10  # layer-0 compute longer than t1
    r = estimate_time(stats("prefetch-oracle", pf=[1000, 1000], compute=[big, 0]), prof, items)
    c_attn = 2 * 1000 / 1e9
    assert math.isclose(r["io_stall_s"], max(0.0, t1 - c_attn) + 0.0, rel_tol=1e-9, abs_tol=1e-12)
    # lookahead 0: both prefetches wait behind the attention of their own layer only
    r0 = estimate_time(stats("prefetch-oracle:d=0", pf=[1000, 1000], compute=[big, 0]), prof, items)
    assert r0["io_stall_s"] > r["io_stall_s"]


def test_dense_compute_counts_all_neurons(items):
    prof = profile()
    r = estimate_time(stats("dense", compute=[4, 4]), prof, items)
    assert math.isclose(r["compute_s"], 2 * 2000 / 1e9 + 8 * items.neuron_bytes / 1e9)


def test_predictor_cost_is_compute(items):
    prof = profile()
    a = estimate_time(stats("lru", compute=[4, 2]), prof, items)
    b = estimate_time(stats("lru", compute=[4, 2]), prof, items, predictor_bytes_per_token=1e6)
    assert math.isclose(b["compute_s"] - a["compute_s"], 1e6 / 1e9)
