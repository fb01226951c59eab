"""``torch.compile`` as an option: networks compiled in place, so state-dict keys and checkpoints are unchanged.

Training compiles the U-Net (and ControlNet) with the settings of a ``Compile`` node in a stage-2 / ControlNet
config (``compile: {target: ldm.nets.compile.Compile, params: {mode: max-autotune}}``; ``compile: true`` is short for
Inductor's defaults). Sampling (``Pipeline.compile()``, ``txt2img.py --compile``) also *freezes* the
weights: Inductor folds them in as constants and pre-packs them for oneDNN / cuDNN, which is where most of
the gain on a CPU comes from (``python scripts/bench.py --only sampling``). The first call compiles (tens of
seconds for an SD-sized U-Net on a CPU); later calls with the same shapes reuse the compiled code.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass

import torch
from torch import nn

from ldm.core.errors import UserError
from ldm.core.private_api import compiled_call, inductor_options, set_compiled_call

INDUCTOR = "inductor"  # torch.compile's default backend, the one that generates kernels
CPU_COMPILERS = ("g++", "c++", "clang++")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's modes  # Inductor's CPU backend builds C++ kernels with one of these
# Weights become constants: only for modules whose weights stay fixed. Set around each call, not passed as
# torch.compile(options=…): Dynamo decides whether parameters are constants from the global config.
INFERENCE_OPTIONS = {"freezing": True}


class CompilerUnavailableError(UserError, RuntimeError):
    """TorchInductor cannot build kernels on this machine (the message says what to install)."""


def compiler_problem(device: torch.device | str) -> str | None:
    """Why TorchInductor cannot build kernels for ``device`` here (no C++ compiler / no Triton), or None."""
    device = torch.device(device)
    if device.type == "cpu":
        names = [os.environ["CXX"]] if os.environ.get("CXX") else list(CPU_COMPILERS)
        if not any(shutil.which(name) for name in names):
            return (f"torch.compile on the CPU needs a C++ compiler ({' or '.join(names)}) and none is on PATH: "
                    "install one (e.g. `apt install g++`) or turn compile off")
    elif device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile on CUDA needs Triton (`pip install triton`, bundled with Linux CUDA wheels of torch)"
    return None


@dataclass(frozen=True)
class Compile:
    """How a training system compiles the networks it trains: ``torch.compile``'s ``mode`` (None: Inductor's
    default), ``dynamic`` shapes (None: torch decides), ``fullgraph`` (an error instead of graph breaks) and
    ``backend`` (Inductor; e.g. ``aot_eager`` traces and differentiates the graph without generating kernels: a
    quick check that a network compiles, or a way around a kernel bug)."""

    mode: str | None = None
    dynamic: bool | None = None
    fullgraph: bool = False
    backend: str = INDUCTOR

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in COMPILE_MODES:
            raise ValueError(f"compile mode {self.mode!r} is not one of torch.compile's: {', '.join(COMPILE_MODES)}")
        if self.mode is not None and self.backend != INDUCTOR:
            raise ValueError(f"compile mode {self.mode!r} is Inductor's: leave it out with backend {self.backend!r}")

    def apply(self, module: nn.Module, device: torch.device | str) -> nn.Module:
        """Compile ``module`` in place for training on ``device`` (once; keys unchanged)."""
        if is_compiled(module):
            return module
        return compile_network(module, device, backend=self.backend, mode=self.mode, dynamic=self.dynamic,
                               fullgraph=self.fullgraph)


def compile_network(module: nn.Module, device: torch.device | str, inference: bool = False,
                    backend: str = INDUCTOR, **options) -> nn.Module:
    """Compile ``module`` in place for ``device`` (keys unchanged) with ``backend``; ``inference`` freezes its
    weights as constants (Inductor); ``options`` go to ``torch.compile`` (mode, dynamic, fullgraph).

    A frozen module must not change its weights afterwards (no training, no EMA swaps, no ``.to(dtype)``):
    compile the modules of a finished pipeline, after moving them.
    """
    problem = compiler_problem(device) if backend == INDUCTOR else None  # other backends build no kernels
    if problem is not None:
        raise CompilerUnavailableError(problem)
    module.compile(backend=backend, **options)
    if inference:
        compiled = compiled_call(module)

        def call_frozen(*args, **kwargs):  # Dynamo reads `freezing` from the global config when it traces
            with inductor_options(INFERENCE_OPTIONS):
                return compiled(*args, **kwargs)

        set_compiled_call(module, call_frozen)
    return module


def is_compiled(module: nn.Module) -> bool:
    """True once ``module.compile()`` has been called on it."""
    return compiled_call(module) is not None
