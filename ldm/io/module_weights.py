"""Giving a built module a checkpoint's tensors: strictly by copy (``load_strict``), or by assignment into a module
built without weights (``params_on_meta``: parameters on the meta device, no random init) with ``load_assign``, so
nothing is initialised only to be overwritten and no weight is held twice. Key reports: ``ldm.io.checkpoints``.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Mapping

import torch

from ldm.io.checkpoints import CheckpointError, fit_report, key_listing

INIT_FUNCTIONS = tuple(n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_"))  # normal_, …


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str,
                ignore: Iterable[str] = (), assign: bool = False) -> None:
    """Load every parameter and buffer of ``module`` or raise a report of what does not fit.

    ``ignore`` lists key prefixes of the file that are expected and skipped (e.g. ``loss.``). ``assign``: the module
    was built with ``params_on_meta`` (a finished run's weights, no random init): it takes the file's tensors, each
    in the dtype it was built with (``load_assign`` + ``built_dtypes``), as loading into a built module gives them.
    """
    ignore = tuple(ignore)
    state_dict = {k: v for k, v in state_dict.items() if not (ignore and k.startswith(ignore))}
    if assign:
        load_assign(module, state_dict, what, dtype_for=built_dtypes(module))
        return
    fit_report({k: v.shape for k, v in module.state_dict().items()}, state_dict, what)
    module.load_state_dict(state_dict, strict=True)


DtypeRule = Callable[[str, torch.Tensor], "torch.dtype | None"]


def built_dtypes(module: torch.nn.Module) -> DtypeRule:
    """A ``load_assign`` rule: each tensor in the dtype of the module's own (meta) tensor of that name, as
    ``load_state_dict`` copying into a built module casts it (a bf16 file into an fp32 model gives fp32)."""
    dtypes = {k: v.dtype for k, v in module.state_dict(keep_vars=True).items()}
    return lambda key, tensor: dtypes.get(key)


def load_assign(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str,
                device: str | torch.device | None = None, dtype_for: DtypeRule | None = None,
                hint: str = "", entries: Mapping[str, torch.Tensor] | None = None) -> None:
    """Strictly load ``state_dict`` into a module built with ``params_on_meta`` (or any), without a second copy.

    After the report, each tensor is moved to ``device`` and cast to ``dtype_for(key, tensor)`` (None: keep)
    and the module takes it as its own (``assign=True``). Entries are popped from ``state_dict`` as they go,
    so the file's copy of a tensor is freed as soon as its converted copy exists. ``entries``: the state entries
    the file must hold when it holds only some of the module's (a LoRA run's adapters; the rest already loaded).
    """
    own = module.state_dict() if entries is None else entries
    fit_report({k: v.shape for k, v in own.items()}, state_dict, what, hint)
    converted = {}
    for key in list(state_dict):
        tensor = state_dict.pop(key)
        dtype = dtype_for(key, tensor) if dtype_for is not None else None
        converted[key] = tensor.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else tensor
    module.load_state_dict(converted, strict=entries is None, assign=True)
    left = meta_tensor_names(module)
    if left:
        raise CheckpointError(f"{what}: {len(left)} tensor(s) of the model were never given values — "
                              + key_listing([("left empty", left)]))


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Build modules inside with their parameters on the meta device (no memory) and their buffers real.

    Non-persistent buffers (causal masks, noise-schedule tables) are computed in constructors and never
    stored in checkpoints, so they must be real; parameters come later from the checkpoint via
    ``load_assign``. An initialiser (``torch.nn.init``) given a meta tensor returns it at once, so building costs
    less than building with random weights even at toy size (a meta kernel per init is not free). Not thread-safe:
    it swaps ``nn.Module.register_parameter`` and the ``torch.nn.init`` functions while active.
    """
    original = torch.nn.Module.register_parameter

    def register_on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = type(param)(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        with wrapped_initialisers(lambda _, initialiser: _skipped_on_meta(initialiser)):
            yield
    finally:
        torch.nn.Module.register_parameter = original


@contextmanager
def wrapped_initialisers(wrap: Callable[[str, Callable], Callable]) -> Iterator[None]:
    """Inside, each ``torch.nn.init`` function (``INIT_FUNCTIONS``) is ``wrap(name, function)``; restored after."""
    originals = {name: getattr(torch.nn.init, name) for name in INIT_FUNCTIONS}
    for name, initialiser in originals.items():
        setattr(torch.nn.init, name, wrap(name, initialiser))
    try:
        yield
    finally:
        for name, initialiser in originals.items():
            setattr(torch.nn.init, name, initialiser)


def _skipped_on_meta(initialiser: Callable) -> Callable:
    """``initialiser`` (e.g. ``torch.nn.init.kaiming_uniform_``), returning a meta tensor untouched."""

    @functools.wraps(initialiser)
    def init(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return tensor if tensor.is_meta else initialiser(tensor, *args, **kwargs)

    return init


def meta_tensor_names(module: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``module`` still on the meta device."""
    named = [*module.named_parameters(), *module.named_buffers()]
    return sorted(name for name, t in named if t is not None and t.is_meta)
