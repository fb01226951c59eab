"""OmegaConf's merge, override and interpolation rules on plain containers (dicts, lists, scalars).

A config is loaded as plain containers; building an OmegaConf tree for every `base:` merge, override and
``${cache.dir}`` costs tens of milliseconds a config. These functions follow OmegaConf's rules on the containers
themselves; what they do not cover (resolvers, relative keys, escapes, a missing key) is handed to OmegaConf, which
resolves it or raises. Errors are ``TypeError`` / ``ValueError`` for the caller to name.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from omegaconf import OmegaConf

PLAIN_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*)*)\}")  # ${cache.dir}
MISSING_VALUE = "???"  # OmegaConf's mark of a value still to be given: merging it keeps the value there


# ----------------------------------------------------------------------------------------- merging


def merge_plain(dest: dict, src: dict) -> dict:
    """``src`` merged over a copy of ``dest`` by ``OmegaConf.merge``'s rules: mappings merge key by key, anything
    else replaces, ``???`` (missing) keeps what was there, and a list meeting a mapping is an error."""
    return _merge_into(copy.deepcopy(dest), src)


def _merge_into(dest: dict, src: dict) -> dict:
    for key, value in src.items():
        dest[key] = _merged(dest[key], value, key) if key in dest else copy.deepcopy(value)
    return dest


def _merged(old: Any, value: Any, key: str) -> Any:
    """``value`` merged over ``old`` (the value at ``key``), by ``OmegaConf.merge``'s rules."""
    if isinstance(value, str) and value == MISSING_VALUE:
        return old
    if isinstance(value, dict) and isinstance(old, dict):
        return _merge_into(old, value)
    if isinstance(value, (dict, list)) and isinstance(old, (dict, list)) and type(value) is not type(old):
        raise TypeError(f"cannot merge a {type(value).__name__} into the {type(old).__name__} at {key!r}")
    return copy.deepcopy(value)


# ----------------------------------------------------------------------------------------- overrides


def override_value(key: str, override: str) -> Any:
    """The value of the ``key=value`` override, typed as OmegaConf types it (1 → int, [a,b] → list, null → None)."""
    value: Any = OmegaConf.to_container(OmegaConf.from_dotlist([override]))
    for part in key.split("."):
        value = value[part]
    return value


def set_override(node: dict | list, parts: list[str], value: Any) -> None:
    """Set the dotted key ``parts`` under ``node`` to ``value`` by ``OmegaConf.merge``'s rules, stepping into lists
    by index (``callbacks.0.params.steps=2``) as ``OmegaConf.update`` does."""
    part, rest = parts[0], parts[1:]
    if isinstance(node, list):
        if not (part.isdigit() and int(part) < len(node)):
            raise ValueError(f"{part!r} is not an index of the list there (it has {len(node)} item"
                             f"{'' if len(node) == 1 else 's'})")
        index = int(part)
        if rest and isinstance(node[index], (dict, list)):
            set_override(node[index], rest, value)
        else:
            node[index] = _merged(node[index], _nest(rest, value), part)
    elif rest and isinstance(node.get(part), (dict, list)):
        set_override(node[part], rest, value)
    else:
        _merge_into(node, {part: _nest(rest, value)})


def _nest(parts: list[str], value: Any) -> Any:
    """``value`` under the dotted key ``parts`` (``["a", "b"]`` → ``{"a": {"b": value}}``)."""
    for part in reversed(parts):
        value = {part: value}
    return value


# ----------------------------------------------------------------------------------------- interpolations


def has_interpolation(node: Any) -> bool:
    """Whether any key or string value holds an OmegaConf interpolation (``${…}``)."""
    if isinstance(node, dict):
        return any(has_interpolation(k) or has_interpolation(v) for k, v in node.items())
    if isinstance(node, list):
        return any(has_interpolation(v) for v in node)
    return isinstance(node, str) and "${" in node


class _NotPlain(Exception):
    """An interpolation beyond ``${dotted.key}`` to a key that holds a value (OmegaConf resolves it, or says why not)."""


def resolve(container: dict) -> dict:
    """``container`` with its interpolations resolved as OmegaConf resolves them: the common ``${dotted.key}`` form
    here (a config loads in a few ms), any other (resolvers, relative keys, escapes, a missing key) by OmegaConf."""
    try:
        return _resolve_plain(container, container, ())
    except _NotPlain:
        return OmegaConf.to_container(OmegaConf.create(container), resolve=True)


def _resolve_plain(node: Any, root: dict, chain: tuple[str, ...]) -> Any:
    if isinstance(node, dict):
        if any(isinstance(k, str) and "${" in k for k in node):
            raise _NotPlain
        return {k: _resolve_plain(v, root, chain) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_plain(v, root, chain) for v in node]
    if not (isinstance(node, str) and "${" in node):
        return node
    whole = PLAIN_INTERPOLATION.fullmatch(node)
    if whole:
        return _lookup(whole.group(1), root, chain)
    parts = PLAIN_INTERPOLATION.split(node)  # text, key, text, key, …, text
    values = [_lookup(key, root, chain) for key in parts[1::2]]
    if "${" in "".join(parts[0::2]) or "\\" in node or not all(type(v) in (str, int) for v in values):
        raise _NotPlain  # another form, an escape, or a value OmegaConf would format its own way
    return "".join(text + str(value) for text, value in zip(parts[0::2], values + [""]))


def _lookup(key: str, root: dict, chain: tuple[str, ...]) -> Any:
    """The resolved value at the dotted ``key`` of ``root`` (``chain``: the keys being resolved, for cycles)."""
    node: Any = root
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise _NotPlain
        node = node[part]
    if key in chain or isinstance(node, (dict, list)) or node == MISSING_VALUE:
        raise _NotPlain
    return _resolve_plain(node, root, chain + (key,))
