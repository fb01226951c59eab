"""Conditioning embedders at toy size: context shapes, null conditions, CFG dropout, tokenisation,
FrozenOpenCLIP against open_clip's own CLIP (random weights, no network)."""

from __future__ import annotations

import time
import warnings

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPVisionCfg

from ldm.core.config import instantiate_from_config
from ldm.nets.conditioning.embedders import (
    ClassEmbedder,
    FrozenOpenCLIP,
    TextTransformer,
    WeightsUnavailableError,
    ucg_dropout,
)
from ldm.nets.conditioning.openclip_weights import read_state_dict

CTX = 16
TINY_TEXT = {"width": 32, "layers": 3, "heads": 2}
TINY_VISION = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)
VIT_H_TAG = "laion2b_s32b_b79k"
CAPTIONS = ["a red circle on a blue background", "a small green square", ""]
SD2_BLOCK_KEYS = [
    "ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
    "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
    "mlp.c_proj.weight", "mlp.c_proj.bias",
]  # fmt: skip
SD2_TOP_KEYS = [
    "token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
    "text_projection", "logit_scale",
]  # fmt: skip


def tiny_clip(arch: str = "ViT-H-14", seed: int = 0) -> CLIP:
    """open_clip's full CLIP (with a toy visual tower) and the toy text tower, as a reference."""
    torch.manual_seed(seed)
    text = {**open_clip.get_model_config(arch)["text_cfg"], **TINY_TEXT, "context_length": CTX}
    return CLIP(embed_dim=open_clip.get_model_config(arch)["embed_dim"], vision_cfg=TINY_VISION, text_cfg=text).eval()


def tiny_openclip(**kwargs) -> FrozenOpenCLIP:
    kwargs = {"pretrained": None, "max_length": CTX, "text_cfg": TINY_TEXT, **kwargs}
    return FrozenOpenCLIP(**kwargs)


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """The Hugging Face hub in offline mode with an empty cache (no network retries)."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


# ------------------------------------------------------------------------------------ ClassEmbedder


def test_class_embedder_context_and_null_class():
    emb = ClassEmbedder(n_classes=5, embed_dim=8)
    assert (emb.key, emb.context_dim) == ("label", 8)
    assert emb.embedding.weight.shape == (6, 8)  # + the null row
    ctx = emb(torch.tensor([0, 4, 2]))
    assert ctx.shape == (3, 1, 8)
    null = emb.null_condition(2)
    assert null.dtype == torch.long and null.tolist() == [5, 5]
    assert torch.equal(emb.unconditional(2), emb.embedding.weight[5].expand(2, 1, 8))
    assert torch.equal(emb([3])[0, 0], emb.embedding.weight[3])  # a list of ints works too


def test_class_embedder_rejects_bad_labels():
    emb = ClassEmbedder(n_classes=5, embed_dim=8)
    with pytest.raises(ValueError, match=r"\[6, -1\] out of range: expected 0\.\.4"):
        emb(torch.tensor([1, 6, -1]))
    with pytest.raises(TypeError, match="integers"):
        emb(torch.tensor([1.0]))


# ----------------------------------------------------------------------------------- TextTransformer


def test_text_transformer_context_null_and_gradients():
    torch.manual_seed(0)
    emb = TextTransformer(embed_dim=32, n_layers=2, n_heads=2, max_length=CTX)
    assert (emb.key, emb.context_dim) == ("caption", 32)
    ctx = emb(CAPTIONS)
    assert ctx.shape == (3, CTX, 32)
    assert emb.null_condition(2) == ["", ""]
    uncond = emb.unconditional(2)
    assert torch.allclose(uncond[0], ctx[2], atol=1e-6) and torch.allclose(uncond[1], ctx[2], atol=1e-6)
    assert not torch.allclose(ctx[0], ctx[1])
    ctx.square().mean().backward()  # trained from scratch: gradients reach the embeddings
    assert emb.token_embedding.weight.grad.abs().sum() > 0 and emb.positional_embedding.grad.abs().sum() > 0


def test_tokens_match_open_clip_tokenize():
    emb = TextTransformer(embed_dim=32, n_layers=1, n_heads=2, max_length=CTX)
    long = "a " + " ".join(["very"] * 30) + " long caption"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = emb.tokenizer([*CAPTIONS, long])
    assert torch.equal(ours, open_clip.tokenize([*CAPTIONS, long], context_length=CTX))


def test_truncation_warns_once_per_caption():
    emb = TextTransformer(embed_dim=32, n_layers=1, n_heads=2, max_length=CTX)
    long_a = "a huge red circle " + " ".join(["and a tiny square"] * 10)
    long_b = "a blue triangle " + " ".join(["next to a circle"] * 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            emb([long_a, "short"])
        emb([long_b])
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2, messages
    assert "a huge red circle" in messages[0] and f"context is {CTX} tokens" in messages[0]
    assert "a blue triangle" in messages[1]


# ---------------------------------------------------------------------------------------- ucg_dropout


def test_ucg_dropout_rates_and_identity():
    captions = [f"c{i}" for i in range(8)]
    labels = torch.arange(8)
    assert ucg_dropout(captions, [""] * 8, 0.0) == captions
    assert torch.equal(ucg_dropout(labels, torch.full((8,), 10), 0.0), labels)
    assert ucg_dropout(captions, [""] * 8, 1.0) == [""] * 8
    assert ucg_dropout(labels, torch.full((8,), 10), 1.0).tolist() == [10] * 8
    assert ucg_dropout(labels, 10, 1.0).tolist() == [10] * 8  # a single null broadcasts
    with pytest.raises(ValueError, match="rate"):
        ucg_dropout(labels, 10, 1.5)

    gen = torch.Generator().manual_seed(0)
    n = 20_000
    dropped = ucg_dropout(torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long), 0.3, gen)
    assert abs(dropped.float().mean().item() - 0.3) < 0.02
    text = ucg_dropout(["x"] * n, "", 0.1, gen)
    assert abs(text.count("") / n - 0.1) < 0.01


def test_ucg_dropout_fresh_per_call_and_seeded():
    labels = torch.arange(64)
    null = torch.full((64,), 99)
    gen = torch.Generator().manual_seed(123)
    first, second = ucg_dropout(labels, null, 0.5, gen), ucg_dropout(labels, null, 0.5, gen)
    assert not torch.equal(first, second)
    again = ucg_dropout(labels, null, 0.5, torch.Generator().manual_seed(123))
    assert torch.equal(first, again)
    kept = first != 99
    assert torch.equal(first[kept], labels[kept])  # survivors are untouched


# ------------------------------------------------------------------------------------ FrozenOpenCLIP


def test_frozen_openclip_frozen_eval_and_sd2_keys():
    emb = tiny_openclip()
    assert (emb.key, emb.context_dim, emb.layer) == ("caption", 32, "penultimate")
    assert all(not p.requires_grad for p in emb.parameters())
    emb.train()
    assert not emb.training and not any(m.training for m in emb.modules())
    ctx = emb(CAPTIONS)
    assert ctx.shape == (3, CTX, 32) and not ctx.requires_grad
    expected = {f"model.{k}" for k in SD2_TOP_KEYS} | {
        f"model.transformer.resblocks.{i}.{k}" for i in range(TINY_TEXT["layers"]) for k in SD2_BLOCK_KEYS
    }
    assert set(emb.state_dict()) == expected  # no visual tower, no attn_mask
    assert not hasattr(emb.model, "visual")


def test_frozen_openclip_trainable_when_not_frozen():
    emb = tiny_openclip(freeze=False)
    emb.train()
    assert emb.training and emb.model.training
    emb(CAPTIONS[:2]).sum().backward()
    assert emb.model.token_embedding.weight.grad is not None


def test_frozen_openclip_matches_open_clip_layers(tmp_path):
    clip = tiny_clip()
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(clip.state_dict(), path)  # a full CLIP checkpoint, visual tower included
    last = tiny_openclip(pretrained=str(path), layer="last")
    penultimate = tiny_openclip(pretrained=str(path), layer="penultimate")

    tokens = open_clip.tokenize(CAPTIONS, context_length=CTX)
    with torch.no_grad():
        ref = clip.forward_intermediates(
            text=tokens, text_indices=2, normalize_intermediates=True, intermediates_only=True
        )["text_intermediates"]
    assert torch.allclose(last(CAPTIONS), ref[-1], atol=1e-5)
    assert torch.allclose(penultimate(CAPTIONS), ref[-2], atol=1e-5)
    assert not torch.allclose(ref[-1], ref[-2], atol=1e-3)
    assert torch.equal(last.model.text_projection, clip.text_projection)


def test_frozen_openclip_loads_sd_checkpoint_and_shorter_context(tmp_path):
    clip = tiny_clip(seed=1)
    text = {k: v for k, v in clip.state_dict().items() if not k.startswith("visual.")}
    sd = {f"cond_stage_model.model.{k}": v for k, v in text.items()}
    sd["model.diffusion_model.out.2.weight"] = torch.zeros(1)
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": sd}, path)
    full = tiny_openclip(pretrained=str(path))
    short = tiny_openclip(pretrained=str(path), max_length=8)  # causal mask: a prefix of the positions is exact
    caption = ["a red circle"]
    assert torch.allclose(short(caption), full(caption)[:, :8], atol=1e-5)
    with pytest.raises(RuntimeError, match="do not fit"):
        tiny_openclip(pretrained=str(path), text_cfg={**TINY_TEXT, "width": 64})


def test_frozen_openclip_offline_tag_fails_fast_with_instructions(offline_hub):
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as err:
        tiny_openclip(pretrained=VIT_H_TAG)
    assert time.monotonic() - start < 10
    message = str(err.value)
    for needle in ("ViT-H-14", VIT_H_TAG, "no network", "pretrained: /path/to/open_clip_pytorch_model.bin",
                   "Hugging Face cache"):  # fmt: skip
        assert needle in message, (needle, message)


def test_frozen_openclip_tag_found_in_local_hf_cache(offline_hub):
    snapshot = offline_hub / "models--laion--CLIP-ViT-H-14-laion2B-s32B-b79K" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (offline_hub / "models--laion--CLIP-ViT-H-14-laion2B-s32B-b79K" / "refs").mkdir()
    (offline_hub / "models--laion--CLIP-ViT-H-14-laion2B-s32B-b79K" / "refs" / "main").write_text("0" * 40)
    clip = tiny_clip(seed=2)
    torch.save(clip.state_dict(), snapshot / "open_clip_pytorch_model.bin")
    emb = tiny_openclip(pretrained=VIT_H_TAG)
    assert torch.equal(emb.model.token_embedding.weight, clip.token_embedding.weight)


def test_frozen_openclip_unknown_tag_or_arch():
    with pytest.raises(FileNotFoundError, match="laion2b_s32b_b79k"):
        tiny_openclip(pretrained="no-such-tag")
    with pytest.raises(ValueError, match="unknown open_clip arch"):
        tiny_openclip(arch="ViT-Q-99")
    with pytest.raises(ValueError, match="unknown field"):
        tiny_openclip(text_cfg={"widht": 32})


def test_full_size_towers_match_public_parameter_counts():
    with torch.device("meta"):
        sd2 = FrozenOpenCLIP(pretrained=None)
        sd1 = FrozenOpenCLIP(arch="ViT-L-14", pretrained=None, layer="last", quick_gelu=True)
    assert sd2.context_dim == 1024 and len(sd2.state_dict()) == 24 * len(SD2_BLOCK_KEYS) + len(SD2_TOP_KEYS)
    assert sum(p.numel() for p in sd2.parameters()) == 354_032_641
    # SD1's text encoder (Hugging Face CLIPTextModel, ViT-L/14): 123,060,480 parameters, no projection.
    tower = sum(p.numel() for n, p in sd1.model.named_parameters() if n not in ("text_projection", "logit_scale"))
    assert sd1.context_dim == 768 and tower == 123_060_480
    assert isinstance(sd1.model.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:.*TorchScript archive")
def test_read_state_dict_torchscript_archive(tmp_path):
    path = tmp_path / "jit.pt"
    torch.jit.script(torch.nn.Linear(2, 3)).save(str(path))
    assert set(read_state_dict(path)) == {"weight", "bias"}


def test_embedders_build_from_config():
    base = "ldm.nets.conditioning.embedders."
    nodes = [
        {"target": base + "ClassEmbedder", "params": {"n_classes": 4, "embed_dim": 8}},
        {"target": base + "TextTransformer", "params": {"embed_dim": 16, "n_layers": 1, "n_heads": 2, "max_length": 8}},
        {
            "target": base + "FrozenOpenCLIP",
            "params": {"pretrained": None, "max_length": 8, "layer": "last", "text_cfg": TINY_TEXT},
        },
    ]
    for node in nodes:
        emb = instantiate_from_config(node, path="model.params.cond_stage_config")
        ctx = emb(emb.null_condition(2))
        assert ctx.shape[0] == 2 and ctx.shape[-1] == emb.context_dim
