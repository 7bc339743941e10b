"""The one error type users see for bad input: it names the field and the rule."""


class ConfigError(ValueError):
    """A plan, config, checkpoint or flag that breaks a rule.

    ``field`` is the dotted name of the offending entry (``model.num_attention_heads``,
    ``ops[2].heads.num_query_groups``, ``--tp``); the message states the rule.
    """

    def __init__(self, field: str, rule: str):
        self.field = field
        self.rule = rule
        super().__init__(f"{field}: {rule}")
