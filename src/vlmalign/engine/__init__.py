"""The training engine shared by every method (accelerate underneath)."""
