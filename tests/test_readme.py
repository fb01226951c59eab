"""README stays true: every `python …` command in it runs, in order, as a user would type it.

The commands run in a scratch folder that links `configs/`, `stages/` and `scripts/` from the repository,
so `runs/`, `cache/` and `outputs/` land there. Each command gets smoke-size arguments appended (the
last value of an option or override wins): few steps, few items. Placeholders (`<folder>`, `<image>`)
are filled with real files. A README command this file does not know fails the test, so a new command
must come with its smoke arguments here.
"""

from __future__ import annotations

import os
import re
import runpy
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.core.config import save_config
from tests.aspect_folder import make_aspect_folder
from tests.bench.memory_toy import toy_config as memory_toy_config
from tests.bench.tables import TABLE_CHECKS
from tests.paths import REPO_ROOT
from tests.sdxl_toy import write_xl_file

pytestmark = pytest.mark.slow  # subprocesses / compiles / end-to-end: `pytest -m "not slow"` skips them

LINKED = ("configs", "stages", "scripts")
FOLDERS = {"<folder>": "images", "<classes>": "classes", "<captioned>": "captioned", "<mixed>": "mixed",  # placeholder → made folder
           "<image>": "img0"}  # an image of <folder> (its edge map: <folder>/edges/<image>.png)
TRAIN_SMOKE = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
               "trainer.enable_progress_bar=false", "trainer.precision=32-true", "data.params.batch_size=4"]
CACHE_SMOKE = ["cache.data.train.params.length=16", "cache.data.val.params.length=4"]
TOY_XL_MEMORY = "toy-sdxl-memory.yaml"  # tests/bench/memory_toy's config, written where a smoke argument names it
# The smoke arguments of each command, by the first words of the command (longest prefix wins).
SMOKE: dict[str, list[str]] = {
    "stages/train_vae.py": TRAIN_SMOKE + ["data.params.train.params.length=8", "data.params.val.params.length=4",
                                          "callbacks=[]"],
    "stages/train_vae.py --resume": ["trainer.max_steps=3"],
    "stages/cache_latents.py": CACHE_SMOKE,
    "stages/train_ldm.py": TRAIN_SMOKE + CACHE_SMOKE + ["callbacks=[]"],
    "stages/train_ldm.py --cfg configs/ldm/shapes-text.yaml --resume": ["trainer.max_steps=3",  # its sample grid
                                                                        "callbacks.0.params.steps=2"] + CACHE_SMOKE,
    "stages/train_controlnet.py": TRAIN_SMOKE + CACHE_SMOKE + ["callbacks=[]"],
    "stages/train_ldm.py --cfg configs/ldm/folder-class.yaml": TRAIN_SMOKE + ["callbacks=[]"],  # small folders:
    "stages/train_ldm.py --cfg configs/ldm/folder-text.yaml": TRAIN_SMOKE + ["callbacks=[]"],  # no lengths
    "stages/train_controlnet.py --cfg configs/controlnet/folder-canny.yaml": TRAIN_SMOKE + ["callbacks=[]"],
    "scripts/txt2img.py": ["--steps", "2", "--n", "1"],
    "scripts/serve.py": ["--check", "--port", "0"],  # serve, draw one 2-step request over HTTP, stop
    # SDXL: a toy file in the public layout under the public file's name, and its toy config (written when needed)
    "scripts/txt2img.py --ckpt sd_xl_base_1.0.safetensors": ["--steps", "2", "--n", "1", "--W", "16", "--H", "16",
                                                             "--config", "toy-sdxl.yaml"],
    # SDXL fine-tune: the toy SDXL file and config, 16-px buckets of the <mixed> folder, CPU steps
    "stages/train_ldm.py --cfg configs/sd/finetune-xl-lora.yaml": [
        "model.params.base_config=toy-sdxl.yaml", "cache.data.train.params.size=16",
        "cache.data.train.params.buckets.resolution=16", "cache.data.train.params.buckets.step=4",
        "cache.data.train.params.captions=metadata", "cache.num_workers=0", "data.params.num_workers=0",
        "data.params.batch_size=4", "trainer.max_steps=2", "trainer.accelerator=cpu", "trainer.precision=32-true",
        "trainer.accumulate_grad_batches=1", "trainer.enable_progress_bar=false", "callbacks=[]"],
    "scripts/evaluate.py vae": ["--n", "4"],
    "scripts/evaluate.py classes": ["--n", "2", "--sampler", "ddim:2", "--threads", "1"],
    "scripts/evaluate.py adherence": ["--n", "2", "--samplers", "ddim:2", "--no-speed", "--threads", "1"],
    "scripts/evaluate.py edges": ["--n", "2", "--sampler", "ddim:2", "--threads", "1"],
    "scripts/make_edges.py": [],
    "scripts/plot_metrics.py": [],
    "scripts/export.py": [],
    "stages/train_reflow.py": TRAIN_SMOKE + ["reflow.count=4", "reflow.val_count=2", "reflow.steps=2",
                                             "reflow.batch_size=4", "reflow.shard_size=4", "callbacks=[]"],
    "stages/train_classifier.py": TRAIN_SMOKE + CACHE_SMOKE,
    "scripts/evaluate.py straightness": ["--n", "2", "--steps", "2", "--threads", "1"],
    "scripts/sampler_moments.py": ["--steps", "2", "--n", "8"],
    "scripts/make_zorbs.py": ["--n", "8", "--regular", "4"],
    "stages/train_ldm.py --cfg configs/ldm/shapes-lora.yaml": TRAIN_SMOKE + ["callbacks=[]"],
    "scripts/compare_lora.py": ["--steps", "2", "--n", "2"],
    "scripts/bench_lora.py": ["--quick", "--precision", "fp32"],
    # every configuration, counted on a toy SDXL (SDXL's modules, a toy's op count) instead of SDXL's 70 blocks
    "scripts/bench_memory.py": ["--config", TOY_XL_MEMORY, "--size", "32", "--batch", "1", "--rank", "4"],
    "scripts/bench_scale.py": ["--sizes", "30", "--workers", "1"],
    "scripts/bench_text_cache.py": ["--batch", "2"],
    "scripts/bench_threads.py": ["--stages", "vae", "--threads", "1", "--loads", "idle", "--steps", "3", "--limit", "300",
                                 "--cfg", "vae=configs/tiny/vae.yaml"],
}


def readme_commands() -> list[str]:
    """The `python …` lines of README.md's code blocks, in order (comments after `#` dropped)."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("python "):
                commands.append(line)
    return commands


def smoke_arguments(words: list[str]) -> list[str]:
    """The smoke arguments of the longest SMOKE prefix matching a command's words."""
    line = " ".join(words)
    matches = [key for key in SMOKE if line == key or line.startswith(key + " ")]
    if not matches:
        pytest.fail(f"README command `python {line}` has no smoke arguments in tests/test_readme.py")
    return SMOKE[max(matches, key=len)]


def run_command(words: list[str]) -> None:
    """Run `python <script> <args>` in this process; a non-zero exit fails."""
    script, args = words[0], words[1:]
    saved = sys.argv
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            pytest.fail(f"`python {' '.join(words)}` exited with {e.code}")
    finally:
        sys.argv = saved


def make_folder(root: Path) -> None:
    """A few photos-like images for the `<folder>` placeholder (`<image>`: the first)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        array = np.zeros((32, 32, 3), np.uint8)
        array[8:24, 6 + i:20 + i] = rng.integers(100, 255, 3, dtype=np.uint8)
        Image.fromarray(array).save(root / f"img{i}.png")


def make_class_folders(root: Path) -> None:
    """Two class folders ("seven", "eight") of grey images, for `<classes>`."""
    rng = np.random.default_rng(1)
    for k, name in enumerate(("seven", "eight")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 80, (28, 28), dtype=np.uint8) + 120 * k).save(root / name / f"{i}.png")


def make_captioned(root: Path) -> None:
    """Eight images with metadata.jsonl captions, for `<captioned>`."""
    make_folder(root)
    rng = np.random.default_rng(2)
    lines = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"c{i}.png")
        lines.append(f'{{"file_name": "c{i}.png", "text": "picture number {i}"}}')
    lines += [f'{{"file_name": "img{i}.png", "text": "a coloured block"}}' for i in range(3)]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def make_photo_and_mask(root: Path) -> None:
    """`photo.png` (a picture to start from) and `mask.png` (its right half white: repaint), for --init / --mask."""
    photo = np.zeros((32, 32, 3), np.uint8)
    photo[...] = (240, 240, 240)
    photo[8:24, 8:24] = (200, 30, 30)
    Image.fromarray(photo).save(root / "photo.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    Image.fromarray(mask, mode="L").save(root / "mask.png")


STANDALONE = "scripts/bench_"  # benchmarks read nothing earlier commands write: each runs as a test of its own


def standalone(command: str) -> bool:
    """Whether a README command reads nothing that earlier commands write (a benchmark)."""
    return command.split()[1].startswith(STANDALONE)


def scratch(tmp_path: Path, monkeypatch) -> None:
    """A user's working folder: the repository's configs, stages and scripts, the placeholder folders, runs here."""
    for name in LINKED:
        (tmp_path / name).symlink_to(REPO_ROOT / name)
    make_folder(tmp_path / "images")
    make_class_folders(tmp_path / "classes")
    make_captioned(tmp_path / "captioned")
    make_aspect_folder(tmp_path / "mixed", n=20, scale=2)  # 80×40 … 40×80 captioned images
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LDM_RUNS_DIR", str(tmp_path / "runs"))


def run_readme_command(command: str) -> None:
    """One README command with its placeholders filled (and the files they name written) and smoke arguments."""
    for placeholder, folder in FOLDERS.items():
        command = command.replace(placeholder, folder)
    words = shlex.split(command)[1:]
    if "sd_xl_base_1.0.safetensors" in words and not Path("sd_xl_base_1.0.safetensors").exists():
        write_xl_file(Path("."))[0].rename("sd_xl_base_1.0.safetensors")  # and toy-sdxl.yaml
    if "photo.png" in words and not Path("photo.png").exists():
        make_photo_and_mask(Path("."))
    run_command(words + smoke_arguments(words))


def test_readme_commands_run_in_order(tmp_path, monkeypatch):
    commands = [c for c in readme_commands() if not standalone(c)]
    assert any("stages/train_vae.py" == c.split()[1] for c in commands)  # the main job is there
    scratch(tmp_path, monkeypatch)
    for command in commands:
        run_readme_command(command)
    assert (tmp_path / "runs" / "vae" / "latest").exists() and os.listdir(tmp_path / "outputs")
    assert list((tmp_path / "runs" / "ldm").glob("shapes-text-*/samples/*.png"))  # the resumed run's sample grid


@pytest.mark.parametrize("command", [c for c in readme_commands() if standalone(c)])
def test_readme_benchmark_runs(command, tmp_path, monkeypatch, capsys):
    scratch(tmp_path, monkeypatch)
    if TOY_XL_MEMORY in smoke_arguments(shlex.split(command)[1:]):
        save_config(memory_toy_config(), tmp_path / TOY_XL_MEMORY)
    run_readme_command(command)
    out = shlex.split(command)[shlex.split(command).index("--out") + 1] if "--out" in command else None
    assert out is None or os.listdir(tmp_path / out)  # the benchmark wrote its table where README says
    check = TABLE_CHECKS.get(shlex.split(command)[1])
    if check is not None:  # the script's own table checks, on this one run of it
        check(tmp_path / out, capsys.readouterr().out)
