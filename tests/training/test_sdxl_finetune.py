"""Fine-tuning an SDXL file (a toy file of the public layout), fully and with LoRA: the config completed from the base
(each text tower frozen or not), the sizes of a bucketed batch reaching the conditioner, CFG dropout zeroing the text
and keeping the sizes, LoRA on both text towers with the frozen base held in bf16, the shipped GPU configs; end to end
(slow): a full fine-tune exported in the SDXL layout samples through txt2img, a LoRA exported in kohya's SDXL layout
gives diffusers' images, and a stopped LoRA run resumes."""

import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file as load_safetensors

from ldm.core.config import instantiate_from_config, load_config
from ldm.data.latents import LatentDataset
from ldm.inference.export import export_checkpoint
from ldm.inference.lora_files import text_towers, trained_lora
from ldm.inference.pipeline import Pipeline
from ldm.inference.sd import load_sd
from ldm.io.checkpoints import EMA_PREFIX, FILLED_KEYS, UNET_PREFIX, CheckpointError, load_file, state_dict_of
from ldm.io.module_weights import params_on_meta
from ldm.io.runs import CHECKPOINT_DIR
from ldm.io.sdxl_layout import model_to_sdxl
from ldm.nets.conditioning.sdxl import size_embedding
from ldm.nets.lora import LoRA, LoRAError, is_lora_key
from ldm.training.cache import ensure_cache
from ldm.training.driver import train
from ldm.training.sd_finetune import complete_from_base
from scripts.export import main as export_main
from tests.aspect_folder import make_aspect_folder
from tests.conftest import TINY
from tests.faults import read_probe
from tests.finetune_steps import from_base as built
from tests.finetune_steps import loss_step as step
from tests.forked import launch_forked
from tests.paths import REPO_ROOT
from tests.procs import finish, only_run, wait_until
from tests.scripts import load_script
from tests.sd_toy import write_sd_file
from tests.sdxl_toy import diffusers_xl_pipeline, tiny_xl_config, write_xl_file
from tests.nets.test_sd_configs import reference

FULL, LORA = TINY / "sdxl-finetune.yaml", TINY / "sdxl-lora.yaml"
SDXL_SCALE = 0.13025
TEXT = "model.params.lora.params.text_targets=[attn.q_proj,attn.k_proj,attn.v_proj,attn.out_proj]"
# one target in each network (both text towers, the U-Net): what a quick test needs of an adapter, the fewest modules
ONE_TARGET = ("model.params.lora.params.text_targets=[attn.q_proj]", "model.params.lora.params.unet_targets=[to_q]")
LIVE_TEXT = "cache.text_embeddings=false"  # adapted (or trained) text towers: no cached embeddings
PROMPTS = ["a red block", "a green block"]
DRAW = dict(steps=3, guidance=5.0, sampler="euler", seed=3)


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """(toy SDXL file, its inference config, a captioned folder of mixed aspects, a work folder)."""
    folder = tmp_path_factory.mktemp("sdxl-base")
    ckpt, config = write_xl_file(folder)  # the toy file tests/inference/test_sdxl.py writes (made once per process)
    return ckpt, config, make_aspect_folder(folder / "mixed", n=12), folder


def overrides(xl, cache: str = "cache", *extra: str) -> list[str]:
    ckpt, config, images, folder = xl
    return [f"model.params.base_ckpt={ckpt}", f"model.params.base_config={config}",
            f"cache.data.train.params.root={images}", f"cache.dir={folder / cache}", *extra]


def completed(xl, cfg_path=FULL, *extra: str, cache: str = "cache") -> dict:
    cfg = load_config(cfg_path, overrides(xl, cache, *extra))
    complete_from_base(cfg)
    return cfg


def bucket_batch(cfg: dict, n: int = 4) -> dict:
    """``n`` items of the cache's first bucket, collated (sizes: (n, 2))."""
    ensure_cache(cfg)
    data = LatentDataset(cfg["cache"]["dir"], "train")
    rows = [i for i in range(len(data)) if data.bucket_ids[i] == data.bucket_ids[0]][:n]
    return torch.utils.data.default_collate([data[i] for i in rows])  # the cache checked once


@pytest.fixture(scope="module")
def full(xl) -> tuple[dict, torch.nn.Module]:
    """(the completed full fine-tune config, its system from the base file), for the tests that only read it."""
    cfg = completed(xl)
    return cfg, built(cfg)


def frozen(cfg: dict) -> list[bool]:
    return [e["params"]["freeze"] for e in cfg["model"]["params"]["cond_stage"]["params"]["embedders"]]


def pooled_width(encoder) -> int:
    """Where ``y``'s size embeddings start: after the pooled text embedding."""
    return encoder.embedders[-1].model.text_projection.shape[-1]


def test_the_config_is_completed_from_the_sdxl_base_and_each_tower_frozen_by_config(xl):
    cfg = completed(xl)
    params = cfg["model"]["params"]
    assert params["cond_stage"]["target"] == "ldm.nets.conditioning.sdxl.SDXLConditioner"
    assert params["scale_factor"] == SDXL_SCALE and params["unet"]["params"]["use_checkpoint"] is True
    base_objective = load_config(xl[1])["model"]["params"]["objective"]["params"]
    assert params["objective"]["params"]["schedule"] == base_objective["schedule"]  # the base's (leading) schedule
    assert frozen(cfg) == [True, True]
    assert frozen(completed(xl, FULL, "model.params.cond_stage_trainable=true")) == [False, False]
    assert frozen(completed(xl, LORA, TEXT)) == [False, False]  # adapters on a frozen tower would get no gradients
    assert frozen(completed(xl, LORA)) == [True, True]


def test_the_sizes_of_a_bucketed_batch_reach_the_conditioner(full):
    cfg, system = full
    batch = bucket_batch(cfg)
    assert batch["original_size"].shape == batch["crop_top_left"].shape == (4, 2)
    h, w = batch["mean"].shape[-2:]
    assert (h, w) != (8, 8)  # a bucket that is not the base's square size
    encoder = system.cond_stage_model
    with torch.no_grad():
        out = system.conditioning(batch, drop=False)
    expected = {"original_size": batch["original_size"].float(), "crop_top_left": batch["crop_top_left"].float(),
                "target_size": torch.tensor([[h * 2, w * 2]] * 4, dtype=torch.float32)}  # the toy VAE's f = 2
    pooled = pooled_width(encoder)
    assert torch.equal(out["y"][:, pooled:], size_embedding(expected, encoder.size_embed_dim))
    with torch.no_grad():
        assert torch.equal(out["context"], encoder.conditioning(batch["caption"], expected)["context"])
    assert not torch.equal(batch["original_size"].float(), expected["target_size"])  # the item's own, not defaults


def test_cfg_dropout_zeroes_the_text_and_keeps_the_sizes(full):
    cfg, system = full  # shared: its ucg_rate (the config's model.params.ucg_rate) is put back after
    batch = bucket_batch(cfg)
    default_rate = system.ucg_rate
    try:
        system.ucg_rate = 1.0
        with torch.no_grad():
            kept, dropped = system.conditioning(batch, drop=False), system.conditioning(batch, drop=True)
        system.ucg_rate = 0.5
        torch.manual_seed(0)
        with torch.no_grad():
            mixed = system.conditioning(batch | {"caption": ["a red block"] * 4}, drop=True)
    finally:
        system.ucg_rate = default_rate
    pooled = pooled_width(system.cond_stage_model)
    assert kept["context"].abs().sum() > 0 and kept["y"][:, :pooled].abs().sum() > 0
    assert not dropped["context"].any() and not dropped["y"][:, :pooled].any()  # text: zeros
    assert torch.equal(dropped["y"][:, pooled:], kept["y"][:, pooled:])  # sizes: the batch's
    text_dropped = mixed["context"].flatten(1).abs().sum(1) == 0
    assert torch.equal(mixed["y"][:, :pooled].abs().sum(1) == 0, text_dropped)  # context and pooled dropped together


def test_lora_adapts_both_text_towers_and_holds_the_frozen_base_in_bf16(xl):
    cfg = completed(xl, LORA, *ONE_TARGET, LIVE_TEXT, "model.params.lora.params.base_dtype=bf16")
    system = built(cfg).train()
    system.configure_model()  # where training holds the base in base_dtype
    trainable = [n for n, p in system.named_parameters() if p.requires_grad]
    assert trainable and all(is_lora_key(n) for n in trainable)
    for tower in (0, 1):
        assert any(n.startswith(f"cond_stage_model.embedders.{tower}.model.transformer.") for n in trainable)
    base = {n: p.dtype for n, p in system.named_parameters()
            if n.startswith(("model.", "cond_stage_model.")) and not is_lora_key(n)}
    assert base and set(base.values()) == {torch.bfloat16}
    assert {p.dtype for n, p in system.named_parameters() if is_lora_key(n)} == {torch.float32}
    assert {p.dtype for p in system.first_stage_model.parameters()} == {torch.float32}  # the VAE is not cast
    optimizer = system.optimizer_settings.build(system.trainable_parameters(), None)["optimizer"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = step(system, bucket_batch(cfg))
    assert torch.isfinite(loss)
    optimizer.step()
    state = [s for s in optimizer.state.values()]
    assert state and all(s["exp_avg"].dtype == torch.float32 for s in state)  # AdamW's moments stay fp32
    weights = trained_lora(system.state_dict(), system.lora)
    assert {w.component for w in weights} == {"unet", "text", "text2"}
    with pytest.raises(LoRAError, match="base_dtype: 'fp8' is not one of null, bf16, fp16"):
        LoRA(base_dtype="fp8")


def test_a_full_sdxl_fine_tune_trains_the_u_net_and_a_trainable_text_encoder(xl):
    cfg = completed(xl, FULL, "model.params.cond_stage_trainable=true", "model.params.ucg_rate=0.0", LIVE_TEXT,
                    cache="cache-latents-only")  # a trained tower reads the captions: a cache without embeddings
    system = built(cfg).train()
    step(system, bucket_batch(cfg))
    for tower in text_towers(system.cond_stage_model):
        blocks = list(tower.transformer.resblocks[:-1].parameters())  # penultimate: the last block is unused
        assert blocks and all(p.grad is not None for p in blocks)
    assert all(p.grad is not None for p in system.model.diffusion_model.label_emb.parameters())  # y reaches the U-Net


@pytest.mark.parametrize("name, lora", [("finetune-xl", False), ("finetune-xl-lora", True)])
def test_the_shipped_sdxl_configs_fine_tune_the_public_architecture(name, lora, tmp_path):
    stand_in = tmp_path / "base.safetensors"  # completing reads the config, never the weights
    stand_in.touch()
    cfg = load_config(REPO_ROOT / "configs" / "sd" / f"{name}.yaml", [f"model.params.base_ckpt={stand_in}"])
    complete_from_base(cfg)
    with params_on_meta():
        system = instantiate_from_config(cfg["model"], "model")
    state = {k: v for k, v in system.state_dict().items() if k not in FILLED_KEYS and not k.startswith(EMA_PREFIX)}
    public = {k: list(v.shape) for k, v in model_to_sdxl(state).items() if k.startswith(UNET_PREFIX)}
    assert public == reference("sdxl_unet.json")["shapes"]
    assert float(system.scale_factor) == pytest.approx(SDXL_SCALE) and system.cond_stage_model.adm_dim == 2816
    assert cfg["trainer"]["precision"] == "bf16-mixed" and cfg["model"]["params"]["unet"]["params"]["use_checkpoint"]
    buckets = cfg["cache"]["data"]["train"]["params"]["buckets"]
    assert buckets["resolution"] == 1024 and buckets["step"] % 32 == 0  # SDXL: VAE 8 × U-Net 4
    assert cfg["cache"]["text_embeddings"] is True  # both frozen towers' outputs cached: a step never runs them
    if lora:
        settings = system.lora
        assert (settings.rank, settings.scale, settings.base_dtype) == (16, 1.0, "bf16")
        assert settings.unet_targets == ["to_q", "to_k", "to_v", "to_out.0"]


def test_an_sdxl_file_reexports_to_its_own_layout_and_loads_back_strictly(xl, tmp_path):
    out = tmp_path / "re-exported.safetensors"
    export_checkpoint(xl[0], out, config=xl[1])
    public, written = load_safetensors(str(xl[0])), load_safetensors(str(out))
    assert set(written) - {"scale_factor", "image_size", "betas", "alphas_cumprod"} == set(public)
    assert all(torch.equal(written[k].half(), v) for k, v in public.items() if v.is_floating_point())
    a, b = load_sd(xl[1], xl[0]), load_sd(None, out)  # the config travels in the file
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    sd_ckpt, sd_config = write_sd_file(tmp_path, seed=3)  # any SD 1.x file (seed 3: the one other tests write)
    with pytest.raises(CheckpointError, match="no SDXL conditioner"):  # SD 1.x asked for SDXL's layout
        export_checkpoint(sd_ckpt, tmp_path / "x.safetensors", config=sd_config, text_layout="sdxl")


# ------------------------------------------------------------------------------------------------ end to end


def images(pipe, **options) -> np.ndarray:
    return pipe.generate_tensors(PROMPTS, height=16, width=16, **DRAW, **options).numpy()


def drawn(pipe) -> torch.Tensor:
    """The toy images in [0, 1] (as diffusers' ``output_type="pt"``)."""
    return pipe.generate_tensors(PROMPTS, height=16, width=16, **DRAW) * 0.5 + 0.5


@pytest.mark.slow
def test_a_full_sdxl_fine_tune_exports_the_sdxl_layout_and_samples(xl, tmp_path, capsys):
    run = train("ldm", argv=["--cfg", str(FULL), "--runs-dir", str(tmp_path / "runs"), *overrides(xl, "e2e-cache")])
    final = state_dict_of(load_file(run / "checkpoints" / "last.ckpt"))
    start = load_sd(xl[1], xl[0]).state_dict()
    assert float(final["scale_factor"]) == pytest.approx(SDXL_SCALE)
    assert any(not torch.equal(final[k], start[k]) for k in start if k.startswith(UNET_PREFIX))  # the U-Net trained
    assert list((run / "samples").glob("*.png"))  # the sample grid drew SDXL at the buckets' sizes
    out = tmp_path / "finetuned.safetensors"
    assert export_main([str(run), "--out", str(out), "--ema-only"]) == 0
    keys = set(load_safetensors(str(out)))
    public = set(load_safetensors(str(xl[0])))
    assert public <= keys and any(k.startswith("conditioner.embedders.0.transformer.") for k in keys)
    assert not any(k.startswith(("cond_stage_model.", EMA_PREFIX)) for k in keys)
    reloaded = load_sd(out.with_suffix(".yaml"), out)  # strictly, with the written config
    assert reloaded.checkpoint_info["checkpoint"] == str(out)
    expected = images(Pipeline.from_run(run, device="cpu"))
    np.testing.assert_array_equal(expected, images(Pipeline.from_checkpoint(out, out.with_suffix(".yaml"))))
    txt2img = load_script("txt2img")
    code = txt2img.main(["--ckpt", str(out), "--config", str(out.with_suffix(".yaml")), "--prompt", PROMPTS[0],
                         "--W", "16", "--H", "16", "--steps", "2", "--sampler", "euler",
                         "--out", str(tmp_path / "png")])
    assert code == 0, capsys.readouterr().err
    assert len(list((tmp_path / "png").glob("*.png"))) == 1


@pytest.mark.slow
def test_an_sdxl_lora_on_both_towers_exports_kohya_and_loads_in_diffusers(xl, tmp_path, capsys):
    run = train("ldm", argv=["--cfg", str(LORA), "--runs-dir", str(tmp_path / "runs"), *overrides(xl, "lora-cache"),
                             TEXT, LIVE_TEXT, "model.params.lora.params.base_dtype=bf16"])
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    keys = set(ckpt["state_dict"])
    assert all(is_lora_key(k) or k.startswith(EMA_PREFIX) or k in ("scale_factor", "image_size") for k in keys)
    out = tmp_path / "lora.safetensors"
    assert export_main([str(run), "--out", str(out)]) == 0
    lora = load_safetensors(str(out))
    assert {k.split("_", 2)[1] for k in lora} == {"unet", "te1", "te2"}
    assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                             "lora_te1_text_model_", "lora_te2_text_model_")) for k in lora)
    ckpt_path, config, _, folder = xl
    got = drawn(Pipeline.from_checkpoint(ckpt_path, config).with_lora(out))
    base = drawn(Pipeline.from_checkpoint(ckpt_path, config))
    assert (got - base).abs().max() > 1e-3  # the trained adapters change the images
    for written in (out, tmp_path / "lora-diffusers.safetensors"):
        if written != out:
            assert export_main([str(run), "--out", str(written), "--lora-layout", "diffusers"]) == 0
            parts = {k.split(".")[0] for k in load_safetensors(str(written))}
            assert parts == {"unet", "text_encoder", "text_encoder_2"}
            here = drawn(Pipeline.from_checkpoint(ckpt_path, config).with_lora(written))
            torch.testing.assert_close(here, got, rtol=0, atol=1e-5)  # both layouts load back equal here
        pipe = diffusers_xl_pipeline(load_safetensors(str(ckpt_path)), tiny_xl_config(), folder)
        pipe.load_lora_weights(str(written))
        theirs = pipe(prompt=PROMPTS, height=16, width=16, num_inference_steps=DRAW["steps"],
                      guidance_scale=DRAW["guidance"], latents=_noise(DRAW["seed"], 2), output_type="pt").images
        torch.testing.assert_close(got, theirs, rtol=0, atol=1e-4)
    merged = tmp_path / "merged.safetensors"  # the base with the adapters folded in: one SDXL file
    assert export_main([str(run), "--out", str(merged), "--merge"]) == 0
    assert any(k.startswith("conditioner.embedders.1.model.") for k in load_safetensors(str(merged)))
    torch.testing.assert_close(torch.from_numpy(images(Pipeline.from_checkpoint(merged, merged.with_suffix(".yaml")))),
                               torch.from_numpy(images(Pipeline.from_run(run, device="cpu"))), rtol=0, atol=1e-5)
    txt2img = load_script("txt2img")
    code = txt2img.main(["--ckpt", str(ckpt_path), "--config", str(config), "--lora", f"{out}:0.8", "--prompt",
                         PROMPTS[0], "--W", "16", "--H", "16", "--steps", "2", "--out", str(tmp_path / "png")])
    assert code == 0, capsys.readouterr().err


def _noise(seed: int, n: int) -> torch.Tensor:
    """The Pipeline's noise: image j from its own generator seeded seed + j (toy latents: 4 × 8 × 8)."""
    return torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(seed + j)) for j in range(n)])


@pytest.mark.slow
def test_a_stopped_sdxl_lora_run_resumes_to_the_uninterrupted_result(xl, tmp_path, monkeypatch):
    steps = 6
    common = ["--cfg", str(LORA), *overrides(xl, "resume-cache"), TEXT, LIVE_TEXT,
              "model.params.lora.params.base_dtype=bf16", f"trainer.max_steps={steps}",
              "checkpoint.every_n_train_steps=3"]
    ensure_cache(load_config(LORA, overrides(xl, "resume-cache", LIVE_TEXT)))

    def probed(name: str, hold_at: tuple[int, ...] = ()) -> list[str]:
        return [f"callbacks=[{{target: tests.faults.StepProbe, params: {{out: {tmp_path / name}.jsonl, "
                f"hold_at: {list(hold_at)}}}}}]", "--runs-dir", str(tmp_path / name)]

    log = tmp_path / "run.log"
    proc = launch_forked("train_ldm", [*common, *probed("run", hold_at=(1,))], log)
    wait_until(lambda: any(r.get("step") == 1 for r in read_probe(tmp_path / "run.jsonl")), proc, log)
    proc.send_signal(signal.SIGTERM)  # mid-run: the step finishes, last.ckpt is written, exit 143
    finish(proc, log, code=143)
    run = only_run(tmp_path / "run", "ldm")
    stopped = torch.load(run / CHECKPOINT_DIR / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < stopped < steps
    monkeypatch.setenv("LDM_ALLOW_TARGETS", "tests.")  # the probe callback, in this process
    train("ldm", argv=["--resume", str(run)])  # resumed here, in another process than the stopped run's
    train("ldm", str(LORA), [*common, *probed("ref")])  # the uninterrupted reference, trained here
    resumed = torch.load(run / CHECKPOINT_DIR / "last.ckpt", weights_only=True)
    expected = torch.load(only_run(tmp_path / "ref", "ldm") / CHECKPOINT_DIR / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == expected["global_step"] == steps
    assert resumed["state_dict"].keys() == expected["state_dict"].keys()
    assert any(k.startswith("cond_stage_model.embedders.1.") for k in resumed["state_dict"])
    for key, value in expected["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0, msg=key)
