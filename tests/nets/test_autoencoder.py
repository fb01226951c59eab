"""KL-VAE networks, posterior and LightningModule at toy size (real modules, CPU, seconds)."""

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from ldm.core.config import ConfigError, instantiate_from_config, load_config
from ldm.nets.autoencoder.distributions import DiagonalGaussianDistribution
from ldm.nets.autoencoder.encoder_decoder import (
    AttnBlock,
    Decoder,
    Downsample,
    Encoder,
    Normalize,
    Upsample,
)
from ldm.nets.autoencoder.model import AutoencoderKL
from ldm.systems.autoencoder import AutoencoderKLSystem
from tests.paths import REPO_ROOT

TINY = REPO_ROOT / "configs" / "tiny" / "vae.yaml"


def ddconfig(ch_mult, ch=8, resolution=16, attn_resolutions=()):
    return dict(double_z=True, z_channels=4, resolution=resolution, in_channels=3, out_ch=3, ch=ch,
                ch_mult=list(ch_mult), num_res_blocks=1, attn_resolutions=list(attn_resolutions), dropout=0.0)


@pytest.mark.parametrize("ch_mult, f", [([1, 2, 2], 4), ([1, 1, 2, 2], 8)])
def test_encoder_decoder_shapes(ch_mult, f):
    torch.manual_seed(0)
    cfg = ddconfig(ch_mult, resolution=32, attn_resolutions=[32 // f])
    model = AutoencoderKL(cfg, embed_dim=3)
    x = torch.randn(2, 3, 32, 32)
    assert Encoder(**cfg)(x).shape == (2, 8, 32 // f, 32 // f)  # double_z: mean and logvar
    assert Decoder(**cfg)(torch.randn(2, 4, 32 // f, 32 // f)).shape == (2, 3, 32, 32)
    posterior = model.encode(x)
    assert model.downsampling_factor == f
    assert posterior.mean.shape == posterior.std.shape == (2, 3, 32 // f, 32 // f)
    recon, post = model(x)
    assert recon.shape == x.shape and torch.isfinite(recon).all()
    # a non-square image works too (the decoder does not assume `resolution`)
    assert model.decode(model.encode(torch.randn(1, 3, 32, 64)).mode()).shape == (1, 3, 32, 64)


def test_attention_only_where_asked():
    enc = Encoder(**ddconfig([1, 2, 2], resolution=32, attn_resolutions=[8]))
    assert [len(level.attn) for level in enc.down] == [0, 0, 1]
    assert isinstance(enc.mid.attn_1, AttnBlock)
    no_attn = Encoder(**ddconfig([1, 2], attn_resolutions=[]), attn_type="none")
    assert isinstance(no_attn.mid.attn_1, torch.nn.Identity)


def test_attnblock_matches_explicit_softmax_attention():
    torch.manual_seed(0)
    block = AttnBlock(8).eval()
    x = torch.randn(2, 8, 4, 5)
    h = block.norm(x)
    q, k, v = (f(h).flatten(2) for f in (block.q, block.k, block.v))  # (B, C, HW)
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(8), dim=-1)  # (B, HWq, HWk)
    expected = x + block.proj_out(torch.einsum("bij,bcj->bci", w, v).reshape(2, 8, 4, 5))
    torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5)


def test_downsample_pads_right_and_bottom_only():
    down = Downsample(1, with_conv=True)
    torch.nn.init.zeros_(down.conv.bias)
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 0, 0] = 1.0  # picks the top-left input of each 3×3 window
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y = down(x)
    assert y.shape == (1, 1, 2, 2)
    assert y.flatten().tolist() == [0.0, 2.0, 8.0, 10.0]  # no padding on the top/left: windows start at 0
    assert Upsample(1, with_conv=False)(x).shape == (1, 1, 8, 8)


def test_normalize_keeps_sd_groups_and_adapts_for_toy_widths():
    assert Normalize(128).num_groups == 32 and Normalize(128).eps == 1e-6
    assert Normalize(8).num_groups == 8 and Normalize(48).num_groups == 16


def test_posterior_kl_sample_mode_nll():
    zeros = torch.zeros(2, 8, 3, 3)
    standard = DiagonalGaussianDistribution(zeros)  # mean 0, logvar 0: N(0, I)
    assert torch.equal(standard.kl(), torch.zeros(2))
    params = torch.randn(2, 8, 3, 3)
    post = DiagonalGaussianDistribution(params)
    kl = post.kl()
    assert kl.shape == (2,) and torch.isfinite(kl).all() and (kl > 0).all()
    ref = torch.distributions.Normal(post.mean, post.std)
    expected = torch.distributions.kl_divergence(ref, torch.distributions.Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(kl, expected)
    other = DiagonalGaussianDistribution(torch.randn(2, 8, 3, 3))
    expected = torch.distributions.kl_divergence(ref, torch.distributions.Normal(other.mean, other.std)).sum((1, 2, 3))
    torch.testing.assert_close(post.kl(other), expected)
    z = post.sample()
    torch.testing.assert_close(post.nll(z), -ref.log_prob(z).sum(dim=(1, 2, 3)))
    a = post.sample(generator=torch.Generator().manual_seed(1))
    b = post.sample(generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, post.mode())
    assert torch.equal(post.mode(), params[:, :4])
    extreme = DiagonalGaussianDistribution(torch.cat([zeros[:, :4], torch.full((2, 4, 3, 3), 1e4)], 1))
    assert extreme.logvar.max() == 20.0 and torch.isfinite(extreme.kl()).all()  # logvar clamped to [-30, 20]
    assert torch.equal(DiagonalGaussianDistribution(params, deterministic=True).sample(), post.mode())


def test_inference_model_has_only_the_nets_keys():
    model = AutoencoderKL(ddconfig([1, 2]), embed_dim=4)
    prefixes = {k.split(".")[0] for k in model.state_dict()}
    assert prefixes == {"encoder", "decoder", "quant_conv", "post_quant_conv"}
    with pytest.raises(RuntimeError, match="without `loss`"):
        AutoencoderKLSystem(ddconfig([1, 2]), embed_dim=4).configure_optimizers()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_layout_gives_the_same_results_in_the_default_layout(dtype):
    ddconfig = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                    num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
    torch.manual_seed(0)
    nchw = AutoencoderKL(ddconfig, embed_dim=4, channels_last=False).eval()
    nhwc = AutoencoderKL(ddconfig, embed_dim=4, channels_last=True).eval()
    nhwc.load_state_dict(nchw.state_dict())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        post_a, post_b = nchw.encode(x), nhwc.encode(x)
        dec_a, dec_b = nchw.decode(post_a.mode()), nhwc.decode(post_a.mode())
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(post_b.mean, post_a.mean, **tol)
    torch.testing.assert_close(dec_b, dec_a, **tol)
    assert dec_b.is_contiguous() and post_b.parameters.is_contiguous()  # callers see the default layout


def test_ddconfig_typo_is_named():
    cfg = load_config(TINY)
    cfg["model"]["params"]["ddconfig"]["ch_mul"] = [1, 2]
    with pytest.raises(ConfigError, match="ddconfig.ch_mul"):
        instantiate_from_config(cfg["model"], "model")


# ------------------------------------------------------------------------------------ training loop


class Squares(Dataset):
    """A stand-in dataset of batch-format dicts: a bright square on a dark background."""

    def __init__(self, n: int, size: int = 16):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        image = torch.full((3, self.size, self.size), -0.8)
        top, left = i % 7, (3 * i) % 7
        image[:, top : top + 6, left : left + 6] = torch.tensor([0.9, -0.2, 0.5])[:, None, None]
        return {"image": image, "path": f"squares/{i}"}


class DiscriminatorProbe(L.Callback):
    """Records the discriminator's activity: forward calls per global step and a snapshot at disc_start."""

    def __init__(self, disc_start: int):
        self.disc_start, self.forward_steps, self.at_start = disc_start, [], None

    def on_fit_start(self, trainer, module):
        disc = module.loss.discriminator
        disc.register_forward_hook(lambda *_: self.forward_steps.append(trainer.global_step))
        self.initial = {k: v.clone() for k, v in disc.state_dict().items()}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.disc_start:
            disc = module.loss.discriminator
            self.at_start = {
                "forwards": len(self.forward_steps),
                "unchanged": all(torch.equal(v, self.initial[k]) for k, v in disc.state_dict().items()),
                "grads_none": all(p.grad is None for p in disc.parameters()),
                "adam_state": len(trainer.optimizers[1].state),
            }


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_training_counts_batches_and_switches_discriminator_on(tmp_path, precision):
    cfg = load_config(TINY)
    torch.manual_seed(0)
    model = instantiate_from_config(cfg["model"], "model")
    disc_start, batches = cfg["model"]["params"]["loss"]["params"]["disc_start"], 6
    probe = DiscriminatorProbe(disc_start)
    trainer_cfg = {**cfg["trainer"], "max_steps": batches, "precision": precision, "val_check_interval": batches}
    trainer = L.Trainer(default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False,
                        callbacks=[probe, *(instantiate_from_config(node) for node in cfg["callbacks"])], **trainer_cfg)
    trainer.fit(model, DataLoader(Squares(64), batch_size=4), DataLoader(Squares(8), batch_size=4))

    assert trainer.global_step == batches  # generator steps = batches, although the discriminator stepped too
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == batches
    # before disc_start: no discriminator forward, no gradient, no optimiser step
    assert probe.at_start == {"forwards": 0, "unchanged": True, "grads_none": True, "adam_state": 0}
    # from disc_start on: it runs, learns and is stepped once per batch
    assert min(probe.forward_steps) == disc_start
    disc = model.loss.discriminator
    assert any(not torch.equal(v, probe.initial[k]) for k, v in disc.state_dict().items())
    adam_d = trainer.optimizers[1].state[next(disc.parameters())]
    assert int(adam_d["step"]) == batches - disc_start
    metrics = trainer.callback_metrics
    assert {"train/g_loss", "train/disc_loss", "train/d_weight", "train/kl_loss", "train/nll_loss"} <= set(metrics)
    assert float(metrics["train/d_weight"]) > 0 and math.isfinite(float(metrics["val/psnr"]))
    samples = sorted(p.name for p in (tmp_path / "samples").glob("*.png"))
    assert samples == ["vae-step3.png", "vae-step6.png"]  # the ReconstructionGrid callback: every 3 steps


def test_tiny_config_trains_through_the_driver(tmp_path):
    """configs/tiny/vae.yaml end to end: shapes data, DataModule, run directory, samples, checkpoint."""
    from ldm.training.driver import train

    run = train("vae", str(TINY), ["--runs-dir", str(tmp_path)])
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    assert (run / "samples" / "vae-step6.png").is_file()
