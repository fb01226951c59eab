"""Sharded training (FSDP2, torch's ``fully_shard``) of a stage-2 system under Lightning's ``ModelParallelStrategy``.

Lightning gives the LightningModule a device mesh and leaves the sharding to ``configure_model``; this module does it:
each U-Net block (``input_blocks.*``, ``middle_block``, ``output_blocks.*``) is one FSDP unit, then the U-Net root
(its time embedding and output head), then a trainable text encoder as one unit (its gradients must be reduced too).
Parameters keep their names, so checkpoints (gathered into one file with ``save_distributed_checkpoint: false``) hold
the same keys as a single-device run's. The EMA is rebuilt over the sharded parameters, so each rank keeps the shards
of the EMA it owns and the update is local. Mixed precision is the trainer's (``precision: bf16-mixed``: fp32 master
weights and gradient reduction, bf16 compute under autocast).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Iterator

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from ldm.nets.ema import LitEma


def reshard(module: nn.Module) -> None:
    """Put every FSDP unit of ``module`` back in its sharded state (a no-op for a module that is not sharded)."""
    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


@contextmanager
def resharded(module: nn.Module, scope: AbstractContextManager) -> Iterator[object]:
    """``scope`` (e.g. the EMA swap) entered and left with every FSDP unit sharded: a unit still unsharded after a
    forward pass would neither see a swap into its shards nor gather the restored ones at its next forward."""
    reshard(module)
    with scope as value:
        try:
            yield value
        finally:
            reshard(module)

BLOCK_LISTS = ("input_blocks", "output_blocks")


def unet_units(unet: nn.Module) -> list[nn.Module]:
    """The U-Net's blocks, each one FSDP unit (the ``TimestepEmbedSequential`` steps of the original)."""
    units = [block for name in BLOCK_LISTS for block in getattr(unet, name, [])]
    return units + ([unet.middle_block] if hasattr(unet, "middle_block") else [])


def shard_system(system: nn.Module, mesh: DeviceMesh) -> bool:
    """Shard the system's trained networks over ``mesh`` (once); returns whether it sharded now."""
    unet = system.model.diffusion_model
    if isinstance(unet, FSDPModule):
        return False
    for unit in unet_units(unet):
        fully_shard(unit, mesh=mesh)
    fully_shard(unet, mesh=mesh)
    cond = system.cond_stage_model
    if any(p.requires_grad for p in cond.parameters()):
        fully_shard(cond, mesh=mesh)
    if system.model_ema is not None:  # shadows as sharded as the parameters they follow
        system.model_ema = LitEma(system.model, decay=float(system.model_ema.decay))
    return True
