"""Training objectives: what ``CIMQModule.training_step`` optimises, chosen by the module's ``objective`` argument.

An objective owns one training recipe: its ``training_step(module, batch, batch_idx)`` returns the loss and
its ``configure_optimizers(module)`` the optimizers; it may bring its own train loader. The module holds exactly
one (``model.objective`` in YAML): :class:`TaskObjective` (cross-entropy: plain fine-tuning or QAT, the default),
:class:`DistillationObjective` (QAT that follows the float network's logits; :class:`QuantizerDistillation`, the
same with only the input steps and ADC ranges learning, for low-ADC PTQ checkpoints) or
:class:`BlockReconstruction` (PTQ, with the `PostTrainingQuantization` callback).
"""

from cimq_pl.objectives.base import Objective, quantizer_parameters, sparsity_penalty
from cimq_pl.objectives.distillation import DistillationObjective, QuantizerDistillation
from cimq_pl.objectives.reconstruction import BlockReconstruction, UnitSchedule, UnitSteps
from cimq_pl.objectives.task import TaskObjective

__all__ = ["BlockReconstruction", "DistillationObjective", "Objective", "QuantizerDistillation", "TaskObjective",
           "UnitSchedule", "UnitSteps", "quantizer_parameters", "sparsity_penalty"]
