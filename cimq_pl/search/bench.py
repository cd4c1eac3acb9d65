"""`SearchBench`: a calibrated CIM network on fixed images, and the cheap measurement of one layer changed.

With metric ``fisher`` (`SearchBench.fisher_trial`, the default of the search) a trial runs the changed layer
alone, on cached activations; with ``kl``/``mse`` (`SearchBench.try_layer`) it runs the network, as below.

The bench holds, for the search images (calibration split): the float network's logits (the teacher: every
quantizer disabled is the exact BN-folded float network), the configured network's logits, its event counters
and its loss against the teacher. `SearchBench.try_layer` then puts one layer on another spec and measures the
network's loss and that layer's energy, without touching the other layers:

* the new layer shares the Parameters; a quantizer its change does not concern is copied from the configured
  layer (an ADC change keeps the input and weight quantizers), the others are calibrated on the inputs the
  layer received in the passes of `calibrate_` that calibrated the configured network (its input quantizer on
  pass 1: float inputs and ideal ADCs everywhere; its ADC on pass 2: quantized inputs, ideal ADCs), so the
  configured setting, tried again, gives back the configured network exactly (with replay, the observers'
  random subsampling draws the same numbers as in that calibration too: common random numbers for every
  candidate, so a difference between candidates is theirs, not the subsample's);
* with ``replay``, those calibration inputs are cached while the configured network is calibrated, and in the
  measuring pass the layers that run before the changed one return their cached outputs instead of computing
  them (their outputs do not depend on it): a trial costs the changed layer and the layers after it, about half
  a forward pass on average. Without replay the same numbers come from running the network;
* its energy is the cost model's (`cimq_pl.cost`) on the counters the changed layer collects in that pass.

Pure PyTorch; knows nothing of Lightning.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cimq_pl.cost.energy import EnergyTable
from cimq_pl.cost.layers import COUNTER_NAMES, LayerInfo, describe_layers, gather_counts, reset_counts
from cimq_pl.cost.model import NetworkCost, layer_cost, network_cost
from cimq_pl.quant.calibrate import calibrate_
from cimq_pl.quant.fold import _set_submodule
from cimq_pl.quant.layers import cim_layers, iter_quantizers
from cimq_pl.quant.convert import rebuild_cim_layer
from cimq_pl.quant.reconstruction import eval_mode
from cimq_pl.quant.spec import CIMSpec

__all__ = ["LayerTrial", "NetworkPoint", "SearchBench", "logit_loss"]


def logit_loss(teacher: torch.Tensor, logits: torch.Tensor, metric: str) -> float:
    """Loss of ``logits`` against the float network's ``teacher`` logits (N, classes), averaged over images.

    ``kl``: KL(softmax(teacher) || softmax(logits)), nats per image; ``mse``: mean squared logit error.
    """
    teacher, logits = teacher.double(), logits.double()
    if metric == "kl":
        log_p = F.log_softmax(teacher, 1)
        return float((log_p.exp() * (log_p - F.log_softmax(logits, 1))).sum(1).mean())
    if metric == "mse":
        return float(((logits - teacher) ** 2).mean())
    raise ValueError(f"metric={metric!r} is invalid: expected 'kl' or 'mse'")


@dataclass(frozen=True)
class LayerTrial:
    """One layer on another spec, the rest of the network as configured.

    Attributes:
        name: the layer.
        spec: the spec it was tried on.
        loss: the network's loss against the float network (the bench's metric).
        energy_uj: the layer's energy per image on that spec, uJ.
        latency_us: the layer's latency per image on that spec, us.
        seconds: wall time of the trial (calibration + measurement), s.
        logits: the network's logits on the bench's images (for `SearchBench.layer_noise`).
    """

    name: str
    spec: CIMSpec
    loss: float
    energy_uj: float
    latency_us: float
    seconds: float
    logits: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class NetworkPoint:
    """A whole network measured on the bench's images.

    Attributes:
        loss: against the float network (the bench's metric).
        cost: its `NetworkCost` on the search images.
        accuracy: top-1 on the search images' labels (None without labels).
        test_accuracy: top-1 on the test images given (None without).
    """

    loss: float
    cost: NetworkCost
    accuracy: Optional[float] = None
    test_accuracy: Optional[float] = None

    @property
    def energy_uj(self) -> float:
        """Energy per image, uJ."""
        return self.cost.energy_per_image_uj

    @property
    def latency_us(self) -> float:
        """Latency per image, us."""
        return self.cost.latency_us_per_image


class _Stop(Exception):
    """Raised right after the layer being calibrated ran: the rest of the network is not needed."""


class _Cursor:
    """Which batch the network is running (read by the replaying layers)."""

    batch = 0


class _Replay(nn.Module):
    """Stands in for a layer that runs before the changed one: returns its cached output for the current batch."""

    def __init__(self, outputs: list, cursor: _Cursor) -> None:
        super().__init__()
        self.outputs, self.cursor = outputs, cursor

    def forward(self, *args, **kwargs):
        return self.outputs[self.cursor.batch]


def _top1(logits: torch.Tensor, labels: Optional[torch.Tensor]) -> Optional[float]:
    return None if labels is None else float((logits.argmax(1) == labels).float().mean())


class SearchBench:
    """A converted network calibrated on ``batches``, measured once, then changed one layer at a time.

    Args:
        model: a network whose layers `convert_to_cim` converted (BN folded); it is calibrated here on ``batches``
            (every quantizer, as `calibrate_`), in eval mode, and left as configured after every trial.
        batches: image tensors (calibration split), on the model's device.
        metric: ``fisher`` (`fisher_trial`: the layer alone, Fisher-weighted output error), ``kl`` or ``mse``
            (`try_layer`: the network's logits, see `logit_loss`); whole networks are measured with ``kl`` (``mse``
            with ``mse``).
        table: per-event energies.
        labels: the labels of ``batches`` (for `NetworkPoint.accuracy` and the Fisher), or None (the Fisher then
            takes the float network's predictions).
        replay: cache the calibration-pass inputs of every CIM layer and (``kl``/``mse``) its outputs, replayed for
            the layers before the changed one (see the module docstring; memory: two or three activations of every
            CIM layer for every image, plus three for ``fisher``: its inputs, outputs and Fisher in the float
            network); turned off when a CIM layer runs more or less than once per forward pass.
        input_trials: also cache the inputs of calibration pass 1 (trials that change ``input_bits`` need them).
        seed: seeds every calibration (percentile observers subsample at random), so every setting is calibrated
            alike.
        reconstructed: a state dict of ``model`` after PTQ (AdaRound decisions baked into the weights), loaded after
            the calibration and the float pass: the configured network is then the reconstructed one, and a trial
            keeps every learned quantizer its change does not concern, an ADC's learned clip range included (the
            same alpha0 and theta at the new resolution), and a learned output offset wherever it keeps an ADC (the
            ideal-ADC reference has none: the offset applies only with the ADC); needs ``replay``.
    """

    def __init__(self, model: nn.Module, batches: Sequence[torch.Tensor], metric: str = "fisher",
                 table: Optional[EnergyTable] = None, labels: Optional[Sequence[torch.Tensor]] = None,
                 replay: bool = True, input_trials: bool = True, seed: int = 0,
                 reconstructed: Optional[dict] = None) -> None:
        if not cim_layers(model):
            raise ValueError("the model has no CIM layer: convert it with convert_to_cim first")
        if metric not in ("fisher", "kl", "mse"):
            raise ValueError(f"metric={metric!r} is invalid: expected 'fisher', 'kl' or 'mse'")
        self.model, self.batches, self.metric = model, list(batches), metric
        self.network_metric = "kl" if metric == "fisher" else metric  # what whole networks are measured with
        self.table = table or EnergyTable()
        self.labels = torch.cat(list(labels)) if labels is not None else None
        self.seed = seed
        self.images = sum(len(batch) for batch in self.batches)
        self._cursor = _Cursor()
        self._calibration_inputs: dict = {}
        self._rng_states: dict = {}
        if reconstructed is not None and not replay:
            raise ValueError("a bench on a reconstructed network needs replay=True (its trials read the cached "
                             "calibration inputs)")
        self.keeps_learned = reconstructed is not None
        with eval_mode(model):
            self.calibrate(model, cache=((1, 2) if input_trials else (2,)) if replay else (), record=True)
            with self._quantizers_off(model):
                self.teacher = self._logits(model)
            if reconstructed is not None:  # the calibration's draws and inputs are recorded; now PTQ's values
                for key in reconstructed:  # learned output offsets after the ADC (PTQ's lr_offset)
                    if key.endswith(".output_offset"):
                        model.get_submodule(key[: -len(".output_offset")]).add_output_offset_()
                model.load_state_dict(reconstructed)
            self.reference = self._reference_pass(replay, cache_outputs=metric != "fisher")  # fisher runs no network
        self.replay = replay and self._order is not None and bool(self._calibration_inputs)
        if not self.replay:
            self._calibration_inputs, self._outputs = {}, {}
        if self._order is None:  # a layer runs more or less than once per pass: its random states do not line up
            self._rng_states = {}
        self._fisher: dict = {}
        if metric == "fisher":
            if not self.replay:
                raise ValueError("metric='fisher' needs the cached calibration inputs (replay=True) and every CIM layer "
                                 "run once per forward pass; use metric='kl'")
            with eval_mode(model):
                self._fisher_pass()

    # ------------------------------------------------------------------ whole networks
    def calibrate(self, model: nn.Module, cache: tuple = (), record: bool = False) -> None:
        """Calibrate every quantizer of ``model`` on the bench's images, seeded (`calibrate_`). ``record``: keep, for
        `try_layer`, the random state every CIM layer's observers drew from in each pass and batch, and the inputs
        it received in the passes listed in ``cache`` (1, 2)."""
        layers = cim_layers(model)
        seen = {name: [] for name, _ in layers}
        cuda = self._cuda_devices(model)

        def hook_for(name):
            def hook(_module, args):
                state = (torch.get_rng_state(), torch.cuda.get_rng_state(cuda[0]) if cuda else None)
                seen[name].append((args[0].detach() if cache else None, state))
            return hook

        handles = [layer.register_forward_pre_hook(hook_for(name)) for name, layer in layers] if record else []
        try:
            with torch.random.fork_rng(devices=cuda), torch.no_grad():
                torch.manual_seed(self.seed)
                calibrate_(model, self.batches)
        finally:
            for handle in handles:
                handle.remove()
        n = len(self.batches)
        if record and all(len(calls) == 2 * n for calls in seen.values()):
            self._rng_states = {(name, pass_): [state for _, state in calls[(pass_ - 1) * n: pass_ * n]]
                                for name, calls in seen.items() for pass_ in (1, 2)}
            self._calibration_inputs = {(name, pass_): [x for x, _ in calls[(pass_ - 1) * n: pass_ * n]]
                                        for name, calls in seen.items() for pass_ in cache}

    def measure(self, model: nn.Module, test_batches: Optional[Sequence] = None) -> NetworkPoint:
        """Loss, cost and accuracy of a calibrated ``model`` on the bench's images (and on ``test_batches``,
        ``(images, labels)`` pairs, when given)."""
        return self._measure(model, test_batches)[0]

    def _measure(self, model: nn.Module, test_batches: Optional[Sequence] = None) -> tuple:
        layers = [layer for _, layer in cim_layers(model)]
        with eval_mode(model), self._collecting(layers):
            logits = self._logits(model)
            counts = gather_counts(layers).cpu()
        cost = network_cost(describe_layers(model), counts, self.table)
        test_accuracy = None
        if test_batches:
            with eval_mode(model), torch.no_grad():
                correct = sum(int((model(images).argmax(1) == labels).sum()) for images, labels in test_batches)
            test_accuracy = correct / sum(len(labels) for _, labels in test_batches)
        return NetworkPoint(logit_loss(self.teacher, logits, self.network_metric), cost, _top1(logits, self.labels),
                            test_accuracy), logits

    def network_with(self, specs: dict) -> nn.Module:
        """A deep copy of the network with the layers of ``specs`` (name -> `CIMSpec`) rebuilt on their new spec,
        calibrated as a whole on the bench's images (as PTQ's calibration would); on a reconstructed network, each
        rebuilt layer keeps what it learned, as in a trial, and nothing else is calibrated again."""
        if self.keeps_learned and not self.replay:
            raise ValueError("whole networks from a reconstructed one need the cached calibration inputs, and this "
                             "network runs a CIM layer more or less than once per forward pass (no replay)")
        network = copy.deepcopy(self.model)
        for name, spec in specs.items():
            old = network.get_submodule(name)
            new = rebuild_cim_layer(old, spec)
            if self.keeps_learned:
                with eval_mode(new):
                    self._calibrate_layer(name, old, new)
            _set_submodule(network, name, new)
        if not self.keeps_learned:
            with eval_mode(network):
                self.calibrate(network)
        return network

    # ------------------------------------------------------------------ one layer changed
    def try_layer(self, name: str, spec: CIMSpec) -> LayerTrial:
        """The network with layer ``name`` on ``spec`` (the others as configured): loss and the layer's cost."""
        start = time.perf_counter()
        old = self.model.get_submodule(name)
        trial = rebuild_cim_layer(old, spec)
        with eval_mode(self.model), self._swapped(name, trial):
            self._calibrate_layer(name, old, trial)
            with self._collecting([trial]):
                logits = self._logits(self.model)
                row = gather_counts([trial]).cpu()[0].tolist()
        cost = layer_cost(LayerInfo.from_layer(name, trial), dict(zip(COUNTER_NAMES, row)), self.table, self.images)
        return LayerTrial(name, spec, logit_loss(self.teacher, logits, self.network_metric), cost.energy_per_image_uj,
                          cost.latency_ns / max(self.images, 1) / 1e3, time.perf_counter() - start, logits)

    # ------------------------------------------------------------------ one layer, locally (metric "fisher")
    def fisher_trial(self, name: str, spec: Optional[CIMSpec] = None, reference: Optional[list] = None) -> LayerTrial:
        """Layer ``name`` on ``spec`` (None: as configured) measured locally: its Fisher-weighted output error and
        its cost, without running the rest of the network.

        The error is ``1/2 sum_i F_i (y_i - r_i)^2`` per image, where y is the layer's output on the float network's
        input to it, r the ``reference`` output there (`layer_outputs`; default: the float layer's) and
        F_i = (d CE / d y*_i)^2 the diagonal empirical Fisher of the float network at that output (labels of the
        images, else its own predictions): the second-order estimate of the loss the difference adds (BRECQ's
        weighting), free of the rounding flips of the layers after it. The cost is the cost model's on the layer's
        counters for the inputs it receives in calibration pass 2 (quantized inputs, ideal ADCs before it), the
        same inputs for every setting.
        """
        start = time.perf_counter()
        old = self.model.get_submodule(name)
        layer = old if spec is None else rebuild_cim_layer(old, spec)
        fisher = self._fisher[name]
        reference = fisher["outputs"] if reference is None else reference
        with eval_mode(self.model), torch.no_grad():
            if spec is not None:
                self._calibrate_layer(name, old, layer)
            error = 0.0
            for x, r, weight in zip(fisher["inputs"], reference, fisher["fisher"]):
                error += float((weight.double() * (layer(x) - r).double() ** 2).sum()) / 2
            with self._collecting([layer]):
                for x in self._calibration_inputs[(name, 2)]:
                    layer(x)
                row = gather_counts([layer]).cpu()[0].tolist()
        cost = layer_cost(LayerInfo.from_layer(name, layer), dict(zip(COUNTER_NAMES, row)), self.table, self.images)
        return LayerTrial(name, layer.spec, error / self.images, cost.energy_per_image_uj,
                          cost.latency_ns / max(self.images, 1) / 1e3, time.perf_counter() - start)

    def layer_outputs(self, name: str, spec: CIMSpec) -> list:
        """Layer ``name`` rebuilt on ``spec`` and calibrated as a trial: its outputs on the float network's inputs to
        it (per batch), the reference `fisher_trial` measures other settings against."""
        old = self.model.get_submodule(name)
        layer = rebuild_cim_layer(old, spec)
        with eval_mode(self.model), torch.no_grad():
            self._calibrate_layer(name, old, layer)
            return [layer(x) for x in self._fisher[name]["inputs"]]

    def _fisher_pass(self) -> None:
        """One forward and backward pass of the float network: every CIM layer's input and output, and the squared
        gradient of the cross-entropy (summed over images, so each image's own) with respect to that output."""
        layers = cim_layers(self.model)
        found = {name: {"inputs": [], "outputs": [], "fisher": []} for name, _ in layers}
        live = {}

        def hook_for(name):
            def hook(_module, args, output):
                found[name]["inputs"].append(args[0].detach())
                found[name]["outputs"].append(output.detach())
                output.retain_grad()
                live[name] = output
            return hook

        handles = [layer.register_forward_hook(hook_for(name)) for name, layer in layers]
        parameters = [(p, p.requires_grad) for p in self.model.parameters()]
        try:
            for p, _ in parameters:
                p.requires_grad_(False)
            with self._quantizers_off(self.model), torch.enable_grad():
                for index, images in enumerate(self.batches):
                    self._cursor.batch = index
                    live.clear()
                    logits = self.model(images.detach().requires_grad_(True))
                    targets = self.labels_of(index, logits)
                    F.cross_entropy(logits, targets, reduction="sum").backward()
                    for name, output in live.items():
                        found[name]["fisher"].append(output.grad.detach() ** 2)
        finally:
            for handle in handles:
                handle.remove()
            for p, flag in parameters:
                p.requires_grad_(flag)
        self._fisher = found

    def labels_of(self, index: int, logits: torch.Tensor) -> torch.Tensor:
        """Labels of batch ``index`` (the given ones, else the float network's predictions)."""
        if self.labels is None:
            return self.teacher[self._offsets[index]: self._offsets[index] + len(logits)].argmax(1)
        return self.labels[self._offsets[index]: self._offsets[index] + len(logits)].to(logits.device)

    @property
    def _offsets(self) -> list:
        offsets, total = [], 0
        for batch in self.batches:
            offsets.append(total)
            total += len(batch)
        return offsets

    def layer_noise(self, exact_logits: torch.Tensor, logits: Optional[torch.Tensor] = None) -> float:
        """The noise of one layer's setting at the network output: the divergence (``kl`` or ``mse``) of ``logits``
        (default: the configured network's) from ``exact_logits``, the network's with that layer on the exact
        reference setting (`cimq_pl.search.sensitivity.exact_for`, a `try_layer`)."""
        return logit_loss(exact_logits, self.reference_logits if logits is None else logits, self.network_metric)

    def layer_energy(self, name: str) -> tuple[float, float]:
        """The configured layer's (energy uJ, latency us) per image on the bench's images."""
        layer = next(layer for layer in self.reference.cost.layers if layer.name == name)
        return layer.energy_per_image_uj, layer.latency_ns / max(self.images, 1) / 1e3

    @torch.no_grad()
    def _calibrate_layer(self, name: str, old: nn.Module, new: nn.Module) -> None:
        """Quantizers of ``new`` (in the network in place of ``old``): copied where its spec change does not concern
        them, else calibrated as `calibrate_` calibrated the configured network (see the module docstring); on a
        reconstructed network, an ADC whose input and weight codes stay the same keeps its learned range."""
        same_input = old.spec.input_bits == new.spec.input_bits
        same_weight = (old.spec.weight_bits, old.spec.effective_cell_bits, old.geometry) == \
                      (new.spec.weight_bits, new.spec.effective_cell_bits, new.geometry)
        for role, same in (("input", same_input), ("weight", same_weight)):
            mine, theirs = getattr(new, f"{role}_quantizer"), getattr(old, f"{role}_quantizer")
            if mine is not None and theirs is not None:
                if same:
                    setattr(new, f"{role}_quantizer", copy.deepcopy(theirs))
                else:
                    mine.enabled = theirs.enabled
        if new.psum_quantizer is not None and old.psum_quantizer is not None:
            new.psum_quantizer.enabled = old.psum_quantizer.enabled
        iq, wq, pq = new.input_quantizer, new.weight_quantizer, new.psum_quantizer
        with torch.random.fork_rng(devices=self._cuda_devices(self.model)):
            torch.manual_seed(self.seed)
            if wq is not None and wq.enabled and not same_weight:
                wq.init_from_observer(new._weight4d())
            if iq is not None and iq.enabled and not same_input:
                adc_on = pq is not None and pq.enabled
                if pq is not None:
                    pq.enabled = False
                iq.start_observing()
                self._calibration_pass(name, new, 1)
                iq.finish_observing()
                if pq is not None:
                    pq.enabled = adc_on
            # a learned ADC range stays where the partial sums keep their units (same input and weight codes)
            keeps_clip = (self.keeps_learned and same_input and same_weight and pq is not None
                          and old.psum_quantizer is not None and pq.adopt_calibration_(old.psum_quantizer))
            if pq is not None and pq.enabled and not keeps_clip:
                pq.start_observing()
                self._calibration_pass(name, new, 2)
                pq.finish_observing()

    def _calibration_pass(self, name: str, layer: nn.Module, pass_: int) -> None:
        """Feed ``layer`` (in the network as ``name``) the inputs it gets in `calibrate_`'s pass ``pass_``: the cached
        ones, or the network run up to it with the other layers as in that pass (pass 1: float inputs, ideal ADCs;
        pass 2: ideal ADCs)."""
        cached = self._calibration_inputs.get((name, pass_))
        if cached is None and (name, 2) in self._calibration_inputs:
            raise RuntimeError(f"calibration pass {pass_} inputs of {name!r} were not cached: build the bench "
                               "with input_trials=True")
        states = self._rng_states.get((name, pass_))
        cuda = self._cuda_devices(self.model)

        def restore(index: int) -> None:  # the random draws the configured layer's observers made on this batch
            if states is not None:
                cpu_state, cuda_state = states[index]
                torch.set_rng_state(cpu_state)
                if cuda_state is not None:
                    torch.cuda.set_rng_state(cuda_state, cuda[0])

        if cached is not None:
            for index, inputs in enumerate(cached):
                restore(index)
                layer(inputs)
            return
        others = [q for n, role, q in iter_quantizers(self.model) if n != name
                  and (role == "psum" or (role == "input" and pass_ == 1))]
        saved = [(quantizer, quantizer.enabled) for quantizer in others]
        for quantizer in others:
            quantizer.enabled = False
        handle = layer.register_forward_pre_hook(lambda *_: restore(self._cursor.batch))
        try:
            self._run_until(layer)
        finally:
            handle.remove()
            for quantizer, enabled in saved:
                quantizer.enabled = enabled

    # ------------------------------------------------------------------ passes
    def _logits(self, model: nn.Module) -> torch.Tensor:
        outputs = []
        with torch.no_grad():
            for index, images in enumerate(self.batches):
                self._cursor.batch = index
                outputs.append(model(images).detach())
        return torch.cat(outputs)

    def _run_until(self, layer: nn.Module) -> None:
        """Every batch through the network, each pass stopped right after ``layer`` ran."""
        def stop(*_):
            raise _Stop

        handle = layer.register_forward_hook(stop)
        try:
            for index, images in enumerate(self.batches):
                self._cursor.batch = index
                try:
                    self.model(images)
                except _Stop:
                    pass
        finally:
            handle.remove()

    def _reference_pass(self, replay: bool, cache_outputs: bool = True) -> NetworkPoint:
        """Measure the configured network; record the order its CIM layers run in and (``replay`` and
        ``cache_outputs``) their outputs."""
        layers = cim_layers(self.model)
        order, calls, outputs = [], {name: 0 for name, _ in layers}, {name: [] for name, _ in layers}

        def hook_for(name):
            def hook(_module, _inputs, output):
                calls[name] += 1
                if self._cursor.batch == 0 and name not in order:
                    order.append(name)
                if replay and cache_outputs:
                    outputs[name].append(output.detach())
            return hook

        handles = [layer.register_forward_hook(hook_for(name)) for name, layer in layers]
        try:
            point, self.reference_logits = self._measure(self.model)
        finally:
            for handle in handles:
                handle.remove()
        once = all(count == len(self.batches) for count in calls.values())
        self._order = order if once and len(order) == len(layers) else None
        self._outputs = outputs if replay and self._order is not None else {}
        return point

    @contextmanager
    def _swapped(self, name: str, trial: nn.Module) -> Iterator[None]:
        """``trial`` in place of layer ``name``; with replay, the layers that run before it replay their outputs."""
        replaced = {name: self.model.get_submodule(name)}
        _set_submodule(self.model, name, trial)
        try:
            if self.replay and self._outputs:  # a fisher bench keeps no outputs: the layers before it run
                for earlier in self._order[: self._order.index(name)]:
                    replaced[earlier] = self.model.get_submodule(earlier)
                    _set_submodule(self.model, earlier, _Replay(self._outputs[earlier], self._cursor))
            yield
        finally:
            for key, module in replaced.items():
                _set_submodule(self.model, key, module)

    @staticmethod
    @contextmanager
    def _collecting(layers: Sequence[nn.Module]) -> Iterator[None]:
        for layer in layers:
            layer.collect_stats = True
        reset_counts(layers)
        try:
            yield
        finally:
            for layer in layers:
                layer.collect_stats = False

    @staticmethod
    @contextmanager
    def _quantizers_off(model: nn.Module) -> Iterator[None]:
        """Every quantizer disabled (the exact float network), their flags restored after."""
        saved = [(quantizer, quantizer.enabled) for *_, quantizer in iter_quantizers(model)]
        for quantizer, _ in saved:
            quantizer.enabled = False
        try:
            yield
        finally:
            for quantizer, enabled in saved:
                quantizer.enabled = enabled

    @staticmethod
    def _cuda_devices(model: nn.Module) -> list:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return [device] if device.type == "cuda" else []
