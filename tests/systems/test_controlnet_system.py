"""Stage 3 at toy size: a ControlLDM on a toy stage-2 run (written from in-memory components, tests/components.py)
or a toy SD file starts as its base, trains only the ControlNet, reads hints from the cache, runs end to end through
the driver (slow tier), resumes and exports."""

import copy
import warnings

import pytest
import torch
from safetensors.torch import load_file as load_safetensors

from ldm.core.config import instantiate_from_config, load_config, save_config
from ldm.data.latents import CacheError, LatentDataset
from ldm.data.shapes import ShapesDataset
from ldm.inference.loaders import build_system
from ldm.inference.sd import load_component, load_sd
from ldm.inference.sd_control import controlnet_from_sd, sampling_model
from ldm.io.checkpoints import CONTROL_PREFIX, UNET_PREFIX, load_file, state_dict_of
from ldm.io.lineage import pinned_path
from ldm.io.module_weights import load_strict, params_on_meta
from ldm.io.runs import checkpoint_for, run_config
from ldm.nets.controlnet import COPIED_FROM_UNET
from ldm.systems.controlnet import ControlLDM
from ldm.training.cache import ensure_cache
from ldm.training.controlnet_base import complete_model_node, load_base_weights, prepare_controlnet
from ldm.training.driver import train
from tests.components import write_vae_run
from tests.conftest import TINY
from tests.sd_toy import ema_unet_state, public_state, tiny_config, tiny_system

CFG = TINY / "controlnet.yaml"
BASE_PARTS = ("model.", "cond_stage_model.", "first_stage_model.")


def overrides(toy_ldm_run, toy_vae_run, workdir) -> list[str]:
    return [f"model.params.base={toy_ldm_run}", f"cache.vae={toy_vae_run}",
            f"cache.dir={workdir / 'cache' / 'tiny-canny'}"]


@pytest.fixture(scope="module")
def cfg(toy_ldm_run, toy_vae_run, workdir):
    """The tiny ControlNet config completed from the tiny stage-2 run, its hint cache built."""
    cfg = load_config(CFG, overrides(toy_ldm_run, toy_vae_run, workdir))
    prepare_controlnet(cfg, str(CFG))
    return cfg


@pytest.fixture(scope="module")
def base(toy_ldm_run):
    """The stage-2 model as sampling uses it: its checkpoint, EMA weights in the U-Net."""
    system = build_system(run_config(toy_ldm_run)["model"])
    load_strict(system, state_dict_of(load_file(checkpoint_for(toy_ldm_run))), "base")
    system.model_ema.copy_to(system.model)
    return system.eval()


def build(cfg, **params) -> ControlLDM:
    node = {**cfg["model"], "params": {**cfg["model"]["params"], **params}}
    system = build_system(node)
    load_base_weights(system)
    return system


@pytest.fixture(scope="module")
def initial(cfg):
    """The ControlLDM as a new run builds it (nothing trained yet), built once: tests read it or step a copy."""
    return build(cfg).eval()


def batch_of(cfg, n=4) -> dict:
    data = LatentDataset(cfg["cache"]["dir"], "train")
    return torch.utils.data.default_collate([data[i] for i in range(n)])


def inputs(n=2, seed=0, size=8, factor=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, size, size, generator=g), torch.tensor([10.0, 700.0][:n]),
            torch.rand(n, 3, size * factor, size * factor, generator=g))


def test_completed_config_pins_the_base_and_spells_out_the_model(cfg, toy_ldm_run):
    params = cfg["model"]["params"]
    assert params["base"] == str(toy_ldm_run.resolve() / "checkpoints" / "last.ckpt")  # the exact checkpoint
    base_params = run_config(toy_ldm_run)["model"]["params"]
    assert params["unet"] == base_params["unet"] and params["cond_stage"] == base_params["cond_stage"]
    assert params["first_stage"] == str(pinned_path(base_params["first_stage"], "vae"))  # pinned too
    control = params["control_stage"]["params"]
    assert control["downsampling_factor"] == 2 and control["model_channels"] == base_params["unet"]["params"]["model_channels"]


def test_at_initialisation_the_controlled_model_is_the_base(initial, base):
    system = initial  # only read
    unet, control = system.model.diffusion_model, system.control_model
    for key, value in base.model.state_dict().items():  # the base's EMA U-Net
        assert torch.equal(system.model.state_dict()[key], value), key
    assert torch.equal(system.scale_factor, base.scale_factor)
    for name in COPIED_FROM_UNET:
        if getattr(unet, name) is None:
            continue
        ours, theirs = getattr(control, name).state_dict(), getattr(unet, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) and ours[k].data_ptr() != theirs[k].data_ptr() for k in ours)
    x, t, hint = inputs()
    with torch.no_grad():
        context = base.cond_stage_model(["a red circle on a blue background", "a green square"])
        expected = base.model(x, t, context)
        assert torch.equal(system.network()(x, t, context=context, hint=hint), expected)
        assert torch.equal(sampling_model(system, strength=0.7, guess_mode=True)(x, t, context, hint=hint), expected)


def test_a_training_step_trains_the_controlnet_only(cfg, initial, base):
    system = copy.deepcopy(initial).train()  # stepped below
    unet = system.model.diffusion_model
    trainable = {id(p) for p in system.trainable_parameters()}
    assert trainable == {id(p) for p in system.control_model.parameters()}
    assert not any(p.requires_grad for p in [*unet.parameters(), *system.cond_stage_model.parameters()])
    before = {k: v.clone() for k, v in system.state_dict().items() if k.startswith(BASE_PARTS)}
    opt = torch.optim.AdamW(system.trainable_parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        loss = system.training_step(batch_of(cfg), 0)
    loss.backward()
    assert all(p.grad is None for p in [*unet.parameters(), *system.cond_stage_model.parameters()])
    assert system.control_model.zero_convs[0][0].weight.grad.abs().sum() > 0
    opt.step()
    after = system.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert system.control_model.zero_convs[0][0].weight.abs().sum() > 0  # the ControlNet did learn
    x, t, hint = inputs(seed=3)
    with torch.no_grad():  # now the hint steers the model; scale 0 gives the base back
        context = base.cond_stage_model(["a red circle", "a green square"])
        assert not torch.allclose(system.network()(x, t, context=context, hint=hint), base.model(x, t, context))
        assert torch.equal(sampling_model(system, strength=0.0)(x, t, context, hint=hint), base.model(x, t, context))


def test_sd_unlocked_also_trains_the_decoder_half(cfg):
    system = build(cfg, sd_locked=False, ema={"target": "ldm.nets.ema.EMA"})
    unet = system.model.diffusion_model
    decoder = [*unet.output_blocks.parameters(), *unet.out.parameters()]
    assert {id(p) for p in system.trainable_parameters()} == {id(p) for p in [*system.control_model.parameters(), *decoder]}
    assert not any(p.requires_grad for p in [*unet.input_blocks.parameters(), *unet.middle_block.parameters()])
    assert len(system.model_ema.m_name2s_name) == len(decoder)  # public model_ema.* names for the decoder
    assert len(system.control_ema.m_name2s_name) == len(list(system.control_model.parameters()))
    node = {**cfg["model"], "params": {**cfg["model"]["params"], "control_scales": [1.0, 1.0]}}
    with pytest.raises(ValueError, match="control_scales has 2 entries"), params_on_meta():  # refused as it is built
        build_system(node, load_first_stage=False)


def test_hints_come_from_the_cache(cfg):
    item = LatentDataset(cfg["cache"]["dir"], "train")[5]
    source = ShapesDataset(**cfg["cache"]["data"]["train"]["params"])[5]
    assert item["hint"].shape == (3, 16, 16) and torch.equal(item["hint"], source["hint"])


def test_a_cache_without_hints_is_refused_with_the_command(toy_ldm_run, toy_vae_run, workdir):
    stage2 = run_config(toy_ldm_run)
    ensure_cache(stage2)  # the stage-2 run's cache: latents and captions, no hints
    stage2_cache = stage2["cache"]["dir"]
    cfg = load_config(CFG, [*overrides(toy_ldm_run, toy_vae_run, workdir), f"cache.dir={stage2_cache}"])
    with pytest.raises(CacheError, match="has no hints.*stages/cache_latents.py --cfg"):
        prepare_controlnet(cfg, str(CFG))


@pytest.mark.slow
def test_tiny_config_trains_end_to_end_resumes_and_exports(toy_ldm_run, toy_vae_run, workdir, cfg, base,
                                                           monkeypatch, tmp_path):
    import ldm.data.edges

    def no_canny(*args, **kwargs):
        raise AssertionError("training recomputed an edge map")

    monkeypatch.setattr(ldm.data.edges, "canny", no_canny)  # the cache exists (fixture): hints are read
    argv = ["--cfg", str(CFG), "--runs-dir", str(workdir / "runs"), *overrides(toy_ldm_run, toy_vae_run, workdir)]
    run = train("controlnet", str(CFG), argv, before_build=prepare_controlnet)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    state = ckpt["state_dict"]
    optimised = ckpt["optimizer_states"][0]["param_groups"][0]["params"]
    assert len(optimised) == sum(k.startswith(CONTROL_PREFIX) for k in state)  # the ControlNet's, nothing else
    for key, value in base.state_dict().items():
        if key.startswith(BASE_PARTS):
            assert torch.equal(state[key], value), key  # the base, as it was
    assert list((run / "samples").glob("controlnet-val-step*.png"))
    assert list((run / "samples").glob("controlnet-train-step*.png"))

    train("controlnet", str(CFG), ["--resume", str(run), "trainer.max_steps=4"], before_build=prepare_controlnet)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4

    from scripts.export import main as export

    out = tmp_path / "control.safetensors"
    assert export([str(run), "--out", str(out), "--controlnet-only"]) == 0
    exported = load_safetensors(str(out))
    assert exported and all(k.startswith(CONTROL_PREFIX) for k in exported)
    system = build_system(run_config(run)["model"], load_first_stage=False)
    load_component(system.control_model, out, "controlnet")
    final = state_dict_of(load_file(run / "checkpoints" / "last.ckpt"))
    assert all(torch.equal(v, final[CONTROL_PREFIX + k]) for k, v in system.control_model.state_dict().items())


def test_a_controlnet_on_a_stable_diffusion_file(tmp_path):
    sd = tiny_system("v1-inference", seed=2)
    ckpt, config = tmp_path / "sd.safetensors", tmp_path / "sd.yaml"
    from safetensors.torch import save_file

    state = public_state(sd)
    save_file(state, str(ckpt))
    save_config(tiny_config("v1-inference"), config)
    node = complete_model_node({"target": "ldm.systems.controlnet.ControlLDM",
                                "params": {"base_ckpt": str(ckpt), "base_config": str(config)}})
    system = build_system(node)
    info = load_base_weights(system)
    assert info["ema"] and info["text_encoder"] == "hf-clip"
    unet_state = system.model.diffusion_model.state_dict()
    assert all(torch.equal(unet_state[k], v) for k, v in ema_unet_state(state).items())
    reference = load_sd(config, ckpt)
    from_sd = controlnet_from_sd(reference).state_dict()  # tool_add_control.py's copy, as ldm.inference.sd_control makes it
    ours = system.control_model.state_dict()
    copied = [k for k in ours if k.split(".")[0] in COPIED_FROM_UNET]
    assert copied and all(torch.equal(ours[k], from_sd[k]) for k in copied)
    x, t, hint = inputs(seed=1)
    system.eval()
    with torch.no_grad():
        context = reference.cond_stage_model(["a photograph of a cat", "edges"])
        assert torch.equal(system.cond_stage_model(["a photograph of a cat", "edges"]), context)
        assert torch.equal(system.network()(x, t, context=context, hint=hint), reference.model(x, t, context))
    assert not any(k.startswith(UNET_PREFIX) for k in [n for n, p in system.named_parameters() if p.requires_grad])


def test_the_sd15_config_builds_controlnet_v1_for_sd15():
    from tests.paths import REPO_ROOT
    from tests.nets.test_sd_configs import CONTROLNET_PARAMS, assert_layout, reference

    cfg = load_config(REPO_ROOT / "configs" / "controlnet" / "sd15-canny.yaml")
    node = complete_model_node(cfg["model"])  # reads configs/sd/v1-inference.yaml; the SD file is not opened
    with params_on_meta():
        system = instantiate_from_config(node, "model")
    assert_layout(system.state_dict(), CONTROL_PREFIX, reference("controlnet_sd15.json"), CONTROLNET_PARAMS)
    assert {id(p) for p in system.trainable_parameters()} == {id(p) for p in system.control_model.parameters()}


def test_a_cache_vae_other_than_the_base_s_is_refused_before_encoding(toy_ldm_run, workdir, tmp_path):
    other = write_vae_run(tmp_path / "runs", seed=1)  # another VAE: other weights, the same architecture
    cfg = load_config(CFG, [f"model.params.base={toy_ldm_run}", f"cache.vae={other}", f"cache.dir={tmp_path / 'c'}"])
    with pytest.raises(CacheError, match="is not the VAE the base model was trained with"):
        prepare_controlnet(cfg, str(CFG))
    assert not (tmp_path / "c").exists()
