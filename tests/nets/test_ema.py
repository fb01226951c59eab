"""LitEma: the warm-up update formula, swapping weights in and out, SD checkpoint key names, fp32 shadows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm.nets.ema import LitEma, ema_scope, shadow_name, warmup_decay


class ToyUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(4, 8, 3)), nn.Sequential(nn.Linear(8, 8))])
        self.out = nn.Sequential(nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 4, 1))


class Wrapper(nn.Module):
    """latent-diffusion's DiffusionWrapper: the module holding `diffusion_model`."""

    def __init__(self):
        super().__init__()
        self.diffusion_model = ToyUNet()


class Parent(nn.Module):
    def __init__(self, decay: float = 0.9999):
        super().__init__()
        self.model = Wrapper()
        self.model_ema = LitEma(self.model, decay=decay)


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_update_follows_warmup_formula():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = LitEma(model, decay=0.9)
    expected = params(model)
    for step in range(1, 31):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema(model) if step % 2 else ema.update(model)
        d = min(0.9, (1 + step) / (10 + step))
        assert d == warmup_decay(0.9, step)
        for name, p in model.named_parameters():
            expected[name] = d * expected[name] + (1 - d) * p.detach()
    assert int(ema.num_updates) == 30
    for name, value in expected.items():
        assert torch.allclose(getattr(ema, shadow_name(name)), value, atol=1e-6), name
    assert warmup_decay(0.9999, 1) == pytest.approx(2 / 11)


def test_without_num_updates_decay_is_constant():
    model = nn.Linear(2, 2, bias=False)
    ema = LitEma(model, decay=0.5, use_num_updates=False)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema(model)
    assert int(ema.num_updates) == -1
    assert torch.allclose(ema.weight, start + 0.5)


def test_copy_to_store_restore_round_trip():
    torch.manual_seed(0)
    parent = Parent(decay=0.5)
    model, ema = parent.model, parent.model_ema
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema(model)
    train = params(model)
    ema.store(model.parameters())
    ema.copy_to(model)
    for name, p in model.named_parameters():
        assert torch.equal(p, getattr(ema, shadow_name(name)))
        assert not torch.equal(p, train[name])
    ema.restore(model.parameters())
    assert all(torch.equal(p, train[n]) for n, p in model.named_parameters())
    assert ema.collected_params == []


def test_scope_swaps_in_and_restores_even_on_exception():
    torch.manual_seed(0)
    parent = Parent(decay=0.5)
    model, ema = parent.model, parent.model_ema
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    train = params(model)
    with pytest.raises(RuntimeError, match="boom"):
        with ema_scope(model, ema):
            w = model.diffusion_model.input_blocks[0][0].weight
            assert torch.equal(w, ema.diffusion_modelinput_blocks00weight)
            raise RuntimeError("boom")
    assert all(torch.equal(p, train[n]) for n, p in model.named_parameters())
    with ema.scope(model):
        assert not torch.equal(model.diffusion_model.out[2].bias, train["diffusion_model.out.2.bias"])
    assert all(torch.equal(p, train[n]) for n, p in model.named_parameters())
    with ema_scope(model, None):  # no EMA: a no-op
        assert all(torch.equal(p, train[n]) for n, p in model.named_parameters())


def test_state_dict_uses_latent_diffusion_names_and_loads_sd_keys():
    parent = Parent()
    keys = set(parent.state_dict())
    assert {"model_ema.decay", "model_ema.num_updates", "model_ema.diffusion_modelinput_blocks00weight",
            "model_ema.diffusion_modelinput_blocks10bias", "model_ema.diffusion_modelout2weight"} <= keys  # fmt: skip
    assert len([k for k in keys if k.startswith("model_ema.")]) == len(list(parent.model.parameters())) + 2
    # A Stable Diffusion checkpoint's model_ema.* entries (fp16 weights, int num_updates) load strictly.
    ckpt = {k: v.half() if v.is_floating_point() else v for k, v in parent.state_dict().items()}
    ckpt["model_ema.num_updates"] = torch.tensor(12345, dtype=torch.int)
    conv = ckpt["model.diffusion_model.input_blocks.0.0.weight"]
    ckpt["model_ema.diffusion_modelinput_blocks00weight"] = torch.full_like(conv, 0.25)
    other = Parent()
    other.load_state_dict(ckpt, strict=True)
    assert int(other.model_ema.num_updates) == 12345
    assert other.model_ema.diffusion_modelinput_blocks00weight.dtype == torch.float32
    assert torch.all(other.model_ema.diffusion_modelinput_blocks00weight == 0.25)


def test_frozen_params_are_not_tracked_and_mismatches_are_named():
    model = Wrapper()
    model.diffusion_model.out.requires_grad_(False)
    ema = LitEma(model)
    assert "diffusion_modelout2weight" not in dict(ema.named_buffers())
    ema(model)  # frozen params are skipped
    model.diffusion_model.out.requires_grad_(True)
    with pytest.raises(KeyError, match="diffusion_model.out"):
        ema(model)


def test_name_collision_is_refused():
    model = nn.Module()
    model.a = nn.Module()
    model.a.bc = nn.Parameter(torch.zeros(1))
    model.ab = nn.Module()
    model.ab.c = nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="abc"):
        LitEma(model)


def test_shadows_stay_fp32_with_low_precision_model():
    torch.manual_seed(0)
    parent = Parent(decay=0.999)
    parent.to(torch.bfloat16)  # e.g. bf16-true precision casts the whole module
    ema = parent.model_ema
    assert all(b.dtype == torch.float32 for n, b in ema.named_buffers() if n != "num_updates")
    assert parent.model.diffusion_model.out[2].weight.dtype == torch.bfloat16
    before = ema.diffusion_modelout2weight.clone()
    with torch.no_grad():
        parent.model.diffusion_model.out[2].weight.add_(1.0)
    ema.reset_num_updates()
    ema(parent.model)
    delta = ema.diffusion_modelout2weight - before
    assert torch.allclose(delta, torch.full_like(delta, 1 - 2 / 11), atol=1e-2)  # fp32 increment, warm-up decay
    with ema_scope(parent.model, ema):
        assert parent.model.diffusion_model.out[2].weight.dtype == torch.bfloat16
