"""scripts/txt2img.py end to end on toy runs (written from in-memory components, tests/components.py): files, grid,
PNG metadata, printed settings, one-line errors."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from tests.forked import fork_script
from tests.paths import REPO_ROOT
from tests.procs import finish
from tests.scripts import load_script

SCRIPT = REPO_ROOT / "scripts" / "txt2img.py"
FAST = ["--steps", "2", "--sampler", "euler"]
LONG_PROMPT = "a red circle on a blue background " * 4  # more than the tiny text encoder's 16 tokens


txt2img = load_script("txt2img")


def pngs(folder):
    return sorted(p.name for p in folder.glob("*.png"))


def test_text_prompts_write_images_grid_and_metadata(toy_ldm_run, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--run", str(toy_ldm_run), "--prompt", "a red circle", "--prompt", "../../escape/me", "--n", "2",
            "--seed", "7", "--negative-prompt", "green", "--scale", "3", "--out", str(out), *FAST]
    assert txt2img.main(argv) == 0
    names = pngs(out)
    assert names == ["00000-s7-a-red-circle.png", "00001-s8-a-red-circle.png", "00002-s9-escape-me.png",
                     "00003-s10-escape-me.png", "grid-00000.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing escaped --out
    image = Image.open(out / "00003-s10-escape-me.png")
    assert image.size == (16, 16)
    text = image.text["parameters"].splitlines()
    assert text[0] == "../../escape/me" and text[1] == "Negative prompt: green"
    assert "Steps: 2, Sampler: euler, CFG scale: 3.0, Seed: 10, Size: 16x16" in text[2]
    meta = json.loads(image.text["ldm"])
    assert meta["prompt"] == "../../escape/me" and meta["seed"] == 10 and meta["negative_prompt"] == "green"
    assert meta["steps"] == 2 and meta["sampler"] == "euler" and meta["scale"] == 3.0
    assert meta["width"] == meta["height"] == 16 and meta["ema"] is True
    assert meta["run"] == str(toy_ldm_run.resolve()) and meta["checkpoint"].endswith("last.ckpt")
    grid = Image.open(out / "grid-00000.png")
    assert grid.size[0] > 2 * 16 and json.loads(grid.text["ldm"])["seeds"] == [7, 8, 9, 10]
    printed = capsys.readouterr().out
    assert "seeds: 7..10 (4 images)" in printed and "sampler: euler, steps: 2, scale: 3.0" in printed
    assert "00002-s9-escape-me.png  seed=9" in printed

    # a second call adds to the folder instead of overwriting; --no-grid writes no grid
    assert txt2img.main(["--run", str(toy_ldm_run), "--prompt", "x", "--n", "2", "--seed", "1", "--no-grid",
                         "--H", "8", "--W", "24", "--out", str(out), *FAST]) == 0
    assert pngs(out)[4:] == ["00004-s1-x.png", "00005-s2-x.png", "grid-00000.png"]
    assert Image.open(out / "00005-s2-x.png").size == (24, 8)


def test_prompts_from_file_and_class_labels(toy_ldm_run, toy_class_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue square\n\n   \na red circle\n")
    assert txt2img.main(["--run", str(toy_ldm_run), "--from-file", str(prompts), "--seed", "0",
                         "--out", str(tmp_path / "file"), *FAST]) == 0
    assert pngs(tmp_path / "file") == ["00000-s0-a-blue-square.png", "00001-s1-a-red-circle.png", "grid-00000.png"]

    out = tmp_path / "class"
    assert txt2img.main(["--run", str(toy_class_run), "--class", "3", "--class", "5", "--n", "2", "--seed", "4",
                         "--sampler", "ddim", "--eta", "0", "--steps", "2", "--out", str(out)]) == 0
    assert pngs(out)[:4] == ["00000-s4-class3.png", "00001-s5-class3.png", "00002-s6-class5.png",
                             "00003-s7-class5.png"]
    meta = json.loads(Image.open(out / "00002-s6-class5.png").text["ldm"])
    assert meta["class"] == 5 and meta["eta"] == 0.0 and meta["sampler"] == "ddim"


P = ["--prompt", "a red circle"]
BAD_ARGUMENTS = {
    "unknown sampler": (P + ["--sampler", "plms"], "invalid choice: 'plms'"),
    "zero steps": (P + ["--steps", "0"], "--steps must be at least 1"),
    "negative scale": (P + ["--scale", "-1"], "--scale must be ≥ 0"),
    "zero images": (P + ["--n", "0"], "--n must be at least 1"),
    "not an int": (P + ["--n", "two"], "invalid int value: 'two'"),
    "size off the VAE grid": (P + ["--H", "15"], "--H 15 is not a multiple of 4: the VAE divides by 2 and the U-Net "
                                                "halves the latent 1 time(s) more; use a multiple of 4, e.g. 12 or 16"),
    "size off the U-Net grid": (P + ["--H", "18"], "--H 18 is not a multiple of 4: the VAE divides by 2 and the U-Net "
                                                   "halves the latent 1 time(s) more; use a multiple of 4, e.g. 16 or 20"),
    "eta for dpm++": (P + ["--sampler", "dpmpp_2m", "--eta", "1"], "--eta applies to the samplers"),
    "rescale out of range": (P + ["--guidance-rescale", "2"], "--guidance-rescale must be in [0, 1]"),
    "class on a text run": (["--class", "3"], "is a text-conditional run: use --prompt"),
    "no prompt": ([], "give --prompt TEXT"),
    "missing run": (P + ["--run", "{tmp}/nowhere"], "run not found"),
    "VAE run": (P + ["--run", "{vae}"], "is not a stage-2 (latent diffusion) run"),
    "prompt on a class run": (P + ["--run", "{cls}"], "is a class-conditional run: use --class NAME or INDEX, not --prompt"),
    "class out of range": (["--run", "{cls}", "--class", "168"], "--class 168 is out of range"),
    "negative prompt on a class run": (["--run", "{cls}", "--class", "1", "--negative-prompt", "x"],
                                       "not --negative-prompt"),
    "empty prompt file": (["--from-file", "{tmp}/empty.txt"], "holds no prompts"),
    "blank prompt file": (["--from-file", "{tmp}/blank.txt"], "holds no prompts"),
    "missing prompt file": (["--from-file", "{tmp}/none.txt"], "cannot read --from-file"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_give_one_line_and_exit_code_2(case, toy_ldm_run, toy_vae_run, toy_class_run, tmp_path,
                                                      capsys):
    extra, message = BAD_ARGUMENTS[case]
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\t\n")
    extra = [a.format(tmp=tmp_path, vae=toy_vae_run, cls=toy_class_run) for a in extra]
    assert txt2img.main(["--run", str(toy_ldm_run), "--out", str(tmp_path / "out"), *FAST, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_too_long_prompt_warns_once(toy_ldm_run, tmp_path, capsys):
    argv = ["--run", str(toy_ldm_run), "--prompt", LONG_PROMPT, "--n", "3", "--batch-size", "1",
            "--out", str(tmp_path), *FAST]
    assert txt2img.main(argv) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "truncated" in warnings[0]


@pytest.mark.slow
def test_command_line_in_a_subprocess(toy_ldm_run, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, str(SCRIPT), "--run", str(toy_ldm_run), "--prompt", "a red circle", "--seed", "3",
               "--steps", "1", "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert pngs(tmp_path / "out") == ["00000-s3-a-red-circle.png"]
    assert "seeds: 3..3 (1 image)" in done.stdout

    # bad input through the script's own exit, in a child forked from here (the fresh start is proven above)
    log, err = tmp_path / "bad.log", tmp_path / "bad.err"
    finish(fork_script(SCRIPT, command[2:] + ["--steps", "0"], log, err=err), log, code=2)
    assert err.read_text() == "error: --steps must be at least 1, got 0\n"


def test_default_run_is_runs_ldm_latest(toy_ldm_run, tmp_path, monkeypatch, capsys):
    """`python scripts/txt2img.py --prompt "…"` samples the run that runs/ldm/latest points at (from the working
    folder), into outputs/ there; the command line as a subprocess: test_command_line_in_a_subprocess."""
    (tmp_path / "runs" / "ldm").mkdir(parents=True)
    (tmp_path / "runs" / "ldm" / "latest").symlink_to(toy_ldm_run.resolve(), target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    assert txt2img.main(["--prompt", "a red circle", "--seed", "5", "--steps", "1"]) == 0
    assert pngs(tmp_path / "outputs") == ["00000-s5-a-red-circle.png"]
    assert f"run: {toy_ldm_run.resolve()}" in capsys.readouterr().out
