"""Reading the files a user hands mgrow (configs, plans, model YAMLs, DeepSpeed JSONs): one error line each.

A path that is missing or a directory, text that is not valid YAML/JSON, nesting deeper than any config needs,
and YAML aliases (``&anchor`` / ``*alias``, which let a few lines expand to gigabytes) are refused as a
:class:`~mgrow.core.errors.ConfigError` naming the flag or key that gave the path.
"""

from __future__ import annotations

import json
import os
from typing import Any

from mgrow.core.errors import ConfigError

MAX_DEPTH = 64  # mappings and lists inside each other; mgrow's deepest config is 5 levels


def check_file(path: str, field: str, what: str = "file") -> None:
    if not os.path.exists(path):
        raise ConfigError(field, f"{what} {path} does not exist")
    if os.path.isdir(path):
        raise ConfigError(field, f"{what} {path} is a directory, not a file")


def read_yaml(path: str, field: str, what: str = "file") -> Any:
    """The YAML document at ``path``."""
    check_file(path, field, what)
    with open(path) as f:
        return parse_yaml(f.read(), field, f"{what} {path}")


def parse_yaml(text: str, field: str, where: str = "the value") -> Any:
    import yaml

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                raise ConfigError(field, f"{where}: YAML aliases (*alias of an &anchor) are not allowed")
            if self.depth_ > MAX_DEPTH:
                raise ConfigError(field, f"{where}: nested deeper than {MAX_DEPTH} levels")
            self.depth_ += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth_ -= 1

    loader = NoAliases(text)
    loader.depth_ = 0
    try:
        return loader.get_single_data()
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(field, f"{where} is not valid YAML: {problem}{at}") from None
    except RecursionError:
        raise ConfigError(field, f"{where}: nested too deep") from None
    finally:
        loader.dispose()


def read_json(path: str, field: str, what: str = "file") -> Any:
    check_file(path, field, what)
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise ConfigError(field, f"{what} {path} is not valid JSON: {error}") from None
        except RecursionError:
            raise ConfigError(field, f"{what} {path}: nested too deep") from None
