"""Which optimizer param group each parameter of a grown model belongs to.

A parameter the old model had (by global name) stays in its group; a new one
(a new layer's) joins the group every parameter of its *role* (its name with
the layer index left out) was in. Where the old groups split a role, no rule
follows from them, and the caller is told so.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Optional

from mgrow.core.errors import ConfigError
from mgrow.core.parameters import layer_index, renumber

# Keys an optimizer or its LR schedule rewrites as training goes on: not part of a group's settings.
VOLATILE_KEYS = ("params", "lr", "weight_decay", "step")


def role(name: str) -> str:
    return name if layer_index(name) is None else renumber(name, "*")


def settings(group: dict) -> dict:
    return {key: value for key, value in group.items() if key not in VOLATILE_KEYS}


def assign(old: dict[str, int], new_names: Iterable[str], strict: bool = True) -> dict[str, Optional[int]]:
    """new name -> old group index. ``strict``: a role the old groups split (or never saw) is refused;
    otherwise such a name maps to None."""
    by_role: dict[str, set[int]] = defaultdict(set)
    for name, index in old.items():
        by_role[role(name)].add(index)
    out: dict[str, Optional[int]] = {}
    for name in new_names:
        if name in old:
            out[name] = old[name]
            continue
        groups = sorted(by_role.get(role(name), ()))
        if len(groups) == 1:
            out[name] = groups[0]
        elif strict:
            where = f"sit in param groups {groups}" if groups else "are in no param group"
            raise ConfigError("optimizer.param_groups",
                              f"the new parameter {name} has no group to join: the parameters of its role "
                              f"{role(name)} {where}; a group must hold every layer's parameter of a role")
        else:
            out[name] = None
    return out
