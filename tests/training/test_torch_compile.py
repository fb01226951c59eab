"""torch.compile as an option: compiled networks keep their keys and outputs; a clear error without a compiler."""

import shutil

import numpy as np
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from ldm.inference.pipeline import Pipeline
from ldm.io.checkpoints import load_file, state_dict_of
from ldm.nets.compile import compile_network, compiler_problem, is_compiled
from ldm.training.cache import ensure_cache
from ldm.training.driver import train
from tests.conftest import TINY
from tests.scripts import load_script

pytestmark = pytest.mark.slow  # subprocesses / compiles / end-to-end: `pytest -m "not slow"` skips them

needs_compiler = pytest.mark.skipif(compiler_problem("cpu") is not None, reason="no C++ compiler for TorchInductor")
PROMPTS = ["a red circle on a blue background", "a green square on a white background"]
MAX_PIXEL_DIFFERENCE = 2  # of 255: compiled kernels sum in another order than eager ones


def test_a_missing_cpu_compiler_is_named_before_anything_compiles(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    problem = compiler_problem("cpu")
    assert "g++" in problem and "clang++" in problem and "compile off" in problem
    monkeypatch.setenv("CXX", "my-cxx")
    assert "my-cxx" in compiler_problem("cpu")
    layer = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler"):
        compile_network(layer, "cpu")
    assert not is_compiled(layer)


def test_txt2img_compile_without_a_compiler_is_a_one_line_error(monkeypatch, toy_ldm_run, tmp_path, capsys):
    txt2img = load_script("txt2img")
    monkeypatch.setattr("ldm.nets.compile.compiler_problem", lambda device: "no C++ compiler here")
    code = txt2img.main(["--run", str(toy_ldm_run), "--prompt", PROMPTS[0], "--steps", "2", "--compile",
                         "--out", str(tmp_path)])
    assert code == 2
    assert "--compile: no C++ compiler here" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_compile_true_without_a_compiler_stops_before_training(monkeypatch, workdir, toy_vae_run, capsys):
    monkeypatch.setattr("ldm.training.driver.compiler_problem", lambda device: f"no C++ compiler for {device}")
    cfg = str(TINY / "ldm-text.yaml")
    argv = ["--cfg", cfg, "--runs-dir", str(workdir / "no-compiler-runs"), "model.params.compile=true",
            f"cache.vae={toy_vae_run}", f"cache.dir={workdir / 'cache' / 'toy-text'}"]
    with pytest.raises(SystemExit) as stop:
        train("ldm", cfg, argv, before_build=ensure_cache)
    assert stop.value.code == 2
    assert "error: model.params.compile: no C++ compiler for cpu" in capsys.readouterr().err
    assert not list((workdir / "no-compiler-runs").rglob("*.ckpt"))


@needs_compiler
@pytest.mark.parametrize("inference", [True, False])
def test_inference_compile_folds_the_weights_in_and_training_compile_does_not(inference):
    layer = nn.Linear(4, 4)
    compile_network(layer, "cpu", inference=inference)
    x = torch.randn(2, 4)
    with torch.no_grad():
        before = layer(x)
        layer.weight.add_(1.0)
        after = layer(x)
    assert is_compiled(layer)
    # frozen (inference): the weights are constants of the compiled code, so a change is not seen — which is
    # why Pipeline.compile() must come last; a training compile reads the live weights
    assert torch.equal(before, after) == inference
    assert torch.allclose(after, x @ layer.weight.T + layer.bias) != inference


@needs_compiler
def test_a_compiled_pipeline_draws_what_the_eager_one_draws(toy_ldm_run):
    eager = Pipeline.from_run(toy_ldm_run, device="cpu")
    compiled = Pipeline.from_run(toy_ldm_run, device="cpu")
    keys = list(compiled.model.state_dict())
    assert compiled.compile() is compiled and is_compiled(compiled.model.diffusion_model)
    assert list(compiled.model.state_dict()) == keys  # compiled in place: checkpoints and loaders unchanged
    settings = {"seed": 3, "steps": 3, "sampler": "dpmpp_2m", "guidance": 3.0}
    want = np.stack([np.asarray(im, dtype=np.int16) for im in eager.generate(PROMPTS, **settings).images])
    got = np.stack([np.asarray(im, dtype=np.int16) for im in compiled.generate(PROMPTS, **settings).images])
    assert np.abs(got - want).max() <= MAX_PIXEL_DIFFERENCE


AOT_EAGER = "{target: ldm.nets.compile.Compile, params: {backend: aot_eager}}"
# The tiny U-Net at one level (a res block and spatial transformer on the way in and out, the middle block; no down- or
# upsampling): a smaller graph for Dynamo and AOTAutograd to trace, with the public checkpoint names.
ONE_LEVEL_UNET = ["model.params.unet.params.channel_mult=[1]", "model.params.unet.params.attention_resolutions=[1]"]


def test_a_compiled_training_run_writes_plain_checkpoints(workdir, toy_vae_run):
    """Dynamo captures the U-Net and AOTAutograd differentiates it (``aot_eager``: Inductor's kernels for a training
    step are built and checked by ``scripts/bench.py``'s compiled row, tests/bench/test_bench.py)."""
    cfg = str(TINY / "ldm-text.yaml")
    counters["stats"].clear()
    argv = ["--cfg", cfg, "--runs-dir", str(workdir / "compiled-runs"), f"model.params.compile={AOT_EAGER}",
            "trainer.max_steps=2", "callbacks=[]", *ONE_LEVEL_UNET,
            "trainer.limit_val_batches=0",  # no validation: only the training graph compiles (no no-grad recompile)
            f"cache.vae={toy_vae_run}", f"cache.dir={workdir / 'cache' / 'toy-text'}"]
    run = train("ldm", cfg, argv, before_build=ensure_cache)
    assert counters["stats"]["unique_graphs"] >= 1  # the U-Net ran compiled
    state = state_dict_of(load_file(run / "checkpoints" / "last.ckpt"))
    assert not [k for k in state if "_orig_mod" in k]
    assert torch.isfinite(state["model.diffusion_model.out.2.weight"]).all()
    Pipeline.from_run(run, device="cpu")  # loads strictly into an eager model
