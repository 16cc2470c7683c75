"""Loss functions: pure functions of tensors and settings returning ``(loss, metrics)``."""
