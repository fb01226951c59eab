"""Peak memory of a training step without the device: the bytes of live tensor storages, by kind, counted op by op.

:class:`LiveBytes` is a ``TorchDispatchMode`` that sees every tensor an op makes, adds its storage's bytes, and
takes them away when the storage dies (a weak reference's callback); its peak is the most bytes live after any op.
Under torch's ``FakeTensorMode`` (``to_fake``) the same count runs on tensors without data, so a full-size model is
counted on a CPU in seconds with nothing allocated. Each storage has a kind — frozen weights, trained adapters,
optimiser state, gradients, activations (everything an op made: saved tensors, temporaries, outputs) — so the peak
is broken down. torch's own ``MemTracker`` does the same count, but (torch 2.14) hooks every parameter's gradient and
fails on frozen ones, as a LoRA fine-tune has. ``block`` rounds each storage as CUDA's caching allocator does;
``ldm.bench.gpu_like`` makes the ops take the dtypes and kernels a GPU would.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

WEIGHTS, ADAPTERS, OPTIMIZER, GRADIENTS, ACTIVATIONS = "weights", "adapters", "optimizer", "gradients", "activations"
KINDS = (WEIGHTS, ADAPTERS, OPTIMIZER, GRADIENTS, ACTIVATIONS)
CUDA_BLOCK = 512  # bytes: the CUDA caching allocator rounds every block up to this (kMinBlockSize)


@dataclass(frozen=True)
class MemoryPeak:
    """The most bytes live at once, and how they split by kind at that moment."""

    peak: int
    by_kind: dict[str, int]


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every live tensor storage by kind, and the peak; ``block``: allocation granularity
    (``CUDA_BLOCK`` for a GPU, 1 for exact bytes). Tensors made outside the mode count once ``tag``-ged."""

    def __init__(self, block: int = 1):
        super().__init__()
        self.block = block
        self._live: dict[int, tuple[int, str]] = {}  # id(storage) → (bytes, kind)
        self._refs: dict[int, weakref.ref] = {}
        self._totals = dict.fromkeys(KINDS, 0)
        self._peak = MemoryPeak(0, dict.fromkeys(KINDS, 0))

    @property
    def live(self) -> int:
        """Bytes live now."""
        return sum(self._totals.values())

    @property
    def peak(self) -> MemoryPeak:
        """The peak since the mode was made."""
        return self._peak

    def live_by_kind(self) -> dict[str, int]:
        """Bytes live now, by kind."""
        return dict(self._totals)

    def tag(self, tensor: Tensor, kind: str) -> None:
        """Count ``tensor``'s storage as ``kind`` (adding it if it is not counted yet)."""
        if kind not in KINDS:
            raise ValueError(f"unknown memory kind {kind!r}; choose from {', '.join(KINDS)}")
        self._add(tensor.untyped_storage(), kind)
        self._update_peak()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self._add(t.untyped_storage(), None)
        self._update_peak()
        return out

    def _bytes(self, storage: torch.UntypedStorage) -> int:
        return math.ceil(storage.nbytes() / self.block) * self.block

    def _add(self, storage: torch.UntypedStorage, kind: str | None) -> None:
        """Count a storage (an activation unless ``kind``); a counted one keeps its kind unless re-tagged."""
        key = id(storage)
        old = self._live.get(key)
        if old is not None:
            self._totals[old[1]] -= old[0]
        new_kind = kind or (old[1] if old is not None else ACTIVATIONS)
        size = self._bytes(storage)
        self._live[key] = (size, new_kind)
        self._totals[new_kind] += size
        if key not in self._refs:
            self._refs[key] = weakref.ref(storage, lambda _, key=key: self._free(key))

    def _free(self, key: int) -> None:
        size, kind = self._live.pop(key)
        del self._refs[key]
        self._totals[kind] -= size

    def _update_peak(self) -> None:
        live = self.live
        if live > self._peak.peak:
            self._peak = MemoryPeak(live, self.live_by_kind())


def fake_tensor_mode() -> FakeTensorMode:
    """A fake-tensor mode that accepts real CPU inputs (token ids from a tokenizer)."""
    return FakeTensorMode(allow_non_fake_inputs=True)


def to_fake(module: nn.Module, mode: FakeTensorMode, device: torch.device, frozen_dtype: torch.dtype,
            trained_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Give every parameter and buffer of ``module`` (built on the meta device, or real) an empty fake tensor of its
    shape on ``device``: frozen parameters and float buffers in ``frozen_dtype``, trained ones in ``trained_dtype``.
    Shared parameters stay shared; nothing is allocated. In place; returns ``module``."""
    made: dict[int, Tensor] = {}

    def fake(t: Tensor, dtype: torch.dtype, param: bool = False) -> Tensor:
        if id(t) not in made:
            with mode:
                made[id(t)] = torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device=device,
                                          requires_grad=param and t.requires_grad)
            if param:  # what nn.Parameter makes of a tensor subclass, without its detach through the fake mode
                made[id(t)]._is_param = True
        return made[id(t)]

    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = fake(p, trained_dtype if p.requires_grad else frozen_dtype, param=True)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = fake(b, frozen_dtype)
    return module


def tag_module(tracker: LiveBytes, module: nn.Module) -> None:
    """Count a module's parameters and buffers: trained ones as adapters, the rest as weights."""
    for p in module.parameters():
        tracker.tag(p, ADAPTERS if p.requires_grad else WEIGHTS)
    for b in module.buffers():
        tracker.tag(b, WEIGHTS)


def tag_gradients(tracker: LiveBytes, params: list[nn.Parameter]) -> list[Any]:
    """Count each parameter's gradient as a gradient once it is accumulated; returns the hook handles."""
    return [p.register_post_accumulate_grad_hook(lambda p: tracker.tag(p.grad, GRADIENTS)) for p in params]


def tag_optimizer(tracker: LiveBytes, optimizer: torch.optim.Optimizer) -> None:
    """Count an optimiser's state tensors (AdamW: exp_avg, exp_avg_sq, step) as optimiser state."""
    for state in optimizer.state.values():
        for t in state.values():
            if isinstance(t, Tensor):
                tracker.tag(t, OPTIMIZER)


def step_peak(step: Callable[[], None], optimizer: torch.optim.Optimizer, tracker: LiveBytes,
              steps: int = 1) -> MemoryPeak:
    """Peak of ``steps`` calls of ``step`` under ``tracker`` (weights already tagged); the optimiser's state is
    tagged before (when it exists) and after each step."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    handles = tag_gradients(tracker, params)
    tag_optimizer(tracker, optimizer)
    try:
        with tracker:
            for _ in range(steps):
                step()
                tag_optimizer(tracker, optimizer)
    finally:
        for handle in handles:
            handle.remove()
    return tracker.peak
