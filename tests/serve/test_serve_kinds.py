"""The page for class and ControlNet models, over HTTP: a class run offers its classes, draws a chosen one as the
Pipeline does and refuses one out of range with the command line's message; a ControlNet run needs a control
image, keeps the upload under a name made from its bytes, and the page's command redraws the image with it."""

import io
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from ldm.serve.adapter import ModelAdapter, ModelSource
from ldm.serve.app import create_app
from ldm.serve.server import Server
from tests.components import shared_run_pipeline
from tests.scripts import load_script
from tests.serve.client import TIMEOUT_S, wait

FAST = {"steps": "2", "sampler": "ddim", "guidance": "3", "seed": "9"}


def serve(run, out) -> Server:
    return Server(create_app(ModelAdapter(ModelSource(run=str(run), device="cpu")), out=out), port=0).start()


def submit(server, fields: dict, files: dict | None = None) -> requests.Response:
    files = {k: ("upload.png", v, "image/png") for k, v in (files or {}).items()}
    return requests.post(server.url + "/api/generate", data=fields, files=files or None, timeout=TIMEOUT_S)


def finished(server, response) -> dict:
    assert response.status_code == 202, response.text
    job = response.json()["job"]
    state = wait(server, job)
    assert state["state"] == "done", state
    return state


def fetch(server, entry: dict) -> Image.Image:
    return Image.open(io.BytesIO(requests.get(server.url + entry["url"], timeout=TIMEOUT_S).content))


@pytest.fixture(scope="module")
def class_server(toy_class_run, tmp_path_factory):
    server = serve(toy_class_run, tmp_path_factory.mktemp("class-out"))
    yield server
    server.stop()


def test_a_class_run_offers_its_classes_and_draws_one(class_server, toy_class_run):
    info = requests.get(class_server.url + "/api/model", timeout=TIMEOUT_S).json()
    assert info["condition_key"] == "label" and info["class_names"][:2] == ["0", "1"] and len(info["class_names"]) == 168
    state = finished(class_server, submit(class_server, {"class": "3", **FAST}))
    image = fetch(class_server, state["images"][0])
    assert json.loads(image.text["ldm"])["class"] == 3 and "--class 3" in state["images"][0]["command"]
    expected = shared_run_pipeline(toy_class_run)([3], steps=2, sampler="ddim", guidance=3.0, seed=9)[0]
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))


def test_a_class_beyond_the_run_is_refused_as_the_command_line_refuses_it(class_server):
    def refused(fields):
        response = submit(class_server, {**FAST, **fields})
        assert response.status_code == 400, response.text
        return response.json()["error"]

    assert refused({"class": "168"}) == "class 168 is out of range: this run has classes 0..167"
    assert refused({"class": "seven"}) == ("class 'seven' is not a class of this run: this run keeps no class names: "
                                           "give an index")
    assert refused({}) == "this model is class-conditional: choose a class"
    assert "integer class labels" in refused({"class": "3", "negative_prompt": "blue"})


@pytest.fixture(scope="module")
def control_server(toy_controlnet_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("control-out")
    server = serve(toy_controlnet_run, out)
    yield server, out
    server.stop()


def test_a_controlnet_run_needs_a_control_image_and_redraws_with_it(control_server, tmp_path):
    server, out = control_server
    info = requests.get(server.url + "/api/model", timeout=TIMEOUT_S).json()
    assert info["controlnet"]
    response = submit(server, {"prompt": "a square", **FAST})
    assert response.status_code == 400 and "this model is a ControlNet: give a control image" in response.json()["error"]
    hint = np.zeros((24, 40), dtype=np.uint8)
    hint[4:20, 10] = hint[4, 10:31] = 255
    buffer = io.BytesIO()
    Image.fromarray(hint, mode="L").save(buffer, format="PNG")
    state = finished(server, submit(server, {"prompt": "a square", "control_scale": "0.8", **FAST},
                                    {"control": buffer.getvalue()}))
    entry = state["images"][0]
    params = json.loads(fetch(server, entry).text["ldm"])
    kept = Path(params["control"])  # the upload, kept in the output folder under a name made from its bytes
    assert kept.name.startswith("control-") and kept.parent == out.resolve() and kept.is_file()
    assert params["control_scale"] == 0.8 and not any("upload" in p.name for p in out.iterdir())
    assert load_script("txt2img").main([*shlex.split(entry["command"])[2:], "--out", str(tmp_path)]) == 0
    redrawn = np.asarray(Image.open(next(tmp_path.glob("0*.png"))))
    assert np.array_equal(redrawn, np.asarray(fetch(server, entry).convert("RGB")))
