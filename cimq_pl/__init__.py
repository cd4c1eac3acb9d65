"""cimq-pl: CIMQ quantization of CNNs for computing-in-memory accelerators, on PyTorch Lightning.

Importing the package registers the CIFAR ResNets in timm's model registry.
"""

from cimq_pl import models  # noqa: F401  (registers cifar_resnet* in timm)

__version__ = "0.1.0"


def __getattr__(name):
    # The Lightning layer is imported lazily so that the pure-PyTorch core never pulls in Lightning.
    if name == "CIMQModule":
        from cimq_pl.module import CIMQModule

        return CIMQModule
    raise AttributeError(f"module 'cimq_pl' has no attribute {name!r}")
