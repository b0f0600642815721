"""ANN -> SNN conversion with Forward Temporal Bias Correction (Wu, Bojkovic, Gu, Suo, Zou, ECCV 2024,
arXiv 2403.18388).

* :mod:`~dormant.snn.models` -- CIFAR ResNet-20/32/44/56 (option-A shortcut, pretrained), CIFAR VGG-16, MNIST LeNet.
* :mod:`~dormant.snn.datasets` -- CIFAR-10 (lossless slices, JPEG zips, official archive) and MNIST, no torchvision.
* :mod:`~dormant.snn.neurons` -- IF neuron (reset by subtraction, v0 = theta/2, amplitude theta, per-step and
  constant biases, shift) and spike-count max pooling.
* :mod:`~dormant.snn.convert` -- trace, check, fold batch-norm, thresholds (max / percentile, layer / channel).
* :mod:`~dormant.snn.network` -- the converted network: chunked multi-step simulation, ANN mode, artifacts.
* :mod:`~dormant.snn.simulate` -- accuracy after every step from one run, firing rates.
* :mod:`~dormant.snn.ftbc` -- FTBC calibration (cached O(L) and straightforward O(L^2) implementations).
* :mod:`~dormant.snn.calibrate` -- registry of calibration methods (``none``, ``ftbc``; more register the same way).
* :mod:`~dormant.snn.experiment` -- resumable convert/sweep runs with reports; ``run_demo``.
* :mod:`~dormant.snn.configs` -- the config dataclasses (torch-free).

Names below are imported lazily, so ``import dormant.snn.configs`` (the CLI) does not import torch.
"""

from importlib import import_module

_EXPORTS = {
    "ConvertConfig": "configs", "FTBCConfig": "configs", "RunConfig": "configs",
    "CALIBRATIONS": "calibrate", "CalibrationData": "calibrate", "get_calibration": "calibrate",
    "ConversionError": "convert", "activation_thresholds": "convert", "build_spiking_network": "convert",
    "convert": "convert", "FTBCResult": "ftbc", "calibrate_ftbc": "ftbc", "SpikingNetwork": "network",
    "IFNeuron": "neurons", "SpikeMaxPool2d": "neurons", "SNNEvaluation": "simulate", "SpikeMonitor": "simulate",
    "evaluate_ann": "simulate", "evaluate_snn": "simulate", "run_sweep": "experiment", "run_demo": "experiment",
    "load_model": "models", "load_dataset": "datasets",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dormant.snn' has no attribute {name!r}")
    return getattr(import_module(f"dormant.snn.{_EXPORTS[name]}"), name)
