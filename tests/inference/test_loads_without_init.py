"""Loading a finished run or a VAE builds its modules without weights (``params_on_meta``) and gives them the file's
tensors: what is loaded equals, bit for bit, what building with random weights and copying the file in gave (every
state entry and buffer, ``requires_grad``, eval mode, the images drawn), no ``torch.nn.init`` function touches a real
tensor while loading, and a checkpoint short of one tensor is a one-line error naming it.

The "before" of each loader is written out here (``old_*``): the module built with random weights, then
``load_state_dict``.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Mapping

import pytest
import torch

from ldm.core.config import instantiate_from_config, load_config
from ldm.inference.loaders import build_system, describe_run, load_autoencoder, load_classifier, sd_vae_node, vae_node
from ldm.inference.pipeline import Pipeline
from ldm.inference.sd import load_sd
from ldm.inference.sd_base import load_run_system, prepare_weights
from ldm.io.checkpoints import EMA_SHADOWED, FILLED_KEYS, CheckpointError, load_file, state_dict_of
from ldm.io.lineage import VAE_TRAINING_ONLY, read_vae_state
from ldm.io.module_weights import load_strict, meta_tensor_names
from ldm.io.runs import CONFIG_FILE, checkpoint_for, resolve_run, run_config
from ldm.nets.lora import is_lora_key
from ldm.training.sd_finetune import complete_from_base, start_from_base
from tests.components import seeded, write_checkpoint, write_run
from tests.init_guard import no_random_init
from tests.paths import TINY
from tests.sd_toy import randomize, write_sd_file

PROMPTS = ["a red circle on a blue background", "a green square"]
DRAW = dict(steps=2, sampler="euler", guidance=3.0, seed=3)
TEXT_LORA = "model.params.lora.params.text_targets=[attn.q_proj,attn.v_proj]"
# two of the config's four U-Net targets (a plain and a nested name): each adapted layer is one more module to inject
UNET_LORA = "model.params.lora.params.unet_targets=[to_q,to_out.0]"


def assert_identical(tensor: torch.Tensor, expected: torch.Tensor, key: str) -> None:
    """The same dtype, device, shape and values, NaN where NaN (``assert_close(rtol=0, atol=0, equal_nan=True)``
    without its per-call cost, which the thousand entries of a system add up)."""
    assert (tensor.dtype, tensor.device, tensor.shape) == (expected.dtype, expected.device, expected.shape), key
    if not torch.equal(tensor, expected):
        nan = tensor.isnan()
        assert torch.equal(nan, expected.isnan()) and torch.equal(tensor[~nan], expected[~nan]), key


def assert_same_modules(new: torch.nn.Module, old: torch.nn.Module, unless: Mapping[str, torch.Tensor] = {}) -> None:
    """Every state entry and buffer equal in value and dtype (``unless``: key → the value expected instead), nothing on
    meta, the same requires_grad and modes."""
    assert not meta_tensor_names(new)
    for mine, theirs in ((new.state_dict(), old.state_dict()), (dict(new.named_buffers()), dict(old.named_buffers()))):
        assert mine.keys() == theirs.keys()
        for key, tensor in mine.items():
            assert_identical(tensor, unless.get(key, theirs[key]), key)
    grads = [{n: p.requires_grad for n, p in module.named_parameters()} for module in (new, old)]
    assert grads[0] == grads[1]
    assert {n: m.training for n, m in new.named_modules()} == {n: m.training for n, m in old.named_modules()}


# ---------------------------------------------------------------------------------------------- the loaders before


@functools.cache
def file_state(ckpt) -> dict[str, torch.Tensor]:
    """A run checkpoint's state dict, read once per test process (only read: the old paths copy it into the modules
    they built, ``short_of_one`` copies the dict)."""
    return state_dict_of(load_file(ckpt))


def old_autoencoder(spec, config=None) -> torch.nn.Module:
    """``load_autoencoder`` before: the VAE built with random weights, the file's copied in."""
    ckpt = checkpoint_for(spec) if config is None else spec
    vae = instantiate_from_config(vae_node(ckpt) if config is None else sd_vae_node(config), "first_stage")
    load_strict(vae, read_vae_state(ckpt, config is not None), "VAE", ignore=VAE_TRAINING_ONLY)
    return vae.eval().requires_grad_(False)


def old_run_system(run, use_ema: bool = True) -> torch.nn.Module:
    """``load_run_system`` before: the system built with random weights (a LoRA run's random adapters on its loaded
    base), the checkpoint copied in, the EMA weights put in the networks."""
    info = describe_run(run)
    state = file_state(info.checkpoint)
    system = build_system(info.config["model"], load_first_stage=False)
    prepare_weights(system, resumed=True)
    system.load_state_dict(state, strict=system.lora is None)
    for name, target in EMA_SHADOWED.items():
        if use_ema and getattr(system, name, None) is not None:
            getattr(system, name).copy_to(getattr(system, target))
    return system


def old_classifier(run) -> torch.nn.Module:
    """``load_classifier``'s network before."""
    ckpt = checkpoint_for(run)
    system = instantiate_from_config(run_config(ckpt)["model"], "model")
    load_strict(system, file_state(ckpt), "classifier")
    return system.classifier.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- runs to load


@pytest.fixture(scope="module")
def sd_file(tmp_path_factory):
    """(a toy SD 1.x file with an EMA copy, its inference config)."""
    return write_sd_file(tmp_path_factory.mktemp("sd-file"), seed=3)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, sd_file):
    """A LoRA run on ``sd_file`` (U-Net and text adapters), its adapters moved off their start and its EMA of them
    differing from the raw ones, as after training."""
    folder = tmp_path_factory.mktemp("lora-run")
    cfg = load_config(TINY / "sd-lora.yaml", [f"model.params.base_ckpt={sd_file[0]}",
                                              f"model.params.base_config={sd_file[1]}", f"cache.dir={folder / 'cache'}",
                                              TEXT_LORA, UNET_LORA])
    complete_from_base(cfg)
    with seeded(0):
        system = build_system(cfg["model"])
    start_from_base(system, cfg)
    with torch.no_grad():
        for index, (name, param) in enumerate((n, p) for n, p in system.named_parameters() if is_lora_key(n)):
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(index)) * 0.1)
    return write_run(folder / "runs", "ldm", cfg, system.checkpoint_state())


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    """A noise-aware classifier run of configs/tiny/classifier.yaml (random weights, a measured scale factor)."""
    cfg = load_config(TINY / "classifier.yaml")
    with seeded(0):
        system = instantiate_from_config(cfg["model"], "model")
    system.scale_factor.fill_(0.9)
    return write_run(tmp_path_factory.mktemp("classifier-run"), "classifier", cfg, randomize(system, 1).state_dict())


def run_copy(run, folder: Path, state: dict[str, torch.Tensor]) -> Path:
    """``folder``/run: ``run``'s config.yaml as it was written and a last checkpoint of ``state``."""
    copy = folder / "run"
    copy.mkdir(parents=True)
    shutil.copyfile(resolve_run(run) / CONFIG_FILE, copy / CONFIG_FILE)
    write_checkpoint(copy, state)
    return copy


def short_of_one(run, tmp_path, pick) -> tuple:
    """A copy of ``run`` whose checkpoint lacks the first tensor ``pick(key)`` accepts; (the copy, that key)."""
    state = dict(file_state(checkpoint_for(run)))
    key = next(k for k in state if pick(k))
    del state[key]
    return run_copy(run, tmp_path, state), key


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------- tests


def test_a_vae_run_loads_without_random_init_as_before(toy_vae_run, tmp_path):
    with no_random_init() as touched:
        vae, info = load_autoencoder(toy_vae_run)
    assert touched == []
    old = old_autoencoder(toy_vae_run)
    assert_same_modules(vae, old)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    with torch.no_grad():
        z = vae.encode(x).mode()
        assert torch.equal(z, old.encode(x).mode()) and torch.equal(vae.decode(z), old.decode(z))
    assert info["hash"] == load_autoencoder(toy_vae_run)[1]["hash"]
    short, key = short_of_one(toy_vae_run, tmp_path, lambda k: "decoder.conv_out.weight" in k)
    with pytest.raises(CheckpointError) as error:
        load_autoencoder(short)
    assert "missing: decoder.conv_out.weight" in one_line(error)


def test_a_bf16_checkpoint_loads_in_the_dtypes_the_modules_are_built_with(toy_vae_run, tmp_path):
    state = {k: v.bfloat16() if v.is_floating_point() else v
             for k, v in file_state(checkpoint_for(toy_vae_run)).items()}
    half = run_copy(toy_vae_run, tmp_path, state)
    vae, _ = load_autoencoder(half)
    assert {t.dtype for t in vae.state_dict().values()} == {torch.float32}  # as copying into a built VAE gives
    assert_same_modules(vae, old_autoencoder(half))


def test_a_public_sd_file_s_vae_loads_without_random_init_as_before(sd_file):
    with no_random_init() as touched:
        vae, _ = load_autoencoder(*sd_file)
    assert touched == []
    assert_same_modules(vae, old_autoencoder(*sd_file))


@pytest.mark.parametrize("name, use_ema", [("toy_ldm_run", True), ("toy_ldm_run", False), ("toy_class_run", True),
                                           ("toy_flow_run", True), ("toy_controlnet_run", True)])
def test_a_run_loads_without_random_init_as_before(request, name, use_ema):
    run = request.getfixturevalue(name)
    with no_random_init() as touched:
        system, ema = load_run_system(describe_run(run), use_ema)
    assert touched == [] and ema == (use_ema and any(getattr(system, n, None) is not None for n in EMA_SHADOWED))
    old = old_run_system(run, use_ema)
    assert_same_modules(system, old)  # every weight and buffer, bit for bit: the same images (drawn in the LoRA test)
    with no_random_init() as touched:
        Pipeline.from_run(run, device="cpu", use_ema=use_ema)
    assert touched == []


def test_a_lora_run_loads_its_base_and_adapters_without_random_init_as_before(lora_run, sd_file):
    with no_random_init() as touched:
        system, ema = load_run_system(describe_run(lora_run))
    assert touched == [] and ema
    old = old_run_system(lora_run)
    # keys SD1's file lacks take the value loading the file gives (before: the random init's, e.g. text_projection)
    public = load_sd(sd_file[1], sd_file[0]).state_dict()
    assert_same_modules(system, old, unless={k: public[k] for k in FILLED_KEYS if k in public})
    assert any(is_lora_key(k) for k in system.state_dict()) and system.model_ema is not None
    drawn = [Pipeline.from_system(s).to("cpu").generate_tensors(PROMPTS, **DRAW) for s in (system, old)]
    assert torch.equal(*drawn)
    with no_random_init() as touched:
        merged = Pipeline.from_run(lora_run, device="cpu")  # the adapters folded in
    assert touched == []
    old.merge_lora()
    expected = Pipeline.from_system(old).generate_tensors(PROMPTS, **DRAW)
    assert torch.equal(merged.generate_tensors(PROMPTS, **DRAW), expected)


@pytest.mark.parametrize("name, pick", [
    ("toy_ldm_run", lambda k: k.startswith("model.diffusion_model.out.")),
    ("toy_ldm_run", lambda k: k.startswith("model_ema.")),
    ("toy_controlnet_run", lambda k: k.startswith("control_model.zero_convs.")),
    ("lora_run", lambda k: ".lora_B." in k),
])
def test_a_run_short_of_one_tensor_is_one_line_naming_it(request, tmp_path, name, pick):
    short, key = short_of_one(request.getfixturevalue(name), tmp_path, pick)
    with pytest.raises(CheckpointError) as error:
        load_run_system(describe_run(short))
    assert f"missing: {key}" in one_line(error)


def test_a_classifier_run_loads_without_random_init_as_before(classifier_run, tmp_path):
    with no_random_init() as touched:
        classifier, schedule, scale = load_classifier(classifier_run)
    assert touched == [] and scale == pytest.approx(0.9)
    old = old_classifier(classifier_run)
    assert_same_modules(classifier, old)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 600])
    with torch.no_grad():
        assert torch.equal(classifier(x, t), old(x, t))
    short, key = short_of_one(classifier_run, tmp_path, lambda k: k.startswith("classifier."))
    with pytest.raises(CheckpointError) as error:
        load_classifier(short)
    assert f"missing: {key}" in one_line(error)
