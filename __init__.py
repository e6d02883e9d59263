"""lorafit: LoRA fine-tuning that runs the same on PyTorch and MLX."""

__version__ = "0.1.0"
