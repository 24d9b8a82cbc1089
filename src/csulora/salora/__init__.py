"""SaLoRA (Li et al., ICLR 2025): safety-preserving LoRA training on stock PEFT.

A fixed safety module ``C = I - V_s V_s^T`` keeps the trainable update out of the output
directions the aligned model uses when it refuses; a task-specific init starts training
in the task's feature subspace. The trained adapter is exported as a plain PEFT LoRA of
rank 2r relative to the original weights (docs/design.md §6).
"""

from csulora.salora.api import train_salora
from csulora.salora.config import SaLoRAConfig

__all__ = ["SaLoRAConfig", "train_salora"]
