"""kdlora: KD-LoRA, LoRA fine-tuning of a small student with knowledge distillation from a fine-tuned teacher."""

__version__ = "0.1.0"
