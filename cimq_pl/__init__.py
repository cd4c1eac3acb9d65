"""cimq-pl: CIMQ quantization of CNNs for computing-in-memory accelerators, on PyTorch Lightning.

Importing the package registers the CIFAR ResNets in timm's model registry. The public names:

* ``cimq_pl.CIMSpec``, ``cimq_pl.convert_to_cim``, ``cimq_pl.quantize_``: the pure-PyTorch core (never imports
  Lightning);
* ``cimq_pl.CIMQModule``: the LightningModule (imports Lightning when first used).
"""

from cimq_pl import models  # noqa: F401  (registers cifar_resnet* in timm)
from cimq_pl.quant import CIMSpec, convert_to_cim
from cimq_pl.quant.techniques import quantize_

__version__ = "0.1.0"
__all__ = ["CIMQModule", "CIMSpec", "convert_to_cim", "quantize_"]


def __getattr__(name):
    # The Lightning layer is imported lazily so that the pure-PyTorch core never pulls in Lightning.
    if name == "CIMQModule":
        from cimq_pl.module import CIMQModule

        return CIMQModule
    raise AttributeError(f"module 'cimq_pl' has no attribute {name!r}")
