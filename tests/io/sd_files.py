"""Writing a toy model's state as an SD / ControlNet file, and inputs to compare networks on (tests/io)."""

import torch
from safetensors.torch import save_file

PROMPTS = ["a red circle on a blue background", ""]


def save(state: dict, path, fmt: str):
    """``state`` written to ``path`` as .safetensors, or pickled as SD / Lightning do (``fmt`` "ckpt"); the path."""
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:  # as SD / Lightning pickle them, with non-tensor entries beside the weights
        torch.save({"state_dict": state, "global_step": 840000, "epoch": 3}, path)
    return path


def inputs(seed: int = 0, pixels: int = 16, f: int = 2):
    """(latents, timesteps, hint) for two toy images of ``pixels`` px and a VAE of factor ``f``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, pixels // f, pixels // f, generator=g)
    hint = torch.rand(2, 3, pixels, pixels, generator=g)
    return x, torch.tensor([3.0, 700.0]), hint
