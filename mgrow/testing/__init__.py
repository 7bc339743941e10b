"""The checking harness: random models, tokens and batches, whole-model gathers (``harness``), and the
invariants every growth must keep (``invariants``), which ``mgrow verify`` and the tests run. Gathering whole
models is for checking only; growth itself never does."""
