"""Where a rank runs: its TP x PP x DP coordinates, groups, device and backend (``dims``), the device
decision (``device``, importable without torch), mgrow's collectives, and the shims that let megatron-core
run on CPU ranks (``cpu_shims``) and on ranks sharing a GPU over gloo (``gloo_cuda``)."""
