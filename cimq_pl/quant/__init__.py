"""CIM simulation core of cimq-pl: pure PyTorch, never imports Lightning.

Public API: `CIMSpec` (the macro), `TileGeometry` (array mapping), `QuantizerOptions`, the quantizers, the
CIM layers, the model verbs `convert_to_cim`, `fold_batchnorm_` and `calibrate_`, and the walks `cim_layers` and
`iter_quantizers`. Real devices: `DeviceSpec` (cells and ADCs of a chip) and its verbs `attach_device_`,
`set_device_mode_`, `device_mode`, `attached_device` (`device_model.py`); a chip's digital per-channel
correction after programming: `fit_chip_calibration`, `channel_affine` (`chip_calibration.py`).
"""

from cimq_pl.quant.activation import ActivationQuantizer
from cimq_pl.quant.calibrate import calibrate_, set_collect_stats, set_quantizers_enabled
from cimq_pl.quant.chip_calibration import (ChannelAffine, ChannelStatistics, channel_affine, fit_chip_calibration,
                                            output_statistics)
from cimq_pl.quant.convert import ConversionReport, ConvertedLayer, convert_to_cim
from cimq_pl.quant.device import DeviceSpec
from cimq_pl.quant.device_model import DeviceModel, attach_device_, attached_device, device_mode, set_device_mode_
from cimq_pl.quant.fold import fold_batchnorm_
from cimq_pl.quant.layers import CIMConv2d, CIMLinear, cim_layers, iter_quantizers
from cimq_pl.quant.observers import MinMaxObserver, MSEObserver, PercentileObserver, RangeObserver
from cimq_pl.quant.options import CONVENTIONAL_OPTIONS, QuantizerOptions
from cimq_pl.quant.psum import PsumQuantizer
from cimq_pl.quant.registry import CIM_LAYER_TYPES, list_cim_layers, register_cim_layer
from cimq_pl.quant.spec import CIMSpec
from cimq_pl.quant.stats import COUNTER_NAMES, CIMStats
from cimq_pl.quant.tiling import RowBlockPart, TileGeometry
from cimq_pl.quant.uniform import QuantizerBase, UniformQuantizer
from cimq_pl.quant.weight import WeightQuantizer

__all__ = [
    "ActivationQuantizer",
    "CIMConv2d",
    "CIMLinear",
    "CIMSpec",
    "CIMStats",
    "CIM_LAYER_TYPES",
    "ChannelAffine",
    "ChannelStatistics",
    "CONVENTIONAL_OPTIONS",
    "COUNTER_NAMES",
    "ConversionReport",
    "ConvertedLayer",
    "DeviceModel",
    "DeviceSpec",
    "MSEObserver",
    "MinMaxObserver",
    "PercentileObserver",
    "PsumQuantizer",
    "QuantizerBase",
    "QuantizerOptions",
    "RangeObserver",
    "RowBlockPart",
    "TileGeometry",
    "UniformQuantizer",
    "WeightQuantizer",
    "attach_device_",
    "attached_device",
    "calibrate_",
    "channel_affine",
    "cim_layers",
    "convert_to_cim",
    "device_mode",
    "fit_chip_calibration",
    "fold_batchnorm_",
    "iter_quantizers",
    "list_cim_layers",
    "output_statistics",
    "register_cim_layer",
    "set_collect_stats",
    "set_device_mode_",
    "set_quantizers_enabled",
]
