"""The web server on a toy run, over HTTP: the page and its API draw what txt2img.py draws; every bad input (not
an image, too large, a mask of another size, beyond the model's or the server's limits, a LoRA name that is a path)
is refused in one line, on the page's API and in the log, and the server keeps serving; a full queue answers busy."""

import io
import json
import logging

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm.inference.pipeline import GenerationRequest, PipelineError
from ldm.serve.adapter import ModelAdapter, ModelSource, PageRequest
from ldm.serve.app import create_app
from ldm.serve.form import Limits
from ldm.serve.server import DEFAULT_HOST, Server
from tests.components import shared_run_pipeline
from tests.serve.client import TIMEOUT_S, wait

UPLOAD_LIMIT = 4096  # bytes: small, so a "too large" upload is cheap to make
FAST = {"steps": "2", "sampler": "ddim", "guidance": "3", "seed": "11"}


@pytest.fixture(scope="module")
def adapter(toy_ldm_run):
    return ModelAdapter(ModelSource(run=str(toy_ldm_run), device="cpu"))


@pytest.fixture(scope="module")
def server(adapter, tmp_path_factory):
    lora_dir = tmp_path_factory.mktemp("loras")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 2)}, str(lora_dir / "style.safetensors"))  # offered
    save_file({"model.diffusion_model.x": torch.zeros(1)}, str(lora_dir / "model.safetensors"))  # not a LoRA
    (lora_dir / "notes.txt").write_text("not offered")
    app = create_app(adapter, Limits(max_steps=50, max_side=64, max_images=4, max_upload_bytes=UPLOAD_LIMIT),
                     queue_limit=4, out=tmp_path_factory.mktemp("served"), lora_dir=lora_dir)
    server = Server(app, port=0).start()
    yield server
    server.stop()


def png_bytes(size=(16, 16), colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def post(server, fields: dict, files: dict | None = None) -> requests.Response:
    files = {name: ("picture.png", data, "image/png") for name, data in (files or {}).items()}
    return requests.post(server.url + "/api/generate", data=fields, files=files or None, timeout=TIMEOUT_S)


def refused(server, fields: dict, files: dict | None = None, status: int = 400) -> str:
    response = post(server, fields, files)
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert "\n" not in message and message
    return message


def test_binds_localhost_by_default(server):
    assert DEFAULT_HOST == "127.0.0.1" and server.host == "127.0.0.1"


def test_page_and_model_description(server, toy_ldm_run):
    page = requests.get(server.url + "/", timeout=TIMEOUT_S)
    assert page.status_code == 200 and '<form id="request"' in page.text
    assert requests.get(server.url + "/static/page.js", timeout=TIMEOUT_S).status_code == 200
    info = requests.get(server.url + "/api/model", timeout=TIMEOUT_S).json()
    assert info["condition_key"] == "caption" and not info["controlnet"] and info["image_size"] == 16
    assert info["size_multiple"] == 4 and info["init_image"] and not info["inpainting"] and "dpmpp_2m" in info["samplers"] and info["loras"] == ["style.safetensors"]
    assert info["limits"]["max_upload_bytes"] == UPLOAD_LIMIT and info["source"]["run"] == str(toy_ldm_run.resolve())


def test_a_request_draws_what_the_pipeline_draws_with_its_parameters(server, toy_ldm_run):
    response = post(server, {"prompt": "a red circle", "negative_prompt": "blue", "n": "2", **FAST})
    assert response.status_code == 202, response.text
    state = wait(server, response.json()["job"])
    assert state["state"] == "done" and state["step"] == state["total"] == 4  # 2 images, one at a time, 2 steps
    images = [Image.open(io.BytesIO(requests.get(server.url + im["url"], timeout=TIMEOUT_S).content))
              for im in state["images"]]
    params = [json.loads(im.text["ldm"]) for im in images]
    assert [p["seed"] for p in params] == [11, 12] and params[0]["prompt"] == "a red circle"
    assert params[0]["negative_prompt"] == "blue" and params[0]["sampler"] == "ddim" and params[0]["steps"] == 2
    assert "Seed: 11" in images[0].text["parameters"] and "--seed 11" in state["images"][0]["command"]
    pipe = shared_run_pipeline(toy_ldm_run)  # read only
    for image, seed in zip(images, (11, 12)):
        expected = pipe(["a red circle"], steps=2, sampler="ddim", guidance=3.0, seed=seed, negative="blue")[0]
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))


def test_random_seed_is_drawn_and_recorded(server):
    response = post(server, {"prompt": "a square", **FAST, "random_seed": "on"})
    state = wait(server, response.json()["job"])
    assert state["state"] == "done" and 0 <= state["images"][0]["seed"] < 2**31


def test_bad_uploads_are_refused_and_logged(server, caplog):
    caplog.set_level(logging.WARNING, logger="ldm.serve")
    fields = {"prompt": "a circle", **FAST}
    assert "not an image" in refused(server, fields, {"init": b"%PDF-1.4 this is no image"})
    assert "more than the limit" in refused(server, fields, {"init": b"\x89PNG" + bytes(UPLOAD_LIMIT)})
    message = refused(server, fields, {"init": png_bytes((16, 16)), "mask": png_bytes((8, 8), (255, 255, 255))})
    assert "mask is 8×8" in message and "16×16" in message
    assert refused(server, fields, {"mask": png_bytes()}) == "the mask needs the init image (the picture to edit)"
    assert refused(server, {**fields, "strength": "0.5"}) == "strength needs the init image (the picture to edit)"
    assert refused(server, {**fields, "strength": "1.5"}, {"init": png_bytes()}) == "strength must be in [0, 1], got 1.5"
    assert "no ControlNet" in refused(server, fields, {"control": png_bytes()})
    logged = [r.getMessage() for r in caplog.records if r.name == "ldm.serve.app"]
    assert any("not an image" in m for m in logged) and any("mask is 8×8" in m for m in logged)
    assert post(server, fields).status_code == 202  # still serving


def test_requests_beyond_the_model_or_the_server_are_refused_in_one_line(server, adapter):
    fields = {"prompt": "a circle", **FAST}
    size = refused(server, {**fields, "height": "15"})
    with pytest.raises(PipelineError) as python:  # the Pipeline's own check of the same request
        adapter.pipe.check(GenerationRequest(["a circle"], height=15, width=16))
    assert size == str(python.value) and size.startswith("image size 16×15 (width×height) is not a positive multiple")
    assert refused(server, {**fields, "steps": "0"}) == "steps must be at least 1, got 0"
    assert refused(server, {**fields, "steps": "51"}) == "steps must be at most 50 on this server, got 51"
    assert "at most 64" in refused(server, {**fields, "width": "128"})
    assert "at most 4" in refused(server, {**fields, "n": "5"})
    assert refused(server, {**fields, "steps": "ten"}) == "steps must be a whole number, got 'ten'"
    assert "finite" in refused(server, {**fields, "guidance": "nan"})
    assert "unknown sampler 'nope'" in refused(server, {**fields, "sampler": "nope"})
    assert "no LoRA named '../../etc/passwd'" in refused(server, {**fields, "lora": "../../etc/passwd"})
    assert post(server, fields).status_code == 202


def test_class_requests_on_a_text_model_are_refused(adapter):
    request = PageRequest(sampler="ddim", steps=2, guidance=3.0, seed=0, height=16, width=16, label="3")
    with pytest.raises(PipelineError, match="text-conditional: give a prompt"):
        adapter.check(request)


def test_a_full_queue_answers_busy_and_recovers(server):
    fields = {"prompt": "a triangle", **FAST}
    long = {**fields, "steps": "50"}  # the first job keeps the worker busy while the queue fills behind it
    answers = [post(server, long if i == 0 else fields) for i in range(6)]
    codes = [a.status_code for a in answers]
    assert codes.count(202) >= 1 and 503 in codes, codes
    busy = next(a for a in answers if a.status_code == 503).json()
    assert busy["busy"] and busy["error"].startswith("busy:")
    for answer in answers:
        if answer.status_code == 202:
            assert wait(server, answer.json()["job"])["state"] == "done"
    assert post(server, {"prompt": "a triangle", **FAST}).status_code == 202


def test_the_command_line_checks_itself_and_refuses_bad_flags(toy_ldm_run, tmp_path, capsys):
    from ldm.serve.cli import main

    assert main(["--run", str(toy_ldm_run), "--check", "--port", "0", "--out", str(tmp_path)]) == 0
    assert "check: 00000-s0-a-red-circle" in capsys.readouterr().out and any(tmp_path.glob("00000-*.png"))
    for argv, message in ((["--queue", "0"], "--queue must be positive"),
                          (["--run", "a", "--ckpt", "b"], "give --run or --ckpt, not both"),
                          (["--config", "c.yaml"], "--config and --controlnet go with --ckpt"),
                          (["--run", str(toy_ldm_run), "--lora-dir", str(tmp_path / "none")], "is not a folder"),
                          (["--run", str(tmp_path)], "error:")):
        assert main([*argv, "--check", "--port", "0"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
