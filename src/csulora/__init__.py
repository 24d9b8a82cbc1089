"""csulora: audit and correct LoRA adapters so fine-tuned LLMs keep their safety alignment."""

__version__ = "0.1.0"
