"""Backend-agnostic parts of lorafit: config, LoRA, data, the loop, checkpoints, events.

Nothing under core/ imports torch, mlx or textual.
"""
