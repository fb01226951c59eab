"""LoRA and public files through the web page: a toy SD 1.x file served with --lora-dir; choosing a kohya-layout
LoRA on the page draws what ``txt2img.py --lora FILE:SCALE`` draws (the page's own command for the image), and
choosing none again draws the plain model."""

import io
import shlex

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm.io.checkpoints import load_file
from ldm.serve.adapter import ModelAdapter, ModelSource
from ldm.serve.app import create_app
from ldm.serve.server import Server
from tests.scripts import load_script
from tests.serve.client import TIMEOUT_S, wait
from tests.sd_toy import write_sd_file
from tests.inference.test_lora_files import kohya_by_hand

FAST = {"prompt": "a zorb", "steps": "3", "sampler": "ddim", "guidance": "3", "seed": "4"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-sd")
    ckpt, config = write_sd_file(folder, seed=5)
    loras = folder / "loras"
    loras.mkdir()
    save_file(kohya_by_hand(load_file(ckpt), torch.Generator().manual_seed(3))[0], str(loras / "hand.safetensors"))
    adapter = ModelAdapter(ModelSource(ckpt=str(ckpt), config=str(config), device="cpu"))
    server = Server(create_app(adapter, out=folder / "out", lora_dir=loras), port=0).start()
    yield server
    server.stop()


def draw(server, fields: dict) -> tuple[np.ndarray, dict]:
    """(the image, its page entry) for one request."""
    job = requests.post(server.url + "/api/generate", data=fields, timeout=TIMEOUT_S).json()["job"]
    state = wait(server, job)
    assert state["state"] == "done", state
    entry = state["images"][0]
    png = requests.get(server.url + entry["url"], timeout=TIMEOUT_S).content
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int), entry


def test_a_lora_chosen_on_the_page_draws_what_txt2img_lora_draws(served, tmp_path):
    plain, _ = draw(served, FAST)
    styled, entry = draw(served, {**FAST, "lora": "hand.safetensors", "lora_scale": "0.5"})
    assert "hand.safetensors:0.5" in entry["command"] and 'Lora: "hand:0.5"' in entry["parameters"]
    assert np.abs(styled - plain).max() > 8  # the LoRA changes the picture
    argv = entry["command"].split(" ", 2)[2]
    assert load_script("txt2img").main([*shlex.split(argv), "--out", str(tmp_path)]) == 0
    redrawn = np.asarray(Image.open(next(tmp_path.glob("0*.png")))).astype(int)
    assert np.array_equal(redrawn, styled)
    again, _ = draw(served, FAST)  # no LoRA: the plain weights are back
    assert np.array_equal(again, plain)
