"""Defaults shared by every part of mgrow."""

DEFAULT_SEED = 1234  # Megatron-LM's --seed default: model init, data order, plans' free entries
