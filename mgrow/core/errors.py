"""The errors users see: a bad input names its field and the rule; a failed growth names the rank and the cause."""


class ConfigError(ValueError):
    """A plan, config, checkpoint or flag that breaks a rule.

    ``field`` is the dotted name of the offending entry (``model.num_attention_heads``,
    ``ops[2].heads.num_query_groups``, ``--tp``); the message states the rule.
    """

    def __init__(self, field: str, rule: str):
        self.field = field
        self.rule = rule
        super().__init__(f"{field}: {rule}")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used; ``field`` is the file (or the config field) at fault."""


class GrowthError(RuntimeError):
    """A growth (or fusion) failed on some rank; raised on every rank, each of which kept its old model and
    optimizer."""


class GrowthRefused(ConfigError, GrowthError):
    """A growth refused before anything changed, for the same reason on every rank: a ConfigError (``field``,
    ``rule``) that is also a GrowthError, so ``except GrowthError`` catches every failed growth."""


class TrainingStopped(RuntimeError):
    """Training stopped at a step whose loss or weights are not finite, before anything of it was saved."""
