"""Training with driftlens: the visual tap, the anchor drift loss, the grounding contrast, the objective.

- :mod:`~driftlens.train.tap` -- :class:`VisualTap`: visual- and text-token states read by hooks
  during the training forward itself, with autograd.
- :mod:`~driftlens.train.anchor` -- :class:`AnchorDriftLoss`: MMD^2 to anchor visual tokens of the
  reference checkpoint (fixed or tracking the text frame), built from an activation store.
- :mod:`~driftlens.train.grounding` -- :class:`GroundingContrast`: a margin on how much the image
  helps the answer.
- :mod:`~driftlens.train.objective` -- :class:`DriftObjective`: the LM loss plus both terms, and a
  plain-loop step.
- :mod:`~driftlens.train.hf` -- the Hugging Face ``Trainer`` and a drift-logging callback.

The package only re-exports; importing it loads no model and no transformers.
"""
from driftlens.train.anchor import AnchorDriftLoss
from driftlens.train.grounding import GroundingContrast
from driftlens.train.objective import DriftObjective, train_steps
from driftlens.train.tap import VisualTap

__all__ = ["AnchorDriftLoss", "DriftObjective", "GroundingContrast", "VisualTap", "train_steps"]
