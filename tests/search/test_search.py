"""The per-layer precision search (`cimq_pl.search`): config validation, the exact front against brute force,
a search on a tiny network with a known answer, trials that reproduce the configured network exactly, and the
written assignment that `convert_to_cim` takes as is."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F

from cimq_pl.errors import ConfigError
from cimq_pl.quant import CIMSpec, QuantizerOptions, cim_layers, convert_to_cim
from cimq_pl.search import SearchBench, SearchConfig, pareto_front, search_precision, select
from cimq_pl.search.front import budget_value
from cimq_pl.search.report import OVERRIDES_FILE, format_summary, write_search_files
from cimq_pl.search.sensitivity import SensitivityTable


@pytest.mark.parametrize("kwargs, message", [
    ({"candidates": {"adc_bit": [3, 4]}}, r"search\.candidates: unknown field 'adc_bit'; allowed: weight_bits, "),
    ({"candidates": {"adc_bits": [3, 17]}}, r"search\.candidates\.adc_bits: 17 is invalid: expected integers in \[1, 16\]"),
    ({"candidates": {"adc_bits": [3, 3]}}, r"expected distinct values"),
    ({"energy_budget": "adc_bits=7"}, r"search\.energy_budget='adc_bits=7' is not a uniform setting of the candidates: "
                                      r"expected one of 'adc_bits=3', 'adc_bits=4', 'adc_bits=5', 'adc_bits=6'"),
    ({"energy_budget": "adc=4"}, r"search\.energy_budget='adc=4' is invalid: expected a number, or a uniform setting"),
    ({"energy_budget": -1.0}, r"search\.energy_budget=-1\.0 is invalid: expected a number >= 0"),
    ({"energy_budget": "-0.8*adc_bits=5"}, r"search\.energy_budget='-0\.8\*adc_bits=5' is invalid: the factor before "
                                          r"'\*' must be a number > 0"),
    ({"loss_budget": "x*adc_bits=5"}, r"search\.loss_budget='x\*adc_bits=5' is invalid: the factor"),
    ({"energy_budget": "0.8*adc_bits=7"}, r"is not a uniform setting of the candidates"),
    ({"energy_budget": 1.0, "loss_budget": 0.1}, r"both set: give one"),
    ({"images": 0}, r"search\.images=0 is invalid: expected an integer >= 1"),
    ({"metric": "ce"}, r"search\.metric='ce' is invalid: expected one of \['fisher', 'kl', 'mse'\]"),
    ({"replay": False}, r"search\.metric='fisher' needs search\.replay=true"),
    ({"layers": []}, r"search\.layers=\[\] is invalid"),
    ({"layer_candidates": {}}, r"search\.layer_candidates=\{\} is invalid: expected a mapping of layer names or globs"),
    ({"layer_candidates": {"conv1": {"input_bit": [7]}}}, r"search\.layer_candidates\['conv1'\]: unknown field "
                                                          r"'input_bit'; allowed: weight_bits"),
    ({"layer_candidates": {"conv1": {"input_bits": [7, 0]}}}, r"search\.layer_candidates\['conv1'\]\.input_bits: 0 is "
                                                              r"invalid: expected integers in \[1, 16\]"),
])
def test_bad_search_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SearchConfig(**kwargs)


def test_candidates_combine_and_budgets_parse():
    config = SearchConfig(candidates={"adc_bits": [3, 4], "input_bits": [4, None]}, loss_budget="adc_bits=4,input_bits=null")
    assert config.settings() == [{"adc_bits": 3, "input_bits": 4}, {"adc_bits": 3, "input_bits": None},
                                 {"adc_bits": 4, "input_bits": 4}, {"adc_bits": 4, "input_bits": None}]
    assert config.budget() == ("loss", {"adc_bits": 4, "input_bits": None}, 1.0)
    assert SearchConfig().budget() == ("energy", None, 1.0)
    assert SearchConfig(energy_budget=0.5).budget() == ("energy", 0.5, 1.0)
    assert SearchConfig(energy_budget="0.8 * adc_bits=5").budget() == ("energy", {"adc_bits": 5}, 0.8)


def test_a_budget_can_be_a_fraction_of_a_uniform_setting():
    table = _random_table(5, 4, seed=3)
    energy, loss, _ = table.predict(table.uniform(3))
    assert budget_value(table, "energy", {"adc_bits": 3}) == (energy, table.uniform(3))
    assert budget_value(table, "energy", {"adc_bits": 3}, 0.8) == (pytest.approx(0.8 * energy), table.uniform(3))
    assert budget_value(table, "loss", {"adc_bits": 3}, 0.5)[0] == pytest.approx(0.5 * loss)


def _random_table(layers: int, settings: int, seed: int) -> SensitivityTable:
    rng = random.Random(seed)
    rows = lambda: [[rng.uniform(-1, 1) for _ in range(settings)] for _ in range(layers)]  # noqa: E731
    loss, energy = rows(), rows()
    loss[1][2] = energy[1][2] = math.nan  # a setting invalid for one layer is never chosen
    return SensitivityTable([f"l{i}" for i in range(layers)], [{"adc_bits": b} for b in range(settings)],
                            [0] * layers, loss, loss, energy, rows(), rows(), [[""] * settings for _ in range(layers)],
                            1.0, 5.0, 0.0, "kl", 8)


def test_the_front_and_budgets_are_exact_against_brute_force():
    table = _random_table(5, 4, seed=3)
    front = pareto_front(table)
    choices = [c for c in itertools.product(range(4), repeat=5) if c[1] != 2]
    predicted = {c: table.predict(c) for c in choices}
    for budget in (3.0, 4.2, 5.0, 6.5):
        best = min((c for c in choices if predicted[c][0] <= budget), key=lambda c: predicted[c][1])
        assert select(front, "energy", budget).loss == pytest.approx(predicted[best][1])
    for budget in (0.0, 1.0, 2.5):
        best = min((c for c in choices if predicted[c][1] <= budget), key=lambda c: predicted[c][0])
        assert select(front, "loss", budget).energy_uj == pytest.approx(predicted[best][0])
    # every front point is an assignment's prediction and none dominates another
    for point in front:
        assert (point.energy_uj, point.loss) == pytest.approx(predicted[point.choice][:2])
    assert all(a.energy_uj < b.energy_uj and a.loss > b.loss for a, b in zip(front, front[1:]))
    with pytest.raises(ConfigError, match=r"energy_budget=0\.1 uJ/image is below every assignment.*cheapest needs"):
        select(front, "energy", 0.1)


def test_an_edge_layer_keeps_its_configured_mapping_in_uniform_settings_and_may_keep_it_in_the_front():
    """An ``int8`` edge layer (conv1) named in ``search.layers`` whose configured setting is no candidate: uniform
    ADC 5 leaves it as configured, as ``model.cim.adc_bits`` does, and the front may keep it (None) or lower it."""
    table = _random_table(4, 3, seed=5)
    table.current[0], table.edge = None, [True, False, False, False]
    assert table.uniform(2) is None  # invalid for l1 (NaN), as without edges
    assert table.uniform(1) == (None, 1, 1, 1)
    energy, loss, _ = table.predict((None, 1, 1, 1))
    assert energy == pytest.approx(5.0 + sum(table.energy_uj[l][1] for l in (1, 2, 3)))
    assert table.assignment((None, 1, 1, 1)) == {f"l{l}": {"adc_bits": 1} for l in (1, 2, 3)}
    assert budget_value(table, "energy", {"adc_bits": 1}) == (pytest.approx(energy), (None, 1, 1, 1))
    front = pareto_front(table)
    choices = [c for c in itertools.product([None, 0, 1, 2], *[range(3)] * 3) if c[1] != 2]
    predicted = {c: table.predict(c) for c in choices}
    for budget in (3.0, 4.5, energy, 6.0):
        best = min((c for c in choices if predicted[c][0] <= budget), key=lambda c: predicted[c][1])
        assert select(front, "energy", budget).loss == pytest.approx(predicted[best][1])
    assert select(front, "loss", loss).energy_uj <= energy + 1e-9  # the uniform setting's loss is always feasible


MACRO = CIMSpec(weight_bits=8, input_bits=8)


class _KnownAnswer(nn.Module):
    """``a`` feeds the logits; ``b`` (four times ``a``'s ADC conversions) reaches them scaled by 1e-4. On 8-bit
    weights and inputs the ADC is the error that matters: at the energy of ADC 4 everywhere, the best assignment
    is ADC 6 on ``a`` paid for by ADC 2 on ``b``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 32, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            self.fc.weight.mul_(30)  # confident logits: the loss reads the ADC error of ``a``

    def forward(self, x):
        h = F.relu(self.a(x))
        return self.fc(h.mean((2, 3))) + 1e-4 * self.b(h).mean((2, 3)).sum(1, keepdim=True)


@pytest.fixture(scope="module")
def known():
    torch.manual_seed(0)
    model = _KnownAnswer().eval()
    convert_to_cim(model, MACRO, options=QuantizerOptions(), overrides={"fc": {"adc_bits": 6}})
    images = torch.rand(32, 3, 8, 8)
    config = SearchConfig(candidates={"adc_bits": [2, 4, 6]}, layers=["a", "b"], energy_budget="adc_bits=4",
                          images=32, batch_size=16)
    result = search_precision(model, images.split(16), config, configured_overrides={"fc": {"adc_bits": 6}})
    return model, images, result


def test_a_search_on_a_tiny_model_picks_the_known_answer(known):
    _, _, result = known
    assert result.table.assignment(result.chosen.choice) == {"a": {"adc_bits": 6}, "b": {"adc_bits": 2}}
    uniform4, searched = result.point("adc_bits=4"), result.searched
    assert searched.measured.energy_uj <= uniform4.measured.energy_uj  # the budget: uniform ADC 4's energy
    assert searched.measured.loss < uniform4.measured.loss  # the sensitive layer got the bits
    a, b = result.table.layers.index("a"), result.table.layers.index("b")
    assert result.table.loss[a][0] > 1e4 * abs(result.table.loss[b][0])  # ADC 2: a matters, b does not
    assert result.table.energy_uj[b][0] < -2 * result.table.energy_uj[a][2]  # b's ADC 2 pays for a's ADC 6
    assert searched.predicted_energy_uj == pytest.approx(searched.measured.energy_uj, rel=2e-2)  # density moves a little
    assert result.overrides == {"a": {"adc_bits": 6}, "b": {"adc_bits": 2}, "fc": {"adc_bits": 6}}
    text = format_summary(result)
    assert "searched assignment: adc_bits=6 x1, adc_bits=2 x1" in text and "uniform adc_bits=4" in text


def test_the_written_assignment_is_a_config_convert_to_cim_takes(known, tmp_path):
    _, _, result = known
    written = write_search_files(result, tmp_path, header="made by a test")
    assert [path.name for path in written] == [OVERRIDES_FILE, "sensitivity.csv", "front.csv", "points.csv", "search.png"]
    text = (tmp_path / OVERRIDES_FILE).read_text()
    assert text.startswith("# made by a test\n")
    overrides = yaml.safe_load(text)["model"]["cim_overrides"]
    fresh = _KnownAnswer().eval()
    convert_to_cim(fresh, MACRO, overrides=overrides)
    assert {name: layer.spec.adc_bits for name, layer in cim_layers(fresh)} == {"a": 6, "b": 2, "fc": 6}


def test_fisher_trials_reproduce_the_configured_layer_and_grow_with_fewer_bits(known):
    model, images, _ = known
    bench = SearchBench(model, images.split(16))
    configured = bench.fisher_trial("a")
    assert bench.fisher_trial("a", model.a.spec).loss == configured.loss  # exactly: same calibration draws
    errors = [bench.fisher_trial("a", model.a.spec.replace(adc_bits=bits)).loss for bits in (2, 3, 4, 6, None)]
    assert errors == sorted(errors, reverse=True) and errors[2] == configured.loss
    energies = [bench.fisher_trial("b", model.b.spec.replace(adc_bits=bits)).energy_uj for bits in (2, 4, 6)]
    assert energies == sorted(energies) and energies[1] == pytest.approx(bench.fisher_trial("b").energy_uj)


def test_fisher_noise_of_an_adc_is_measured_against_the_ideal_adc(known):
    from cimq_pl.search.sensitivity import exact_for

    model, images, _ = known
    assert exact_for(model.a.spec, [{"adc_bits": 3}]) == model.a.spec.replace(adc_bits=None)
    assert exact_for(model.a.spec, [{"input_bits": 3, "weight_bits": 2}]) == model.a.spec.replace(
        input_bits=None, weight_bits=None, cell_bits=None)
    bench = SearchBench(model, images.split(16))
    ideal = bench.layer_outputs("a", model.a.spec.replace(adc_bits=None))
    assert bench.fisher_trial("a", model.a.spec.replace(adc_bits=None), ideal).loss == 0.0
    noise = [bench.fisher_trial("a", model.a.spec.replace(adc_bits=bits), ideal).loss for bits in (2, 4, 6, 8)]
    assert noise == sorted(noise, reverse=True) and noise[-1] < 1e-3 * noise[0]


def test_a_trial_of_the_configured_setting_gives_back_the_configured_network_with_and_without_replay(known):
    model, images, _ = known
    benches = [SearchBench(model, images.split(16), metric="kl", replay=replay) for replay in (True, False)]
    assert benches[0].replay and not benches[1].replay
    for bench in benches:
        assert bench.try_layer("a", model.a.spec).loss == bench.reference.loss  # exactly: same calibration draws
    lowered = [bench.try_layer("a", model.a.spec.replace(adc_bits=2, input_bits=3)) for bench in benches]
    assert lowered[0].loss == lowered[1].loss and lowered[0].energy_uj == lowered[1].energy_uj
    assert lowered[0].loss > benches[0].reference.loss
    assert {name: layer.spec.adc_bits for name, layer in cim_layers(model)} == {"a": 4, "b": 4, "fc": 6}  # restored


def test_a_bench_on_a_reconstructed_network_measures_it_and_keeps_what_it_learned(known):
    """``search.init_from``: the configured network is the PTQ one; an ADC trial keeps the learned clip range at the
    new resolution, a trial that changes the partial sums' units calibrates its ADC again."""
    import copy

    from cimq_pl.search import logit_loss

    model, images, _ = known
    learned = copy.deepcopy(model)
    SearchBench(learned, images.split(16))  # calibrated in place
    with torch.no_grad():  # what reconstruction would have learned: a wider clip of a, a coarser input step of b,
        learned.a.psum_quantizer.theta.add_(0.3)  # an output offset of b after its ADC (lr_offset)
        learned.b.input_quantizer.step.mul_(1.5)
        learned.b.add_output_offset_().uniform_(-0.2, 0.2)
    bench = SearchBench(copy.deepcopy(model), images.split(16), metric="kl", reconstructed=learned.state_dict())
    with torch.no_grad():
        logits = torch.cat([learned(batch) for batch in images.split(16)])
    assert bench.reference.loss == pytest.approx(logit_loss(bench.teacher, logits, "kl"), rel=1e-12, abs=0)
    assert bench.reference.loss != SearchBench(copy.deepcopy(model), images.split(16), metric="kl").reference.loss
    assert bench.try_layer("a", model.a.spec).loss == bench.reference.loss  # the configured setting gives it back
    six = bench.network_with({"a": model.a.spec.replace(adc_bits=6)})
    assert six.a.spec.adc_bits == 6 and torch.equal(six.a.psum_quantizer.alpha(), learned.a.psum_quantizer.alpha())
    assert torch.equal(six.b.input_quantizer.step, learned.b.input_quantizer.step)  # not calibrated again
    assert bench.try_layer("a", model.a.spec.replace(adc_bits=6)).loss < bench.reference.loss  # finer codes, same clip
    wider = bench.network_with({"a": model.a.spec.replace(input_bits=6)})  # other partial-sum units: a new ADC range
    assert not torch.equal(wider.a.psum_quantizer.alpha(), learned.a.psum_quantizer.alpha())
    # the offset stays b's own: kept at another ADC resolution, absent on the ideal-ADC reference (not in the bias)
    assert torch.equal(bench.network_with({"b": model.b.spec.replace(adc_bits=6)}).b.output_offset, learned.b.output_offset)
    ideal = bench.network_with({"b": model.b.spec.replace(adc_bits=None)}).b
    assert ideal.output_offset is None and torch.equal(ideal.bias, learned.b.bias)
    assert bench.try_layer("b", model.b.spec).loss == bench.reference.loss
    with pytest.raises(ValueError, match="needs replay=True"):
        SearchBench(copy.deepcopy(model), images.split(16), metric="kl", replay=False, reconstructed=learned.state_dict())


def test_search_init_from_needs_replay():
    with pytest.raises(ConfigError, match=r"search\.init_from='ptq\.ckpt' needs search\.replay=true"):
        SearchConfig(metric="kl", replay=False, init_from="ptq.ckpt")


def test_a_search_naming_an_int8_edge_layer_leaves_it_out_of_the_uniform_settings():
    """``a`` mapped ``int8`` (ideal ADC) and named in ``search.layers``: uniform ADC 4 is the network with ``b`` at 4
    and ``a`` as configured; searched alone, a uniform setting is ``a``'s own."""
    torch.manual_seed(0)
    model = _KnownAnswer().eval()
    overrides = {"a": {"mode": "int8"}, "fc": {"adc_bits": 6}}
    convert_to_cim(model, MACRO, options=QuantizerOptions(), overrides=overrides)
    images = torch.rand(32, 3, 8, 8).split(16)
    config = SearchConfig(candidates={"adc_bits": [2, 4, 6]}, layers=["a", "b"], energy_budget="adc_bits=4",
                          images=32, batch_size=16)
    result = search_precision(model, images, config, configured_overrides=overrides)
    assert result.table.edge == [True, False] and result.table.current == [None, 1]  # b: the macro's ADC 4
    uniform4 = result.point("adc_bits=4")
    assert uniform4.choice == (None, 1)
    assert uniform4.predicted_energy_uj == pytest.approx(result.table.reference_energy_uj
                                                         + result.table.energy_uj[1][1])
    assert uniform4.measured.energy_uj == pytest.approx(uniform4.predicted_energy_uj, rel=2e-2)
    assert result.searched.predicted_energy_uj <= uniform4.predicted_energy_uj * (1 + 1e-9)
    assert result.table.energy_uj[0][2] < 0  # a's 6-bit ADC is cheaper than its ideal one, charged as 8 bits
    # at uniform ADC 4's energy the search keeps a as configured (its candidates all cost loss), and says so
    assert result.chosen.choice == (None, 1) and "a as configured" in format_summary(result)
    alone = search_precision(model, images, SearchConfig(candidates={"adc_bits": [2, 4, 6]}, layers=["a"],
                                                         energy_budget="adc_bits=4", images=32, batch_size=16),
                             configured_overrides=overrides)
    assert alone.table.edge == [False] and alone.point("adc_bits=4").choice == (1,)  # searched alone: its own


def test_a_layer_configured_exact_is_measured_against_the_float_network():
    """``a`` int8 (an ideal ADC: its own exact reference in an ADC search), whole-network metric: a setting's loss
    change is the whole network's loss on it minus the configured network's, both against the float network (a
    noise against the ideal ADC would carry the floor of the rounding flips downstream, which the configured
    network's zero noise lacks)."""
    from cimq_pl.search.sensitivity import measure_sensitivity

    torch.manual_seed(0)
    model = _KnownAnswer().eval()
    convert_to_cim(model, MACRO, options=QuantizerOptions(), overrides={"a": {"mode": "int8"}, "fc": {"adc_bits": 6}})
    bench = SearchBench(model, torch.rand(32, 3, 8, 8).split(16), "mse")
    settings = [{"adc_bits": bits} for bits in (2, 4, 6)]
    table = measure_sensitivity(bench, ["a"], settings)
    assert table.current == [None] and table.reference_loss == bench.reference.loss
    for index, setting in enumerate(settings):
        trial = bench.try_layer("a", bench.model.get_submodule("a").spec.replace(**setting))
        assert table.loss[0][index] == pytest.approx(trial.loss - bench.reference.loss, rel=1e-9, abs=1e-12)
    assert table.loss[0][0] > table.loss[0][2]  # ADC 2 costs more than ADC 6


def test_layers_with_candidates_of_their_own_take_only_those_and_stay_out_of_the_uniform_settings():
    """``search.layer_candidates``: ``a`` searched over input bits and ADC bits of its own, ``b`` over the common
    ADC candidates. Each layer is tried on its own settings only; uniform ADC 4 is ``b`` at 4 with ``a`` as
    configured; the front equals brute force over each layer's own settings (or ``a`` as configured); the chosen
    assignment is what is written; a pattern matching no searched layer is one line."""
    torch.manual_seed(0)
    model = _KnownAnswer().eval()
    convert_to_cim(model, MACRO, options=QuantizerOptions(), overrides={"fc": {"adc_bits": 6}})
    images = torch.rand(32, 3, 8, 8).split(16)
    own = {"input_bits": [4, 8], "adc_bits": [6, None]}
    config = SearchConfig(candidates={"adc_bits": [2, 4, 6]}, layers=["a", "b"], layer_candidates={"a": own},
                          energy_budget="adc_bits=4", images=32, batch_size=16, metric="mse")
    assert config.own_settings(["a", "b"]) == {"a": [
        {"input_bits": 4, "adc_bits": 6}, {"input_bits": 4, "adc_bits": None}, {"input_bits": 8, "adc_bits": 6},
        {"input_bits": 8, "adc_bits": None}]}
    ticks = []
    result = search_precision(model, images, config, configured_overrides={"fc": {"adc_bits": 6}},
                              progress=ticks.append, on_start=lambda total: ticks.append(total))
    table = result.table
    assert table.settings == [{"adc_bits": 2}, {"adc_bits": 4}, {"adc_bits": 6}, *config.own_settings(["a"])["a"]]
    assert table.candidates == [{3, 4, 5, 6}, {0, 1, 2}] and table.edge == [True, False]
    assert [table.valid(0, s) for s in range(7)] == [False] * 3 + [True] * 4
    assert [table.valid(1, s) for s in range(7)] == [True] * 3 + [False] * 4
    assert table.current == [None, 1]  # a: the macro's 8-bit inputs at ADC 4 are none of its own settings
    # the progress bar: 4 + 3 trials, then 4 verified points (uniform ADC 2/4/6 and the searched assignment)
    assert [tick for tick in ticks if isinstance(tick, int)] == [4 + 3 + 4, 4 + 3 + 4]
    assert len([tick for tick in ticks if isinstance(tick, str)]) == 4 + 3 + 4
    assert [row["setting"] for row in table.rows() if row["layer"] == "a"] == [
        "input_bits=4,adc_bits=6", "input_bits=4,adc_bits=null", "input_bits=8,adc_bits=6", "input_bits=8,adc_bits=null"]
    assert result.point("adc_bits=4").choice == (None, 1)  # b at 4, a as configured
    assert [point.label for point in result.points if point.kind == "uniform"] == ["adc_bits=2", "adc_bits=4",
                                                                                   "adc_bits=6"]
    choices = [(a, b) for a in (None, 3, 4, 5, 6) for b in (0, 1, 2)]
    predicted = {c: table.predict(c) for c in choices}
    budget = predicted[(None, 1)][0]
    best = min((c for c in choices if predicted[c][0] <= budget * (1 + 1e-9)), key=lambda c: predicted[c][1])
    assert result.chosen.loss == pytest.approx(predicted[best][1])
    assert {name: dict(fields) for name, fields in result.overrides.items() if name != "fc"} == table.assignment(
        result.chosen.choice)
    with pytest.raises(ConfigError, match=r"search\.layer_candidates: 'conv1' matches no layer; the searched layers "
                                          r"are: a, b"):
        SearchConfig(layer_candidates={"conv1": own}).own_settings(["a", "b"])
