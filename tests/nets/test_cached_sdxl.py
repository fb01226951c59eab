"""The cached stand-in for SDXL's conditioner equals the real one on a toy SDXL system: the same context and ADM
vector y (within the cache's fp16 rounding) for captions and sizes, the same unconditional branch (zeros, or the empty
caption's outputs), the real conditioner's outputs for captions, and its state-dict names."""

import pytest
import torch

from ldm.core.config import instantiate_from_config
from ldm.data.text_cache import encode_captions
from ldm.nets.conditioning.cached_sdxl import CachedSDXLConditioner
from ldm.nets.conditioning.sdxl import SizeConditioning
from tests.init_guard import no_random_init
from tests.sdxl_toy import tiny_xl_config, tiny_xl_system

CAPTIONS = ["a red circle on a blue background", "a zorb", ""]
SIZES = {"original_size": torch.tensor([[1024.0, 768.0], [16.0, 16.0], [600.0, 1200.0]]),
         "crop_top_left": torch.tensor([[0.0, 0.0], [4.0, 8.0], [32.0, 0.0]]),
         "target_size": torch.tensor([[16.0, 16.0], [16.0, 16.0], [16.0, 24.0]])}
FP16 = dict(rtol=2e-3, atol=2e-3)  # the cache stores fp16


def conditioner_node() -> dict:
    return tiny_xl_config()["model"]["params"]["cond_stage"]


def stand_in(real, zero_unconditional: bool = True) -> CachedSDXLConditioner:
    """The stand-in as training builds it: the real conditioner's weights and empty-caption outputs (fp16)."""
    return CachedSDXLConditioner(dict(real.state_dict()), encode_captions(real, [""], 1),
                                 lambda: instantiate_from_config(conditioner_node()),
                                 size_embed_dim=real.size_embed_dim, zero_unconditional=zero_unconditional)


@pytest.fixture(scope="module")
def real():
    return tiny_xl_system(seed=2).cond_stage_model


def batch_of(real, captions):
    """What a batch of the cache carries under ``text``: the fp16 outputs, as fp32."""
    return {k: v.float() for k, v in encode_captions(real, captions, 2).items()}


def test_cached_outputs_and_sizes_give_the_real_context_and_y(real):
    cached = stand_in(real)
    assert cached.takes_sizes and cached.key == "text"
    assert (cached.context_dim, cached.adm_dim) == (real.context_dim, real.adm_dim)
    want = real.conditioning(CAPTIONS, SIZES)
    got = cached.conditioning(batch_of(real, CAPTIONS), SIZES)
    assert got.keys() == want.keys() == {"context", "y"}
    assert got["y"].shape == want["y"].shape == (3, real.adm_dim)
    for key in got:
        assert torch.allclose(got[key], want[key], **FP16), key
    pooled = real.embedders[-1].model.text_projection.shape[-1]
    assert torch.equal(got["y"][:, pooled:], want["y"][:, pooled:])  # the size embeddings: the same rule, exact
    one = SizeConditioning.for_size(16, 24, original_size=(600, 1200))  # one request's sizes for every row
    for key, value in cached.conditioning(batch_of(real, CAPTIONS), one).items():
        assert torch.allclose(value, real.conditioning(CAPTIONS, one)[key], **FP16)


@pytest.mark.parametrize("zero", [True, False])
def test_the_unconditional_branch_is_the_real_one(real, zero):
    real.zero_unconditional = zero
    try:
        want = real.unconditional_conditioning(3, SIZES)
        got = stand_in(real, zero_unconditional=zero).unconditional_conditioning(3, SIZES)
    finally:
        real.zero_unconditional = True
    for key in ("context", "y"):
        assert got[key].shape == want[key].shape
        assert torch.equal(got[key], want[key]) if zero else torch.allclose(got[key], want[key], **FP16)
    if zero:
        assert not got["context"].any()  # zeros, not the empty caption's embedding


def test_captions_go_through_the_real_conditioner_and_the_weights_keep_their_names(real):
    cached = stand_in(real)
    assert not list(cached.parameters())  # nothing built for training
    two = {k: v[:2] for k, v in SIZES.items()}
    with no_random_init() as touched:  # the real conditioner is built without weights and takes the cached ones
        got = cached.conditioning(CAPTIONS[:2], two)  # a sample grid's prompts
    assert touched == []
    want = real.conditioning(CAPTIONS[:2], two)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(cached(CAPTIONS[:2]), real(CAPTIONS[:2]))
    state = cached.state_dict()
    assert state.keys() == real.state_dict().keys()
    cached.load_state_dict(real.state_dict())  # a checkpoint of a run with the real conditioner loads
