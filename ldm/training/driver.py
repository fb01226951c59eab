"""The one training driver every stage script calls: config → run directory → Lightning Trainer → fit.

Stages differ only in their config. ``python stages/<stage>.py [--cfg FILE] [--resume RUN] [--data DIR] [--threads N]
[key=value …]``; ``--data DIR`` points the recipe at a folder of images (``ldm.training.presets``).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Sequence

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
    load_config,
    save_config,
)
from ldm.core.errors import UserError
from ldm.core.logging import setup_cli_logging
from ldm.core.threads import add_threads_argument, apply_threads
from ldm.inference.loaders import build_system
from ldm.inference.sd_base import checkpoint_state_of
from ldm.io.checkpoints import fit_report, load_file, state_dict_of
from ldm.io.runs import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    LAST_CHECKPOINT,
    check_writable,
    checkpoint_for,
    create_run_dir,
    resolve_run,
)
from ldm.nets.compile import compiler_problem
from ldm.training.callbacks import AtomicCheckpointIO, FinalValidation, GracefulStop, ResumeBookkeeping
from ldm.training.csv_logger import RunCSVLogger
from ldm.training.guards import GUARD_DEFAULTS, NonFiniteError, guard_callbacks
from ldm.training.presets import apply_folder, take_folder_overrides
from ldm.training.progress import progress_callback
from ldm.training.stages import STAGES, BeforeBuild, Complete, InitWeights, ResumeWeights

# Set by the launching process so that DDP workers (which re-run the script) join its run directory.
RUN_DIR_ENV = "LDM_RUN_DIR"
CHECKPOINT_DEFAULTS = {"every_n_train_steps": 1000, "keep": 2, "monitor": None, "mode": "max"}
EXIT_BAD_INPUT = 2
log = logging.getLogger(__name__)
EXIT_STOPPED = 143  # 128 + SIGTERM, so schedulers see an interrupted (resumable) job
EXIT_NONFINITE = 3  # the run diverged: resuming as is would diverge again
GUARD_MODES = ("stop", "skip", "off")


def parse_args(argv: Sequence[str] | None, default_config: str) -> argparse.Namespace:
    """The command line every stage script shares."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", help=f"YAML config (default: {default_config})")
    parser.add_argument("--resume", metavar="RUN", help="run directory, <stage>/latest or a .ckpt to continue from")
    parser.add_argument("--name", help="run name (default: the config's `name`)")
    parser.add_argument("--runs-dir", help="folder for run directories (default: runs, or $LDM_RUNS_DIR)")
    parser.add_argument("--data", metavar="DIR", help="train on the images in DIR instead of the config's data "
                        "(same as data.root=DIR); the caption mode is detected and reported")
    parser.add_argument("--captions", metavar="MODE", help="with --data: auto (default), metadata, txt, subfolders "
                        "or none (same as data.captions=MODE)")
    add_threads_argument(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. trainer.max_steps=500")
    return parser.parse_intermixed_args(argv)  # overrides may come before or after options


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


def load_run_config(args: argparse.Namespace, default_config: str, complete: Complete | None = None
                    ) -> tuple[dict, str, Path | None, Path | None]:
    """The checked config (``complete`` fills what it inherits first), its path, and on resume the run directory and
    checkpoint to continue from."""
    run_dir = ckpt = None
    if args.resume:
        run_dir = resolve_run(args.resume)
        ckpt = checkpoint_for(args.resume)
    cfg_path = str(args.cfg or (run_dir / CONFIG_FILE if run_dir else default_config))
    overrides, folder = take_folder_overrides(list(args.overrides), args.data, args.captions)
    if folder is not None and run_dir is not None:
        raise ConfigError("--data / data.root starts a new run on a folder; a resumed run keeps its data (drop it)")
    cfg = load_config(cfg_path, overrides)
    for line in apply_folder(cfg, folder) if folder is not None else ():
        log.info("%s", line)
    if complete is not None:
        complete(cfg)
    validate(cfg)
    return cfg, cfg_path, run_dir, ckpt


def open_run_dir(stage: str, cfg: dict, cfg_path: str, args: argparse.Namespace, run_dir: Path | None) -> Path:
    """Create the run directory (or reuse the resumed / launching process's one) and write its config."""
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited:
        return Path(inherited)  # a DDP worker: rank 0 made the directory and wrote the config
    if run_dir is None:
        run_dir = create_run_dir(stage, args.name or cfg.get("name") or Path(cfg_path).stem, args.runs_dir)
    else:
        check_writable(run_dir / CHECKPOINT_DIR)  # a resumed run must still be able to save
        remove_stale_temporaries(run_dir / CHECKPOINT_DIR)
    save_config(cfg, run_dir / CONFIG_FILE)
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
        dirpath=ckpt_dir, filename="step{step:07d}", auto_insert_metric_name=False,
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
    progress = progress_callback(trainer_kwargs)
    callbacks += [progress] if progress is not None else []
    return L.Trainer(default_root_dir=str(run_dir), logger=RunCSVLogger(run_dir), callbacks=callbacks,
                     plugins=[AtomicCheckpointIO()], **trainer_kwargs)


def train(stage: str, default_config: str | None = None, argv: Sequence[str] | None = None,
          before_build: BeforeBuild | None = None, init_weights: InitWeights | None = None,
          complete: Complete | None = None, resume_weights: ResumeWeights | None = None) -> Path:
    """Run one stage's training from the command line; returns the run directory.

    ``stage`` names the runs folder and, for the stages of ``ldm.training.stages``, the defaults of the rest:
    ``default_config``; ``before_build(cfg, config_path)``, run after the config is checked and before anything
    is built (stage 2 builds or checks its latent cache); ``init_weights(model, cfg)``, run on a new run (not a
    resumed one) once the model is built (stage 3 loads its base model's weights); ``complete(cfg)``, run before the
    config is checked, fills in what it inherits (reflow: the model of its source run); ``resume_weights(model, cfg)``,
    run on a resumed run before its checkpoint is checked, gives it what the checkpoints do not hold (a LoRA run's
    base and adapters).
    """
    setup_cli_logging()
    known = STAGES.get(stage)
    build_model = known.build_model if known is not None and known.build_model is not None else None
    if known is not None:
        default_config = default_config or known.default_config
        before_build = before_build or known.before_build
        init_weights = init_weights or known.init_weights
        complete = complete or known.complete
        resume_weights = resume_weights or known.resume_weights
    args = parse_args(argv, default_config)
    try:
        cfg, cfg_path, run_dir, ckpt = load_run_config(args, default_config, complete)
        apply_threads(args.threads if args.threads is not None else cfg.get("threads"),
                      "--threads" if args.threads is not None else "threads")
        if before_build is not None:
            before_build(cfg, cfg_path)
        L.seed_everything(cfg.get("seed", 0), workers=True, verbose=False)
        datamodule = instantiate_from_config(cfg["data"], "data")
        # a stage-1 run named by path is loaded, not read by the system
        model = build_model(cfg) if build_model is not None else build_system(cfg["model"])
        if ckpt is not None:
            if resume_weights is not None:
                resume_weights(model, cfg)
            check_resumable(model, ckpt)
        elif init_weights is not None:
            init_weights(model, cfg)
        run_dir = open_run_dir(stage, cfg, cfg_path, args, run_dir)
        trainer = build_trainer(cfg, run_dir)
        if getattr(model, "compile_networks", False):  # `compile: true`: fail now, not at the first step
            problem = compiler_problem(trainer.strategy.root_device)
            if problem is not None:
                raise ConfigError(f"model.params.compile: {problem}")
    except UserError as e:
        log.error("%s", e)
        raise SystemExit(EXIT_BAD_INPUT) from None
    log.info("%s: %s%s", "resuming" if ckpt else "run", run_dir, f" from {ckpt}" if ckpt else "")
    os.environ[RUN_DIR_ENV] = str(run_dir)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    except SIGTERMException:
        log.warning("stopped at step %d; resume with: --resume %s", trainer.global_step, run_dir)
        raise SystemExit(EXIT_STOPPED) from None
    except NonFiniteError as e:
        log.error("%s", e)
        raise SystemExit(EXIT_NONFINITE) from None
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
    return run_dir
