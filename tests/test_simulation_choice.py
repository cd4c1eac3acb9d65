"""``model.simulation``: eager, compiled, or auto (compiled for fits long enough to repay the compilation)."""

from types import SimpleNamespace

import pytest
import torch

from cimq_pl import module as module_lib
from cimq_pl.errors import ConfigError
from cimq_pl.module import AUTO_COMPILE_MIN_STEPS, CIMQModule
from cimq_pl.quant import CIMSpec, cim_layers


def _paths(module) -> set:
    return {layer.simulation for _, layer in cim_layers(module.model)}


@pytest.mark.parametrize("steps, expected", [(AUTO_COMPILE_MIN_STEPS - 1, "eager"), (AUTO_COMPILE_MIN_STEPS, "compiled")])
def test_auto_compiles_long_fits_only(monkeypatch, steps, expected):
    monkeypatch.setattr(module_lib, "compiled_simulation_available", lambda: True)
    module = CIMQModule("cifar_resnet20", 10, None, cim=CIMSpec(rows=64, cols=64), simulation="auto")
    assert _paths(module) == {"eager"}
    module._trainer = SimpleNamespace(estimated_stepping_batches=steps)
    module.on_train_start()
    assert _paths(module) == {expected}
    module.on_train_end()  # evaluation after the fit runs eagerly, as a separate `test` run would
    assert _paths(module) == {"eager"}


@pytest.mark.parametrize("compiler, device", [(False, "cpu"), (True, "cuda")])
def test_auto_stays_eager_without_a_compiler_and_on_cuda(monkeypatch, compiler, device):
    monkeypatch.setattr(module_lib, "compiled_simulation_available", lambda: compiler)
    module = CIMQModule("cifar_resnet20", 10, None, cim=CIMSpec(rows=64, cols=64), simulation="auto")
    module._trainer = SimpleNamespace(estimated_stepping_batches=10 * AUTO_COMPILE_MIN_STEPS)
    monkeypatch.setattr(CIMQModule, "device", property(lambda self: torch.device(device)))
    module.on_train_start()
    assert _paths(module) == {"eager"}


def test_explicit_paths_and_a_bad_value():
    assert _paths(CIMQModule("cifar_resnet20", 10, None, cim=CIMSpec(), simulation="compiled")) == {"compiled"}
    with pytest.raises(ConfigError, match=r"model.simulation='jit' is invalid: expected one of \['eager', 'compiled', 'auto'\]"):
        CIMQModule("cifar_resnet20", 10, None, cim=CIMSpec(), simulation="jit")


@pytest.mark.parametrize("targets", [("block_input", "activations"), ("block_input", "activations", "psums")])
def test_auto_compiles_layers_that_drop_partial_sums(monkeypatch, caplog, targets):
    """QDrop on the ADC runs in the compiled kernels (session 34; before, those layers ran eagerly, with a note)."""
    import logging

    from cimq_pl.quant.techniques import QuantDroppingConfig, quantize_

    monkeypatch.setattr(module_lib, "compiled_simulation_available", lambda: True)
    module = CIMQModule("cifar_resnet20", 10, None, cim=CIMSpec(rows=64, cols=64), simulation="auto")
    quantize_(module.model, QuantDroppingConfig(keep_prob=0.5, targets=targets))
    module._trainer = SimpleNamespace(estimated_stepping_batches=AUTO_COMPILE_MIN_STEPS)
    with caplog.at_level(logging.INFO):
        module.on_train_start()
    message = " ".join(record.getMessage() for record in caplog.records if "model.simulation=auto" in record.getMessage())
    assert "CIM layers compiled" in message and "eagerly" not in message
    assert _paths(module) == {"compiled"}
    dropping = [layer.psum_quantizer.dropping for _, layer in cim_layers(module.model) if layer.psum_quantizer is not None]
    assert dropping and all(dropping) == ("psums" in targets)
