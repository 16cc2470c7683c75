"""Constants shared by every layer (this module imports nothing from vlmalign)."""

# Label of a token that is not supervised: the ``ignore_index`` of PyTorch's cross entropy.
IGNORE_INDEX = -100
