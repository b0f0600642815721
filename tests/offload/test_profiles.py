"""Device profiles: shipped files validate, bad files fail with the key named, the storage model's equations."""

import math

import numpy as np
import pytest
import yaml

from dormant.offload import StorageModel, list_profiles, load_profile
from dormant.offload.profiles import DeviceProfile, ProfileError


def test_shipped_profiles_load_and_cite_sources():
    names = list_profiles()
    assert {"rpi5-microsd", "rpi5-nvme", "phone-ufs4", "jetson-orin-nano-nvme", "laptop-nvme"} <= set(names)
    for n in names:
        p = load_profile(n)
        assert all(f.source for f in p.figures.values())
        sm = p.storage
        assert sm.latency > 0 and sm.bandwidth > 0 and sm.max_iops > 0


def _valid() -> dict:
    return yaml.safe_load(load_profile("rpi5-nvme").to_yaml())


def test_roundtrip_through_a_user_file(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text(yaml.safe_dump(_valid()))
    p = load_profile(str(f))
    assert p.storage == load_profile("rpi5-nvme").storage and p.path == str(f)


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["storage"].pop("seq_read_MBps"), "seq_read_MBps .* is missing"),
    (lambda d: d["storage"]["seq_read_MBps"].pop("source"), r"must be a mapping \{value"),
    (lambda d: d["storage"]["seq_read_MBps"].update(source=" "), "non-empty"),
    (lambda d: d["dram"]["bandwidth_GBps"].update(value=-1), "positive"),
    (lambda d: d["dram"]["bandwidth_GBps"].update(value="fast"), "must be a number"),
    (lambda d: d["storage"]["max_queue_depth"].update(value=2.5), "integer"),
    (lambda d: d["storage"].update(speed=1), r"unknown key\(s\) \['speed'\]"),
    (lambda d: d.update(gpu={}), "unknown top-level"),
    (lambda d: d.pop("compute"), "section 'compute'"),
    (lambda d: d["storage"]["rand_read_4k_qd1_iops"].update(value=1e6), "sequential bandwidth"),
    (lambda d: d["storage"]["rand_read_4k_max_iops"].update(value=10), "below the QD1"),
])
def test_bad_profiles_name_the_problem(tmp_path, edit, match):
    d = _valid()
    edit(d)
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(d))
    with pytest.raises(ProfileError, match=match):
        load_profile(str(f))


def test_unknown_profile_lists_shipped_ones():
    with pytest.raises(ProfileError, match="rpi5-microsd"):
        load_profile("no-such-device")


def test_storage_model_equations():
    sm = StorageModel(bandwidth=100e6, latency=100e-6, max_iops=20_000, max_queue_depth=8)
    s = 4096
    t_req = 100e-6 + s / 100e6
    assert math.isclose(sm.batch_time(1, s), t_req)                       # one request: L + s/B
    assert math.isclose(sm.request_rate(s, 1), 1 / t_req)
    assert math.isclose(sm.request_rate(s, 8), 20_000)                    # IOPS ceiling
    assert math.isclose(sm.read_bandwidth(1 << 20, 8), 100e6)             # bandwidth ceiling
    assert math.isclose(sm.batch_time(1, 1 << 30), 100e-6 + (1 << 30) / 100e6)
    for q in (1, 2, 8):                                                   # n equal requests, n >= q
        n = 64
        assert math.isclose(sm.batch_time(n, n * s, q), n / sm.request_rate(s, q))
    assert sm.batch_time(0, 0) == 0.0
    np.testing.assert_allclose(sm.batch_time(np.array([0, 1]), np.array([0, s])), [0.0, t_req])
    bws = [sm.read_bandwidth(x, 4) for x in (512, 4096, 32768, 1 << 20)]
    assert bws == sorted(bws)
    assert sm.depth(64) == 8 and sm.depth(None) == 8


def test_profile_built_in_code_is_validated():
    p = load_profile("rpi5-microsd")
    figs = dict(p.figures)
    figs.pop("compute.GFLOPs")
    with pytest.raises(ProfileError, match="missing compute.GFLOPs"):
        DeviceProfile("x", "", figs)
