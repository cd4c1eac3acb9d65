"""Random quantization dropping (QDrop, Wei et al. ICLR 2022; SPEC 4.4).

While PTQ reconstructs a block (or QAT trains), every quantized element keeps its quantized value with
probability ``keep_prob`` and its full-precision value otherwise, drawn per element per step. Targets: the
block input (read by the reconstruction objective), the input activations of every CIM layer, and
**[choice]** the partial sums. Dropping is off in evaluation mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import nn

from cimq_pl.errors import ConfigError
from cimq_pl.quant.techniques.base import reconfigure_, register_technique

__all__ = ["DROP_TARGETS", "QuantDroppingConfig"]

DROP_TARGETS = ("block_input", "activations", "psums")


@register_technique("quant_dropping")
@dataclass(frozen=True)
class QuantDroppingConfig:
    """Keep probability and where dropping applies.

    Attributes:
        keep_prob: probability p that an element keeps its quantized value (QDrop default 0.5).
        targets: any of ``"block_input"``, ``"activations"``, ``"psums"``.
        int8_layers: also drop inside the 8-bit edge layers' quantizers (``CIMSpec.first_layer`` /
            ``last_layer`` ``"int8"``). Off by default: off is what every PTQ number before the option measured,
            and with the CPU preset no fit gained from it (README, "QDrop inside the 8-bit edge layers").

    Raises:
        ConfigError: keep_prob outside (0, 1] or an unknown target.
    """

    keep_prob: float = 0.5
    targets: Sequence[str] = DROP_TARGETS
    int8_layers: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.keep_prob <= 1:
            raise ConfigError(f"keep_prob={self.keep_prob!r} is invalid: expected a probability in (0, 1]")
        unknown = [t for t in self.targets if t not in DROP_TARGETS]
        if unknown or not self.targets:
            raise ConfigError(f"targets={list(self.targets)!r} is invalid: expected a non-empty subset of {list(DROP_TARGETS)}")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def block_input_keep_prob(self) -> float | None:
        """Keep probability of the reconstruction block input, None when not a target."""
        return self.keep_prob if "block_input" in self.targets else None

    def apply_(self, model: nn.Module) -> None:
        """Set the keep probability of the targeted quantizers of every CIM layer on the arrays (and of the ``int8``
        edge layers with ``int8_layers``; ``block_input``: read from the model by the reconstruction objective,
        see `applied_technique`)."""
        reconfigure_(
            model,
            mappings=("cim", "int8") if self.int8_layers else ("cim",),
            input_keep_prob=self.keep_prob if "activations" in self.targets else None,
            psum_keep_prob=self.keep_prob if "psums" in self.targets else None,
        )
