"""LoRA files (toy SD 1.x files of the public layout): a LoRA exported here loads in diffusers' load_lora_weights and
gives our outputs; a kohya-layout file written by hand in this test loads through txt2img --lora exactly as its weights
folded in by hand; unknown keys and misfit shapes are refused naming them; folding equals the live adapter; the module
names match diffusers' own converter."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm.bench.mapping import diffusers_unet_config
from ldm.inference.lora_files import num_res_blocks, read_lora_file, trained_lora, write_lora_file
from ldm.inference.pipeline import Pipeline
from ldm.inference.sd import load_sd
from ldm.io.checkpoints import UNET_PREFIX, ema_shadow_key, load_file, read_metadata
from ldm.io.lineage import lineage_hashes, read_lineage
from ldm.io.lora_layout import LoraFileError, diffusers_unet_path, hf_text_path
from ldm.nets.lora import UNET_TARGETS, LoRA, adaptable_modules
from tests.scripts import load_script
from tests.sd_lora_twins import diffusers_lora_outputs, lora_sd_file
from tests.sd_toy import file_pipeline, shared_file_pipeline, shared_tiny_system, tiny_config, write_sd_file

ALL = LoRA(rank=4, alpha=8, unet_targets=list(UNET_TARGETS),
           text_targets=["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"])
PROMPTS = ["a red circle", "a zorb on a white background"]
FAST = ["--steps", "3", "--sampler", "ddim", "--scale", "3", "--seed", "4"]
TOLERANCE = 1e-5  # fp32: max |Δ| of outputs of order 1


@pytest.fixture(scope="module")
def sd(workdir, tmp_path_factory):
    """(toy SD 1.x file, its inference config — shared with test_lora_layouts_sd1 —, this module's work folder)."""
    ckpt, config = lora_sd_file(workdir / "lora-sd")
    return ckpt, config, tmp_path_factory.mktemp("lora-files")


def loaded(sd) -> Pipeline:
    """A copy of our Pipeline of the toy file (loaded once), no LoRA on it."""
    return file_pipeline(sd[0], sd[1])


@pytest.fixture(scope="module")
def trained(sd):
    """A LoRA of every target "trained here" (random adapters on the toy file's model), its weights and files."""
    system = load_sd(sd[1], sd[0])
    ALL.apply(system.model.diffusion_model, system.cond_stage_model.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in system.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)
    weights = trained_lora(system.state_dict(), ALL)
    files = {layout: write_lora_file(weights, sd[2] / f"{layout}.safetensors", layout, 1)
             for layout in ("kohya", "diffusers")}
    return system.eval(), weights, files


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([20, 700])


def outputs(unet, text, tokens_or_prompts, x, t):
    """(text context, U-Net output) of our modules for prompts."""
    with torch.no_grad():
        context = text(tokens_or_prompts)
        return context, unet(x, t, context=context)


def test_module_names_match_diffusers_own_converter():
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    for name in ("v1-inference", "v2-inference"):
        unet = shared_tiny_system(name).model.diffusion_model  # read only
        params = load_config_params(name)
        state = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
        converted = single_file.convert_ldm_unet_checkpoint(state, diffusers_unet_config(params))
        where = {v.data_ptr(): k for k, v in converted.items()}
        modules = adaptable_modules(unet, "unet")
        assert len(modules) > 10
        for module in modules:
            theirs = where[unet.get_submodule(module).weight.data_ptr()]
            assert theirs == diffusers_unet_path(module, num_res_blocks(unet)) + ".weight", module
    assert hf_text_path("transformer.resblocks.11.attn.v_proj") == "text_model.encoder.layers.11.self_attn.v_proj"
    assert hf_text_path("transformer.resblocks.0.mlp.c_proj") == "text_model.encoder.layers.0.mlp.fc2"


def load_config_params(name: str) -> dict:
    return tiny_config(name)["model"]["params"]["unet"]["params"]


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_a_lora_exported_here_gives_our_output_in_diffusers_load_lora_weights(sd, trained, layout):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    system, weights, files = trained
    base = shared_file_pipeline(sd[0], sd[1])  # read only
    x, t = inputs()
    their_context, their_out = diffusers_lora_outputs(sd[0], sd[1], files[layout], PROMPTS, x, t)
    ours = loaded(sd).with_lora(files[layout], live=True)
    context, out = outputs(ours.model, ours.cond_stage_model, PROMPTS, x, t)
    trained_context, trained_out = outputs(system.model, system.cond_stage_model, PROMPTS, x, t)
    base_context, base_out = outputs(base.model, base.cond_stage_model, PROMPTS, x, t)
    assert (trained_out - base_out).abs().max() > 0.1 and (trained_context - base_context).abs().max() > 0.1
    for a, b in ((context, their_context), (out, their_out), (context, trained_context), (out, trained_out)):
        assert (a - b).abs().max() <= TOLERANCE


def test_folding_equals_the_live_adapters_and_several_files_add_up(sd, trained):
    _, weights, files = trained
    x, t = inputs(2)
    half = write_lora_file([w.__class__(w.component, w.module, w.down, -w.up, w.alpha) for w in weights],
                           sd[2] / "negated.safetensors", "kohya", 1)
    results = {}
    for live in (False, True):
        pipe = loaded(sd)
        pipe.with_lora(files["kohya"], 0.7, live=live).with_lora(half, 0.2, live=live)
        results[live] = outputs(pipe.model, pipe.cond_stage_model, PROMPTS, x, t)
        assert len(pipe.source["lora"]) == 2
    single = loaded(sd).with_lora(files["diffusers"], 0.5)  # 0.7 − 0.2
    for a, b in zip(results[False], results[True]):
        assert (a - b).abs().max() <= TOLERANCE
    for a, b in zip(results[True], outputs(single.model, single.cond_stage_model, PROMPTS, x, t)):
        assert (a - b).abs().max() <= TOLERANCE


def kohya_by_hand(state: dict, g: torch.Generator) -> tuple[dict, dict]:
    """(a kohya-layout LoRA written as sd-scripts names it, the public file's tensors with it folded in by hand)."""
    rank, alpha, scale = 2, 1.0, 0.5  # --lora FILE:0.5
    targets = {  # kohya name → (public SD key, rows of it)
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (
            UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", None),
        "lora_unet_up_blocks_1_attentions_1_proj_out": (UNET_PREFIX + "output_blocks.3.1.proj_out.weight", None),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2": (
            UNET_PREFIX + "middle_block.1.transformer_blocks.0.ff.net.2.weight", None),
        "lora_te_text_model_encoder_layers_1_self_attn_v_proj": (
            "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.v_proj.weight", None),
    }
    lora, edited = {}, dict(state)
    for name, (key, _) in targets.items():
        weight = state[key]
        out_f, in_f = weight.shape[0], weight.flatten(1).shape[1]
        down = torch.randn((rank, in_f) + weight.shape[2:], generator=g)
        up = torch.randn((out_f, rank) + weight.shape[2:], generator=g)
        lora.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                     f"{name}.alpha": torch.tensor(alpha)})
        update = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * (alpha / rank) * scale
        edited[key] = weight + update
        if key.startswith(UNET_PREFIX):  # the file's EMA copy is what the U-Net loads
            edited[ema_shadow_key(key)] = state[ema_shadow_key(key)] + update
    return lora, edited


def test_a_kohya_file_made_here_loads_through_txt2img_lora(sd, tmp_path, capsys):
    txt2img = load_script("txt2img")
    state = load_file(sd[0])
    lora, edited = kohya_by_hand(state, torch.Generator().manual_seed(3))
    save_file(lora, str(tmp_path / "hand.safetensors"))
    save_file(edited, str(tmp_path / "edited.safetensors"))
    common = ["--config", str(sd[1]), "--prompt", PROMPTS[1], *FAST]
    for mode in ("fold", "live"):
        code = txt2img.main(["--ckpt", str(sd[0]), "--lora", f"{tmp_path / 'hand.safetensors'}:0.5", "--lora-mode", mode,
                             "--out", str(tmp_path / mode), *common])
        assert code == 0, capsys.readouterr().err
    assert txt2img.main(["--ckpt", str(tmp_path / "edited.safetensors"), "--out", str(tmp_path / "edited"),
                         *common]) == 0
    images = {m: np.asarray(Image.open(next((tmp_path / m).glob("0*.png")))).astype(int)
              for m in ("fold", "live", "edited")}
    assert np.abs(images["fold"] - images["edited"]).max() <= 1 and np.abs(images["live"] - images["edited"]).max() <= 1
    meta = json.loads(Image.open(next((tmp_path / "live").glob("0*.png"))).text["ldm"])
    assert meta["lora"] == [{"file": str(tmp_path / "hand.safetensors"), "scale": 0.5, "mode": "live"}]
    plain = tmp_path / "plain"
    assert txt2img.main(["--ckpt", str(sd[0]), "--out", str(plain), *common]) == 0
    assert np.abs(np.asarray(Image.open(next(plain.glob("0*.png")))).astype(int) - images["fold"]).max() > 8


@pytest.mark.parametrize("case, message", [
    ("unknown", "1 key(s) that no module of this SD 1.x / 2.x model has: "
                "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down"),
    ("shape", "LoRA shapes do not fit this model — input_blocks.1.1.transformer_blocks.0.attn2.to_k"),
    ("half", "module(s) without both a down and an up weight: lora_unet_mid_block_attentions_0_proj_in"),
    ("sdxl", "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha (the file looks like kohya for SDXL"),
])
def test_a_file_with_a_wrong_key_or_shape_is_refused_naming_it(sd, tmp_path, capsys, case, message):
    lora, _ = kohya_by_hand(load_file(sd[0]), torch.Generator().manual_seed(0))
    if case == "unknown":
        lora["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = torch.zeros(2, 32)
    elif case == "shape":
        lora["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"] = torch.zeros(2, 7)
    elif case == "half":
        lora["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"] = torch.zeros(2, 64, 1, 1)
    else:
        lora["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha"] = torch.tensor(1.0)
    path = tmp_path / f"{case}.safetensors"
    save_file(lora, str(path))
    txt2img = load_script("txt2img")
    code = txt2img.main(["--ckpt", str(sd[0]), "--config", str(sd[1]), "--lora", str(path), "--prompt", "x",
                         "--out", str(tmp_path / "out"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    model = shared_tiny_system()  # read only
    with pytest.raises(LoraFileError, match="key|shape|down and an up"):
        read_lora_file(path, model.model.diffusion_model, model.cond_stage_model.model)
    assert txt2img.main(["--ckpt", str(sd[0]), "--lora", str(tmp_path / "none.safetensors:0.5"), "--prompt", "x",
                         "--out", str(tmp_path / "out")]) == 2
    assert "--lora" in capsys.readouterr().err


@pytest.mark.slow
def test_a_lora_run_exports_as_a_file_or_merged_and_loads_back(tmp_path, capsys):
    from ldm.training.driver import train
    from scripts.export import main as export
    from tests.sd_toy import write_image_folder
    from tests.systems.test_lora_training import CFG, TEXT

    ckpt, config = write_sd_file(tmp_path, seed=6)
    run = train("ldm", argv=["--cfg", str(CFG), "--runs-dir", str(tmp_path / "runs"), f"model.params.base_ckpt={ckpt}",
                             f"model.params.base_config={config}", f"cache.dir={tmp_path / 'cache'}",
                             f"cache.data.train.params.root={write_image_folder(tmp_path / 'images')}", TEXT,
                             "trainer.max_steps=3"])
    draw = dict(steps=3, sampler="ddim", seed=2, guidance=3.0)
    expected = np.stack([np.asarray(im) for im in Pipeline.from_run(run, device="cpu")(PROMPTS, **draw)]).astype(int)
    files = {}
    for layout in ("kohya", "diffusers"):
        files[layout] = tmp_path / f"run-{layout}.safetensors"
        assert export([str(run), "--out", str(files[layout]), "--lora-layout", layout]) == 0
    assert export([str(run), "--out", str(tmp_path / "merged.safetensors"), "--merge"]) == 0
    assert export([str(run), "--out", str(tmp_path / "half.safetensors"), "--half"]) == 0
    half = load_file(tmp_path / "half.safetensors")
    assert {v.dtype for k, v in half.items() if not k.endswith(".alpha")} == {torch.float16}
    kohya = load_file(files["kohya"])
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in kohya) and any(k.startswith("lora_te_") for k in kohya)
    assert files["kohya"].stat().st_size < ckpt.stat().st_size / 4  # the adapters alone
    lineage = json.loads(read_metadata(files["kohya"])["ldm.lineage"])  # what the adapters were trained on
    assert lineage == lineage_hashes(read_lineage(run)) and lineage.get("base_file")
    for source, tolerance in ((files["kohya"], 1), (files["diffusers"], 1), (tmp_path / "half.safetensors", 3)):
        pipe = Pipeline.from_checkpoint(ckpt, config, device="cpu").with_lora(source)
        drawn = np.stack([np.asarray(im) for im in pipe(PROMPTS, **draw)]).astype(int)
        assert np.abs(drawn - expected).max() <= tolerance, source
    merged = Pipeline.from_checkpoint(tmp_path / "merged.safetensors", device="cpu")  # the config it carries
    assert np.abs(np.stack([np.asarray(im) for im in merged(PROMPTS, **draw)]).astype(int) - expected).max() <= 1
    assert export([str(run), "--out", str(tmp_path / "x.ckpt")]) == 2
    capsys.readouterr()
