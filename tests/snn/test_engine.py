"""The fast simulation engine and the fused IF kernel give the reference's outputs bit for bit.

Kernel level: ``dormant.kernels.spiking`` against its torch specification on random currents (conv- and
linear-shaped, with and without per-step biases, step-broadcast inputs). Network level: every way the code
simulates (plain simulation with monitors, FTBC cached and re-forward, BC, PC, RTS, QCFS neurons) on the tiny nets
and on the real CIFAR ResNet-20 (whose channel counts select other oneDNN kernels than the tiny ones).
"""

import pytest
import torch

from dormant.kernels import spiking
from dormant.kernels import spiking_reference as reference
from dormant.snn.calibrate import CalibrationData, get_calibration
from dormant.snn.conversion import ConvertConfig, convert
from dormant.snn.ftbc import FTBCConfig, calibrate_ftbc
from dormant.snn.network import ENGINES
from dormant.snn.simulate import evaluate_snn

from .test_models_data import needs_cifar
from .tiny import synthetic, trained


@pytest.mark.parametrize("shape", [(7, 3, 5, 6, 6), (4, 2, 9, 1), (5, 3, 6), (3, 1, 16, 4, 4), (2, 2, 3, 2, 3)])
@pytest.mark.parametrize("with_beta", [False, True])
def test_fused_if_equals_the_step_by_step_loop(shape, with_beta):
    g = torch.Generator().manual_seed(sum(shape))
    steps, _, channels = shape[:3]
    x = torch.randn(shape, generator=g)
    x[x.abs() < 0.3] = 0.0  # exact zeros and ties with theta happen in real networks
    theta = torch.rand(channels, generator=g) + 0.2
    x[0, 0, 0] = theta[0]
    beta = 0.1 * torch.randn(steps, channels, generator=g) if with_beta else None
    v0 = torch.rand(shape[1:], generator=g)
    v_ref, v_cpu = v0.clone(), v0.clone()
    out_ref = reference.if_forward(x, beta, theta, v_ref)
    out_cpu = spiking.if_forward(x, beta, theta, v_cpu, impl="cpu")
    assert torch.equal(out_ref, out_cpu) and torch.equal(v_ref, v_cpu)
    assert (out_ref != 0).any() and (out_ref == 0).any()
    # a step-broadcast input (the analog image's first layer) is read without a copy and gives the same
    one = x[0].unsqueeze(0).expand(shape)
    v_ref, v_cpu = v0.clone(), v0.clone()
    assert torch.equal(reference.if_forward(one, beta, theta, v_ref),
                       spiking.if_forward(one, beta, theta, v_cpu, impl="cpu"))
    assert torch.equal(v_ref, v_cpu)
    target = torch.rand(shape[1:], generator=g)
    b = torch.randn(channels, generator=g)
    assert torch.equal(reference.if_probe(x[1], b, theta, v0, target),
                       spiking.if_probe(x[1], b, theta, v0, target, impl="cpu"))
    assert torch.equal(reference.count_nonzero(out_ref.reshape(steps, -1)),
                       spiking.count_nonzero(out_ref, impl="cpu"))


def test_if_implementations_are_checked():
    x = torch.zeros(2, 1, 3)
    with pytest.raises(ValueError, match="auto, cpu, reference"):
        spiking.if_forward(x, None, torch.ones(3), torch.zeros(1, 3), impl="gpu")
    with pytest.raises(ValueError, match="float32 CPU"):
        spiking.if_forward(x.double(), None, torch.ones(3), torch.zeros(1, 3).double(), impl="cpu")
    with spiking.using("reference"):
        assert spiking.default_impl() == "reference"
    assert spiking.default_impl() == "auto"


def _tiny(pool: str):
    xc, _ = synthetic(128, seed=3)
    return convert(trained(pool), xc, ConvertConfig(percentile=99.9)), xc


def _both(snn, run):
    """``run()`` under the reference engine, then the fast one (the network is left on the fast engine)."""
    out = {}
    for engine in ("reference", "fast"):
        snn.engine = engine
        out[engine] = run()
    return out["reference"], out["fast"]


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return torch.equal(a, b)


@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize(("n", "T", "chunk"), [(6, 5, None), (6, 5, 2), (1, 4, None), (1, 1, None), (3, 7, 1)])
def test_fast_engine_simulates_like_the_reference(pool, n, T, chunk):
    snn, _ = _tiny(pool)
    x, y = synthetic(n, seed=5)
    ref, fast = _both(snn, lambda: snn.simulate(x, T, chunk=chunk))
    assert torch.equal(ref, fast)
    ref, fast = _both(snn, lambda: evaluate_snn(snn, x, y, T, batch_size=4, chunk=chunk))
    assert torch.equal(ref.correct, fast.correct)
    assert _equal(ref.rates, fast.rates) and _equal(ref.synaptic_rates, fast.synaptic_rates)
    assert len(fast.synaptic_rates["conv1"]) == T  # the analog layer is counted at every step


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_fast_engine_calibrates_like_the_reference(pool):
    snn, xc = _tiny(pool)
    for impl in ("cached", "reforward"):
        cfg = FTBCConfig(passes=2, batch_size=32, select="last", implementation=impl)
        ref, fast = _both(snn, lambda cfg=cfg: calibrate_ftbc(snn, xc[:64], 6, cfg).snapshots)
        assert all(_equal(a, b) for a, b in zip(ref, fast))
        assert any(bool(b.any()) for b in fast[-1].values())
    data = CalibrationData(xc[:48])
    for method in ("bc", "pc", "rts"):
        run = get_calibration(method).run

        def state(method=method, run=run):
            snn.reset_calibration_()
            run(snn, data, 5, None)
            return {k: v.clone() for k, v in snn.net.state_dict().items()}, snn.simulate(xc[48:56], 5)

        (ref_state, ref_out), (fast_state, fast_out) = _both(snn, state)
        assert _equal(ref_state, fast_state) and torch.equal(ref_out, fast_out), method


def test_engine_names_are_checked():
    snn, _ = _tiny("avg")
    assert snn.engine == "fast" and ENGINES == ("fast", "reference")
    with pytest.raises(ValueError, match="fast, reference"):
        snn.engine = "turbo"


@pytest.mark.slow
@needs_cifar
def test_fast_engine_on_resnet20_equals_the_reference():
    from dormant.snn.datasets import load_dataset
    from dormant.snn.models import load_zoo_model

    model, spec = load_zoo_model("resnet20")
    x, y = load_dataset("cifar10-lossless", "train").tensors(spec.mean, spec.std)
    snn = convert(model, x[:64], ConvertConfig())
    xb, yb = x[64:70], y[64:70]
    ref, fast = _both(snn, lambda: evaluate_snn(snn, xb, yb, 6, batch_size=3))
    assert torch.equal(ref.correct, fast.correct) and _equal(ref.rates, fast.rates)
    ref, fast = _both(snn, lambda: snn.simulate(xb[:1], 3))
    assert torch.equal(ref, fast)
    cfg = FTBCConfig(passes=1, batch_size=4, select="last")
    ref, fast = _both(snn, lambda: calibrate_ftbc(snn, xb[:4], 4, cfg).snapshots[-1])
    assert _equal(ref, fast)


def test_auto_falls_back_to_the_reference_without_a_compiler(monkeypatch):
    def no_compiler():
        raise spiking.KernelBuildError("no C++ compiler")

    monkeypatch.setattr(spiking, "_UNAVAILABLE", None)
    monkeypatch.setattr(spiking, "library", no_compiler)
    x, theta = torch.randn(3, 2, 4, 9), torch.rand(4) + 0.2
    v1, v2 = torch.zeros(2, 4, 9), torch.zeros(2, 4, 9)
    assert spiking.resolve("auto", x) == "reference"
    assert torch.equal(spiking.if_forward(x, None, theta, v1), reference.if_forward(x, None, theta, v2))
