"""dormant: make neural networks do less work per inference by letting neurons stay silent.

Two halves, one package:

* ``dormant.llm`` -- activation sparsity for Hugging Face causal LMs (Dhar et al., IPCCC 2024,
  arXiv 2412.12178): measure, calibrate zero-enforcing thresholds, apply them, evaluate perplexity.
* ``dormant.snn`` -- ANN-to-SNN conversion with Forward Temporal Bias Correction (Wu et al.,
  ECCV 2024, arXiv 2403.18388).

``import dormant`` is deliberately light: it imports neither torch nor transformers.
"""

__version__ = "0.1.0"
