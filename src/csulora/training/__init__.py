"""Fine-tuning on transformers + peft: the alignment (full) and the adapters (LoRA).

API: :func:`csulora.training.data.load_pairs`, :func:`csulora.training.data.tokenize_pairs`,
:class:`csulora.training.trainer.TrainConfig`, :class:`csulora.training.trainer.LoraSettings`,
:func:`csulora.training.trainer.fit`, :func:`csulora.training.trainer.train_full`,
:func:`csulora.training.trainer.train_lora`.
"""
