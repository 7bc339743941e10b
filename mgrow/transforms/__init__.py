"""Transforms of a live job, each all or nothing across ranks (``agreement``): growth (``grow``, with masked
growth in ``masks``), Deep Fusion (``fuse``) and cross-architecture transfer (``transfer``)."""
