"""The one rule that turns a dtype name into a torch dtype (command lines, configs, loaders, the benchmark)."""

from __future__ import annotations

import torch

from ldm.core.errors import UserError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                                  "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
AUTO = "auto"  # bf16 on a CUDA device that supports it, else fp32


class DtypeError(UserError, ValueError):
    """A dtype name or dtype this project does not run in."""


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str | None = None) -> torch.dtype:
    """A torch dtype from a name (fp32 / bf16 / fp16), a dtype, None (fp32) or "auto" (bf16 on CUDA, else fp32)."""
    if dtype is None:
        return torch.float32
    if dtype == AUTO:
        device = torch.device(device or "cpu")
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise DtypeError(f"dtype {dtype} is not supported; choose float32, bfloat16 or float16")
        return dtype
    if dtype not in DTYPES:
        raise DtypeError(f"unknown dtype {dtype!r}; choose one of {AUTO}, {', '.join(DTYPES)}")
    return DTYPES[dtype]
