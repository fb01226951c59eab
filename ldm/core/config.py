"""YAML configs: load (with `base:` includes and CLI overrides) and build objects from `target` / `params`.

A config node ``{target: "pkg.mod.Class", params: {...}}`` becomes ``Class(**params)``, as in
latent-diffusion's ``instantiate_from_config`` — but recursive (a param that is itself a node is built
first) and strict: an unknown key, a target that does not import or lies outside the allowed packages,
a parameter the constructor does not take, or a value of the wrong type raises ``ConfigError`` naming
the config path, e.g. ``model.params.unet.params.channel_mult``.
"""

from __future__ import annotations

import collections.abc
import copy
import difflib
import functools
import importlib
import inspect
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterable

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.core.aliases import resolve_alias
from ldm.core.atomic import write_text_atomic
from ldm.core.config_merge import has_interpolation, merge_plain, override_value, resolve, set_override
from ldm.core.errors import UserError
from ldm.core.migrate import upgrade_config
from ldm.core.paths import config_path

# Targets may only come from these packages unless a user widens the list knowingly
# (`LDM_ALLOW_TARGETS=mypkg.,other.` or `allow_targets("mypkg.")`): a config file is data, not code.
DEFAULT_TARGET_PREFIXES = ("ldm.", "torch.", "lightning.")
ALLOW_TARGETS_ENV = "LDM_ALLOW_TARGETS"
PARSED_CACHE_SIZE = 256  # distinct YAML texts kept parsed (a config file is a few kB)
_extra_prefixes: set[str] = set()
# Inside the allowed packages, what would load or run code named by the config (unpickling, hub code,
# compiled extensions, native libraries, Lightning's own class_path instantiation) is refused even so,
# as are private names (`torch._C`, `ldm.x._helper`). Widening the allowed prefixes does not lift this.
DENIED_TARGET_PREFIXES = (
    "torch.hub.", "torch.load", "torch.serialization.", "torch.jit.load", "torch.utils.cpp_extension.",
    "torch.ops.", "torch.classes.", "torch.package.", "torch.utils.model_zoo.", "torch.export.load",
    "torch.distributed.", "torch.multiprocessing.", "torch.library.",
    "lightning.pytorch.cli.", "lightning.fabric.utilities.cloud_io.", "lightning.fabric.utilities.load.",
    "lightning.pytorch.core.saving.",
    "ldm.io.safe_pickle.", "ldm.io.checkpoints.", "ldm.core.config.", "ldm.training.driver.", "ldm.io.runs.",
)

# Every top-level section a config may have; anything else is a typo.
TOP_LEVEL_KEYS = frozenset(
    {"name", "seed", "model", "data", "trainer", "checkpoint", "callbacks", "logger", "cache", "guard", "reflow",
     "threads", "folder_epochs", "lineage"}
)
NODE_KEYS = frozenset({"target", "params"})


class ConfigError(UserError, ValueError):
    """A config that cannot be loaded or built; the message names the config path."""


def allow_targets(*prefixes: str) -> None:
    """Let configs name targets under these module prefixes too (e.g. ``"mypkg."``)."""
    _extra_prefixes.update(prefixes)


def allowed_prefixes() -> tuple[str, ...]:
    """The module prefixes a config target may start with."""
    env = [p.strip() for p in os.environ.get(ALLOW_TARGETS_ENV, "").split(",") if p.strip()]
    return DEFAULT_TARGET_PREFIXES + tuple(sorted(_extra_prefixes)) + tuple(env)


# ----------------------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> dict:
    """Load a YAML file (following `base:` includes), apply ``key=value`` overrides, resolve, → dict."""
    container = apply_overrides(_load_with_bases(config_path(path), seen=()), overrides, str(path))
    container = upgrade_config(container, str(path))  # a config written before the layered package
    unknown = sorted(set(container) - TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(
            f"{path}: unknown top-level key {unknown[0]!r}{_suggest(unknown[0], TOP_LEVEL_KEYS)}; "
            f"allowed: {', '.join(sorted(TOP_LEVEL_KEYS))}"
        )
    return container


def apply_overrides(container: dict, overrides: Iterable[str], where: str) -> dict:
    """``container`` with ``key=value`` overrides merged in and interpolations resolved (``where`` names it in errors)."""
    overrides = list(overrides)
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value (e.g. trainer.max_steps=500)")
    try:
        if overrides:
            container = copy.deepcopy(container)
        for override in overrides:
            key = override.split("=", 1)[0]
            set_override(container, key.split("."), override_value(key, override))
        return resolve(container) if has_interpolation(container) else container
    except (OmegaConfBaseException, TypeError, ValueError) as e:  # e.g. `callbacks.5.x=1` on a list of one
        raise ConfigError(f"{where}: cannot apply overrides {' '.join(overrides)}: {e}") from e


@functools.lru_cache(maxsize=PARSED_CACHE_SIZE)
def _parse_yaml(text: str) -> Any:
    """YAML text → plain containers, by OmegaConf's own YAML rules; kept per text (a run's config is read often)."""
    return OmegaConf.to_container(OmegaConf.create(text), resolve=False)


def _load_with_bases(path: Path, seen: tuple[Path, ...]) -> dict:
    """One YAML file with its `base:` includes merged under it, unresolved, as plain containers."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: circular `base:` include")
    try:
        cfg = copy.deepcopy(_parse_yaml(path.read_text(encoding="utf-8")))
    except (OmegaConfBaseException, ValueError) as e:  # yaml.YAMLError derives from Exception only
        raise ConfigError(f"{path}: cannot parse YAML: {e}") from e
    except Exception as e:  # noqa: BLE001 - yaml's scanner errors
        raise ConfigError(f"{path}: cannot parse YAML: {e}") from e
    if not isinstance(cfg, collections.abc.Mapping):
        raise ConfigError(f"{path}: a config must be a mapping at the top level")
    bases = cfg.pop("base", None) or []
    if not bases:
        return cfg
    bases = [bases] if isinstance(bases, str) else list(bases)
    merged: dict = {}
    for base in bases:
        merged = merge_plain(merged, _load_with_bases(path.parent / base, seen + (path.resolve(),)))
    return merge_plain(merged, cfg)


def save_config(cfg: dict, path: str | os.PathLike) -> None:
    """Write a resolved config as YAML (the run directory's `config.yaml`), atomically."""
    write_text_atomic(path, OmegaConf.to_yaml(OmegaConf.create(cfg)))


def config_section(cfg: dict, name: str, defaults: dict, required: tuple[str, ...] = (), what: str = "") -> dict:
    """The top-level section ``name`` of ``cfg`` with ``defaults`` filled in, checked for typos and missing keys.

    A missing section is an empty one when nothing is required; otherwise its error says what it holds (``what``).
    """
    section = cfg.get(name)
    if section is None and not required:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"config has no `{name}:` section ({', '.join(required)}){' ' + what if what else ''}")
    allowed = tuple(required) + tuple(defaults)
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}: unknown key{_suggest(unknown[0], allowed)}; allowed: {', '.join(allowed)}")
    missing = [k for k in required if section.get(k) in (None, "")]
    if missing:
        raise ConfigError(f"{name}.{missing[0]}: required")
    return {**defaults, **section}


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ----------------------------------------------------------------------------------------- building


def is_node(value: Any) -> bool:
    """True for a mapping with a `target` key: something `instantiate_from_config` builds."""
    return isinstance(value, collections.abc.Mapping) and "target" in value


def get_obj_from_str(target: str, path: str = "") -> Any:
    """Import ``pkg.mod.Name`` after checking it lies under an allowed package."""
    where = f"{path}.target" if path else "target"
    if not isinstance(target, str) or "." not in target:
        raise ConfigError(f"{where}: {target!r} is not a dotted import path like 'ldm.nets.unet.model.UNetModel'")
    target = resolve_alias(target)  # a config written before a class moved names its old path
    prefixes = allowed_prefixes()
    if not target.startswith(prefixes):
        raise ConfigError(
            f"{where}: target {target!r} is outside the allowed packages {', '.join(prefixes)}; "
            f"to allow it, set {ALLOW_TARGETS_ENV}={target.split('.')[0]}."
        )
    if target.startswith(DENIED_TARGET_PREFIXES) or any(part.startswith("_") for part in target.split(".")):
        raise ConfigError(f"{where}: target {target!r} is refused: a config may build objects, not load or run "
                          f"code, and not name private objects")
    module_name, _, attr = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{where}: cannot import {target!r}: {e}") from e
    if not hasattr(module, attr):
        names = [n for n in dir(module) if not n.startswith("_")]
        raise ConfigError(f"{where}: module {module_name!r} has no {attr!r}{_suggest(attr, names)}")
    return getattr(module, attr)


def instantiate_from_config(config: Any, path: str = "", **extra: Any) -> Any:
    """Build ``target(**params, **extra)``; nested nodes in params are built first, strictly checked."""
    target, params = _split_node(config, path)
    obj = get_obj_from_str(target, path)
    built = {k: _build_value(v, f"{_params_path(path)}.{k}") for k, v in params.items()}
    built.update(extra)
    _check_call(obj, built, _params_path(path))
    try:
        return obj(**built)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path or 'config'} ({target}): {e}") from e


def check_config(config: Any, path: str = "", extra: Iterable[str] = ()) -> None:
    """Validate a node without building it: imports, parameter names and simple types, recursively."""
    target, params = _split_node(config, path)
    obj = get_obj_from_str(target, path)
    for k, v in params.items():
        _check_value(v, f"{_params_path(path)}.{k}")
    values = {k: (_Placeholder if _contains_node(v) else v) for k, v in params.items()}
    values.update({name: _Placeholder for name in extra})
    _check_call(obj, values, _params_path(path))


def _split_node(config: Any, path: str) -> tuple[str, dict]:
    where = path or "config"
    if not isinstance(config, collections.abc.Mapping):
        raise ConfigError(f"{where}: expected a mapping with `target` (and `params`), got {type(config).__name__}")
    if "target" not in config:
        raise ConfigError(f"{where}: missing `target` (the import path of the class or function to build)")
    unknown = sorted(set(config) - NODE_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}.{unknown[0]}: unknown key{_suggest(unknown[0], NODE_KEYS)}; a node has only `target` and `params`"
        )
    params = config.get("params") or {}
    if not isinstance(params, collections.abc.Mapping):
        raise ConfigError(f"{_params_path(path)}: must be a mapping, got {type(params).__name__}")
    return config["target"], dict(params)


def _params_path(path: str) -> str:
    return f"{path}.params" if path else "params"


def _build_value(value: Any, path: str) -> Any:
    if is_node(value):
        return instantiate_from_config(value, path)
    if isinstance(value, list) and any(is_node(v) for v in value):
        return [_build_value(v, f"{path}.{i}") for i, v in enumerate(value)]
    return value


def _check_value(value: Any, path: str) -> None:
    if is_node(value):
        check_config(value, path)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_value(v, f"{path}.{i}")


def _contains_node(value: Any) -> bool:
    return is_node(value) or (isinstance(value, list) and any(is_node(v) for v in value))


class _Placeholder:
    """Stands in for a nested object during checks; matches any annotation."""


# -------------------------------------------------------------------------------- signature checks


def check_arguments(obj: Any, kwargs: dict, where: str) -> None:
    """Check keyword arguments against ``obj``'s signature and type hints; errors name ``where.<key>``."""
    _check_call(obj, kwargs, where)


def _check_call(obj: Any, params: dict, where: str) -> None:
    sig = _signature(obj)
    if sig is None:
        return  # builtins without a signature: let the call itself complain
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    named = {
        n: p
        for n, p in sig.parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    if not accepts_any:
        for key in params:
            if key not in named:
                raise ConfigError(
                    f"{where}.{key}: unknown parameter of {_qualname(obj)}{_suggest(key, named)}; "
                    f"it takes {', '.join(named) or 'no parameters'}"
                )
    missing = [n for n, p in named.items() if p.default is inspect.Parameter.empty and n not in params]
    if missing:
        raise ConfigError(f"{where}.{missing[0]}: required parameter of {_qualname(obj)} is missing")
    hints = _type_hints(obj)
    for key, value in params.items():
        if key in hints and value is not _Placeholder and not _type_ok(value, hints[key]):
            raise ConfigError(
                f"{where}.{key}: expected {_type_name(hints[key])}, got {type(value).__name__} {value!r}"
            )


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


@functools.lru_cache(maxsize=None)
def _signature(obj: Any) -> inspect.Signature | None:
    """``inspect.signature(obj)`` (None for builtins without one), once per target."""
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):
        return None


@functools.lru_cache(maxsize=None)
def _type_hints(obj: Any) -> dict:
    """The evaluated annotations of a target's parameters, once per target."""
    func = obj.__init__ if inspect.isclass(obj) else obj
    try:
        return typing.get_type_hints(func)
    except Exception:  # noqa: BLE001 - unresolvable forward refs: skip type checks
        return {}


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _type_ok(value: Any, annotation: Any) -> bool:
    """Lenient isinstance for the annotations configs use; unknown annotations accept anything."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (str, bool):
        return isinstance(value, annotation)
    if origin in (list, tuple, collections.abc.Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        inner = [a for a in args if a is not Ellipsis]
        return len(inner) != 1 or all(_type_ok(v, inner[0]) for v in value)
    if origin in (dict, collections.abc.Mapping) or annotation is dict:
        return isinstance(value, collections.abc.Mapping)
    return True
