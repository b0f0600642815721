"""The cache simulator against analytic values and the brute-force reference caches."""

import math

import numpy as np
import pytest
import torch

from dormant.offload import (
    FFNGeometry,
    ItemLayout,
    Policy,
    StorageLayout,
    parse_policy,
    perturb_trace,
    simulate,
    synthetic_trace,
    weight_format,
)
from dormant.offload.reference import reference_loads
from dormant.offload.simulator import capacity, hot_chunks
from dormant.traces import ActivationTrace, pack_masks

EXACT = StorageLayout(align=1, chunk=1)


def make_trace(masks: np.ndarray, hidden: int = 8) -> ActivationTrace:
    t, n_layers, n = masks.shape
    model = {"id": "hand", "dtype": "float16", "n_layers": n_layers, "hidden_size": hidden,
             "intermediate_size": n, "gated": True}
    return ActivationTrace(pack_masks(masks), n, model, {"kind": "oracle"})


def random_masks(seed: int, t=40, n_layers=2, n=24, density=0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.beta(1, 2, size=(n_layers, n)) * 2 * density
    return rng.random((t, n_layers, n)) < p


def items_for(trace, layout=EXACT, fmt="fp16"):
    return ItemLayout(FFNGeometry.from_trace(trace), weight_format(fmt), layout)


def test_bytes_per_neuron_formats():
    g = FFNGeometry(30, 576, 1536)
    assert g.neuron_bytes(weight_format("fp16")) == 3 * 576 * 2
    assert g.neuron_bytes(weight_format("fp32")) == 3 * 576 * 4
    assert g.neuron_bytes(weight_format("int8")) == 3 * (576 + 576 // 32 * 2)
    assert g.neuron_bytes(weight_format("int4")) == 3 * (288 + 576 // 32 * 2)
    assert g.ffn_bytes(weight_format("fp16")) == 30 * 1536 * 3456
    with pytest.raises(ValueError, match="choose from"):
        weight_format("fp8")


def test_dense_reads_all_ffn_bytes_per_token():
    tr = make_trace(random_masks(0))
    it = items_for(tr)
    st = simulate(tr, parse_policy("dense"), 0.0, it)
    ffn = FFNGeometry.from_trace(tr).ffn_bytes(weight_format("fp16"))
    assert (st.read_bytes == ffn).all()
    assert st.pollution_bytes == 0 and st.ready == st.needed


def test_demand_reads_exactly_the_active_neurons():
    m = random_masks(1)
    tr = make_trace(m)
    it = items_for(tr)
    st = simulate(tr, parse_policy("demand"), 0.5, it)  # no cache: the budget is unused
    nb = it.neuron_bytes
    np.testing.assert_array_equal(st.dem_bytes, m.sum(-1) * nb)
    assert st.pf_bytes.sum() == 0 and st.hits == 0 and st.padding_bytes == 0


def test_infinite_cache_reads_each_neuron_once():
    m = random_masks(2)
    tr = make_trace(m)
    it = items_for(tr)
    for pol in ("lru", "lfu", "window:k=100000"):
        st = simulate(tr, parse_policy(pol), math.inf, it)
        assert st.read_bytes.sum() == m.any(0).sum() * it.neuron_bytes, pol


@pytest.mark.parametrize("kind", ["lru", "lfu"])
@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cache_matches_brute_force_reference(kind, window, seed):
    m = random_masks(seed)
    tr = make_trace(m)
    it = items_for(tr)
    for cap in (0, 1, 5, 11, 24):
        budget = cap / m.shape[2]
        pol = Policy(f"{kind}", "demand", cache=kind, window=window)
        st = simulate(tr, pol, budget, it)
        assert st.capacity_items == cap * m.shape[1]
        ref_loads, ref_hits = reference_loads(m, cap, kind, window)
        np.testing.assert_array_equal(st.dem_bytes // it.neuron_bytes, ref_loads, err_msg=f"{kind} C={cap}")
        assert st.hits == ref_hits.sum()


def test_prefetch_matches_reference_and_charges_misses():
    m = random_masks(3)
    tr = make_trace(m)
    pred = perturb_trace(tr, fn_rate=0.2, fp_rate=0.3, seed=1)
    pm = pred.masks().numpy()
    it = items_for(tr)
    cap = 6
    st = simulate(tr, parse_policy("prefetch"), cap / m.shape[2], it, predicted=pred)
    ref_loads, _ = reference_loads(m, cap, "lru", predicted=pm)
    np.testing.assert_array_equal((st.dem_bytes + st.pf_bytes) // it.neuron_bytes, ref_loads)
    # with no cache, demand loads are exactly the missed active neurons
    st0 = simulate(tr, parse_policy("prefetch:cache=none"), 0.0, it, predicted=pred)
    np.testing.assert_array_equal(st0.dem_bytes // it.neuron_bytes, (m & ~pm).sum(-1))
    np.testing.assert_array_equal(st0.pf_bytes // it.neuron_bytes, pm.sum(-1))
    assert st0.pollution_bytes == (pm & ~m).sum() * it.neuron_bytes
    skip = simulate(tr, parse_policy("prefetch:cache=none,miss=skip"), 0.0, it, predicted=pred)
    assert skip.dem_bytes.sum() == 0 and skip.skipped == (m & ~pm).sum()


def test_oracle_prefetch_equals_lru_bytes():
    tr = make_trace(random_masks(4))
    it = items_for(tr)
    a = simulate(tr, parse_policy("lru"), 0.3, it)
    b = simulate(tr, parse_policy("prefetch-oracle"), 0.3, it)
    np.testing.assert_array_equal(a.dem_bytes, b.pf_bytes)
    assert b.dem_bytes.sum() == 0 and b.ready == b.needed


def test_window_on_hand_made_trace():
    # one layer, 4 neurons: neuron 0 every token, neuron 1 at t=0 and t=3, neuron 2 at t=1, neuron 3 at t=4
    m = np.zeros((5, 1, 4), bool)
    m[:, 0, 0] = True
    m[0, 0, 1] = m[3, 0, 1] = True
    m[1, 0, 2] = True
    m[4, 0, 3] = True
    tr = make_trace(m)
    it = items_for(tr)
    # window k: after token t the cache holds what tokens t-k+1 .. t used
    loads = simulate(tr, parse_policy("window:k=2"), math.inf, it).dem_bytes[:, 0] // it.neuron_bytes
    # t0: {0,1}; t1: {2} new; t2: none new (1 dropped after t2); t3: 1 reloaded; t4: {3}
    np.testing.assert_array_equal(loads, [2, 1, 0, 1, 1])
    loads3 = simulate(tr, parse_policy("window:k=3"), math.inf, it).dem_bytes[:, 0] // it.neuron_bytes
    np.testing.assert_array_equal(loads3, [2, 1, 0, 0, 1])  # with k=3, neuron 1 survives t1, t2 and hits at t3
    # a window bounded by a budget of 2 neurons behaves as LRU(2) inside the window
    loads_cap = simulate(tr, parse_policy("window:k=3"), 2 / 4, it).dem_bytes[:, 0] // it.neuron_bytes
    ref, _ = reference_loads(m, 2, "lru", window=3)
    np.testing.assert_array_equal(loads_cap, ref[:, 0])


def test_pinning_on_hand_made_trace():
    # 2 layers x 4 neurons; profile part (t<4): neuron 0 of layer 1 and neuron 3 of layer 0 are hottest
    m = np.zeros((8, 2, 4), bool)
    m[:4, 1, 0] = True
    m[:3, 0, 3] = True
    m[:1, 0, 1] = True
    m[4:, :, :] = True  # evaluation part: everything active
    tr = make_trace(m)
    it = items_for(tr)
    pinned = hot_chunks(tr, it, 2, stop=4)
    assert pinned.sum() == 2 and pinned[1, 0] and pinned[0, 3]
    pol = parse_policy("hot")
    caps, n_pin = capacity(pol, 2 / 8, 2, 4)
    assert n_pin == 2 and caps.tolist() == [0, 0]
    st = simulate(tr, pol, 2 / 8, it, split=4)
    assert (st.dem_bytes.sum(1) == 6 * it.neuron_bytes).all()  # 8 active, 2 pinned
    assert st.pin_load_bytes == 2 * it.neuron_bytes
    assert st.hits == 2 * 4
    with pytest.raises(ValueError, match="profiling"):
        simulate(tr, pol, 2 / 8, it, split=0)


def test_pinned_plus_lru_shares_the_budget_by_unpinned_chunks():
    m = random_masks(6, t=60, n=16)
    tr = make_trace(m)
    it = items_for(tr)
    pol = parse_policy("hot+lru")  # half the budget pinned
    pinned = hot_chunks(tr, it, 8, stop=20)
    caps, n_pin = capacity(pol, 0.5, 2, 16, pinned)
    assert n_pin == 8 and caps.sum() <= 16 - 8 and (caps <= 16 - pinned.sum(1)).all()
    pinned16 = hot_chunks(tr, it, 16, stop=20)
    full, _ = capacity(pol, 1.0, 2, 16, pinned16)
    np.testing.assert_array_equal(full, 16 - pinned16.sum(1))  # a 100% budget holds everything
    st = simulate(tr, pol, 1.0, it, split=20)
    assert st.read_bytes.sum() == (m[20:].any(0) & ~pinned16).sum() * it.neuron_bytes
    st = simulate(tr, pol, 0.5, it, split=20)
    ref, _ = reference_loads(m[20:], 0, "lru", pinned=pinned)  # capacities differ per layer: check bounds
    assert (st.dem_bytes // it.neuron_bytes <= ref).all()


def test_chunks_and_alignment_padding():
    m = np.zeros((1, 1, 10), bool)
    m[0, 0, [0, 1, 5]] = True
    tr = make_trace(m, hidden=8)  # fp16 neuron = 3 * 16 = 48 bytes
    it = items_for(tr, StorageLayout(chunk=2, align=1))
    st = simulate(tr, parse_policy("demand"), 0.0, it)
    assert st.dem_req[0, 0] == 2 and st.dem_bytes[0, 0] == 4 * 48   # chunks {0,1} and {4,5}
    assert st.pollution_bytes == 48                                   # neuron 4 loaded, never used
    it = items_for(tr, StorageLayout(chunk=1, align=64, coalesce=True))
    st = simulate(tr, parse_policy("demand"), 0.0, it)
    # runs [0,96) -> [0,128) and [240,288) -> [192,320)
    assert st.dem_req[0, 0] == 2 and st.dem_bytes[0, 0] == 128 + 128 and st.padding_bytes == 256 - 144
    it = items_for(tr, StorageLayout(bundling="separate", chunk=1, align=1, coalesce=False))
    st = simulate(tr, parse_policy("demand"), 0.0, it)
    assert st.dem_req[0, 0] == 9 and st.dem_bytes[0, 0] == 3 * 48


def test_request_list_matches_cost():
    tr = synthetic_trace(3, 2, 50, hidden_size=20, seed=0)
    for lay in (StorageLayout(chunk=3, align=64), StorageLayout("separate", chunk=2, align=32, coalesce=False)):
        it = items_for(tr, lay)
        mask = it.items(tr.masks(tokens=slice(0, 1)).numpy()[0])
        n, read = it.requests(mask)
        for layer in range(2):
            reqs = it.request_list(layer, mask[layer])
            assert len(reqs) == n[layer] and sum(s for _, s in reqs) == read[layer]
            assert all(o % lay.align == 0 and s % lay.align == 0 for o, s in reqs)


def test_predicted_trace_must_be_aligned():
    tr = make_trace(random_masks(5))
    other = make_trace(random_masks(5, t=30))
    with pytest.raises(ValueError, match="aligned"):
        simulate(tr, parse_policy("prefetch"), 0.5, items_for(tr), predicted=other)
    with pytest.raises(ValueError, match="predicted trace"):
        simulate(tr, parse_policy("prefetch"), 0.5, items_for(tr))


def test_policy_parsing():
    p = parse_policy("prefetch:d=2,cache=lfu,miss=skip")
    assert (p.lookahead, p.cache, p.on_miss, p.name) == (2, "lfu", "skip", "prefetch:d=2,cache=lfu,miss=skip")
    assert parse_policy("lru:pin=0.3").pin == 0.3
    with pytest.raises(ValueError, match="presets"):
        parse_policy("fifo")
    with pytest.raises(ValueError, match="keys"):
        parse_policy("lru:x=1")


def test_perturb_trace_rates():
    tr = synthetic_trace(200, 2, 512, density=0.3, seed=0)
    pred = perturb_trace(tr, 0.05, 0.07, seed=0)
    m, p = tr.masks().numpy(), pred.masks().numpy()
    recall = (m & p).sum() / m.sum()
    extra = (p & ~m).sum() / m.sum()
    assert abs(recall - 0.95) < 0.01 and abs(extra - 0.07) < 0.01
    assert pred.source["kind"] == "predicted"
    assert torch.equal(tr.packed, synthetic_trace(200, 2, 512, density=0.3, seed=0).packed)
