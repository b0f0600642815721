"""Sparse FFN execution for single-token decode of ``sparsify_``'d models, by module swap.

:func:`enable_sparse_decode_` replaces each gated FFN container (e.g. ``LlamaMLP``) by a
:class:`SparseDecodeMLP` that registers the *same* child modules under the *same* names
(``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``; Phi-3's ``gate_up_proj``), so ``state_dict`` keys,
``generate()`` and the KV cache are unchanged, and no ``forward`` is patched. Its forward runs

* the sparse kernel (:func:`dormant.kernels.sparse_ffn_decode`) for a single token (batch 1,
  sequence 1) of a model with active thresholds, applying those thresholds itself (the hooks
  :func:`~dormant.llm.sparsify.sparsify_` put on the children are not run, so nothing is applied twice);
* otherwise the original container, hooks and all: prefill (several tokens) and batched decode run the
  dense modules with the thresholds applied by the hooks (the same results, not faster). Also dense, and
  said once per layer with a :class:`SparseDecodeWarning`: a step under autograd, extra arguments, a dtype
  mismatch, and any hook on the FFN other than those of ``sparsify_`` (an observer such as
  :func:`~dormant.llm.sparsify.measure_sparsity` must see every tensor), so results never depend on which path
  ran. :func:`sparse_decode_stats` counts the paths taken. Process-wide module hooks
  (``torch.nn.modules.module.register_module_forward_hook``) see the container's input and output on the kernel
  path, not its children's.

Which thresholds run in the kernel: any of the taps ``GATE``, ``UP``, ``ACT``, ``MID``, ``OUT`` -- the sites
``gate_act`` (CATS: gate read in full, up/down rows of active neurons only), ``paper`` (Dhar et al.
arXiv 2412.12178: gate read in full, up/down rows only where ``|gate x| >= T_gate``, output thresholded)
and ``intermediate`` (gate and up read in full, down rows of active neurons only). The ``inputs`` site
thresholds ``FFN_IN`` (input-column sparsity, TEAL) and has no kernel here: it raises
:class:`SparseDecodeError`. An optional ``predictor(layer, x)`` returning a neuron mask or sorted indices
switches to the predicted-set mode (gate rows of inactive neurons skipped too); thresholds still apply.
"""

from __future__ import annotations

import warnings
import weakref
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

from dormant.config import UserError
from dormant.kernels import (
    FFNThresholds,
    Impl,
    PackedFFN,
    check_impl,
    default_impl,
    pack_ffn,
    sparse_ffn_decode,
)
from dormant.kernels.reference import ACTIVATIONS
from dormant.llm.adapters import FFN_SPECS, FFNLayout, Tap, UnsupportedModelError, ffn_layout
from dormant.llm.sites import SITES
from dormant.llm.sparsify import sparsify_state
from dormant.llm.thresholds import Thresholds

__all__ = [
    "KERNEL_TAPS",
    "SparseDecodeError",
    "SparseDecodeWarning",
    "SparseDecodeMLP",
    "enable_sparse_decode_",
    "disable_sparse_decode_",
    "is_sparse_decode",
    "sparse_decode_stats",
    "kernel_sites",
]

# Taps whose thresholds the kernels apply (FFN_IN, input-column sparsity, has no kernel).
KERNEL_TAPS = frozenset({Tap.GATE, Tap.UP, Tap.ACT, Tap.MID, Tap.OUT})
_FIELD = {Tap.GATE: "gate", Tap.UP: "up", Tap.ACT: "act", Tap.MID: "mid", Tap.OUT: "out"}

Predictor = Callable[[int, torch.Tensor], torch.Tensor]


class SparseDecodeError(UserError, RuntimeError):
    """The model, its thresholds or the requested kernel cannot use sparse decode."""


class SparseDecodeWarning(UserWarning):
    """A decode step the kernel could take runs the dense modules instead (said once per layer and reason)."""


# Reasons a single-token step runs the dense modules, and what the warning says about each.
_DENSE_REASONS = {
    "extra_args": "the FFN was called with extra arguments",
    "autograd": "gradients are enabled for the FFN weights",
    "dtype": "the FFN input dtype differs from the weight dtype",
    "hooks": "a forward hook other than sparsify_'s is registered inside the FFN",
}


def kernel_sites() -> list[str]:
    """Sites of :data:`dormant.llm.sites.SITES` whose thresholds the kernels apply."""
    return sorted(s for s, taps in SITES.items() if set(taps) <= KERNEL_TAPS)


def _probe_activation(act: nn.Module) -> str:
    """Name of the activation ``act`` computes, found by evaluating it (class names vary across versions)."""
    z = torch.linspace(-8.0, 8.0, 161)
    with torch.no_grad():
        try:
            out = act.forward(z)  # not act(z): hooks (e.g. an ACT threshold) must not run
        except Exception as e:  # noqa: BLE001 -- any failure means we cannot identify it
            raise SparseDecodeError(f"cannot evaluate the FFN activation {type(act).__name__}: {e}") from e
    for name, fn in ACTIVATIONS.items():
        if torch.allclose(out.float(), fn(z), rtol=1e-5, atol=1e-6):
            return name
    raise SparseDecodeError(
        f"FFN activation {type(act).__name__} has no kernel; supported: {', '.join(ACTIVATIONS)}"
    )


class SparseDecodeMLP(nn.Module):
    """A gated FFN container that runs single-token decode through a sparse kernel.

    Holds the original container's children under the original names; the original container is kept
    (not as a submodule) and runs every step the kernel does not take. Built by
    :func:`enable_sparse_decode_`, not directly.

    Attributes:
        layer: decoder layer index.
        impl: the kernel implementation.
        calls: ``Counter`` of the paths taken (``"kernel"``, ``"dense:multi_token"``, ``"dense:hooks"``, ...).
    """

    def __init__(
        self,
        dense: nn.Module,
        layer: int,
        layout: FFNLayout,
        model: nn.Module,
        impl: Impl,
        activation: str,
        predictor: Predictor | None = None,
        interleave: bool = False,
    ):
        super().__init__()
        for name, child in dense.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_dense", dense)  # not a submodule: state_dict keys stay those of the model
        self.layer = layer
        self.impl = impl
        self.activation = activation
        self.predictor = predictor
        self.interleave = interleave
        self.calls: Counter[str] = Counter()
        self._warned: set[str] = set()
        self._layout = layout
        spec = layout.spec
        self._weight_owners = tuple(
            dict.fromkeys(n for n in (spec.gate, spec.up, spec.down))
        )  # fused: gate == up
        self._model = weakref.ref(model)
        self._packed: PackedFFN | None = None
        self._packed_key: tuple | None = None
        self._thr: tuple[object, FFNThresholds | None] = (None, None)
        self._hook_ids: tuple[object, frozenset[int]] = (None, frozenset())

    @property
    def dense(self) -> nn.Module:
        """The original FFN container (shares the children with this module)."""
        return self._dense

    def extra_repr(self) -> str:
        return f"layer={self.layer}, impl={self.impl.value}, activation={self.activation}"

    # -- what the kernel needs, cached and refreshed when the model changes --------------------------

    def _weights(self) -> list[torch.Tensor]:
        # Looked up per call (cheap), so a replaced child module or parameter is noticed.
        return [self._modules[name].weight for name in self._weight_owners]

    def packed(self) -> PackedFFN:
        """The layer's weights in the sparse layout, rebuilt when a weight changes (dtype, device, in place)."""
        key = tuple((w.data_ptr(), w._version, w.dtype, w.device) for w in self._weights())
        if key != self._packed_key:
            self._packed = None  # free the old copy before building the new one
            w = self._layout.weights(self.layer)
            self._packed = pack_ffn(w.gate, w.up, w.down, self.activation, interleave=self.interleave)
            self._packed_key = key
        return self._packed

    def thresholds(self, thr: Thresholds) -> FFNThresholds:
        cached_for, value = self._thr
        if cached_for is not thr:
            unsupported = [t.value for t in thr.taps if t not in KERNEL_TAPS]
            if unsupported:
                raise SparseDecodeError(
                    f"site {thr.site!r} thresholds tap(s) {unsupported}, which no sparse decode kernel applies; "
                    f"sites with kernels: {', '.join(kernel_sites())}. Call disable_sparse_decode_(model) to decode densely."
                )
            value = FFNThresholds(**{_FIELD[t]: thr.value(self.layer, t) for t in thr.taps})
            self._thr = (thr, value)
        return value

    def _foreign_hooks(self, state) -> bool:
        """Whether a hook other than sparsify_'s would run inside this FFN (then only the dense path is exact)."""
        cached_for, ids = self._hook_ids
        if cached_for is not state:
            ids = state.hook_ids if state is not None else frozenset()
            self._hook_ids = (state, ids)
        for m in (self._dense, *self._modules.values()):
            for hooks in (m._forward_pre_hooks, m._forward_hooks):
                if hooks and not hooks.keys() <= ids:
                    return True
        return False

    def _blocker(self, x: torch.Tensor, state) -> str | None:
        if x.numel() != x.shape[-1]:
            return "multi_token"
        if state is None and self.predictor is None:
            return "no_thresholds"
        weights = self._weights()
        if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            return "autograd"
        if x.dtype != weights[0].dtype:
            return "dtype"
        if self._foreign_hooks(state):
            return "hooks"
        return None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        model = self._model()
        state = sparsify_state(model) if model is not None else None
        reason = "extra_args" if args or kwargs else self._blocker(x, state)
        if reason is not None:
            self.calls["dense:" + reason] += 1
            if reason in _DENSE_REASONS and reason not in self._warned:
                self._warned.add(reason)
                warnings.warn(f"sparse decode: layer {self.layer} runs its dense FFN modules ({_DENSE_REASONS[reason]});"
                              " results are the same, decode is not faster", SparseDecodeWarning, stacklevel=2)
            # The original container's own hooks (registered before the swap) run here, the children's inside.
            return self._dense(x, *args, **kwargs)
        thr = self.thresholds(state.thresholds) if state is not None else FFNThresholds()
        packed = self.packed()
        v = x.reshape(-1)
        active = self.predictor(self.layer, v) if self.predictor is not None else None
        y = sparse_ffn_decode(packed, v, thr, active, impl=self.impl)
        self.calls["kernel"] += 1
        return y.view(x.shape)


def _gated_types() -> str:
    return ", ".join(sorted(k for k, s in FFN_SPECS.items() if s.gated))


def enable_sparse_decode_(
    model: nn.Module,
    impl: Impl | str | None = None,
    predictor: Predictor | None = None,
    interleave: bool = False,
) -> nn.Module:
    """Swap every gated FFN of ``model`` for a :class:`SparseDecodeMLP`, in place. Returns ``model``.

    Args:
        model: a Hugging Face causal LM with a gated FFN (see :data:`dormant.llm.adapters.FFN_SPECS`);
            thresholds come from :func:`~dormant.llm.sparsify.sparsify_`, before or after this call.
        impl: kernel implementation; ``None`` = :func:`dormant.kernels.default_impl` for the model's device
            (``cpu`` on CPUs, ``triton`` on CUDA). Checked now: an unsupported device/dtype raises.
        predictor: optional ``predictor(layer, x [D]) -> bool mask [I] or sorted indices``; when given, only
            predicted neurons are computed (gate rows included).
        interleave: store each neuron's gate, up and down rows in one buffer (copies all FFN weights)
            instead of copying only down transposed (the default; +1/3 of the FFN weights in memory).
    """
    layout = ffn_layout(model)
    if not layout.gated:
        raise UnsupportedModelError(
            f"sparse decode needs a gated FFN; {layout.model_type} is not (gated: {_gated_types()})"
        )
    if is_sparse_decode(model):
        disable_sparse_decode_(model)
        layout = ffn_layout(model)
    p = next(model.parameters())
    impl = check_impl(impl if impl is not None else default_impl(p.device), p.device, p.dtype)
    if impl is Impl.CPU:
        from dormant.kernels import cpu

        cpu.library()  # compile now (once per machine), not in the first decode step
    for i in range(layout.n_layers):
        w = layout.weights(i)
        if any(b is not None for b in (w.gate_bias, w.up_bias, w.down_bias)):
            raise SparseDecodeError(f"layer {i}: FFN projections with biases have no sparse decode kernel")
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        raise SparseDecodeError(
            "models dispatched by accelerate (device_map / offloading hooks) are not supported"
        )
    activation = _probe_activation(layout.module(0, layout.spec.act))
    state = sparsify_state(model)
    swaps = []
    for i, ffn in enumerate(layout.ffns):
        if ffn._parameters or ffn._buffers:
            raise SparseDecodeError(f"layer {i}: the FFN container holds its own tensors; cannot swap it")
        swaps.append(SparseDecodeMLP(ffn, i, layout, model, impl, activation, predictor, interleave))
    if state is not None:
        swaps[0].thresholds(state.thresholds)  # unsupported sites fail now, not in generate()
    parent_path, _, name = layout.spec.mlp.rpartition(".")
    for layer, new in zip(layout.layers, swaps):
        parent = layer.get_submodule(parent_path) if parent_path else layer
        setattr(parent, name, new)
    return model


def disable_sparse_decode_(model: nn.Module) -> nn.Module:
    """Put the original FFN containers back (no-op when sparse decode is off). Returns ``model``.

    Raises :class:`SparseDecodeError` if a hook was registered on a :class:`SparseDecodeMLP` container
    itself (it would be lost): remove it first.
    """
    layout = ffn_layout(model)
    parent_path, _, name = layout.spec.mlp.rpartition(".")
    swapped = [
        (layer, ffn) for layer, ffn in zip(layout.layers, layout.ffns) if isinstance(ffn, SparseDecodeMLP)
    ]
    for _, ffn in swapped:
        if ffn._forward_hooks or ffn._forward_pre_hooks:
            raise SparseDecodeError(
                f"layer {ffn.layer}: hooks are registered on the sparse-decode FFN container; remove them "
                "(e.g. unsparsify_) before disable_sparse_decode_"
            )
    for layer, ffn in swapped:
        parent = layer.get_submodule(parent_path) if parent_path else layer
        setattr(parent, name, ffn.dense)
    return model


def is_sparse_decode(model: nn.Module) -> bool:
    return any(isinstance(m, SparseDecodeMLP) for m in model.modules())


def sparse_decode_stats(model: nn.Module) -> dict[str, int]:
    """How many FFN calls took each path since :func:`enable_sparse_decode_` (summed over layers)."""
    total: Counter[str] = Counter()
    for m in model.modules():
        if isinstance(m, SparseDecodeMLP):
            total.update(m.calls)
    return dict(total)
