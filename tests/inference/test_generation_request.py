"""GenerationRequest checked against ModelCapabilities (ldm.inference.request): every refusal, in Python's and the
command line's names, and what a request checked before loading leaves for after. No model is built."""

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.inference.capabilities import ModelCapabilities
from ldm.inference.control_image import ControlImageError
from ldm.inference.edit_images import EditImageError
from ldm.inference.loaders import PipelineError
from ldm.inference.request import GenerationRequest, check_request
from ldm.inference.request_names import CLI_NAMES

TEXT = ModelCapabilities("caption", size_step=8, image_size=64, latent_channels=4)
CLASSES = ModelCapabilities("label", n_classes=10, class_names=tuple("abcdefghij"), size_step=8, image_size=64,
                            latent_channels=4)
CONTROL = ModelCapabilities("caption", control=True, size_step=8, image_size=64, latent_channels=4)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("request-files")
    Image.fromarray(np.zeros((64, 48, 3), dtype=np.uint8)).save(root / "init.png")
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8), mode="L").save(root / "small.png")
    (root / "text.png").write_text("not an image")
    (root / "style.safetensors").write_bytes(b"")
    return root


REFUSALS = {  # case → (model, request fields, error type, message)
    "no conditions": (TEXT, dict(conditions=[]), PipelineError, "no conditions given"),
    "label for a text model": (TEXT, dict(conditions=[3]), PipelineError, "this run is text-conditional: give prompts"),
    "prompt for a class model": (CLASSES, dict(conditions=["a"]), PipelineError, "give integer class labels"),
    "bool label": (CLASSES, dict(conditions=[True]), PipelineError, "give integer class labels"),
    "class out of range": (CLASSES, dict(conditions=[10]), PipelineError, "class 10 is out of range: this run has "
                                                                           "classes 0..9"),
    "negatives count": (TEXT, dict(conditions=["a", "b"], negative=["x", "y", "z"]), PipelineError,
                        "3 negative conditions for 2 images"),
    "negative of the wrong kind": (CLASSES, dict(conditions=[1], negative="x"), PipelineError, "integer class labels"),
    "classifier missing": (CLASSES, dict(conditions=[1], classifier_scale=2.0), PipelineError, "needs a classifier"),
    "classifier on text": (ModelCapabilities("caption", size_step=8, image_size=64, classifier=True),
                           dict(conditions=["a"], classifier_scale=1.0), PipelineError, "steers toward class labels"),
    "negative classifier scale": (CLASSES, dict(conditions=[1], classifier_scale=-1.0), PipelineError,
                                  "needs a classifier"),
    "missing lora": (TEXT, dict(conditions=["a"], loras=(("{root}/none.safetensors", 1.0),)), PipelineError,
                     "LoRA file {root}/none.safetensors not found"),
    "lora scale nan": (TEXT, dict(conditions=["a"], loras=(("{root}/style.safetensors", float("nan")),)),
                       PipelineError, "must be a finite number"),
    "unknown sampler": (TEXT, dict(conditions=["a"], sampler="plms"), PipelineError, "unknown sampler 'plms'"),
    "zero steps": (TEXT, dict(conditions=["a"], steps=0), PipelineError, "steps must be at least 1, got 0"),
    "zero batch": (TEXT, dict(conditions=["a"], batch_size=0), PipelineError, "batch size must be at least 1"),
    "negative guidance": (TEXT, dict(conditions=["a"], guidance=-1.0), PipelineError, "guidance scale must be ≥ 0"),
    "nan guidance": (TEXT, dict(conditions=["a"], guidance=float("nan")), PipelineError, "guidance scale must be ≥ 0"),
    "rescale above 1": (TEXT, dict(conditions=["a"], guidance_rescale=1.5), PipelineError,
                        "guidance rescale must be in [0, 1]"),
    "negative seed": (TEXT, dict(conditions=["a"], seed=-1), PipelineError, "seed must be ≥ 0"),
    "option of another sampler": (TEXT, dict(conditions=["a"], sampler="dpmpp_2m", sampler_options={"eta": 0.5}),
                                  PipelineError, "sampler 'dpmpp_2m' takes no option 'eta' (eta applies to the samplers"),
    "unknown option": (TEXT, dict(conditions=["a"], sampler_options={"churn": 1}), PipelineError,
                       "takes no option 'churn'"),
    "runtime option": (TEXT, dict(conditions=["a"], sampler_options={"generator": None}), PipelineError,
                       "takes no option 'generator'"),
    "negative eta": (TEXT, dict(conditions=["a"], sampler="ddim", sampler_options={"eta": -1.0}), PipelineError,
                     "eta must be ≥ 0"),
    "strength above 1": (TEXT, dict(conditions=["a"], init_image="{root}/init.png", strength=1.5), PipelineError,
                         "strength must be in [0, 1], got 1.5"),
    "strength without init": (TEXT, dict(conditions=["a"], strength=0.5), PipelineError,
                              "strength needs the init image"),
    "mask without init": (TEXT, dict(conditions=["a"], mask="{root}/small.png"), PipelineError,
                          "the mask needs the init image"),
    "unreadable init": (TEXT, dict(conditions=["a"], init_image="{root}/text.png"), PipelineError,
                        "cannot read the init image {root}/text.png"),
    "unreadable mask": (TEXT, dict(conditions=["a"], init_image="{root}/init.png", mask="{root}/none.png"),
                        PipelineError, "cannot read the mask {root}/none.png"),
    "mask of another size": (TEXT, dict(conditions=["a"], init_image="{root}/init.png", mask="{root}/small.png"),
                             EditImageError, "the mask is 32×32 pixels but the init image is 48×64"),
    "zero height": (TEXT, dict(conditions=["a"], height=0), PipelineError, "height must be a positive number"),
    "off the grid": (TEXT, dict(conditions=["a"], height=60), PipelineError,
                     "image size 64×60 (width×height) is not a positive multiple of 8 (the VAE's factor 8 × the U-Net's "
                     "downsampling 1); e.g. 64×64"),
    "no size known": (ModelCapabilities("caption", size_step=8), dict(conditions=["a"]), PipelineError,
                      "does not record its image size"),
    "control for a plain model": (TEXT, dict(conditions=["a"], control="{root}/init.png"), PipelineError,
                                  "needs a ControlNet model, and this model has no ControlNet"),
    "no control for a ControlNet": (CONTROL, dict(conditions=["a"]), PipelineError,
                                    "this model is a ControlNet: give a control image"),
    "negative control scale": (CONTROL, dict(conditions=["a"], control="{root}/init.png", control_scale=-1.0),
                               PipelineError, "control scale must be ≥ 0"),
    "unreadable control": (CONTROL, dict(conditions=["a"], control="{root}/text.png"), ControlImageError,
                           "cannot read the control image {root}/text.png"),
    "control count": (CONTROL, dict(conditions=["a", "b"], control=["{root}/init.png"] * 3), ControlImageError,
                      "3 control images for 2 images"),
}


def filled(fields: dict, root) -> dict:
    fill = lambda v: v.format(root=root) if isinstance(v, str) else v  # noqa: E731
    return {k: (type(v)(fill(x) if not isinstance(x, tuple) else tuple(fill(y) for y in x) for x in v)
                if isinstance(v, (list, tuple)) else fill(v)) for k, v in fields.items()}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_every_refusal_is_one_line(case, files):
    caps, fields, error, message = REFUSALS[case]
    with pytest.raises(error) as info:
        check_request(GenerationRequest(**filled(fields, files)), caps)
    text = str(info.value)
    assert message.format(root=files) in text and "\n" not in text, text


CLI_REFUSALS = {  # the same rules in the command line's names
    "zero steps": (dict(steps=0), "--steps must be at least 1, got 0"),
    "guidance": (dict(guidance=-1.0), "--scale must be ≥ 0"),
    "eta": (dict(sampler="dpmpp_2m", sampler_options={"eta": 1.0}), "--eta applies to the samplers"),
    "off the grid": (dict(width=12), "--W 12 is not a multiple of 8: the VAE divides by 8 and the U-Net halves the latent 0 "
                                       "time(s) more; use a multiple of 8, e.g. 8 or 16"),
    "strength": (dict(init_image="{root}/init.png", strength=-0.1), "--strength must be in [0, 1]"),
    "mask": (dict(mask="{root}/init.png"), "--mask needs --init"),
    "mask size": (dict(init_image="{root}/init.png", mask="{root}/small.png"), "--mask is 32×32 pixels but --init"),
    "control": (dict(control="{root}/init.png"), "--control needs a ControlNet model"),
}


@pytest.mark.parametrize("case", list(CLI_REFUSALS))
def test_the_command_line_gets_its_own_names(case, files):
    fields, message = CLI_REFUSALS[case]
    with pytest.raises(PipelineError, match=None) as info:
        check_request(GenerationRequest(["a"], **filled(fields, files)), TEXT, CLI_NAMES)
    assert message.format(root=files) in str(info.value)


def test_before_loading_unknowns_pass_and_after_loading_images_are_prepared(files):
    unknown = ModelCapabilities("caption", control=None, size_step=8)  # a file whose ControlNet only loading tells
    request = GenerationRequest(["a", "b"], control=str(files / "init.png"), init_image=str(files / "init.png"),
                                strength=0.3, mask=str(files / "init.png"))
    early = check_request(request, unknown, CLI_NAMES, before_loading=True, model="toy.safetensors")
    assert early.control is None and early.edit is None and (early.height, early.width) == (64, 48)
    late = check_request(request, CONTROL)
    assert late.shape == (4, 8, 6) and late.control.hints.shape == (1, 3, 64, 48)
    assert late.edit.image.shape == (1, 3, 64, 48) and late.edit.mask.shape == (1, 1, 64, 48)
    assert late.edit.image.min() >= -1 and late.edit.mask.sum() == 0  # a black mask keeps everything
    assert late.settings()["strength"] == 0.3
    with pytest.raises(PipelineError, match="toy.safetensors is a ControlNet model: give --control IMAGE"):
        check_request(GenerationRequest(["a"]), CONTROL, CLI_NAMES, before_loading=True, model="toy.safetensors")


def test_keywords_build_the_request_and_tensors_count_as_conditions():
    request = GenerationRequest.of(torch.tensor([3, 4]), seed=7, steps=2, eta=0.5, sampler="ddim", guidance=2.0)
    assert request.sampler_options == {"eta": 0.5} and request.steps == 2 and request.seeds == [7, 8]
    checked = check_request(request, CLASSES)
    assert checked.conditions == [3, 4] and checked.options == {"eta": 0.5}
    assert check_request(GenerationRequest("one prompt"), TEXT).conditions == ["one prompt"]


def test_steps_run_count_the_ladder_tail(files):
    init = str(files / "init.png")
    for strength, runs in ((1.0, 10), (0.55, 5), (0.0, 0)):
        assert check_request(GenerationRequest(["a"], steps=10, init_image=init, strength=strength), TEXT).steps_run == runs
    assert check_request(GenerationRequest(["a"], steps=10), TEXT).steps_run == 10
