"""Checkpoints: storage (``files``: step folders, ``latest``, the manifest; no torch), the framework formats
(``megatron_format``, ``deepspeed_format``) and the whole training state (``state``: save, load, progress)."""
