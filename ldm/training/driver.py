"""The one training driver every stage script calls: config → plan → run directory → Lightning Trainer → fit.

Stages differ only in their config. ``python stages/<stage>.py [--cfg FILE] [--resume RUN] [--data DIR] [--threads N]
[--dry-run] [key=value …]`` (``ldm.training.cli``); the stage is resolved once into a ``StagePlan``
(``ldm.training.plan``), printed by ``--dry-run``, and the run executes it.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Callable, Sequence

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import (
    MisconfigurationException,
    SIGTERMException,
)

from ldm.core.atomic import TMP_MARKER
from ldm.core.config import (
    ConfigError,
    check_arguments,
    check_config,
    config_section,
    instantiate_from_config,
    is_node,
    save_config,
)
from ldm.core.errors import UserError
from ldm.core.logging import setup_cli_logging
from ldm.core.threads import apply_threads, resolve_threads
from ldm.inference.loaders import build_system
from ldm.inference.sd_base import checkpoint_state_of
from ldm.io.checkpoints import fit_report, load_file, state_dict_of
from ldm.io.runs import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    LAST_CHECKPOINT,
    PERIODIC_CHECKPOINT,
    check_writable,
    create_run_dir,
)
from ldm.nets.compile import compiler_problem
from ldm.training.callbacks import (
    AtomicCheckpointIO,
    FinalValidation,
    GracefulStop,
    ResumeBookkeeping,
    expect_own_checkpoints,
)
from ldm.training.cli import parse_args  # noqa: F401 (the stages' command line, defined light)
from ldm.training.csv_logger import RunCSVLogger
from ldm.training.guards import GUARD_DEFAULTS, NonFiniteError, guard_callbacks
from ldm.training.plan import CHECKPOINT_DEFAULTS, Resolution, StagePlan, plan_stage
from ldm.training.progress import progress_callback
from ldm.training.run_inputs import record_lineage
from ldm.training.stages import STAGES, InitWeights, ResumeWeights, Stage
from ldm.training.summary import summary_callback
from ldm.training.vae_once import LoadOnce

# Set by the launching process so that DDP workers (which re-run the script) join its run directory.
RUN_DIR_ENV = "LDM_RUN_DIR"
EXIT_BAD_INPUT = 2
log = logging.getLogger(__name__)
EXIT_STOPPED = 143  # 128 + SIGTERM, so schedulers see an interrupted (resumable) job
EXIT_NONFINITE = 3  # the run diverged: resuming as is would diverge again
GUARD_MODES = ("stop", "skip", "off")


def validate(cfg: dict) -> None:
    """Check every section of a training config before anything heavy is built."""
    for section in ("model", "data"):
        if section not in cfg:
            raise ConfigError(f"config has no `{section}:` section")
        check_config(cfg[section], section)
    trainer = cfg.get("trainer") or {}
    for key, node in trainer.items():  # a strategy object, e.g. lightning.pytorch.strategies.ModelParallelStrategy
        if is_node(node):
            check_config(node, f"trainer.{key}")
    check_arguments(L.Trainer, {k: v for k, v in trainer.items() if not is_node(v)}, "trainer")
    config_section(cfg, "checkpoint", CHECKPOINT_DEFAULTS)
    for i, node in enumerate(cfg.get("callbacks") or []):
        check_config(node, f"callbacks.{i}")
    guard = config_section(cfg, "guard", GUARD_DEFAULTS)
    if guard.get("nonfinite", "stop") not in GUARD_MODES:
        raise ConfigError(f"guard.nonfinite: expected one of {', '.join(GUARD_MODES)}, got {guard['nonfinite']!r}")


def open_run_dir(plan: StagePlan) -> Path:
    """Create the run directory (or reuse the resumed / launching process's one) and write its config."""
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited:
        return Path(inherited)  # a DDP worker: rank 0 made the directory and wrote the config
    run_dir = plan.run_dir
    if run_dir is None:
        run_dir = create_run_dir(plan.stage, plan.run_name, plan.runs_dir)
    else:
        check_writable(run_dir / CHECKPOINT_DIR)  # a resumed run must still be able to save
        remove_stale_temporaries(run_dir / CHECKPOINT_DIR)
    save_config(plan.config_dict(), run_dir / CONFIG_FILE)
    return run_dir


def remove_stale_temporaries(ckpt_dir: Path) -> None:
    """Delete checkpoint temporaries a killed process left behind (never a finished checkpoint)."""
    for tmp in ckpt_dir.glob(f".*{TMP_MARKER}*"):
        tmp.unlink(missing_ok=True)


def check_resumable(model: L.LightningModule, ckpt: Path) -> None:
    """Refuse, in one line, a checkpoint that is unsafe to unpickle or was written by another architecture."""
    own = {k: v.shape for k, v in checkpoint_state_of(model).items()}
    fit_report(own, state_dict_of(load_file(ckpt, mmap=True)), f"checkpoint {ckpt}",
               hint="resume with the config the run was started with (or start a new run)")


def build_trainer(cfg: dict, run_dir: Path) -> L.Trainer:
    """A Lightning Trainer from the config's `trainer:` section plus the run's logger and checkpoints."""
    try:
        return _build_trainer(cfg, run_dir)
    except (MisconfigurationException, ValueError, TypeError) as e:  # e.g. devices=0, keep=-2, fsdp on a CPU
        raise ConfigError(f"trainer: {str(e).splitlines()[0]}") from e


def _build_trainer(cfg: dict, run_dir: Path) -> L.Trainer:
    ckpt_cfg = {**CHECKPOINT_DEFAULTS, **(cfg.get("checkpoint") or {})}
    ckpt_dir = run_dir / CHECKPOINT_DIR
    periodic = ModelCheckpoint(
        dirpath=ckpt_dir, filename=PERIODIC_CHECKPOINT, auto_insert_metric_name=False,
        every_n_train_steps=ckpt_cfg["every_n_train_steps"], save_last=True,
        monitor="step", mode="max", save_top_k=ckpt_cfg["keep"], enable_version_counter=False,
    )
    callbacks: list[L.Callback] = [periodic]
    if ckpt_cfg["monitor"]:
        callbacks.append(ModelCheckpoint(
            dirpath=ckpt_dir, filename="best", monitor=ckpt_cfg["monitor"], mode=ckpt_cfg["mode"],
            save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False,
        ))
    callbacks += [GracefulStop(ckpt_dir / LAST_CHECKPOINT), ResumeBookkeeping(), FinalValidation(),
                  *guard_callbacks(cfg, ckpt_dir)]
    callbacks += [instantiate_from_config(node, f"callbacks.{i}") for i, node in enumerate(cfg.get("callbacks") or [])]
    trainer_kwargs = {k: instantiate_from_config(v, f"trainer.{k}") if is_node(v) else v
                      for k, v in (cfg.get("trainer") or {}).items()}
    progress = progress_callback(trainer_kwargs, monitor=ckpt_cfg["monitor"], mode=ckpt_cfg["mode"])
    summary = summary_callback(trainer_kwargs)
    callbacks += [c for c in (progress, summary) if c is not None]
    return L.Trainer(default_root_dir=str(run_dir), logger=RunCSVLogger(run_dir), callbacks=callbacks,
                     plugins=[AtomicCheckpointIO()], **trainer_kwargs)


def resume_command(stage: str, run_dir: Path) -> str:
    """The command that continues a run, ready to paste: this script (as started) and the run's absolute path."""
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith(".py") else f"stages/train_{stage}.py"
    return f"python {shlex.quote(script)} --resume {shlex.quote(str(Path(run_dir).absolute()))}"


def stage_of(stage: str, default_config: str | None = None, before_build: Callable | None = None,
             init_weights: InitWeights | None = None, complete: Callable[[dict], object] | None = None,
             resume_weights: ResumeWeights | None = None) -> Stage:
    """The stage ``stage`` (``ldm.training.stages``), or a new one, with the hooks given here in place of its own:
    ``complete(cfg)`` fills in what the config inherits before the stage resolves it; ``before_build(cfg,
    config_path)`` replaces its preparation (it gets a copy of the planned config)."""
    known = STAGES.get(stage) or Stage(stage, default_config or "")
    resolve = known.resolve
    if complete is not None:
        def resolve(cfg: dict, config_path: str, _own=known.resolve) -> Resolution:
            out = complete(cfg)
            return _own(out if isinstance(out, dict) else cfg, config_path)
    prepare = known.prepare
    if before_build is not None:
        def prepare(cfg: dict, config_path: str, load_vae: Callable) -> object:
            return before_build(cfg, config_path)
    return Stage(stage, default_config or known.default_config, resolve, prepare, init_weights or known.init_weights,
                 resume_weights or known.resume_weights, known.build_model)


def train(stage: str, default_config: str | None = None, argv: Sequence[str] | None = None,
          before_build: Callable | None = None, init_weights: InitWeights | None = None,
          complete: Callable[[dict], object] | None = None, resume_weights: ResumeWeights | None = None,
          args: argparse.Namespace | None = None) -> Path | None:
    """Run one stage's training from the command line; returns the run directory (None after ``--dry-run``).

    ``stage`` names the runs folder and, for the stages of ``ldm.training.stages``, the defaults of the rest (see
    ``stage_of`` for hooks given here). ``args`` are arguments already parsed (a stage script parses them before
    the heavy imports); else ``argv`` is parsed.
    """
    setup_cli_logging()
    spec = stage_of(stage, default_config, before_build, init_weights, complete, resume_weights)
    args = args if args is not None else parse_args(argv, spec.default_config)
    try:
        if args.threads is not None:
            resolve_threads(args.threads)  # a bad --threads is refused before anything is read
        plan = plan_stage(spec.name, spec.default_config, args, spec.resolve, validate)
    except UserError as e:
        log.error("%s", e)
        raise SystemExit(EXIT_BAD_INPUT) from None
    if args.dry_run:
        print(plan)
        return None
    return run_plan(plan, spec, args.threads)


def run_plan(plan: StagePlan, stage: Stage, threads: str | None = None) -> Path:
    """Execute a stage's plan: prepare (cache, pairs), build the data and the model (each VAE loaded once), open the
    run directory, fit; returns the run directory."""
    cfg, ckpt = plan.config_dict(), plan.checkpoint
    load_vae = LoadOnce()
    for note in plan.notes:  # what --data chose
        log.info("%s", note)
    try:
        apply_threads(threads if threads is not None else cfg.get("threads"),
                      "--threads" if threads is not None else "threads")
        if stage.prepare is not None:
            stage.prepare(copy.deepcopy(cfg), plan.config_path, load_vae)
        L.seed_everything(cfg.get("seed", 0), workers=True, verbose=False)
        datamodule = instantiate_from_config(cfg["data"], "data")
        if stage.build_model is not None:
            model = stage.build_model(cfg, load_vae)
        else:
            model = build_system(cfg["model"], load_vae=load_vae)  # a stage-1 run named by path is loaded, not read
        if ckpt is not None:
            if stage.resume_weights is not None:
                stage.resume_weights(model, cfg)
            check_resumable(model, ckpt)
        elif stage.init_weights is not None:
            stage.init_weights(model, cfg)
        run_dir = open_run_dir(plan).absolute()  # printed paths are absolute, before a resume and after
        record_lineage(run_dir, plan.stage, cfg)  # once: a resume never rewrites it
        if ckpt is not None:
            expect_own_checkpoints(run_dir / CHECKPOINT_DIR)
        trainer = build_trainer(cfg, run_dir)
        if getattr(model, "compile_settings", None) is not None:  # a compile node: fail now, not at the first step
            problem = compiler_problem(trainer.strategy.root_device)
            if problem is not None:
                raise ConfigError(f"model.params.compile: {problem}")
    except UserError as e:
        log.error("%s", e)
        raise SystemExit(EXIT_BAD_INPUT) from None
    log.info("%s: %s%s", "resuming" if ckpt else "run", run_dir, f" from {Path(ckpt).absolute()}" if ckpt else "")
    os.environ[RUN_DIR_ENV] = str(run_dir)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    except SIGTERMException:
        log.info("stopped at step %d; resume with: %s", trainer.global_step, resume_command(plan.stage, run_dir))
        raise SystemExit(EXIT_STOPPED) from None
    except NonFiniteError as e:
        log.error("%s", e)
        raise SystemExit(EXIT_NONFINITE) from None
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
    return run_dir
