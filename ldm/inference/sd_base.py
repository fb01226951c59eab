"""A fine-tune's base: a public Stable Diffusion file loaded into a stage-2 system (``model.params.base_ckpt``), and runs
whose checkpoints hold only LoRA adapters.

``load_base`` gives a LatentDiffusion built from the base's inference config the file's weights, strictly: the U-Net
takes the file's EMA weights when it has them (``model_ema.*``), the text encoder (SD1's Hugging Face names mapped to
open_clip's) and the VAE take theirs, and the scale factor stays the base's (the config's 0.18215, or the one the file
stores): it is never re-measured on the new data, since the U-Net was trained at that scale. A system that keeps an
EMA starts it from the loaded U-Net.

``prepare_weights`` is what a system needs before its checkpoint (if any) is loaded: a new run's base; for a LoRA
system the base whatever happens (its checkpoints hold only the adapters) and then the adapters. ``load_run_system``
builds a run's system that way and loads its checkpoint strictly (all of it, or exactly the adapters): its modules (and
a LoRA run's adapters) are built without weights (``params_on_meta``) and take the file's tensors, so nothing is
randomly initialised and no weight is held twice.
"""

from __future__ import annotations

from contextlib import nullcontext

from torch import nn

from ldm.core.config import ConfigError
from ldm.inference.base_text import with_cached_text
from ldm.inference.loaders import RunSummary, build_system
from ldm.inference.sd import load_sd_weights, read_sd_state
from ldm.inference.source_checks import check_run_vae
from ldm.io.checkpoints import EMA_SHADOWED, load_file, state_dict_of
from ldm.io.module_weights import built_dtypes, load_assign, params_on_meta


def base_hint(config: str | None) -> str:
    """What to check when a base file does not fit the model its config builds."""
    return (f"Is model.params.base_config ({config}) the file's inference config? SD 1.x: configs/sd/v1-inference.yaml; "
            "SD 2.x: v2-inference.yaml (512 px, ε) or v2-inference-v.yaml (768 px, v); a file scripts/export.py wrote: "
            "the .yaml beside it")


def load_base(system: nn.Module, use_ema: bool = True) -> dict:
    """Load the public SD file a system names as its base (``base_source``) into it, strictly; returns what was done."""
    source = getattr(system, "base_source", None) or {}
    ckpt, config = source.get("base_ckpt"), source.get("base_config")
    if not ckpt:
        raise ConfigError("the model has no base to start from: set model.params.base_ckpt (a public SD file) and "
                          "model.params.base_config (its inference config)")
    state = with_cached_text(system, read_sd_state(ckpt))  # a cached text stand-in keeps its own weights
    info = load_sd_weights(system, state, use_ema=use_ema, what=f"the base {ckpt}",
                           hint=base_hint(config), consume=True)
    return {"checkpoint": str(ckpt), **info}


def has_base(system: nn.Module) -> bool:
    """Whether the system names a public SD file to start from."""
    return bool((getattr(system, "base_source", None) or {}).get("base_ckpt"))


def prepare_weights(system: nn.Module, resumed: bool = False, adapters_on_meta: bool = False) -> dict:
    """Before a checkpoint is loaded (``resumed``) or a new run starts: the base's weights when the checkpoint will not
    hold them, then a LoRA system's adapters (``adapters_on_meta``: without weights, for ``load_checkpoint`` to give
    them the checkpoint's). Returns what ``load_base`` did (empty when nothing was loaded)."""
    lora = getattr(system, "lora", None) is not None
    info = load_base(system) if has_base(system) and (lora or not resumed) else {}
    if lora:
        with params_on_meta() if adapters_on_meta else nullcontext():
            system.add_lora()
    return info


def checkpoint_state_of(system: nn.Module) -> dict:
    """The state entries a checkpoint of ``system`` holds (all, or a LoRA system's adapters)."""
    own = getattr(system, "checkpoint_state", None)
    return own() if own is not None else system.state_dict()


def load_checkpoint(system: nn.Module, state: dict, what: str, hint: str = "") -> None:
    """Give a prepared system a checkpoint's tensors (``load_assign``: the system may be built with ``params_on_meta``),
    in the dtypes it was built with: names and shapes exactly the system's checkpointed ones, nothing left without a
    value. ``state``'s entries are taken from it as they go."""
    load_assign(system, state, what, dtype_for=built_dtypes(system), hint=hint, entries=checkpoint_state_of(system))


def load_run_system(info: RunSummary, use_ema: bool = True) -> tuple[nn.Module, bool]:
    """Build a run's system (a LatentDiffusion or ControlLDM) and load its checkpoint strictly; (system, EMA used).

    The VAE's architecture comes from its run's config; all weights (VAE included) from the run's checkpoint, or for
    a LoRA run from its base file plus the checkpoint's adapters. With ``use_ema`` the U-Net (a ControlNet, a LoRA
    run's adapters) take the EMA weights when the run kept them.
    """
    state = state_dict_of(load_file(info.checkpoint, mmap=True))  # read once (mapped): the VAE check and the weights
    check_run_vae(info.config, state, info.run_dir)  # a moved `runs/vae/latest`: refused or reported
    with params_on_meta():  # every weight comes from the checkpoint (a LoRA run's base from its file): no random init
        system = build_system(info.config["model"], load_first_stage=False)
    prepare_weights(system, resumed=True, adapters_on_meta=True)
    load_checkpoint(system, state, f"checkpoint {info.checkpoint}")
    emas = {name: target for name, target in EMA_SHADOWED.items() if getattr(system, name, None) is not None}
    if use_ema:
        for name, target in emas.items():
            getattr(system, name).copy_to(getattr(system, target))
    return system, use_ema and bool(emas)
