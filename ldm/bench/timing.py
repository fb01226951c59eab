"""Timing, peak memory, FLOP counting and matmul peak: the measuring instruments of the benchmark."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

MEMORY_EVENT = "[memory]"  # the profiler's name for an allocation (+bytes) or a free (−bytes)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on an accelerator (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paired_medians(
    fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternation (A, B, A, B, …) after ``warmup`` calls each.

    Alternating spreads the load of a shared, noisy machine evenly over the functions compared.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int, warmup: int, repeats: int) -> float:
    """FLOP/s of an n×n @ n×n matmul in ``dtype`` (2n³ FLOPs): this machine's practical peak."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = paired_medians({"mm": lambda: torch.mm(a, b)}, device, warmup, repeats)["mm"]
    return 2 * n**3 / seconds


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (matmuls, convolutions, attention; forward and backward) by PyTorch's counter."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated during one call of ``fn`` above what was allocated before it.

    CUDA: the caching allocator's statistics. CPU: the running sum of the profiler's allocation events.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == MEMORY_EVENT
              and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak
