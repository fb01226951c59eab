"""The memory count of a training step (ldm.bench.memory) against the CPU allocator and against CUDA's own autocast,
and the SDXL build on fake tensors (ldm.bench.lora_memory) that allocates nothing. The checks that step or build
models are in the slow tier, with the benchmark they measure for."""

from __future__ import annotations

import contextlib
import json
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ldm.bench.gpu_like import gpu_like
from ldm.bench.lora_memory import DTYPES, Setup, adamw_with_state, build, measure
from ldm.bench.memory import (
    ACTIVATIONS,
    ADAPTERS,
    CUDA_BLOCK,
    OPTIMIZER,
    WEIGHTS,
    LiveBytes,
    fake_tensor_mode,
    step_peak,
    tag_module,
    tag_optimizer,
    to_fake,
)
from ldm.bench.timing import MEMORY_EVENT
from ldm.inference.sd import SD_CONFIG_DIR, build_sd
from ldm.io.module_weights import params_on_meta
from ldm.nets.lora import LoRA
from tests.bench.memory_toy import toy_config
from tests.paths import REPO_ROOT
from tests.scripts import load_script

SDXL = SD_CONFIG_DIR / "xl-base-inference.yaml"
TOY_BATCH, TOY_SIDE, TOY_CONTEXT = 2, 32, 64  # tests/sdxl_toy's U-Net: 64-wide context


def toy_unet(checkpointing: bool, fake: bool):
    """The toy U-Net with rank-4 LoRA on its attention, frozen weights bf16: real, or fake from a meta build."""
    cfg = toy_config()
    cfg["model"]["params"]["unet"]["params"]["use_checkpoint"] = checkpointing
    torch.manual_seed(0)
    unet = build_sd(cfg, on_meta=fake).model.diffusion_model
    with params_on_meta() if fake else contextlib.nullcontext():
        LoRA(rank=4, alpha=4).apply(unet, None)
    mode = fake_tensor_mode() if fake else None
    if fake:
        to_fake(unet, mode, torch.device("cpu"), torch.bfloat16)
    else:
        for p in unet.parameters():
            p.data = p.data if p.requires_grad else p.data.bfloat16()
    return unet, mode


def toy_step_peak(checkpointing: bool, fake: bool) -> tuple[int, int | None]:
    """(the count's peak above the start of a toy LoRA step, the CPU allocator's peak for it; None on fake tensors)."""
    unet, mode = toy_unet(checkpointing, fake)
    tracker = LiveBytes()
    tag_module(tracker, unet)
    with mode or contextlib.nullcontext(), gpu_like():
        x, target = torch.randn(TOY_BATCH, 4, TOY_SIDE, TOY_SIDE), torch.randn(TOY_BATCH, 4, TOY_SIDE, TOY_SIDE)
        t, context, y = torch.randint(0, 1000, (TOY_BATCH,)), torch.randn(TOY_BATCH, 77, TOY_CONTEXT), torch.randn(
            TOY_BATCH, unet.adm_in_channels)
        for v in (x, t, context, y, target):
            tracker.tag(v, ACTIVATIONS)
        optimizer = adamw_with_state([p for p in unet.parameters() if p.requires_grad])
        tag_optimizer(tracker, optimizer)
        start = tracker.live

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = unet(x, t, context, y)
            F.mse_loss(out.float(), target).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        if fake:
            return step_peak(step, optimizer, tracker, steps=1).peak - start, None
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            counted = step_peak(step, optimizer, tracker, steps=1).peak - start
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == MEMORY_EVENT
                     and e.device_type() == torch.autograd.DeviceType.CPU), key=lambda e: e.start_ns())
    live = allocated = 0
    for event in events:
        live += event.nbytes()
        allocated = max(allocated, live)
    return counted, allocated


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing, tolerance", [(False, 0.02), (True, 0.15)])
def test_the_count_of_a_real_step_is_what_the_cpu_allocator_allocates_and_fake_tensors_count_the_same(
        checkpointing, tolerance):
    counted, allocated = toy_step_peak(checkpointing, fake=False)
    # The allocator also holds what kernels allocate outside the dispatcher (workspaces, checkpointing's RNG states).
    assert allocated * (1 - tolerance) <= counted <= allocated
    fake, _ = toy_step_peak(checkpointing, fake=True)
    assert fake == pytest.approx(counted, rel=0.01)


def test_to_fake_keeps_parameters_trainability_and_ties_with_the_dtypes_asked():
    with torch.device("meta"):
        net = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10), torch.nn.BatchNorm1d(10))
    net[1].weight = net[0].weight  # tied (a text model's embedding and its output layer)
    net[2].requires_grad_(False)
    to_fake(net, fake_tensor_mode(), torch.device("cpu"), torch.bfloat16)
    params = dict(net.named_parameters())
    assert set(params) == {"0.weight", "1.bias", "2.weight", "2.bias"} and net[1].weight is net[0].weight
    assert all(isinstance(p, torch.nn.Parameter) and isinstance(p, FakeTensor) for p in params.values())
    assert {n: (p.requires_grad, p.dtype) for n, p in params.items()} == {
        "0.weight": (True, torch.float32), "1.bias": (True, torch.float32),
        "2.weight": (False, torch.bfloat16), "2.bias": (False, torch.bfloat16)}
    assert net[2].running_mean.dtype == torch.bfloat16 and net[2].num_batches_tracked.dtype == torch.int64
    assert not net[2].running_mean.requires_grad and all(p.device.type == "cpu" for p in params.values())


class OpLog(TorchDispatchMode):
    """Every op's name and its outputs' dtypes and shapes."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__.removesuffix("_for_cpu")
        outs = [(t.dtype, tuple(t.shape)) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if outs:  # (``prim.device`` queries make none)
            self.ops.append((name, outs[:2] if name == "_scaled_dot_product_flash_attention" else outs))
        return out


class CudaFlash(TorchFunctionMode):
    """scaled_dot_product_attention → CUDA's flash op, as a GPU picks it (fake CUDA tensors cannot pick)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return torch.ops.aten._scaled_dot_product_flash_attention(*args[:3])[0]
        return func(*args, **(kwargs or {}))


def forward_ops(device: str) -> list:
    """The ops of a toy U-Net forward under bf16 autocast: CUDA's own (fake CUDA tensors), or ``gpu_like`` on CPU."""
    unet = build_sd(toy_config(), on_meta=True).model.diffusion_model
    with params_on_meta():
        LoRA(rank=4, alpha=4).apply(unet, None)
    mode = fake_tensor_mode()
    to_fake(unet, mode, torch.device(device), torch.float32)
    cuda = device == "cuda"
    no_gpu_check = (mock.patch("torch.cuda.amp.common.amp_definitely_not_available", return_value=False),
                    mock.patch("torch.cuda.is_bf16_supported", return_value=True)) if cuda else ()
    log = OpLog()
    with mode, contextlib.ExitStack() as stack:
        for patch in no_gpu_check:
            stack.enter_context(patch)
        stack.enter_context(CudaFlash() if cuda else gpu_like())
        inputs = (torch.randn(1, 4, 8, 8, device=device), torch.randint(0, 1000, (1,), device=device),
                  torch.randn(1, 77, TOY_CONTEXT, device=device), torch.randn(1, unet.adm_in_channels, device=device))
        with torch.autocast(device, dtype=torch.bfloat16), log:
            unet(*inputs)
    return log.ops


@pytest.mark.slow
def test_gpu_like_gives_every_op_the_dtype_cudas_own_autocast_gives_it():
    cuda, emulated = forward_ops("cuda"), forward_ops("cpu")
    assert any(name == "native_group_norm" and outs[0][0] == torch.float32 for name, outs in cuda)  # fp32 norms
    assert emulated == cuda


@pytest.mark.slow
def test_the_sdxl_model_is_built_on_fake_tensors_without_allocating_and_has_the_public_parameter_count():
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        unet, text, _ = build(SDXL, Setup(text="gpu", base="bf16", rank=16))
    allocated = sum(e.nbytes() for e in prof.profiler.kineto_results.events()
                    if e.name() == MEMORY_EVENT and e.nbytes() > 0)
    assert allocated < 2**16  # in all, over the whole build: a few scalars, not a parameter (SDXL's: 7 GB in bf16)
    tensors = [*unet.parameters(), *unet.buffers(), *text.parameters(), *text.buffers()]
    assert all(isinstance(t, FakeTensor) for t in tensors)
    reference = json.loads((REPO_ROOT / "shared" / "reference" / "sdxl_unet.json").read_text())["parameters"]
    frozen = [p for p in unet.parameters() if not p.requires_grad]
    assert sum(p.numel() for p in frozen) == reference and {p.dtype for p in frozen} == {torch.bfloat16}
    # rank 16 on q, k, v, out: 10 blocks 640 wide, 60 blocks 1280 wide; r·(in + out) per Linear, context 2048
    per_block = {width: 16 * (8 * width + 4 * width + 2 * (2048 + width)) for width in (640, 1280)}
    adapters = [p for p in unet.parameters() if p.requires_grad]
    assert sum(p.numel() for p in adapters) == 10 * per_block[640] + 60 * per_block[1280] == 23_224_320
    assert {p.dtype for p in adapters} == {torch.float32}


@pytest.mark.slow
def test_a_toy_step_splits_its_peak_by_kind_and_checkpointing_lowers_it():
    config = toy_config()  # a config dict: checkpointing is set on it as on a file's (the SDXL test builds a file)
    setups = {ckpt: Setup(batch=2, checkpointing=ckpt, size=32, rank=4) for ckpt in (True, False)}
    peaks = {ckpt: measure(config, setup) for ckpt, setup in setups.items()}
    # rank 4 on q, k, v, out of 4 blocks 64 wide (one at level 2 in, middle, two out), context 64: r·(in + out) each
    adapters = 4 * 4 * (8 * 64 + 4 * 64 + 2 * (TOY_CONTEXT + 64))
    for peak in peaks.values():
        assert sum(peak.by_kind.values()) == peak.peak
        assert peak.by_kind[WEIGHTS] > 0 and peak.by_kind[ADAPTERS] == 4 * adapters  # fp32
        # AdamW: exp_avg and exp_avg_sq like each adapter, and its step count, one 512-byte block each (fused, on GPU):
        # 64 adapter tensors (A and B of 8 Linears in each of the 4 blocks)
        assert peak.by_kind[OPTIMIZER] == 2 * peak.by_kind[ADAPTERS] + CUDA_BLOCK * 4 * 8 * 2
    assert peaks[True].peak < peaks[False].peak
    assert peaks[True].by_kind[WEIGHTS] == peaks[False].by_kind[WEIGHTS]


# scripts/bench_memory.py's table (one row per configuration, all 8 by default): tests/bench/tables.py, checked on the
# one run of README's command (tests/test_readme.py::test_readme_benchmark_runs, on tests/bench/memory_toy's config).


def test_bad_size_is_a_one_line_error_and_the_choices_are_the_library_s(tmp_path):
    script = load_script("bench_memory")
    with pytest.raises(SystemExit, match="multiple of 8"):
        script.main(["--size", "100", "--out", str(tmp_path)])
    assert set(script.BASES) == set(DTYPES) and script.SDXL_CONFIG == SDXL
