"""Runs, reports and the demo: the layer that composes the library's verbs into experiments.

Each run owns its output folder and its :class:`~dormant.experiments.ledger.Ledger` (resumable results), and is the
only place that writes markdown, CSV and plots (through :mod:`dormant.report`):

* :mod:`~dormant.experiments.sparsity` -- the sparsity-perplexity sweep (``dormant sweep``);
* :mod:`~dormant.experiments.analysis` -- natural sparsity, CDFs, thresholds vs depth, bytes/FLOPs accounting
  (``dormant analyze``, ``dormant account``);
* :mod:`~dormant.experiments.predictors` -- predictor fit/eval and the predictability study;
* :mod:`~dormant.experiments.offload` -- traces, prefetch simulation, storage check;
* :mod:`~dormant.experiments.snn`, :mod:`~dormant.experiments.snn_report`, :mod:`~dormant.experiments.qcfs` --
  conversion sweeps, the comparison page, QCFS fine-tuning;
* :mod:`~dormant.experiments.demo` -- every part once on small defaults (``make demo``).
"""
