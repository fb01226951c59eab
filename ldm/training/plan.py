"""A stage is a plan, then a run: ``plan_stage`` resolves everything a training stage needs into one immutable
``StagePlan`` that prints itself (``--dry-run``); ``ldm.training.driver`` runs from it.

The plan holds the resolved config (as the run directory's ``config.yaml`` will read), the runs and files the stage
depends on, what it derives (n_classes, the cache, its scale factor, the data's size), what runs before the model is
built (the latent cache, a ControlNet's hint checks, reflow's pairs), each object it builds (target and resolved
params), what it writes, and a ``lineage`` record of what the run depends on. Nothing edits the config after it.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

from ldm.core.config import ConfigError, load_config
from ldm.io.lineage import Input, identify_all, pin_paths
from ldm.io.runs import CHECKPOINT_DIR, CONFIG_FILE, LAST_CHECKPOINT, SAMPLES_DIR, checkpoint_for, resolve_run, runs_root
from ldm.training.epochs import STEPS_OVERRIDE, size_by_epochs
from ldm.training.presets import apply_folder, take_folder_overrides
from ldm.training.run_inputs import check_stage_of, pin_and_check

CHECKPOINT_DEFAULTS = {"every_n_train_steps": 1000, "keep": 2, "monitor": None, "mode": "max"}
INDENT = "  "
SHOWN_LIST_ITEMS = 8  # a longer list (prompts, class names) prints its first items and its length


@dataclass(frozen=True)
class Resolution:
    """What a stage's resolver makes of a loaded config: the completed config and the lines that explain it."""

    config: dict
    depends: tuple[tuple[str, str], ...] = ()  # (what, where): runs and files read
    derived: tuple[tuple[str, str], ...] = ()  # (what, value): values the stage computes from its inputs
    prepare: tuple[str, ...] = ()  # what runs before the model is built
    writes: tuple[str, ...] = ()  # what that preparation writes
    train_items: int | None = None  # the training split's size, when the stage can tell


Resolver = Callable[[dict, str], Resolution]  # (loaded config, its path) → completed config + explanation


def freeze(value: Any) -> Any:
    """A read-only deep copy: mappings become ``MappingProxyType``, lists tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """A plain, mutable deep copy of a frozen value (dicts and lists, as a config is)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return copy.deepcopy(value)


@dataclass(frozen=True)
class StagePlan:
    """Everything one training stage will do, resolved before anything heavy is built or written."""

    stage: str
    config_path: str
    config: Mapping  # frozen: the resolved config, as the run's config.yaml will hold it
    run_dir: Path | None = None  # the run directory a resumed run continues (None: a new one)
    checkpoint: Path | None = None  # the checkpoint it continues from
    run_name: str = ""  # a new run's name (its directory is runs/<stage>/<name>-<time>)
    runs_dir: str | None = None
    notes: tuple[str, ...] = ()  # what --data chose
    depends: tuple[tuple[str, str], ...] = ()
    derived: tuple[tuple[str, str], ...] = ()
    prepare: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()  # what the preparation writes (the run directory's files are added when printed)
    lineage: Mapping = field(default_factory=lambda: MappingProxyType({}))  # the runs, checkpoints, hashes used

    def config_dict(self) -> dict:
        """A mutable copy of the resolved config (for the objects built from it and the run's config.yaml)."""
        return thaw(self.config)

    def builds(self) -> tuple[tuple[str, Any], ...]:
        """(config path, node) of each object the run builds: the model, the data module, the callbacks."""
        cfg = self.config
        nodes = [("model", cfg["model"]), ("data", cfg["data"])]
        nodes += [(f"callbacks.{i}", node) for i, node in enumerate(cfg.get("callbacks") or ())]
        return tuple(nodes)

    def run_location(self) -> str:
        """Where the run writes: the resumed run's directory, or the pattern of a new one."""
        if self.run_dir is not None:
            return str(self.run_dir)
        root = Path(self.runs_dir) if self.runs_dir else runs_root()
        return str((root / self.stage / f"{self.run_name}-<time>").absolute())

    def run_writes(self) -> tuple[str, ...]:
        """The run directory's files."""
        ckpt = {**CHECKPOINT_DEFAULTS, **(self.config.get("checkpoint") or {})}
        every, keep = ckpt.get("every_n_train_steps"), ckpt.get("keep")
        lines = [f"{self.run_location()}/{CONFIG_FILE}",
                 f"{self.run_location()}/{CHECKPOINT_DIR}/{LAST_CHECKPOINT} (and step*.ckpt every {every} steps, "
                 f"the last {keep} kept)" if every else f"{self.run_location()}/{CHECKPOINT_DIR}/{LAST_CHECKPOINT}"]
        if ckpt.get("monitor"):
            lines.append(f"{self.run_location()}/{CHECKPOINT_DIR}/best.ckpt (by {ckpt['monitor']}, {ckpt.get('mode')})")
        lines += [f"{self.run_location()}/metrics.csv", f"{self.run_location()}/{SAMPLES_DIR}/ (sample grids)"]
        if self.run_dir is None:
            lines.append(f"{Path(self.run_location()).parent}/latest → the new run")
        return tuple(lines)

    def __str__(self) -> str:
        head = (f"resume {self.run_dir} from {self.checkpoint}" if self.run_dir is not None
                else f"new run {self.run_location()}")
        lines = [f"stage {self.stage}: {head}", f"config: {self.config_path}"]
        lines += [f"{INDENT}{note}" for note in self.notes]
        lines += _section("depends on", [f"{what}: {where}" for what, where in self.depends])
        lines += _section("derives", [f"{what}: {value}" for what, value in self.derived])
        lines += _section("before training", list(self.prepare))
        lines += _section("builds", [line for path, node in self.builds() for line in _node_lines(path, node)])
        trainer = ", ".join(f"{k}={_short(v)}" for k, v in (self.config.get("trainer") or {}).items())
        lines += _section("trains", [f"lightning.Trainer({trainer})", f"seed: {self.config.get('seed', 0)}"])
        lines += _section("writes", [*self.writes, *self.run_writes()])
        lines += _section("lineage", [f"{k}: {v}" for k, v in self.lineage.items()] or ["(none recorded)"])
        return "\n".join(lines)


def _section(title: str, items: list[str]) -> list[str]:
    return [f"{title}:", *(f"{INDENT}{item}" for item in items)] if items else []


def _short(value: Any) -> str:
    """A value on one line: long lists shortened to their first items and their length."""
    if isinstance(value, (tuple, list)):
        shown = [_short(v) for v in value[:SHOWN_LIST_ITEMS]]
        more = f", … ({len(value)} in all)" if len(value) > SHOWN_LIST_ITEMS else ""
        return "[" + ", ".join(shown) + more + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return json.dumps(value) if isinstance(value, str) and (not value or " " in value) else str(value)


def _node_lines(name: str, node: Any, depth: int = 0) -> list[str]:
    """A config node as an indented tree: ``name: target`` then its params, nested nodes expanded."""
    pad = INDENT * depth
    if isinstance(node, Mapping) and "target" in node:
        lines = [f"{pad}{name}: {node['target']}"]
        for key, value in (node.get("params") or {}).items():
            lines += _node_lines(key, value, depth + 1)
        return lines
    return [f"{pad}{name}: {_short(node)}"]


def load_stage_config(args: argparse.Namespace, default_config: str) -> tuple[dict, str, Path | None, Path | None,
                                                                              tuple[str, ...]]:
    """The loaded config (``--data`` applied), its path, on resume the run directory and checkpoint, and what
    ``--data`` chose."""
    run_dir = ckpt = None
    if args.resume:
        run_dir = resolve_run(args.resume)
        ckpt = checkpoint_for(args.resume)
    cfg_path = str(args.cfg or (run_dir / CONFIG_FILE if run_dir else default_config))
    overrides, folder = take_folder_overrides(list(args.overrides), args.data, args.captions)
    if folder is not None and run_dir is not None:
        raise ConfigError("--data / data.root starts a new run on a folder; a resumed run keeps its data (drop it)")
    cfg = load_config(cfg_path, overrides)
    notes = tuple(apply_folder(cfg, folder)) if folder is not None else ()
    return cfg, cfg_path, run_dir, ckpt, notes


def plan_stage(stage: str, default_config: str, args: argparse.Namespace, resolve: Resolver,
               validate: Callable[[dict], object]) -> StagePlan:
    """Resolve one stage: load its config, complete it (``resolve``, on its own copy), check it (``validate``), and
    gather what the run depends on, derives, builds and writes, and the lineage it pins (on a resume, another
    objective, recipe or input is refused here). Reads files; writes nothing."""
    if args.resume:
        check_stage_of(stage, args.resume)  # before the config of a run of another stage is read as this one's
    cfg, cfg_path, run_dir, ckpt, notes = load_stage_config(args, default_config)
    pin_and_check(stage, cfg, run_dir, ckpt)  # paths pinned to the exact checkpoints, in place; a resume checked
    resolution = resolve(copy.deepcopy(cfg), cfg_path)
    pin_paths(resolution.config)  # what resolving filled in (a source's, a base's) is pinned too
    inputs = identify_all(resolution.config)
    derived = resolution.derived
    if notes and not any(item.startswith(STEPS_OVERRIDE) for item in args.overrides):  # --data: a folder's size
        sized = size_by_epochs(resolution.config, resolution.train_items)
        derived += (sized,) if sized else ()
    validate(resolution.config)
    name = args.name or resolution.config.get("name") or Path(cfg_path).stem
    return StagePlan(stage=stage, config_path=cfg_path, config=freeze(resolution.config), run_dir=run_dir,
                     checkpoint=ckpt, run_name=name, runs_dir=args.runs_dir, notes=notes,
                     depends=resolution.depends, derived=derived, prepare=resolution.prepare,
                     writes=resolution.writes, lineage=freeze(lineage_lines(inputs)))


def lineage_lines(inputs: list[Input]) -> dict[str, str]:
    """What a plan prints of its pinned inputs: role → the exact file, its step and hash."""
    return {f"{i.role} ({i.key})": " ".join(filter(None, [i.path, f"step {i.step}" if i.step is not None else "",
                                                             f"weights {i.vae_hash}" if i.vae_hash else
                                                             (f"sha256 {i.hash}" if i.hash else "")]))
            for i in inputs}


def describe(title: str, resolution: Resolution, notes: list[str] | tuple[str, ...] = ()) -> str:
    """A resolution on its own (a stage without a model, e.g. the latent cache), printed as a plan is."""
    lines = [f"{title}:", *(f"{INDENT}{note}" for note in notes)]
    lines += _section("depends on", [f"{what}: {where}" for what, where in resolution.depends])
    lines += _section("derives", [f"{what}: {value}" for what, value in resolution.derived])
    lines += _section("does", list(resolution.prepare))
    lines += _section("writes", list(resolution.writes) or ["nothing"])
    return "\n".join(lines)
