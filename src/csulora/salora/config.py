"""Options of SaLoRA training (Li et al., ICLR 2025), validated before any tensor is read.

Defaults are the published recipe (docs/design.md §6): rank 16 with alpha = rank (scaling 1),
safety rank 32, task rank 32, 128 samples for each feature pass, q_proj and v_proj,
learning rate 1e-4 and no weight decay.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from csulora.errors import OptionError


@dataclass(frozen=True)
class SaLoRAConfig:
    """Every knob of one SaLoRA run; each field carries its help text in ``metadata``."""

    rank: int = field(default=16, metadata={"help": "LoRA rank r of the trainable B (m x r), A (r x n); alpha = r"})
    safety_rank: int = field(
        default=32, metadata={"help": "r_s: safety feature directions V_s projected out of the update (C = I - V_s V_s^T)"}
    )
    task_rank: int = field(default=32, metadata={"help": "r_t: task feature directions V_t used by the initialisation"})
    num_samples: int = field(
        default=128, metadata={"help": "samples of safety data and of task data read by each feature pass"}
    )
    targets: tuple[str, ...] = field(
        default=("q_proj", "v_proj"), metadata={"help": "module names (or name suffixes) that get SaLoRA layers"}
    )
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    steps: int = field(default=100, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "training batch size"})
    seed: int = field(default=0, metadata={"help": "seed for sampling, the randomized SVD and training"})
    max_length: int = field(default=256, metadata={"help": "token limit of one prompt + response"})
    max_new_tokens: int = field(
        default=64, metadata={"help": "length of the aligned model's greedy refusals to the safety prompts"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (the recipe uses none)"})

    def __post_init__(self) -> None:
        # Lists from JSON or argparse become a tuple so the frozen config stays hashable.
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        else:
            object.__setattr__(self, "targets", tuple(self.targets))
        for name in ("rank", "safety_rank", "task_rank", "num_samples", "steps", "batch_size", "max_length",
                     "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"SaLoRA option {name}={value!r}: must be a positive integer")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise OptionError(f"SaLoRA option seed={self.seed!r}: must be a non-negative integer")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise OptionError(f"SaLoRA option lr={self.lr!r}: must be in (0, 1)")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise OptionError(f"SaLoRA option weight_decay={self.weight_decay!r}: must be >= 0")
        if not self.targets or not all(isinstance(t, str) and t.strip() for t in self.targets):
            raise OptionError(f"SaLoRA option targets={self.targets!r}: give at least one module name")
        if len(set(self.targets)) != len(self.targets):
            raise OptionError(f"SaLoRA option targets={self.targets!r}: names repeat")
        # The ranks against the layer shapes and the response-token counts are checked by
        # train_salora once the checkpoint header and the data are read (still before training).

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready options (targets as a list), written beside the adapter."""
        data = dataclasses.asdict(self)
        data["targets"] = list(self.targets)
        return data
