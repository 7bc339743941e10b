"""Growing a running, sharded job: the transaction and the shard movement it uses."""

from mgrow.growth.transaction import GrowthError, GrowthReport, grow

__all__ = ["GrowthError", "GrowthReport", "grow"]
