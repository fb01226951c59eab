"""A CPU step that holds what a GPU's would: CUDA autocast's dtypes and the flash attention kernel, on CPU tensors.

The autograd engine of torch 2.14 needs a real device to run a backward over fake CUDA tensors, so a GPU step is
counted (``ldm.bench.memory``) on fake CPU tensors under CPU autocast. CPU autocast leaves in bf16 what CUDA's runs in
fp32 (group / layer norms, upsampling), and attention on a CPU or on fake tensors takes other kernels than a GPU's
flash attention; :class:`GpuKernels` closes both gaps for the functions these networks call.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.graph import _engine_run_backward
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

LOW_PRECISION = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256  # torch's flash kernel takes heads up to this wide (sdp_utils)
UPSAMPLE_MODES = ("nearest", "nearest-exact", "linear", "bilinear", "bicubic", "trilinear")
# CUDA's autocast policy where it differs from the CPU's (ATen/autocast_mode.h: AT_FORALL_FP32,
# AT_FORALL_FP32_SET_OPT_DTYPE, AT_FORALL_LOWER_PRECISION_FP against autocast_mode.cpp's AutocastCPU list), for the
# functions these networks call: norms and upsampling run in fp32, reductions and softmax give fp32, einsum bf16.
CUDA_FP32 = frozenset({F.group_norm, F.layer_norm, F.rms_norm, F.softplus, F.cosine_similarity, torch.exp, Tensor.exp,
                       torch.log, Tensor.log, torch.rsqrt, Tensor.rsqrt, torch.pow, Tensor.pow, Tensor.__pow__,
                       torch.logsumexp, Tensor.logsumexp})
CUDA_FP32_OUTPUT = frozenset({F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, Tensor.softmax,
                              Tensor.log_softmax, torch.sum, Tensor.sum, torch.cumsum, Tensor.cumsum, torch.prod,
                              Tensor.prod})
BACKWARD = frozenset({Tensor.backward, torch.autograd.backward})
CUDA_LOWER = frozenset({torch.einsum, torch.mv, Tensor.mv, torch.addmv, torch.addr, torch.chain_matmul})


class GpuKernels(TorchFunctionMode):
    """Under CPU autocast, make each op take the dtypes CUDA's autocast would give it (``CUDA_FP32`` …), and run
    ``scaled_dot_product_attention`` as a GPU's flash kernel does for 16-bit heads: the output and a (B, H, N)
    log-sum-exp are kept for the backward, not the N×N scores (a CPU or a fake tensor would take another path)."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func in BACKWARD:
            return self._backward(args[0], **kwargs)
        if not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)
        low = torch.get_autocast_dtype("cpu")
        if func is F.scaled_dot_product_attention and kwargs.get("attn_mask") is None:
            q, k, v = (_cast(t, low) for t in args[:3])
            if q.shape[-1] <= FLASH_MAX_HEAD_DIM:
                return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q, k, v, kwargs.get("dropout_p", 0.0), kwargs.get("is_causal", False),
                    scale=kwargs.get("scale"))[0]  # (B, H, N, D)
        if func is F.interpolate and kwargs.get("mode", args[3] if len(args) > 3 else "nearest") in UPSAMPLE_MODES:
            return func(*_cast_all(args, torch.float32), **kwargs)
        if func in CUDA_FP32:
            return func(*_cast_all(args, torch.float32), **_cast_all(kwargs, torch.float32))
        if func in CUDA_FP32_OUTPUT and kwargs.get("dtype") is None and _low(args[0]):
            return func(*args, **{**kwargs, "dtype": torch.float32})
        if func in CUDA_LOWER:
            return func(*_cast_all(args, low), **_cast_all(kwargs, low))
        return func(*args, **kwargs)

    def _backward(self, loss: Tensor, **kwargs: Any) -> None:
        """``loss.backward()`` with this mode on (a mode is off inside its own handler, and checkpointing recomputes
        the forward during the backward): the autograd engine called as ``torch.autograd.backward`` calls it."""
        if loss.numel() != 1 or any(kwargs.get(k) for k in ("gradient", "grad_tensors", "retain_graph", "create_graph",
                                                             "inputs")):
            raise ValueError("GpuKernels runs the backward of a scalar loss only, without extra arguments")
        with self:
            _engine_run_backward((loss,), (torch.ones_like(loss),), False, False, (), allow_unreachable=True,
                                 accumulate_grad=True)


def _low(t: Any) -> bool:
    return isinstance(t, Tensor) and t.dtype in LOW_PRECISION


def _cast(t: Any, dtype: torch.dtype) -> Any:
    """A floating tensor (not fp64) in ``dtype``, as autocast casts an argument; anything else as it is."""
    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 and t.dtype != dtype:
        return t.to(dtype)
    return t


def _cast_all(tree: Any, dtype: torch.dtype) -> Any:
    return tree_map(lambda t: _cast(t, dtype), tree)


@contextlib.contextmanager
def gpu_like() -> Iterator[None]:
    """Run the networks as a GPU would under bf16 autocast (``GpuKernels``), with the CPU-only fp32 upcast of
    small attention products (``ldm.nets.unet.attention``) off: a GPU runs them in bf16."""
    never = lambda q, k: False  # noqa: E731 (a plain function: a Mock would keep every q and k it was called with)
    with mock.patch("ldm.nets.unet.attention._cpu_reduced_precision_training", new=never), GpuKernels():
        yield
