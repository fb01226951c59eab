"""LPIPSWithDiscriminator: NLL/KL terms, the adaptive GAN weight, the disc_start switch, the offline LPIPS error."""

import socket
import urllib.error

import pytest
import torch

from ldm.nets.autoencoder.discriminator import (
    NLayerDiscriminator,
    hinge_d_loss,
    vanilla_d_loss,
)
from ldm.nets.autoencoder.losses import (
    VGG16_FILE,
    LPIPSWithDiscriminator,
    PerceptualWeightsUnavailable,
    adaptive_weight,
)
from ldm.systems.autoencoder import AutoencoderKLSystem

DDCONFIG = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=8, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)


def make(disc_start=0, **kw):
    torch.manual_seed(0)
    params = dict(disc_start=disc_start, kl_weight=1e-3, perceptual_weight=0.0, disc_num_layers=2, disc_ndf=8)
    loss = LPIPSWithDiscriminator(**{**params, **kw})
    return AutoencoderKLSystem(DDCONFIG, embed_dim=4, loss=loss), loss


def test_generator_loss_terms():
    model, loss = make(disc_start=100, logvar_init=0.5)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, post = model(x)
    total, log = loss(x, recon, post, 0, global_step=0, last_layer=model.get_last_layer())
    rec = (x - recon).abs()
    nll = (rec / torch.exp(torch.tensor(0.5)) + 0.5).sum() / 2
    kl = post.kl().sum() / 2
    assert torch.isfinite(kl) and kl > 0
    torch.testing.assert_close(total, nll + 1e-3 * kl)
    torch.testing.assert_close(log["train/nll_loss"], nll.detach())
    torch.testing.assert_close(log["train/rec_loss"], rec.mean().detach())
    assert float(log["train/g_loss"]) == 0 and float(log["train/d_weight"]) == 0
    assert loss.perceptual_loss is None  # LPIPS is only built when perceptual_weight > 0
    assert not loss.logvar.requires_grad  # fixed at logvar_init, as latent-diffusion's optimiser leaves it


def test_adaptive_weight_matches_direct_autograd():
    model, loss = make(disc_start=0, disc_weight=0.7)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, post = model(x)
    last = model.get_last_layer()
    total, log = loss(x, recon, post, 0, global_step=5, last_layer=last)

    nll = ((x - recon).abs() / torch.exp(loss.logvar) + loss.logvar).sum() / 2
    g = -loss.discriminator(recon).mean()
    g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g, last, retain_graph=True)[0]
    expected = (g_nll.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4) * 0.7
    assert expected > 0
    torch.testing.assert_close(log["train/d_weight"], expected.detach())
    torch.testing.assert_close(adaptive_weight(nll, g, last, 0.7), expected.detach())
    torch.testing.assert_close(total, nll + 1e-3 * post.kl().sum() / 2 + expected.detach() * g)
    # the GAN term reaches the decoder only with that weight
    (grad_total,) = torch.autograd.grad(total, last, retain_graph=True)
    torch.testing.assert_close(grad_total, torch.autograd.grad(nll + 1e-3 * post.kl().sum() / 2, last,
                                                               retain_graph=True)[0] + expected * g_adv,
                               rtol=1e-4, atol=1e-4)


def test_discriminator_does_no_work_before_disc_start():
    model, loss = make(disc_start=10)
    calls = []
    loss.discriminator.register_forward_hook(lambda *_: calls.append(1))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, post = model(x)
    total, _ = loss(x, recon, post, 0, global_step=9, last_layer=model.get_last_layer())
    total.backward()
    assert calls == [] and all(p.grad is None for p in loss.discriminator.parameters())
    assert not loss.discriminator_active(9) and loss.discriminator_active(10)
    with pytest.raises(RuntimeError, match="disc_start=10"):
        loss(x, recon, post, 1, global_step=9)
    d_loss, log = loss(x, recon, post, 1, global_step=10)
    assert len(calls) == 2 and torch.isfinite(d_loss) and "train/logits_real" in log


def test_gan_losses_and_discriminator_shape():
    zeros = torch.zeros(4, 1, 3, 3)
    assert float(hinge_d_loss(zeros, zeros)) == 1.0
    assert float(hinge_d_loss(zeros + 2, zeros - 2)) == 0.0
    torch.testing.assert_close(vanilla_d_loss(zeros, zeros), torch.log(torch.tensor(2.0)))
    disc = NLayerDiscriminator(input_nc=3, ndf=8, n_layers=3)
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)  # PatchGAN logits
    act = NLayerDiscriminator(input_nc=3, ndf=8, n_layers=2, use_actnorm=True)
    assert torch.isfinite(act(torch.randn(2, 3, 16, 16))).all()
    with pytest.raises(ValueError, match="disc_loss"):
        LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0, disc_loss="wasserstein")


def _offline() -> bool:
    try:
        socket.getaddrinfo("download.pytorch.org", 443)
    except OSError:
        return True
    return False


def test_lpips_without_vgg_weights_says_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: nothing to load
    if not _offline():  # with network the real download would succeed; make it fail as it does offline
        def refuse(*args, **kwargs):
            raise urllib.error.URLError("no network in this test")
        monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    with pytest.raises(PerceptualWeightsUnavailable) as info:
        LPIPSWithDiscriminator(disc_start=0, perceptual_weight=1.0)
    message = str(info.value)
    assert "VGG16 weights" in message and "could not be fetched" in message
    assert str(tmp_path / "hub" / "checkpoints" / VGG16_FILE) in message
    assert "perceptual_weight: 0" in message
