"""The converted spiking network: a traced graph whose ReLUs are IF neurons, simulated over T steps.

Layout. A time-varying tensor of ``T_c`` consecutive steps and batch ``N`` is stored *merged*,
``[T_c * N, ...]`` (step-major), so every stateless layer (conv, linear, pooling, residual add, flatten) runs on all
steps of a chunk in one call. Stateful layers (:class:`~dormant.snn.neurons.IFNeuron`,
:class:`~dormant.snn.neurons.SpikeMaxPool2d`) see ``[T_c, N, ...]`` and keep their state from chunk to chunk, so
simulating T steps in chunks of any size gives the same result as one chunk of T (the chunk size only bounds
memory). The analog input is fed at every step; the readout is the running mean of the logits, so one run gives
the prediction after every step t = 1..T.

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
from dormant.snn.neurons import IFNeuron, SpikeMaxPool2d

__all__ = ["SpikingNetwork", "NeuronHook", "SpikeObserver"]

# hook(name, neuron, x [T_c, N, C, *S]) -> output [T_c, N, C, *S]: replaces the neuron's forward (calibration)
NeuronHook = Callable[[str, IFNeuron, torch.Tensor], torch.Tensor]
# observer(name, output [T_c, N, C, *S]) is called with every neuron's output chunk (monitors)
SpikeObserver = Callable[[str, torch.Tensor], None]


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
             record: Collection[str] = (), stop_at: str | None = None) -> tuple[Any, dict[str, torch.Tensor]]:
        env: dict[fx.Node, Any] = {}
        rec: dict[str, torch.Tensor] = {}
        out = None
        for i, node in enumerate(self._nodes):
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            if node.op == "placeholder":
                val = x
            elif node.op == "call_module":
                mod = self._mods[node.target]
                if isinstance(mod, (IFNeuron, SpikeMaxPool2d)):
                    a = args[0]
                    if not snn:
                        val = mod.ann(a, clip)
                    else:
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
    def ann_forward(self, x: torch.Tensor, clip: bool = False, record: Collection[str] = ()
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """ANN mode: ``x`` ``[N, ...]`` -> (logits ``[N, K]``, {recorded node name: output}).

        With ``clip`` every neuron is ``clamp(z, 0, theta)`` (the network the SNN approaches as T grows);
        otherwise ReLU (the original ANN, with batch-norm folded).
        """
        return self._run(x, snn=False, clip=clip, record=set(record))

    @torch.no_grad()
    def simulate(self, x: torch.Tensor, T: int, *, chunk: int | None = None, hook: NeuronHook | None = None,
                 observer: SpikeObserver | None = None) -> torch.Tensor:
        """Run ``T`` steps on the analog input ``x`` ``[N, ...]`` (fed at every step).

        Args:
            chunk: steps per stateless call (default all ``T``); only memory depends on it.
            hook: replaces each neuron's forward (used by calibration).
            observer: sees every neuron output chunk.

        Returns:
            Per-step logits ``[T, N, K]`` (average them over steps 1..t for the prediction after step t).
        """
        self.reset()
        n, chunk = len(x), chunk or T
        outs = []
        for t0 in range(0, T, chunk):
            tc = min(chunk, T - t0)
            xin = x.unsqueeze(0).expand(tc, *x.shape).reshape(tc * n, *x.shape[1:])
            out, _ = self._run(xin, snn=True, tc=tc, n=n, hook=hook, observer=observer)
            outs.append(out.reshape(tc, n, -1))
        return torch.cat(outs)

    @torch.no_grad()
    def neuron_input(self, x: torch.Tensor, T: int, name: str) -> torch.Tensor:
        """Input currents of neuron ``name`` over ``T`` steps, ``[T, N, C, *S]``, running only the graph before it."""
        self.reset()
        n = len(x)
        xin = x.unsqueeze(0).expand(T, *x.shape).reshape(T * n, *x.shape[1:])
        try:
            self._run(xin, snn=True, tc=T, n=n, stop_at=name)
        except _Stop as stop:
            return stop.value
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
