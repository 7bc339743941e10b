"""Cross-architecture transfer (XATL): start a model from the shared components of a trained GPT.

``rules`` (the math on full tensors), ``shards`` (filling TP/PP shards from a
checkpoint), ``apply`` (what the training loop calls on a fresh run, before the
optimizer exists), ``freeze`` (the unfreeze rule; the frozen param groups are
:mod:`mgrow.engine.param_groups`), ``config`` (the ``transfer:`` section, read
before torch is loaded).
"""

