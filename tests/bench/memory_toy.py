"""The toy SDXL whose LoRA step the memory count is tested on (tests/bench/test_memory.py) and README's
scripts/bench_memory.py command runs on at smoke size (tests/test_readme.py)."""

from __future__ import annotations

from tests.sdxl_toy import tiny_xl_config


def toy_config() -> dict:
    """tests/sdxl_toy's SDXL config with one transformer block per attention level: every kind of op, half as many."""
    cfg = tiny_xl_config()
    cfg["model"]["params"]["unet"]["params"]["transformer_depth"] = [0, 1]
    return cfg
