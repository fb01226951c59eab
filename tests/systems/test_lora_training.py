"""LoRA fine-tuning of a toy SD file through peft: only the adapters train (the base's hash is unchanged after a step),
checkpoints hold the adapters alone and a resumed run continues them bit for bit, gradient checkpointing gives the same
gradients, bf16 trains them, and bad settings are one-line errors."""

import copy
import shutil

import pytest
import torch

from ldm.core.config import ConfigError, instantiate_from_config, load_config
from ldm.inference.loaders import build_system
from ldm.inference.pipeline import Pipeline
from ldm.inference.sd import load_sd
from ldm.io.checkpoints import EMA_PREFIX, CheckpointError, tensors_hash
from ldm.io.module_weights import params_on_meta
from ldm.nets.lora import LoRA, LoRAError, is_lora_key
from ldm.systems.latent_diffusion import LatentDiffusion
from ldm.training.driver import train
from ldm.training.sd_finetune import complete_from_base
from tests.components import tiny_components
from tests.conftest import TINY
from tests.finetune_steps import cache_batch as batch_of
from tests.finetune_steps import from_base as build
from tests.finetune_steps import loss_step as step
from tests.training.test_sd_finetune import base, overrides  # noqa: F401  (the toy SD file, its config and images)

CFG = TINY / "sd-lora.yaml"
TEXT = "model.params.lora.params.text_targets=[attn.q_proj,attn.k_proj,attn.v_proj,attn.out_proj]"
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def lora_cfg(base, *extra: str) -> dict:  # noqa: F811
    cfg = load_config(CFG, overrides(base, "lora-cache", *extra))
    complete_from_base(cfg)
    return cfg


@pytest.fixture(scope="module")
def built_text_lora(base):  # noqa: F811
    """(config, system): adapters on the U-Net's and the text encoder's attention, gradient checkpointing on, as a
    new run starts (the adapters' A drawn from seed 0); built once per module."""
    cfg = lora_cfg(base, TEXT, "model.params.unet.params.use_checkpoint=true")
    torch.manual_seed(0)  # the adapters' initial A
    return cfg, build(cfg).train()


@pytest.fixture
def text_lora(built_text_lora):
    """The module's LoRA system for a test that computes gradients but never steps an optimiser (copy it to step);
    the gradients are cleared afterwards, and its adapters checked to be as built (B = 0: never stepped)."""
    cfg, system = built_text_lora
    yield cfg, system
    system.zero_grad(set_to_none=True)
    assert not any(p.any() for n, p in system.named_parameters() if ".lora_B." in n)


def base_part(system) -> dict:
    """Everything that is not an adapter (nor the adapters' EMA)."""
    return {k: v for k, v in system.state_dict().items() if not is_lora_key(k) and not k.startswith(EMA_PREFIX)}


def test_only_the_adapters_train_and_the_base_s_hash_is_unchanged_after_a_step(base, text_lora):  # noqa: F811
    cfg, shared = text_lora
    system = copy.deepcopy(shared)  # stepped below
    reference = load_sd(base[1], base[0])  # the file as sampling loads it
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10.0, 600.0])
    with torch.no_grad():  # B starts at zero: the adapted model is the base
        context = system.cond_stage_model(["a red circle", "a zorb"])
        assert torch.equal(context, reference.cond_stage_model(["a red circle", "a zorb"]))
        assert torch.allclose(system.model(x, t, context), reference.model(x, t, context), atol=1e-6)
    trainable = [n for n, p in system.named_parameters() if p.requires_grad]
    assert trainable and all(is_lora_key(n) for n in trainable)
    adapted = {n.split(".lora_")[0] for n in trainable if n.startswith("model.diffusion_model.")}
    assert all(m.endswith(ATTENTION) for m in adapted)  # q, k, v, out of every attention layer, nothing else
    assert {m.split(".transformer_blocks.")[1].split(".")[1] for m in adapted} == {"attn1", "attn2"}
    assert any(n.startswith("cond_stage_model.") for n in trainable)  # the text encoder's attention
    assert len(system.model_ema.m_name2s_name) == sum("diffusion_model" in n for n in trainable)  # EMA: adapters only
    before = tensors_hash(base_part(system))
    optimizer = system.optimizer_settings.build(system.trainable_parameters(), None)["optimizer"]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)
    step(system, batch_of(cfg))
    assert all(p.grad is None for n, p in system.named_parameters() if not is_lora_key(n))
    optimizer.step()
    assert tensors_hash(base_part(system)) == before
    changed = [n for n, p in system.named_parameters() if ".lora_B." in n and p.abs().sum() > 0]
    assert len(changed) == sum(".lora_B." in n for n in trainable)  # every adapter moved off zero


def test_gradient_checkpointing_gives_the_adapters_the_same_gradients(base, text_lora):  # noqa: F811
    checkpointed_cfg, checkpointed = text_lora  # use_checkpoint=true
    plain_cfg = lora_cfg(base, TEXT, "model.params.unet.params.use_checkpoint=false")
    torch.manual_seed(0)  # the adapters' initial A, as the module's system drew them
    grads = {}
    for flag, cfg, system in ((True, checkpointed_cfg, checkpointed), (False, plain_cfg, build(plain_cfg).train())):
        step(system, batch_of(cfg), seed=3)
        grads[flag] = {n: p.grad.clone() for n, p in system.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and grads[True]
    assert any(n.startswith("cond_stage_model.") for n in grads[True])  # the text adapters' gradients too
    for name, grad in grads[True].items():
        torch.testing.assert_close(grad, grads[False][name], rtol=1e-4, atol=1e-6)


def test_bf16_autocast_trains_fp32_adapters(text_lora):
    cfg, system = text_lora
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = step(system, batch_of(cfg))
    assert torch.isfinite(loss)
    adapters = [p for n, p in system.named_parameters() if is_lora_key(n)]
    assert all(p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all() for p in adapters)


@pytest.mark.parametrize("settings, message", [
    (dict(rank=0), "lora rank must be at least 1"),
    (dict(dropout=1.5), "lora dropout must be in"),
    (dict(unet_targets=["to_qq"]), "unknown target 'to_qq'; choose from"),
    (dict(unet_targets=[], text_targets=[]), "no targets"),
])
def test_bad_lora_settings_are_one_line_errors(settings, message):
    with pytest.raises(LoRAError, match=message):
        LoRA(**settings)


def test_a_lora_that_cannot_apply_is_refused(base):  # noqa: F811
    with pytest.raises(ConfigError, match="cond_stage_trainable: with lora only the adapters train"), params_on_meta():
        build_system(lora_cfg(base, "model.params.cond_stage_trainable=true")["model"])  # refused as it is built
    components = tiny_components("text")  # a shapes model: its text encoder is not a CLIP tower
    system = LatentDiffusion(**components, cond_stage_trainable=False, lora=LoRA(text_targets=["attn.q_proj"]))
    with pytest.raises(LoRAError, match="not a CLIP text tower"):
        system.add_lora()
    assert isinstance(instantiate_from_config({"target": "ldm.nets.lora.LoRA", "params": {"rank": 2}}), LoRA)


@pytest.mark.slow
def test_checkpoints_hold_the_adapters_and_a_resumed_run_continues_them(base, tmp_path):  # noqa: F811
    args = ["--cfg", str(CFG), "--runs-dir", str(tmp_path / "runs"), *overrides(base, "lora-cache"), TEXT]
    straight = train("ldm", argv=[*args, "--name", "straight", "trainer.max_steps=6", "checkpoint.every_n_train_steps=3"])
    ckpt = torch.load(straight / "checkpoints" / "step0000003.ckpt", weights_only=True)  # written mid-run, mid-epoch
    keys = set(ckpt["state_dict"])
    assert keys and all(is_lora_key(k) or k.startswith(EMA_PREFIX) or k in ("scale_factor", "image_size") for k in keys)
    assert any(k.startswith("cond_stage_model.") for k in keys) and any(k.startswith(EMA_PREFIX) for k in keys)
    optimised = ckpt["optimizer_states"][0]["param_groups"][0]["params"]
    assert len(optimised) == sum(is_lora_key(k) for k in keys)  # the adapters, nothing else
    interrupted = tmp_path / "runs" / "ldm" / "interrupted"  # as if the run had been killed after step 3
    shutil.copytree(straight, interrupted)
    for later in ("last.ckpt", "step0000006.ckpt"):
        (interrupted / "checkpoints" / later).unlink()
    train("ldm", argv=["--resume", str(interrupted / "checkpoints" / "step0000003.ckpt")])
    resumed = torch.load(interrupted / "checkpoints" / "last.ckpt", weights_only=True)
    reference = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 6 and resumed["state_dict"].keys() == reference["state_dict"].keys()
    assert all(torch.equal(v, reference["state_dict"][k]) for k, v in resumed["state_dict"].items())
    assert not all(torch.equal(v, ckpt["state_dict"][k]) for k, v in resumed["state_dict"].items())
    pipe = Pipeline.from_run(interrupted, device="cpu")  # the base file + the run's EMA adapters
    assert pipe.source["ema"] and len(pipe(["a zorb"], steps=2, seed=0)) == 1
    with pytest.raises(SystemExit):  # other LoRA settings: the checkpoint does not fit, one line
        train("ldm", argv=["--resume", str(interrupted), "trainer.max_steps=7", "model.params.lora.params.rank=2"])


def test_a_lora_checkpoint_with_other_keys_is_refused(built_text_lora):
    _, system = built_text_lora  # only read
    state = system.checkpoint_state()
    state.pop(next(k for k in state if is_lora_key(k)))
    with pytest.raises(CheckpointError, match="the LoRA checkpoint does not fit the model — missing"):
        system.on_load_checkpoint({"state_dict": state})
