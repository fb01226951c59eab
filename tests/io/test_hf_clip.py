"""SD1's text encoder: Hugging Face CLIPTextModel weights mapped into open_clip's text tower (FrozenOpenCLIP).

The mapping must cover every key of the HF model and reproduce its hidden states (last layer, and the
penultimate one with the final LayerNorm, as "CLIP skip 2" uses it) for the same token ids.
"""

import pytest
import torch

from ldm.io.hf_clip import (
    HF_IGNORED,
    OPENCLIP_ONLY,
    ClipKeyError,
    hf_to_openclip,
    is_hf_clip_text,
    openclip_to_hf,
)
from ldm.nets.conditioning.openclip import FrozenOpenCLIP

WIDTH, HEADS, LAYERS, MLP = 32, 2, 3, 128
VOCAB, CONTEXT = 49408, 77  # CLIP's BPE vocabulary and context, as SD1's
# OpenAI CLIP ViT-L/14's text model (SD1's cond_stage_model.transformer) in transformers' naming.
VIT_L14 = dict(vocab_size=VOCAB, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=CONTEXT, hidden_act="quick_gelu")
VIT_L14_TEXT_PARAMS = 123_060_480  # openai/clip-vit-large-patch14's CLIPTextModel
CAPTIONS = ["a photograph of an astronaut riding a horse", "", "red circle, blue background " * 3]


def sd1_encoder(layer: str = "last", toy: bool = True) -> FrozenOpenCLIP:
    """SD1's text encoder as configs/sd/v1-inference.yaml builds it (at toy width unless ``toy=False``)."""
    cfg = dict(width=WIDTH, heads=HEADS, layers=LAYERS) if toy else None
    return FrozenOpenCLIP(arch="ViT-L-14", pretrained=None, layer=layer, quick_gelu=True, pad_token_id=49407,
                          text_cfg=cfg)


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=MLP,
                                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                         max_position_embeddings=CONTEXT, hidden_act="quick_gelu")
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so every tensor shows in the outputs
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def sd1_keys(state: dict) -> dict:
    """HF keys as SD1 files store them: under ``text_model.`` (transformers ≥ 5 drops that level in memory)."""
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}


def test_the_mapping_covers_every_key_of_the_hf_text_model_both_ways(hf_model):
    hf_state = sd1_keys(hf_model.state_dict())
    hf_state["text_model.embeddings.position_ids"] = torch.arange(CONTEXT)[None]  # as old SD1 files have it
    assert is_hf_clip_text(hf_state)
    mapped = hf_to_openclip(hf_state)
    own = sd1_encoder().model.state_dict()
    assert set(mapped) == set(own) - OPENCLIP_ONLY
    assert all(mapped[k].shape == own[k].shape for k in mapped)
    back = openclip_to_hf(mapped)  # a bijection on the weights: nothing dropped, nothing invented
    assert set(back) == set(hf_state) - HF_IGNORED
    assert all(torch.equal(back[k], hf_state[k]) for k in back)
    n_values = sum(v.numel() for k, v in hf_state.items() if k not in HF_IGNORED)
    assert sum(v.numel() for v in mapped.values()) == n_values


@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_mapped_weights_reproduce_the_hf_hidden_states(hf_model, layer):
    ours = sd1_encoder(layer)
    missing, unexpected = ours.model.load_state_dict(hf_to_openclip(sd1_keys(hf_model.state_dict())), strict=False)
    assert sorted(missing) == sorted(OPENCLIP_ONLY) and not unexpected
    tokens = ours.tokenizer(CAPTIONS)  # (B, 77), padded with <end> as HF's tokenizer does for SD1
    assert tokens[1, 2:].eq(49407).all()
    with torch.no_grad():
        out = hf_model(input_ids=tokens, output_hidden_states=True)
        final_norm = getattr(hf_model, "text_model", hf_model).final_layer_norm
        expected = out.last_hidden_state if layer == "last" else final_norm(out.hidden_states[-2])
        torch.testing.assert_close(ours(CAPTIONS), expected, atol=1e-5, rtol=1e-5)
        other = out.hidden_states[-2] if layer == "last" else out.last_hidden_state
        assert (ours(CAPTIONS) - other).abs().max() > 1e-2  # the two layers do differ


def test_old_sd1_files_without_the_text_model_level_map_the_same(hf_model):
    with_root = sd1_keys(hf_model.state_dict())
    bare = {k[len("text_model."):]: v for k, v in with_root.items()}
    a, b = hf_to_openclip(with_root), hf_to_openclip(bare)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_keys_and_incomplete_attention_are_named():
    q = {f"text_model.encoder.layers.0.self_attn.{p}_proj.weight": torch.zeros(4, 4) for p in "qk"}
    with pytest.raises(ClipKeyError, match="layer 0: self_attn weight of v_proj missing"):
        hf_to_openclip(q)
    with pytest.raises(ClipKeyError, match="text_model.pooler.dense.weight"):
        hf_to_openclip({"text_model.pooler.dense.weight": torch.zeros(1)})
    with pytest.raises(ClipKeyError, match="transformer.resblocks.0.ls_1.gamma"):
        openclip_to_hf({"transformer.resblocks.0.ls_1.gamma": torch.zeros(1)})


def test_vit_l14_full_key_list_and_shapes_on_the_meta_device():
    """Every key and shape of SD1's real text encoder (no weights allocated) lands on our ViT-L/14 tower."""
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        hf = transformers.CLIPTextModel(transformers.CLIPTextConfig(**VIT_L14))
        ours = sd1_encoder(toy=False)  # configs/sd/v1-inference.yaml's encoder: the full ViT-L/14 text tower
    hf_state = sd1_keys(hf.state_dict())
    hf_state = {k: v for k, v in hf_state.items() if k not in HF_IGNORED}
    assert sum(v.numel() for v in hf_state.values()) == VIT_L14_TEXT_PARAMS
    assert len(hf_state) == 196  # 2 embeddings + 12 layers × 16 + final LayerNorm × 2
    mapped = hf_to_openclip(hf_state)
    own = {k: v.shape for k, v in ours.model.state_dict().items()}
    assert set(mapped) == set(own) - OPENCLIP_ONLY
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(own[k]) for k in mapped}
    assert set(openclip_to_hf(mapped)) == set(hf_state)


def test_mapping_without_transformers_follows_the_documented_names():
    """The key pattern itself (no transformers needed): two layers at toy width."""
    own = sd1_encoder().model.state_dict()
    hf = openclip_to_hf(own)
    layer = {k for k in hf if k.startswith("text_model.encoder.layers.0.")}
    names = {k.removeprefix("text_model.encoder.layers.0.") for k in layer}
    assert names == {f"self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")} | {
        "self_attn.out_proj.weight", "self_attn.out_proj.bias", "layer_norm1.weight", "layer_norm1.bias",
        "layer_norm2.weight", "layer_norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"}
    assert {"text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
            "text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"} <= set(hf)
    assert len(hf) == 4 + 16 * LAYERS
    back = hf_to_openclip(hf)
    assert all(torch.equal(back[k], own[k]) for k in back) and set(back) == set(own) - OPENCLIP_ONLY
