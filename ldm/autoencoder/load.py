"""Load a trained KL-VAE for inference (stage 2, caching, sampling) from a stage-1 run or checkpoint."""

from __future__ import annotations

import os

from ldm.autoencoder.model import AutoencoderKL
from ldm.checkpoints import load_file, load_strict, state_dict_of, tensors_hash
from ldm.config import instantiate_from_config
from ldm.runs import checkpoint_for, run_config

TRAINING_ONLY_PREFIXES = ("loss.",)  # LPIPS and discriminator weights: not part of the autoencoder


def load_autoencoder(spec: str | os.PathLike) -> tuple[AutoencoderKL, dict]:
    """A frozen, eval-mode VAE from a run directory (``runs/vae/latest``) or a checkpoint inside one.

    Returns the model and its identity: checkpoint path, hash of its weights, downsampling factor.
    """
    ckpt = checkpoint_for(spec)
    node = run_config(ckpt)["model"]
    node = {"target": node["target"], "params": {**node.get("params", {}), "loss": None}}
    vae = instantiate_from_config(node, "first_stage")
    load_strict(vae, state_dict_of(load_file(ckpt)), f"VAE checkpoint {ckpt}", ignore=TRAINING_ONLY_PREFIXES)
    vae.eval().requires_grad_(False)
    info = {
        "checkpoint": str(ckpt),
        "hash": tensors_hash(vae.state_dict()),
        "downsampling_factor": vae.downsampling_factor,
        "embed_dim": vae.embed_dim,
    }
    return vae, info
