"""Each CIMQ technique callback changes the model the way it claims, alone and together, at setup."""

from __future__ import annotations

import pytest
import torch

from cimq_pl.callbacks import (
    ArraywiseWeights,
    BitSparseActivations,
    PartialSumClipping,
    PostTrainingQuantization,
    QuantDropping,
    QuantizationAwareTraining,
)
from cimq_pl.errors import ConfigError
from cimq_pl.module import CIMQModule
from cimq_pl.objectives import BlockReconstruction, TaskObjective
from cimq_pl.quant import CIMSpec, calibrate_, cim_layers, set_collect_stats
from cimq_pl.quant.techniques import (
    ArraywiseWeightConfig,
    BitSparseActivationConfig,
    PartialSumClippingConfig,
    QuantDroppingConfig,
    quantize_,
)
from conftest import CIFAR10, RESNET20

SPEC = CIMSpec(rows=128, cols=128, weight_bits=4, input_bits=4, adc_bits=4)


@pytest.fixture(scope="module")
def images():
    from cimq_pl.datamodules import CIFAR10DataModule

    dm = CIFAR10DataModule(root=str(CIFAR10), num_workers=0, calibration_size=64, eval_batch_size=64)
    return next(iter(dm.calibration_dataloader()))[0]


def _model(*configs):
    module = CIMQModule("cifar_resnet20", 10, str(RESNET20), cim=SPEC)
    for config in configs:
        quantize_(module.model, config)
    return module.model.eval()


def _bit_density(model, images) -> float:
    set_collect_stats(model, True)
    with torch.no_grad():
        model(images)
    stats = [layer.stats.as_dict() for _, layer in cim_layers(model)]
    set_collect_stats(model, False)
    return sum(s["input_ones_fed"] for s in stats) / sum(s["input_bits_fed"] for s in stats)


def test_conventional_quantizers_are_the_baseline():
    for _, layer in cim_layers(_model()):
        assert layer.weight_quantizer.granularity == "layer" and layer.weight_quantizer.step.numel() == 1
        assert layer.input_quantizer.max_ones is None
        assert layer.psum_quantizer.granularity == "layer" and not layer.psum_quantizer.theta.requires_grad
        assert layer.options.psum_observer == "minmax" and layer.input_quantizer.keep_prob is None


def test_arraywise_gives_one_scale_per_tile():
    for _, layer in cim_layers(_model(ArraywiseWeightConfig("array"))):
        geo = layer.geometry
        assert tuple(layer.weight_quantizer.step.shape) == (geo.groups, geo.n_row_blocks, geo.n_col_blocks)
    layers = dict(cim_layers(_model(ArraywiseWeightConfig("array"))))
    assert layers["layer3.0.conv2"].weight_quantizer.step.numel() == 5  # 576 rows -> 5 arrays of 128 rows


def test_bit_sparse_codes_lower_measured_bit_density(images):
    # same MSE step search on both sides: only the code set differs
    plain, sparse = _model(BitSparseActivationConfig(max_ones=None)), _model(BitSparseActivationConfig(max_ones=1))
    calibrate_(plain, [images])
    calibrate_(sparse, [images])
    for _, layer in cim_layers(sparse):
        codes = layer.input_quantizer.allowed_codes()[0]
        one_hot = {-8, 0, 1, 2, 4} if layer.input_quantizer.signed else {0, 1, 2, 4, 8}  # 4-bit codes, <= 1 one bit
        assert layer.input_quantizer.max_ones == 1 and set(codes.tolist()) == one_hot
    assert _bit_density(sparse, images) < 0.7 * _bit_density(plain, images)


def test_bit_sparse_codes_leave_int8_edge_layers_uniform():
    """The code set is a technique of the 4-bit arrays: the int8 first conv and classifier keep all 256 codes."""
    module = CIMQModule("cifar_resnet20", 10, None, cim=CIMSpec(first_layer="int8", last_layer="int8"))
    quantize_(module.model, BitSparseActivationConfig(max_ones=2))
    layers = cim_layers(module.model)
    edges = [layer for _, layer in layers if layer.mapping == "int8"]
    assert [name for name, layer in layers if layer.mapping == "int8"] == ["conv1", "fc"]
    assert all(layer.input_quantizer.max_ones is None and layer.spec.input_bits == 8 for layer in edges)
    assert all(layer.input_quantizer.max_ones == 2 for _, layer in layers if layer.mapping == "cim")


@pytest.mark.parametrize("int8_layers", [False, True])
def test_dropping_leaves_int8_edge_layers_alone_unless_asked(int8_layers):
    module = CIMQModule("cifar_resnet20", 10, None, cim=CIMSpec(first_layer="int8", last_layer="int8"))
    quantize_(module.model, QuantDroppingConfig(keep_prob=0.5, targets=("activations", "psums"), int8_layers=int8_layers))
    layers = cim_layers(module.model)
    edges = {name: layer.input_quantizer.keep_prob for name, layer in layers if layer.mapping == "int8"}
    assert edges == {"conv1": 0.5 if int8_layers else None, "fc": 0.5 if int8_layers else None}
    assert all(layer.input_quantizer.keep_prob == 0.5 and layer.psum_quantizer.keep_prob == 0.5
               for _, layer in layers if layer.mapping == "cim")


def test_psum_clipping_is_per_array_learnable_and_mse_initialised(images):
    baseline, clipped = _model(), _model(PartialSumClippingConfig("array", "mse", True))
    calibrate_(baseline, [images])
    calibrate_(clipped, [images])
    name, layer = list(cim_layers(clipped))[3]
    reference = dict(cim_layers(baseline))[name]
    assert layer.psum_quantizer.theta.requires_grad and layer.psum_quantizer.alpha0.shape[1] == layer.geometry.n_row_blocks
    # the MSE clip sits inside the min-max range of the conventional ADC
    assert layer.psum_quantizer.alpha().max() < reference.psum_quantizer.alpha().max()


def test_dropping_mixes_quantized_and_float_values_in_training_only(images):
    model = _model(QuantDroppingConfig(keep_prob=0.5, targets=("activations",)))
    calibrate_(model, [images])
    layer = dict(cim_layers(model))["layer1.0.conv1"]
    assert layer.input_quantizer.keep_prob == 0.5 and layer.psum_quantizer.keep_prob is None
    x = torch.rand(2, 16, 8, 8)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    first = layer(x)
    assert not torch.equal(first, layer(x))


def test_step_scale_reaches_the_array_layers_only_and_lowers_the_measured_bit_density(images):
    """``step_scale`` 2 on the 4-bit array layers (not the int8 edge layers): smaller codes, fewer 1 bits fed."""
    spec = CIMSpec(rows=128, cols=128, weight_bits=4, input_bits=4, adc_bits=4, first_layer="int8", last_layer="int8")
    density = {}
    for scale in (1.0, 2.0):
        model = CIMQModule("cifar_resnet20", 10, str(RESNET20), cim=spec).model
        quantize_(model, BitSparseActivationConfig(max_ones=None, step_scale=scale))
        assert {(layer.mapping, layer.input_quantizer.step_scale) for _, layer in cim_layers(model)} == \
            {("cim", scale), ("int8", 1.0)}
        calibrate_(model, [images])
        density[scale] = _bit_density(model, images)
    assert density[2.0] < 0.85 * density[1.0]


def test_techniques_compose_in_any_order_and_keep_runtime_switches():
    configs = [QuantDroppingConfig(0.7), BitSparseActivationConfig(2, 0.1), ArraywiseWeightConfig(), PartialSumClippingConfig()]
    for order in (configs, configs[::-1]):
        for _, layer in cim_layers(_model(*order)):
            assert layer.input_quantizer.keep_prob == 0.7 and layer.input_quantizer.sparsity_weight == 0.1
            assert layer.input_quantizer.max_ones == 2 and layer.weight_quantizer.granularity == "array_channel"
            assert layer.psum_quantizer.granularity == "column"


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: ArraywiseWeights(granularity="tile"), r"granularity='tile' is invalid: expected one of \['layer', 'channel', 'array', 'array_channel'\]"),
        (lambda: BitSparseActivations(max_ones=0), r"max_ones=0 is invalid: expected an integer >= 1"),
        (lambda: BitSparseActivations(sparsity_weight=-1.0), r"sparsity_weight=-1.0 is invalid"),
        (lambda: BitSparseActivations(step_scale=0.0), r"step_scale=0.0 is invalid: expected a finite number > 0"),
        (lambda: PartialSumClipping(observer="kmeans"), r"observer='kmeans' is invalid: expected one of \['minmax', 'percentile', 'mse', 'auto'\]"),
        (lambda: PartialSumClipping(granularity="row"), r"granularity='row' is invalid: expected one of \['layer', 'array', 'column'\]"),
        (lambda: QuantDropping(keep_prob=1.5), r"keep_prob=1.5 is invalid: expected a probability in \(0, 1\]"),
        (lambda: QuantDropping(targets=["weights"]), r"targets=\['weights'\] is invalid"),
        (lambda: BlockReconstruction(iters_per_block=-1), r"iters_per_block=-1 is invalid: expected an integer >= 0"),
        (lambda: BlockReconstruction(warmup=1.0), r"warmup=1.0 is invalid"),
        (lambda: TaskObjective(quantizer_lr_scale=0), r"quantizer_lr_scale=0 is invalid"),
        (lambda: PostTrainingQuantization(iters_per_block=200), r"objective=BlockReconstruction\(iters_per_block=200\)"),
        (lambda: QuantizationAwareTraining(quantizer_lr_scale=0), r"objective=TaskObjective\(quantizer_lr_scale=0\)"),
    ],
)
def test_misconfigured_callbacks_name_the_value(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_technique_without_cim_macro_is_a_clear_error():
    module = CIMQModule("cifar_resnet20", 10)
    with pytest.raises(ConfigError, match="ArraywiseWeights needs a CIM macro: set model.cim"):
        ArraywiseWeights().setup(None, module, "fit")


def test_a_technique_applied_after_calibration_keeps_what_still_fits(images):
    model = _model()
    calibrate_(model, [images])
    layer = dict(cim_layers(model))["layer1.0.conv1"]
    input_step, weight_step = layer.input_quantizer.step.clone(), layer.weight_quantizer.step.clone()
    psum_quantizer = layer.psum_quantizer
    quantize_(model, QuantDroppingConfig(0.5))  # settings change in place: the very same quantizers
    quantize_(model, PartialSumClippingConfig(granularity="layer", observer="minmax", learn_clip=True))
    assert layer.psum_quantizer is psum_quantizer and layer.psum_quantizer.keep_prob == 0.5
    assert layer.psum_quantizer.theta.requires_grad and layer.psum_quantizer.initialized
    quantize_(model, BitSparseActivationConfig(max_ones=2))  # another code set: rebuilt, calibrated step kept
    assert layer.input_quantizer.max_ones == 2 and torch.equal(layer.input_quantizer.step, input_step)
    assert layer.input_quantizer.initialized and layer.input_quantizer.keep_prob == 0.5
    quantize_(model, ArraywiseWeightConfig())  # per-tile scales: re-initialised from the weights (no data needed)
    assert layer.weight_quantizer.initialized and layer.weight_quantizer.step.shape != weight_step.shape
    fresh = _model(ArraywiseWeightConfig())
    calibrate_(fresh, [images])
    assert torch.equal(layer.weight_quantizer.step, dict(cim_layers(fresh))["layer1.0.conv1"].weight_quantizer.step)
    quantize_(model, PartialSumClippingConfig(granularity="array"))  # alpha per array: needs calibration again
    assert not layer.psum_quantizer.initialized


def test_old_names_of_partial_sum_clipping_still_work_with_a_deprecation():
    from cimq_pl.provenance import configured_techniques

    with pytest.warns(FutureWarning, match=r"PartialSumClipping.init is deprecated: call it observer"):
        settings = configured_techniques(
            [{"class_path": "cimq_pl.callbacks.PartialSumClipping", "init_args": {"init": "minmax", "learnable": False}}]
        )
    assert settings == {"PartialSumClipping": {"granularity": "column", "observer": "minmax", "learn_clip": False,
                                               "asymmetric": False}}


def test_a_checkpoint_of_another_code_set_is_refused_not_taken(images):
    saved = _model(BitSparseActivationConfig(max_ones=1))
    calibrate_(saved, [images])
    with pytest.raises(ConfigError, match=r"the checkpoint's input codes have max_ones=1 but this layer is configured "
                                          r"with max_ones=2: set BitSparseActivations.max_ones: 1"):
        _model(BitSparseActivationConfig(max_ones=2)).load_state_dict(saved.state_dict())


def test_block_input_dropping_is_read_from_the_model():
    from cimq_pl.quant.techniques import applied_technique

    model = _model(QuantDroppingConfig(0.3, targets=("block_input",)))
    assert applied_technique(model, QuantDroppingConfig).block_input_keep_prob == 0.3
    assert applied_technique(_model(), QuantDroppingConfig) is None
    assert all(layer.input_quantizer.keep_prob is None for _, layer in cim_layers(model))
