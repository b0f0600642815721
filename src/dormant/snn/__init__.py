"""ANN -> SNN conversion with Forward Temporal Bias Correction (Wu, Bojkovic, Gu, Suo, Zou, ECCV 2024,
arXiv 2403.18388).

* :mod:`~dormant.snn.models` -- CIFAR ResNet-20/32/44/56 (option-A shortcut, pretrained), CIFAR VGG-16, MNIST LeNet.
* :mod:`~dormant.snn.datasets` -- CIFAR-10 (lossless slices, JPEG zips, official archive) and MNIST, no torchvision.
* :mod:`~dormant.snn.neurons` -- IF neuron (reset by subtraction, v0 = theta/2, amplitude theta, per-step and
  constant biases, shift) and spike-count max pooling; :mod:`~dormant.snn.qcfs` -- the QCFS activation.
* :mod:`~dormant.snn.graph` -- trace, check, fold batch-norm, swap in spiking modules (the structure);
  :mod:`~dormant.snn.conversion` -- thresholds (max / percentile, layer / channel) and :func:`convert`.
* :mod:`~dormant.snn.network` -- the converted network: chunked multi-step simulation, ANN mode, artifacts.
* :mod:`~dormant.snn.simulate` -- accuracy after every step from one run; :mod:`~dormant.snn.monitors` -- firing and
  input spike rates; :mod:`~dormant.snn.energy` -- synaptic operations and energy.
* :mod:`~dormant.snn.ftbc` -- FTBC calibration (cached O(L) and straightforward O(L^2) implementations);
  :mod:`~dormant.snn.corrections` -- BC, PC (Li et al. 2021) and RTS; :mod:`~dormant.snn.calibrate` -- the one
  table of calibration methods.
* :mod:`~dormant.snn.configs` -- the config dataclasses (torch-free).

The resumable sweeps, the comparison report and QCFS training are runs of :mod:`dormant.experiments`.
Names below are imported lazily, so ``import dormant.snn.configs`` (the CLI) does not import torch.
"""

from importlib import import_module

_EXPORTS = {
    "ConvertConfig": "configs", "FTBCConfig": "configs", "CorrectionConfig": "configs", "EnergyConfig": "configs",
    "CALIBRATIONS": "calibrate", "CalibrationData": "calibrate", "get_calibration": "calibrate",
    "ConversionError": "graph", "activation_thresholds": "conversion", "build_spiking_network": "conversion",
    "convert": "conversion", "FTBCResult": "ftbc", "calibrate_ftbc": "ftbc", "SpikingNetwork": "network",
    "IFNeuron": "neurons", "SpikeMaxPool2d": "neurons", "QCFS": "qcfs", "load_qcfs_model": "qcfs",
    "SNNEvaluation": "simulate", "evaluate_ann": "simulate", "evaluate_snn": "simulate", "SpikeMonitor": "monitors",
    "synaptic_layers": "energy", "energy_estimate": "energy", "load_zoo_model": "models", "load_dataset": "datasets",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dormant.snn' has no attribute {name!r}")
    return getattr(import_module(f"dormant.snn.{_EXPORTS[name]}"), name)
