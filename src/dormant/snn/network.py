"""The converted spiking network: a traced graph whose ReLUs are IF neurons, simulated over T steps.

Layout. A time-varying tensor of ``T_c`` consecutive steps and batch ``N`` is stored *merged*,
``[T_c * N, ...]`` (step-major), so every stateless layer (conv, linear, pooling, residual add, flatten) runs on all
steps of a chunk in one call. Stateful layers (:class:`~dormant.snn.neurons.IFNeuron`,
:class:`~dormant.snn.neurons.SpikeMaxPool2d`) see ``[T_c, N, ...]`` and keep their state from chunk to chunk, so
simulating T steps in chunks of any size gives the same result as one chunk of T (the chunk size only bounds
memory). The analog input is fed at every step; the readout is the running mean of the logits, so one run gives
the prediction after every step t = 1..T.

Engines (``SpikingNetwork.engine``). ``"reference"`` is the step-by-step semantics as first written: the analog
input copied to every step, every layer run on all steps, the IF recursion as a torch loop over steps, chunks of
all T steps. ``"fast"`` (default) gives the same outputs bit for bit (tested) at a fraction of the cost:

* layers that depend on the analog input alone (the first convolution) run once per sample, and the first neurons
  read that one step at every step without a copy;
* the IF recursion is one fused pass per layer and chunk (:mod:`dormant.kernels.spiking`), and so are the
  monitors' spike counts;
* on the CPU the default chunk holds as many steps as keep the largest activation of one call near 4 MiB: such
  calls run from cache, and stay under the size (32 MiB in glibc) above which every allocation is fresh pages from
  the OS, which cost more than the convolutions themselves at T = 32 (measured: ``benchmarks/bench_snn_engine.py``).

Convolutions are oneDNN's on the same NCHW tensors in both engines; their per-sample results do not depend on how
many samples share a call (the equality tests check this on every model they simulate).

The same graph also runs in ANN mode (neurons act as ReLU, or ReLU clipped at theta; max pooling as max pooling),
which is what threshold statistics and FTBC targets are computed from.

Cited: Wu et al., FTBC, ECCV 2024, arXiv 2403.18388.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from dormant.artifacts import ArtifactError, load_artifact, save_artifact
from dormant.kernels import spiking
from dormant.snn.neurons import IFNeuron, SpikeMaxPool2d

__all__ = ["ENGINES", "SpikingNetwork", "NeuronHook", "SpikeObserver"]

# hook(name, neuron, x [T_c, N, C, *S]) -> output [T_c, N, C, *S]: replaces the neuron's forward (calibration)
NeuronHook = Callable[[str, IFNeuron, torch.Tensor], torch.Tensor]
# observer(name, output [T_c, N, C, *S]) is called with every neuron's output chunk (monitors)
SpikeObserver = Callable[[str, torch.Tensor], None]


# layers whose output for a sample depends on that sample's input only: run once on an input that is the same at
# every step (the analog image), instead of once per step
_PER_SAMPLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.AvgPool2d,
               nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity, nn.Dropout)

# simulation engines: "fast" (fused IF kernel, the analog input's layers once per sample, cache-sized step chunks)
# and "reference" (every layer at every step, the step-by-step IF loop); the same outputs
ENGINES = ("fast", "reference")


_CHUNK_BYTES = 4 << 20  # the fast engine's default step chunk keeps its largest activation near this size
_PIECE = 64  # samples per call of a per-sample layer in the fast engine (the working set stays in cache)


def _unobserved_per_sample(mod: nn.Module) -> bool:
    # a per-sample layer without hooks: observers (monitor_synapses) see each call as tc steps of n samples
    return isinstance(mod, _PER_SAMPLE) and not (mod._forward_pre_hooks or mod._forward_hooks)


def _in_pieces(mod: nn.Module, a: torch.Tensor, lone: bool) -> torch.Tensor:
    """``mod(a)`` for a per-sample layer, computed on slices of about ``_PIECE`` samples (the same values).

    oneDNN computes a lone sample with other kernels than a batch (the rounding differs; any two or more samples
    agree), so no call gets a lone sample unless ``lone`` (the reference would run it alone too).
    """
    if not _unobserved_per_sample(mod):  # observers see the call as it is
        return mod(a)
    if len(a) == 1 and not lone:
        return mod(a.expand(2, *a.shape[1:]))[:1]
    if len(a) <= 2 * _PIECE:
        return mod(a)
    cuts = list(range(0, len(a) - _PIECE, _PIECE)) + [len(a)]  # the last slice takes the remainder
    return torch.cat([mod(a[i:j]) for i, j in zip(cuts[:-1], cuts[1:])])


class _Stop(Exception):
    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value


class SpikingNetwork(nn.Module):
    """A converted network (build it with :func:`dormant.snn.conversion.convert`).

    Attributes:
        net: the ``fx.GraphModule``; neurons live at ``net.neurons.<node name>``.
        meta: how it was built (model name, input shape, conversion config, calibration); saved with it.
    """

    KIND = "dormant.SpikingNetwork"
    VERSION = 1

    def __init__(self, gm: fx.GraphModule, meta: dict[str, Any]):
        super().__init__()
        self.net = gm
        self.meta = meta
        self._nodes = list(gm.graph.nodes)
        last_use: dict[fx.Node, int] = {}
        for i, node in enumerate(self._nodes):
            for a in node.all_input_nodes:
                last_use[a] = i
        self._free: list[list[fx.Node]] = [[] for _ in self._nodes]
        for node, i in last_use.items():
            self._free[i].append(node)
        self._mods = dict(gm.named_modules())
        self._engine = "fast"
        self._sample_bytes: int | None = None

    @property
    def engine(self) -> str:
        """How :meth:`simulate` runs: one of :data:`ENGINES` (``"fast"`` by default; not saved)."""
        return self._engine

    @engine.setter
    def engine(self, name: str) -> None:
        if name not in ENGINES:
            raise ValueError(f"unknown simulation engine {name!r}; choose one of {', '.join(ENGINES)}")
        self._engine = name

    # -- structure -------------------------------------------------------------------------------------------
    @property
    def neurons(self) -> dict[str, IFNeuron]:
        """Neurons by graph node name, in topological (execution) order."""
        return {n.name: self._mods[n.target] for n in self._nodes
                if n.op == "call_module" and isinstance(self._mods[n.target], IFNeuron)}

    def stateful(self) -> list[nn.Module]:
        return [m for m in self._mods.values() if isinstance(m, (IFNeuron, SpikeMaxPool2d))]

    def reset(self) -> None:
        """Reset every membrane and spike counter."""
        for m in self.stateful():
            m.reset()

    def reset_calibration_(self) -> None:
        """Put every neuron back to plain conversion: no FTBC/constant bias, ``v[0] = v0 * theta`` and ``shift``
        as the conversion config says (``meta["convert"]``). Thresholds and weights are not touched."""
        conv = self.meta.get("convert", {})
        for nrn in self.neurons.values():
            dev = nrn.theta.device
            nrn.step_bias = torch.zeros(0, nrn.channels, device=dev)
            nrn.bias = torch.zeros(nrn.channels, device=dev)
            nrn.v_init = torch.zeros(0, device=dev)
            nrn.v0, nrn.shift = float(conv.get("v0", nrn.v0)), float(conv.get("shift", nrn.shift))
            nrn.reset()

    @property
    def device(self) -> torch.device:
        return next(iter(self.net.buffers())).device

    # -- execution -------------------------------------------------------------------------------------------
    def _run(self, x: torch.Tensor, *, snn: bool, tc: int = 1, n: int = 0, clip: bool = False,
             hook: NeuronHook | None = None, observer: SpikeObserver | None = None,
             record: Collection[str] = (), stop_at: str | None = None,
             static: bool = False, lone: bool = True) -> tuple[Any, dict[str, torch.Tensor]]:
        """Walk the graph once. ``static`` (fast engine): ``x`` is one step ``[n, ...]`` fed at every step of the
        chunk; values computed from it alone by per-sample layers are computed once and broadcast; ``lone``:
        per-sample layers may be called on a single sample (see :func:`_in_pieces`)."""
        env: dict[fx.Node, Any] = {}
        fixed: set[fx.Node] = set()  # nodes holding one step [n, ...] that is the same at every step

        def merged(node: fx.Node) -> Any:
            val = env[node]
            if node in fixed:  # broadcast over the chunk's steps: [n, ...] -> [tc * n, ...]
                return val.unsqueeze(0).expand(tc, *val.shape).reshape(tc * n, *val.shape[1:])
            return val

        rec: dict[str, torch.Tensor] = {}
        out = None
        for i, node in enumerate(self._nodes):
            inputs = node.all_input_nodes
            if node.op == "call_module" and inputs and inputs[0] in fixed and len(node.args) == 1 \
                    and not node.kwargs and _unobserved_per_sample(self._mods[node.target]):
                val = _in_pieces(self._mods[node.target], env[inputs[0]], lone=lone)
                fixed.add(node)
                env[node] = val
                for dead in self._free[i]:
                    env.pop(dead, None)
                continue
            broadcast = (snn and node.op == "call_module" and isinstance(self._mods[node.target], IFNeuron)
                         and inputs[0] in fixed)
            if broadcast:  # the neuron reads the one step at every step, without a copy
                a0 = env[inputs[0]]
                args = (a0.unsqueeze(0).expand(tc, *a0.shape),)
            else:
                args = fx.node.map_arg(node.args, merged)
            kwargs = fx.node.map_arg(node.kwargs, merged)
            if node.op == "placeholder":
                val = x
                if static:
                    fixed.add(node)
            elif node.op == "call_module":
                mod = self._mods[node.target]
                if isinstance(mod, (IFNeuron, SpikeMaxPool2d)):
                    a = args[0]
                    if not snn:
                        val = hook(node.name, mod, a) if hook is not None and isinstance(mod, IFNeuron) \
                            else mod.ann(a, clip)
                    else:
                        if not broadcast:  # merged [tc * n, ...] -> [tc, n, ...]
                            a = a.view(tc, n, *a.shape[1:])
                        if isinstance(mod, IFNeuron):
                            if stop_at == node.name:
                                raise _Stop(a)
                            val = hook(node.name, mod, a) if hook is not None else mod(a)
                            if observer is not None:
                                observer(node.name, val)
                        else:
                            val = mod(a)
                        val = val.reshape(tc * n, *val.shape[2:])
                elif static and len(args) == 1 and not kwargs and isinstance(mod, _PER_SAMPLE):
                    val = _in_pieces(mod, args[0], lone=lone)
                else:
                    val = mod(*args, **kwargs)
            elif node.op == "call_function":
                val = node.target(*args, **kwargs)
            elif node.op == "call_method":
                val = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif node.op == "output":
                out = args[0]
                break
            else:  # get_attr is rejected by the conversion check
                raise RuntimeError(f"unsupported fx opcode {node.op} at {node.name}")
            env[node] = val
            if node.name in record:
                rec[node.name] = val
            for dead in self._free[i]:
                env.pop(dead, None)
        return out, rec

    @torch.no_grad()
    def ann_forward(self, x: torch.Tensor, clip: bool = False, record: Collection[str] = (),
                    hook: NeuronHook | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """ANN mode: ``x`` ``[N, ...]`` -> (logits ``[N, K]``, {recorded node name: output}).

        With ``clip`` every neuron is ``clamp(z, 0, theta)`` (the network the SNN approaches as T grows);
        otherwise ReLU (the original ANN, with batch-norm folded). ``hook(name, neuron, z)`` replaces each
        neuron's activation (``z`` ``[N, C, *S]``; used by threshold balancing).
        """
        return self._run(x, snn=False, clip=clip, record=set(record), hook=hook)

    @torch.no_grad()
    def simulate(self, x: torch.Tensor, T: int, *, chunk: int | None = None, hook: NeuronHook | None = None,
                 observer: SpikeObserver | None = None) -> torch.Tensor:
        """Run ``T`` steps on the analog input ``x`` ``[N, ...]`` (fed at every step).

        Args:
            chunk: steps per stateless call; only memory and speed depend on it. Default: all ``T`` for the
                reference engine and on CUDA; on the CPU the fast engine takes as many steps as keep the largest
                activation of a call near ``_CHUNK_BYTES`` (cache-sized, and under the size at which every
                allocation would be fresh pages from the OS).
            hook: replaces each neuron's forward (used by calibration).
            observer: sees every neuron output chunk.

        Returns:
            Per-step logits ``[T, N, K]`` (average them over steps 1..t for the prediction after step t).
        """
        self.reset()
        n, chunk = len(x), chunk or self._auto_chunk(x, T)
        outs = []
        with self._neuron_impl():
            for t0 in range(0, T, chunk):
                tc = min(chunk, T - t0)
                out, _ = self._run(self._feed(x, tc), snn=True, tc=tc, n=n, hook=hook, observer=observer,
                                   static=self._engine == "fast", lone=T * n == 1)
                outs.append(out.reshape(tc, n, -1))
        return torch.cat(outs)

    def _auto_chunk(self, x: torch.Tensor, T: int) -> int:
        if self._engine == "reference" or x.device.type != "cpu":
            return T
        if self._sample_bytes is None:  # the largest activation of one sample, from one ANN-mode pass
            _, rec = self._run(x[:1], snn=False, record=[n.name for n in self._nodes])
            sizes = [v.numel() * v.element_size() for v in rec.values() if isinstance(v, torch.Tensor)]
            self._sample_bytes = max(sizes, default=1)
        steps = max(1, min(T, _CHUNK_BYTES // (len(x) * self._sample_bytes)))
        return max(steps, min(T, 2)) if len(x) == 1 else steps  # two sample-steps per call at least

    def _neuron_impl(self):
        return spiking.using("auto" if self._engine == "fast" else "reference")

    def _feed(self, x: torch.Tensor, tc: int) -> torch.Tensor:
        # the fast engine takes the one step and broadcasts what depends on it alone; the reference feeds tc
        # merged copies [tc * N, ...]
        if self._engine == "fast":
            return x
        return x.unsqueeze(0).expand(tc, *x.shape).reshape(tc * len(x), *x.shape[1:])

    @torch.no_grad()
    def neuron_input(self, x: torch.Tensor, T: int, name: str) -> torch.Tensor:
        """Input currents of neuron ``name`` over ``T`` steps, ``[T, N, C, *S]``, running only the graph before it."""
        self.reset()
        try:
            with self._neuron_impl():
                self._run(self._feed(x, T), snn=True, tc=T, n=len(x), stop_at=name,
                          static=self._engine == "fast", lone=T * len(x) == 1)
        except _Stop as stop:
            return stop.value.contiguous()
        raise KeyError(f"no neuron named {name!r}; neurons: {list(self.neurons)}")

    # -- persistence -----------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.net.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load tensors saved by :meth:`state_tensors`; keys must match exactly (shapes of neuron state may differ)."""
        own = self.net.state_dict()
        # neuron ``levels`` (QCFS) is absent from artifacts written before it existed: those neurons are ReLU (0)
        missing = sorted(k for k in set(own) - set(tensors) if not k.endswith(".levels"))
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise ArtifactError(f"saved network does not fit this structure: missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]}")
        for key, value in tensors.items():
            owner, _, attr = key.rpartition(".")
            mod = self.net.get_submodule(owner)
            cur = getattr(mod, attr)
            if isinstance(mod, IFNeuron) and attr in ("step_bias", "v_init", "theta", "bias", "levels"):
                setattr(mod, attr, value.to(cur.device, cur.dtype).clone())
            elif cur.shape != value.shape:
                raise ArtifactError(f"{key}: saved shape {tuple(value.shape)} != {tuple(cur.shape)}")
            else:
                with torch.no_grad():
                    cur.copy_(value)

    def save(self, path: str | Path) -> Path:
        """Write weights, thresholds and neuron state (FTBC biases, constant biases, initial membranes, and
        ``v0``/``shift`` where they differ from the conversion config) as one versioned artifact."""
        conv = self.meta.get("convert", {})
        scalars = {name: {"v0": n.v0, "shift": n.shift} for name, n in self.neurons.items()
                   if (n.v0, n.shift) != (conv.get("v0"), conv.get("shift"))}
        meta = {**self.meta, "neuron_scalars": scalars}
        return save_artifact(path, self.KIND, self.VERSION, self.state_tensors(), meta)

    @classmethod
    def load(cls, path: str | Path, ann: nn.Module | None = None) -> SpikingNetwork:
        """Load a saved network. Zoo models are rebuilt from their name; for other models pass the ANN
        (its architecture is traced again; its weights are replaced by the saved, folded ones)."""
        from dormant.snn.configs import ConvertConfig
        from dormant.snn.graph import spiking_graph
        from dormant.snn.models import MODELS, build_model

        tensors, meta, _ = load_artifact(path, cls.KIND, (cls.VERSION,))
        name = meta.get("model")
        if ann is None:
            if name not in MODELS:
                raise ArtifactError(f"{path}: model {name!r} is not in the zoo; pass its architecture as `ann`")
            ann = build_model(name)
        try:
            cfg = ConvertConfig(**meta["convert"])
            example = torch.zeros(1, *meta["input_shape"])
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"{path}: malformed SpikingNetwork meta ({e})") from e
        scalars = meta.pop("neuron_scalars", {})
        snn = cls(spiking_graph(ann, example, cfg), meta)
        snn.load_state_tensors(tensors)
        neurons = snn.neurons
        for name, sc in scalars.items():
            neurons[name].v0, neurons[name].shift = float(sc["v0"]), float(sc["shift"])
        return snn
