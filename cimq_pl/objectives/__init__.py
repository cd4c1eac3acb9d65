"""Training objectives: what ``CIMQModule.training_step`` optimises, installed by the PTQ/QAT callbacks.

An objective owns one training recipe: its ``training_step(module, batch, batch_idx)`` returns the loss and
its ``configure_optimizers(module)`` the optimizers. The module holds exactly one (``module.objective``);
the default is :class:`TaskObjective` (cross-entropy, i.e. plain fine-tuning or QAT).
"""

from cimq_pl.objectives.base import Objective, quantizer_parameters, sparsity_penalty
from cimq_pl.objectives.reconstruction import BlockReconstructionObjective
from cimq_pl.objectives.task import TaskObjective

__all__ = ["BlockReconstructionObjective", "Objective", "TaskObjective", "quantizer_parameters", "sparsity_penalty"]
