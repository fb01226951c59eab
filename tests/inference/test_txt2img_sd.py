"""scripts/txt2img.py with public-layout files (--ckpt, --config, --controlnet, --unsafe-load) and ControlNet
runs (--control, --control-scale, --guess-mode): toy SD files from tests/sd_toy.py, no real weights."""

import argparse
import json

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from ldm.core.config import ConfigError
from ldm.inference.pipeline import guess_sd_config
from ldm.inference.sd import CONTEXT_KEY, SD_CONFIG_DIR
from tests.scripts import load_script
from tests.sd_toy import tiny_config
from tests.inference.test_pipeline_control import edges, runs, sd_files  # noqa: F401  (module fixtures shared)
from tests.inference.test_txt2img import pngs

txt2img = load_script("txt2img")
FAST = ["--steps", "2", "--sampler", "euler", "--scale", "2"]
LONG_PROMPT = "a photograph of an astronaut riding a horse on the moon " * 8  # more than CLIP's 77 tokens


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """The toy SD 1.x inference config as a YAML file."""
    path = tmp_path_factory.mktemp("sd-config") / "tiny-v1-inference.yaml"
    path.write_text(yaml.safe_dump(tiny_config("v1-inference")))
    return path


def run_cli(argv, capsys):
    code = txt2img.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_ckpt_with_config_writes_png_with_metadata_and_warns_on_long_prompts(sd_files, config, tmp_path,  # noqa: F811
                                                                             capsys):
    out = tmp_path / "out"
    code, printed, err = run_cli(["--ckpt", sd_files[0], "--config", config, "--prompt", LONG_PROMPT, "--seed", "3",
                                  "--out", out, *FAST], capsys)
    assert code == 0, err
    (name,) = pngs(out)
    image = Image.open(out / name)
    assert image.size == (16, 16)
    meta = json.loads(image.text["ldm"])
    assert meta["checkpoint"] == str(sd_files[0]) and meta["config"] == str(config) and meta["run"] is None
    assert "control" not in meta and "Model: sd" in image.text["parameters"]
    assert f"checkpoint: {sd_files[0]}" in printed and f"config: {config}" in printed
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "truncated" in warnings[0]


def test_ckpt_with_controlnet_and_control_image(sd_files, config, edges, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    code, printed, err = run_cli(["--ckpt", sd_files[0], "--config", config, "--controlnet", sd_files[1],
                                  "--control", edges, "--control-scale", "0.5", "--guess-mode", "--prompt", "a box",
                                  "--seed", "1", "--out", out, *FAST], capsys)
    assert code == 0, err
    image = Image.open(out / "00000-s1-a-box.png")
    assert image.size == (16, 16)  # the 40×24 grey control image was resized and converted
    meta = json.loads(image.text["ldm"])
    assert meta["control"] == str(edges) and meta["control_scale"] == 0.5 and meta["guess_mode"] is True
    assert meta["controlnet"] == str(sd_files[1])
    assert "Control scale: 0.5, Guess mode: True" in image.text["parameters"]
    assert "control: " in printed and "guess mode: True" in printed

    code, _, err = run_cli(["--ckpt", sd_files[0], "--config", config, "--controlnet", sd_files[1], "--prompt", "x",
                            "--out", out, *FAST], capsys)
    assert code == 2 and "is a ControlNet model: give --control IMAGE" in err


def test_pickle_that_needs_full_unpickling_is_refused_unless_unsafe_load(sd_files, config, tmp_path,  # noqa: F811
                                                                        capsys):
    ckpt = tmp_path / "full-pickle.ckpt"
    state = load_file(sd_files[0])
    torch.save({"state_dict": state, "hyper_parameters": argparse.Namespace(lr=1e-4)}, ckpt)  # a class: code
    argv = ["--ckpt", ckpt, "--config", config, "--prompt", "a box", "--seed", "0", "--out", tmp_path / "out", *FAST]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and "--unsafe-load" in err and "refused" in err
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli(argv + ["--unsafe-load"], capsys)
    assert code == 0, err
    assert pngs(tmp_path / "out") == ["00000-s0-a-box.png"]


def test_control_run_from_the_command_line(runs, edges, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    code, _, err = run_cli(["--run", runs[1], "--control", edges, "--prompt", "a red circle", "--seed", "2",
                            "--out", out, *FAST], capsys)
    assert code == 0, err
    meta = json.loads(Image.open(out / "00000-s2-a-red-circle.png").text["ldm"])
    assert meta["control"] == str(edges) and meta["control_scale"] == 1.0 and meta["guess_mode"] is False


P = ["--prompt", "a box"]
BAD = {
    "missing ckpt": (["--ckpt", "{tmp}/none.safetensors", "--config", "{cfg}"], "checkpoint not found"),
    "corrupt safetensors": (["--ckpt", "{tmp}/bad.safetensors", "--config", "{cfg}"], "not a readable safetensors"),
    "corrupt ckpt": (["--ckpt", "{tmp}/bad.ckpt", "--config", "{cfg}"], "not a readable checkpoint"),
    "missing config": (["--ckpt", "{sd}", "--config", "{tmp}/none.yaml"], "--config {tmp}/none.yaml not found"),
    "config not guessable": (["--ckpt", "{sd}"], "cannot tell which model"),
    "missing controlnet": (["--ckpt", "{sd}", "--config", "{cfg}", "--controlnet", "{tmp}/none.pth"],
                           "checkpoint not found"),
    "run and ckpt": (["--ckpt", "{sd}", "--run", "{run}"], "give --run or --ckpt, not both"),
    "config without ckpt": (["--run", "{run}", "--config", "{cfg}"], "--config goes with --ckpt"),
    "control without controlnet": (["--run", "{run}", "--control", "{edges}"], "--control needs a ControlNet model"),
    "scale without control": (["--run", "{run}", "--control-scale", "0.5"], "--control-scale needs --control"),
    "guess mode without control": (["--run", "{run}", "--guess-mode"], "--guess-mode needs --control"),
    "control run without control": (["--run", "{control}"], "is a ControlNet model: give --control IMAGE"),
    "unreadable control": (["--run", "{control}", "--control", "{tmp}/bad.ckpt"], "cannot read --control"),
    "negative control scale": (["--run", "{control}", "--control", "{edges}", "--control-scale", "-1"],
                               "--control-scale must be ≥ 0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_model_and_control_arguments_give_one_line(case, sd_files, config, runs, edges, tmp_path, capsys):  # noqa: F811
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "bad.ckpt").write_bytes(b"PK\x03\x04 truncated")
    extra, message = BAD[case]
    fill = dict(tmp=tmp_path, cfg=config, sd=sd_files[0], run=runs[0], control=runs[1], edges=edges)
    code, _, err = run_cli([a.format(**fill) for a in extra] + P + ["--out", tmp_path / "out", *FAST], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message.format(**fill) in err, err
    assert not (tmp_path / "out").exists()


def test_config_is_guessed_for_sd1_and_asked_for_sd2(tmp_path):
    for width, expected in ((768, SD_CONFIG_DIR / "v1-inference.yaml"), (1024, None)):
        path = tmp_path / f"unet-{width}.safetensors"
        save_file({CONTEXT_KEY: torch.zeros(4, width)}, path)
        if expected is not None:
            assert guess_sd_config(path) == expected
        else:
            with pytest.raises(ConfigError, match="v2-inference-v.yaml"):
                guess_sd_config(path)
