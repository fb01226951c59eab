"""LoRA against full fine-tuning of a U-Net: what trains, what the optimiser keeps, step time, activation memory.

Measured on the benchmark's SD-layout U-Net (``ldm.bench.sizes``) with adapters on the attention q, k, v and out (the
fine-tune configs' targets) at ranks 4, 16 and 64, through the same peft layers training uses (``ldm.nets.lora``), each
step fwd + bwd + fused AdamW over what trains; the four variants are timed in alternation. At SD 1.5's width
(``configs/sd/v1-inference.yaml``, built on the meta device: nothing allocated) the same adapters are counted, not run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ldm.bench.measures import MEBI
from ldm.bench.sizes import BenchSizes
from ldm.bench.steps import Options, fill_zero_init, place, train_step_and_optimizer, unet_inputs
from ldm.bench.timing import paired_medians, peak_memory_bytes
from ldm.io.module_weights import params_on_meta
from ldm.nets.lora import UNET_ATTENTION, LoRA, is_lora_key
from ldm.nets.unet.model import UNetModel

RANKS = (4, 16, 64)
FP32_BYTES = 4
ADAMW_MOMENTS = 2  # exp_avg and exp_avg_sq, fp32, one of each per trained weight


@dataclass
class Variant:
    """One way to fine-tune the U-Net: full (rank None) or LoRA of a rank, with what it costs."""

    rank: int | None
    trainable: int
    total: int  # the U-Net's own parameters
    optimizer_bytes: int  # AdamW's state after a step (measured), or its 2 fp32 moments per weight (counted)
    seconds: dict[str, float] = field(default_factory=dict)  # precision → median seconds per step
    activation_mib: dict[str, float] = field(default_factory=dict)  # precision → peak MiB beyond weights/grads/state

    @property
    def name(self) -> str:
        """``full`` or ``LoRA r<rank>``."""
        return "full fine-tune" if self.rank is None else f"LoRA r{self.rank} (attention q, k, v, out)"


def adapted_unet(params: Mapping[str, Any], rank: int | None) -> UNetModel:
    """A U-Net of ``params``; with ``rank``, LoRA adapters on its attention (only they train)."""
    unet = UNetModel(**params)
    if rank is not None:
        LoRA(rank=rank, alpha=rank, unet_targets=list(UNET_ATTENTION)).apply(unet, None)
    return unet


def counts(unet: nn.Module) -> tuple[int, int]:
    """(trainable parameters, the U-Net's own parameters: adapters aside)."""
    named = list(unet.named_parameters())
    return (sum(p.numel() for _, p in named if p.requires_grad),
            sum(p.numel() for n, p in named if not is_lora_key(n)))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors an optimiser keeps per parameter (AdamW: exp_avg, exp_avg_sq, step)."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if torch.is_tensor(t))


def measure_lora(sizes: BenchSizes, opts: Options, precisions: Sequence[str]) -> list[Variant]:
    """Full fine-tuning and LoRA at ``RANKS`` on the benchmark U-Net: counts, AdamW state, step time, activations."""
    inputs = unet_inputs(sizes, opts)
    variants, models = [], {}
    for rank in (None, *RANKS):
        torch.manual_seed(0)
        unet = place(fill_zero_init(adapted_unet(sizes.unet, rank)), opts)
        variants.append(Variant(rank, *counts(unet), optimizer_bytes=0))
        models[variants[-1].name] = unet
    for precision in precisions:
        steps = {}
        for variant in variants:
            step, optimizer = train_step_and_optimizer(models[variant.name], inputs, opts, precision, fused=True)
            step()
            variant.optimizer_bytes = optimizer_state_bytes(optimizer)
            steps[variant.name] = step
        seconds = paired_medians(steps, opts.device, opts.warmup, opts.repeats)
        for variant in variants:
            variant.seconds[precision] = seconds[variant.name]
            step = train_step_and_optimizer(models[variant.name], inputs, opts, precision, keep_grads=True)[0]
            step()  # gradients and optimiser state exist: the peak of the next step is activations and workspace
            variant.activation_mib[precision] = peak_memory_bytes(step, opts.device) / MEBI
    return variants


def counted_at(params: Mapping[str, Any]) -> list[Variant]:
    """The same variants at another width, counted on the meta device: AdamW's 2 fp32 moments per trained weight."""
    variants = []
    for rank in (None, *RANKS):
        with params_on_meta():
            unet = UNetModel(**params)
        if rank is not None:
            LoRA(rank=rank, alpha=rank, unet_targets=list(UNET_ATTENTION)).apply(unet, None)
        trainable, total = counts(unet)
        variants.append(Variant(rank, trainable, total, ADAMW_MOMENTS * FP32_BYTES * trainable))
    return variants


def lora_table(variants: Sequence[Variant], precisions: Sequence[str]) -> str:
    """The variants as a Markdown table (timed columns only for what was run)."""
    timed = [p for p in precisions if any(p in v.seconds for v in variants)]
    header = ["variant", "trainable parameters", "% of the U-Net", "AdamW state (MiB)", "trained weights (MiB, fp32)"]
    header += [f"step (s, {p})" for p in timed] + [f"activations (MiB, {p})" for p in timed]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in variants:
        cells = [v.name, f"{v.trainable:,}", f"{100 * v.trainable / v.total:.3g} %", f"{v.optimizer_bytes / MEBI:,.1f}",
                 f"{FP32_BYTES * v.trainable / MEBI:,.1f}"]
        cells += [f"{v.seconds[p]:.3g}" for p in timed] + [f"{v.activation_mib[p]:,.0f}" for p in timed]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lora_csv(variants: Sequence[Variant], width: str) -> list[list[str]]:
    """CSV rows: width, variant, trainable, total, optimiser bytes, then precision:seconds:activation MiB entries."""
    return [[width, v.name, str(v.trainable), str(v.total), str(v.optimizer_bytes),
             *[f"{p}:{v.seconds[p]:.4g}:{v.activation_mib[p]:.1f}" for p in v.seconds]] for v in variants]
