"""Checks of a benchmark script's written table, run where README's command for that script runs
(tests/test_readme.py), so that one run of the script serves both the README check and its table's properties."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path
from typing import Callable

from ldm.bench.lora_memory import DTYPES, Setup, memory_table

SD15_UNET_PARAMETERS = 859_520_964
SD15_LORA_R4_ATTENTION = 797_184  # rank 4 on q, k, v, out of SD 1.5's attention: diffusers' LoRA example's count


def check_lora_table(out: Path, printed: str) -> None:
    """scripts/bench_lora.py counts what trains and what AdamW keeps; lora.md is what it printed, lora.csv is there."""
    assert (out / "lora.md").read_text() in printed and (out / "lora.csv").is_file()
    rows = {row[0] + "/" + row[1]: row for row in csv.reader((out / "lora.csv").read_text().splitlines()[1:])}
    full, r4 = rows["bench/full fine-tune"], rows["bench/LoRA r4 (attention q, k, v, out)"]
    assert int(full[2]) == int(full[3]) and 0 < int(r4[2]) < int(full[2]) // 10
    for row in (full, r4):  # AdamW: two fp32 moments per trained weight, plus a step counter per tensor
        assert 8 * int(row[2]) <= int(row[4]) <= 8 * int(row[2]) + 4096
    assert int(rows["sd15/LoRA r4 (attention q, k, v, out)"][2]) == SD15_LORA_R4_ATTENTION
    assert int(rows["sd15/full fine-tune"][2]) == SD15_UNET_PARAMETERS


def check_memory_table(out: Path, printed: str) -> None:
    """scripts/bench_memory.py counts every configuration asked (by default all 8: frozen fp32 / bf16 × text cached /
    on the GPU × checkpointing on / off), one row each; memory.md is what it printed."""
    text = (out / "memory.md").read_text()
    assert text in printed
    rows = [line for line in text.splitlines() if line.startswith("| frozen")]
    assert [row.split("|")[1].strip() for row in rows] == [
        Setup(batch=1, checkpointing=ckpt == "on", base=base, text=place).describe()
        for base, place, ckpt in itertools.product(DTYPES, ("cached", "gpu"), ("on", "off"))]
    assert memory_table([]).count("\n") == 1  # the header alone


# script → check of its output folder (given what the command printed)
TABLE_CHECKS: dict[str, Callable[[Path, str], None]] = {"scripts/bench_lora.py": check_lora_table,
                                                        "scripts/bench_memory.py": check_memory_table}
