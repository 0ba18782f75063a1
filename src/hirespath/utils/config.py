"""Generic helpers for checking composed configs; the rules themselves live in :mod:`hirespath.configs` (which
calls the checkers of the domain that owns each rule: ``models/``, the tiling, the data readers).

:class:`Problems` collects every bad key of a config as ``key=value: what is valid`` and raises one
:class:`ConfigValidationError` listing them all; :func:`unknown_keys` finds keys Hydra's ``+key=value`` added to a
closed (structured) node; :func:`one_of` words a choice with a did-you-mean hint.
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
from collections.abc import Callable, Iterable
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from .errors import InputError


class ConfigValidationError(InputError):
    """A config with bad keys or values; the message lists every invalid key with its value and the valid range."""


def select(cfg: DictConfig, key: str) -> Any:
    """The value at dotted ``key`` (None when absent), containers resolved to plain dicts/lists."""
    value = OmegaConf.select(cfg, key, default=None)
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def has_key(cfg: DictConfig, key: str) -> bool:
    """Whether dotted ``key`` is present (with any value, None included)."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node


def is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_folder_name(v: Any) -> bool:
    """A name one folder can take (a tag in an output path): not blank, no separator, not ``.`` or ``..``."""
    return bool(str(v).strip()) and not any(c in str(v) for c in "/\\") and str(v) not in (".", "..")


def is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def one_of(value: Any, valid: Iterable[str]) -> str:
    """``one of [...]`` plus ``(did you mean 'x'?)`` when a valid choice is close to ``value``."""
    valid = list(valid)
    hint = difflib.get_close_matches(str(value), valid, n=1)
    return f"one of {valid}" + (f" (did you mean {hint[0]!r}?)" if hint else "")


class Problems:
    """Every problem of one config, raised together by :meth:`raise_if_any`."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def bad(self, key: str, value: Any, valid: str) -> None:
        """``key=value: must be <valid>``."""
        self.items.append(f"{key}={value!r}: must be {valid}")

    def add(self, message: str) -> None:
        self.items.append(message)

    def check(self, key: str, value: Any, checker: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        """Run a domain's checker; its ValueError becomes ``key=value: <its message>`` (a TypeError, a value of the
        wrong type such as a string for a number, too). True when it passed."""
        try:
            checker(*args, **kwargs)
        except (ValueError, TypeError) as err:
            self.items.append(f"{key}={value!r}: {err}")
            return False
        return True

    def raise_if_any(self, what: str = "invalid configuration") -> None:
        if self.items:
            items = list(dict.fromkeys(self.items))  # a key named by two checks is listed once
            raise ConfigValidationError(f"{what}:\n  " + "\n  ".join(items))


def group_options(group: str, hidden: Iterable[str] = ()) -> list[str] | None:
    """Config files of a group on the search path of the active Hydra (None outside Hydra), without ``hidden``
    (the schemas stored in the group, which are no choice of their own)."""
    from hydra.core.global_hydra import GlobalHydra

    gh = GlobalHydra.instance()
    if not gh.is_initialized():
        return None
    hidden = set(hidden)
    try:
        return sorted(o for o in gh.config_loader().get_group_options(group) if o not in hidden)
    except Exception:
        return None


def unknown_keys(cfg: DictConfig, prefix: str = "") -> list[tuple[str, str, list[str]]]:
    """(key, schema name, valid keys) of every key that a structured (dataclass-typed) node's schema lacks.

    Hydra refuses a misspelt ``group.key=value`` at composition, but ``+group.key=value`` force-adds it even to a
    closed structured config; this finds such keys (the ``hydra`` node is Hydra's own and skipped)."""
    out = []
    schema = OmegaConf.get_type(cfg)
    fields = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
    for key in cfg.keys():
        key = str(key)
        if not prefix and key == "hydra":
            continue
        if fields is not None and key not in fields:
            out.append((f"{prefix}{key}", schema.__name__, fields))
            continue
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not (node._is_none() or node._is_missing() or node._is_interpolation()):
            out += unknown_keys(node, f"{prefix}{key}.")
    return out
