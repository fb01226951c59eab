"""Image to image and inpainting through the page, over HTTP on a toy run: a request with an init image (and a
mask) draws exactly what ``Pipeline.generate`` draws for the same request, keeps the uploads under names made from
their bytes, and the page's command redraws each image through txt2img.py; a mask of another size is refused
with the request's own message."""

import io
import json
import shlex

import numpy as np
import pytest
import requests
from PIL import Image

from ldm.inference.pipeline import GenerationRequest, PipelineError
from ldm.serve.adapter import DEFAULT_STRENGTH, ModelAdapter, ModelSource
from ldm.serve.app import create_app
from ldm.serve.server import Server
from tests.components import shared_run_pipeline
from tests.scripts import load_script
from tests.serve.client import TIMEOUT_S, wait

FAST = {"prompt": "a red square", "steps": "4", "sampler": "ddim", "guidance": "3", "seed": "5"}


@pytest.fixture(scope="module")
def served(toy_ldm_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("edit-out")
    server = Server(create_app(ModelAdapter(ModelSource(run=str(toy_ldm_run), device="cpu")), out=out), port=0).start()
    yield server, out
    server.stop()


@pytest.fixture(scope="module")
def pipe(toy_ldm_run):
    return shared_run_pipeline(toy_ldm_run)  # read only


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def picture(size: int) -> Image.Image:
    """A picture to start from: a red square on white."""
    pixels = np.full((size, size, 3), 255, np.uint8)
    pixels[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = (220, 20, 20)
    return Image.fromarray(pixels)


def half_mask(size: int, height: int | None = None) -> Image.Image:
    """White (repaint) on the right half."""
    mask = np.zeros((height or size, size), np.uint8)
    mask[:, size // 2:] = 255
    return Image.fromarray(mask, mode="L")


def drawn(server, fields: dict, files: dict) -> tuple[dict, Image.Image]:
    files = {k: ("upload.png", png(v), "image/png") for k, v in files.items()}
    response = requests.post(server.url + "/api/generate", data=fields, files=files, timeout=TIMEOUT_S)
    assert response.status_code == 202, response.text
    job = response.json()["job"]
    state = wait(server, job)
    assert state["state"] == "done" and state["step"] == state["total"], state
    entry = state["images"][0]
    return entry, Image.open(io.BytesIO(requests.get(server.url + entry["url"], timeout=TIMEOUT_S).content))


def redrawn(entry: dict, folder) -> np.ndarray:
    assert load_script("txt2img").main([*shlex.split(entry["command"])[2:], "--out", str(folder)]) == 0
    return np.asarray(Image.open(next(folder.glob("0*.png"))).convert("RGB"))


@pytest.mark.parametrize("edit", ["img2img", "inpaint"])
def test_an_edit_draws_what_the_pipeline_draws_and_its_command_redraws_it(served, pipe, edit, tmp_path):
    server, out = served
    size = pipe.capabilities.image_size
    files = {"init": picture(size)} | ({"mask": half_mask(size)} if edit == "inpaint" else {})
    fields = FAST | ({"strength": "0.5"} if edit == "img2img" else {})  # inpainting: strength 1 by default
    entry, image = drawn(server, fields, files)
    params = json.loads(image.text["ldm"])
    assert params["strength"] == (0.5 if edit == "img2img" else 1.0)
    for key, name in (("init_image", "init"), ("mask", "mask")):
        if name in files:  # kept under the output folder by the hash of its bytes, named so in the parameters
            assert (out / params[key]).is_file() and (out / params[key]).name.startswith(f"{name}-")
    request = GenerationRequest(["a red square"], steps=4, sampler="ddim", guidance=3.0, seed=5, batch_size=1,
                                init_image=files["init"], mask=files.get("mask"), strength=params["strength"])
    expected = np.asarray(pipe.generate(request).images[0])
    assert np.array_equal(np.asarray(image.convert("RGB")), expected)
    if edit == "inpaint":
        assert "--mask" in entry["command"] and "--strength 1.0" in entry["command"]
    assert np.array_equal(redrawn(entry, tmp_path), expected)


def test_strength_defaults_as_txt2img_does(served, pipe):
    server, _ = served
    size = pipe.capabilities.image_size
    entry, image = drawn(server, FAST | {"steps": "2"}, {"init": picture(size)})
    assert json.loads(image.text["ldm"])["strength"] == DEFAULT_STRENGTH and "--init" in entry["command"]


def test_a_mask_of_another_size_is_refused_with_the_requests_message(served, pipe):
    server, _ = served
    size = pipe.capabilities.image_size
    init, mask = picture(size), half_mask(size, size // 2)
    files = {"init": ("a.png", png(init), "image/png"), "mask": ("b.png", png(mask), "image/png")}
    response = requests.post(server.url + "/api/generate", data=FAST, files=files, timeout=TIMEOUT_S)
    assert response.status_code == 400
    with pytest.raises(PipelineError) as python:
        pipe.check(GenerationRequest(["a red square"], init_image=init, mask=mask))
    assert response.json()["error"] == str(python.value)
    assert str(python.value).startswith(f"the mask is {size}×{size // 2} pixels but the init image is {size}×{size}")
