"""Sharded stage-2 training at toy size: Lightning's ModelParallelStrategy (torch's fully_shard, FSDP2) in two CPU
processes (gloo) trains and checkpoints the weights of the data-parallel run (DDP, the same two processes, the same
data and noise; within ADAM_TOLERANCE, see there), exports exactly its checkpoint's weights, and resumed from a
checkpoint reaches its uninterrupted weights within fp32 tolerance.

What does not run on a CPU: Lightning's FSDPStrategy (``trainer.strategy=fsdp``, FSDP1) refuses a CPU accelerator; the
GPU command is in docs/scale.md. The comparison is with DDP, not with one process: each rank draws its own noise,
so one process over the whole batch draws other noise (DDP equals one process up to that by Lightning's contract).
"""

import pytest
import torch
import yaml
from safetensors.torch import load_file as load_safetensors

from ldm.core.config import load_config
from ldm.training.cache import ensure_cache
from tests.conftest import TINY
from tests.forked import launch_forked
from tests.procs import finish
from tests.scripts import load_script

pytestmark = pytest.mark.slow
MODEL_PARALLEL = {"target": "lightning.pytorch.strategies.ModelParallelStrategy",
                  "params": {"data_parallel_size": 2, "tensor_parallel_size": 1, "save_distributed_checkpoint": False}}
STEPS_PER_EPOCH = 3  # 48 cached items, batch 8 per rank, 2 ranks
TOLERANCE = dict(rtol=1e-5, atol=1e-6)
# Sharded vs data-parallel: reduce-scatter and all-reduce sum gradients in other orders; Adam's m / (√v + ε) turns
# last-bit differences of tiny gradients (~1e-9: biases behind a zero-initialised convolution) into a fraction of a
# step (lr 1e-3). Measured after 6 steps: 3e-8 everywhere after 3 steps; then two biases of the last output block
# (and their EMA) up to 5e-5, every other tensor within 1e-6.
ADAM_TOLERANCE = dict(rtol=1e-3, atol=1e-4)


def two_process_config(tmp_path, strategy) -> str:
    cfg = yaml.safe_load((TINY / "ldm-text.yaml").read_text())
    cfg["callbacks"] = []  # sample grids draw on rank 0 alone: under sharding every rank must take part
    cfg["trainer"].update(devices=2, strategy=strategy, val_check_interval=STEPS_PER_EPOCH)
    cfg["checkpoint"] = {"every_n_train_steps": STEPS_PER_EPOCH}
    path = tmp_path / f"{'ddp' if strategy == 'ddp' else 'fsdp'}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def state(run) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


def test_fsdp_two_cpu_processes_match_ddp_through_checkpoint_export_and_resume(tiny_vae_run, tmp_path):
    data = [f"cache.vae={tiny_vae_run}", f"cache.dir={tmp_path / 'cache'}"]
    ensure_cache(load_config(TINY / "ldm-text.yaml", data))  # built once, before two processes would race for it
    runs = tmp_path / "runs"
    steps = 2 * STEPS_PER_EPOCH
    for name, strategy in (("ddp", "ddp"), ("fsdp", MODEL_PARALLEL)):
        log = tmp_path / f"{name}.log"
        finish(launch_forked("train_ldm", ["--cfg", two_process_config(tmp_path, strategy), "--runs-dir", str(runs),
                                           "--name", name, *data, f"trainer.max_steps={steps}"], log), log)
    ddp_run, fsdp_run = next((runs / "ldm").glob("ddp-*")), next((runs / "ldm").glob("fsdp-*"))
    ddp, fsdp = state(ddp_run), state(fsdp_run)  # fsdp: one file, gathered from the shards
    assert ddp["global_step"] == fsdp["global_step"] == steps
    assert ddp["state_dict"].keys() == fsdp["state_dict"].keys()
    for key, value in ddp["state_dict"].items():  # the U-Net, the text encoder and the EMA
        torch.testing.assert_close(fsdp["state_dict"][key], value, **ADAM_TOLERANCE, msg=key)

    out = tmp_path / "fsdp.safetensors"
    assert load_script("export").main([str(fsdp_run), "--out", str(out)]) == 0  # the script's own entry, here
    exported = load_safetensors(str(out))
    unet = [k for k in fsdp["state_dict"] if k.startswith("model.diffusion_model.")]
    assert unet and all(torch.equal(exported[k], fsdp["state_dict"][k]) for k in unet)

    # resumed from its end-of-epoch checkpoint, the sharded run reaches its own uninterrupted weights
    log = tmp_path / "resume.log"
    finish(launch_forked("train_ldm", ["--resume", str(fsdp_run / "checkpoints" / f"step{STEPS_PER_EPOCH:07d}.ckpt"),
                                       f"trainer.max_steps={steps}"], log), log)
    resumed = state(fsdp_run)
    assert resumed["global_step"] == steps
    for key, value in fsdp["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, **TOLERANCE, msg=key)
