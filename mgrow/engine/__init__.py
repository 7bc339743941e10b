"""A training engine around a megatron-core GPTModel stage: building the model on the rank's device
(``model``), the three optimizer paths (``engines``: Megatron DDP + AdamW, the DistributedOptimizer, DeepSpeed
ZeRO 1/2/3), DeepSpeed's view of megatron's groups (``ds_mpu``) and frozen parameter groups (``param_groups``)."""
