"""What the server keeps of a drawn image: PNG bytes with their parameters, the txt2img.py command that redraws
it, and (with an output folder) the file, named as txt2img.py names its images."""

from __future__ import annotations

import io
import shlex
import threading
from dataclasses import dataclass
from pathlib import Path

from ldm.core.atomic import write_bytes_atomic
from ldm.inference.png_params import INDEX_DIGITS, a1111_text, next_index, png_info, slug
from ldm.serve.adapter import Drawn

DTYPE_FLAGS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # torch dtype → txt2img.py --dtype


@dataclass(frozen=True)
class Result:
    """One image as the page serves it."""

    name: str  # the download's file name (also its name in the output folder)
    seed: int
    png: bytes  # with the parameters in its text chunks
    parameters: str  # AUTOMATIC1111's text
    command: str  # txt2img.py command line that draws it again


def txt2img_arguments(params: dict, folder: Path | None = None) -> list[str]:
    """The txt2img.py arguments that draw the image with these PNG parameters again (one image, its own seed)."""
    if params.get("run"):
        args = ["--run", params["run"]]
    else:
        args = ["--ckpt", params["checkpoint"]] + (["--config", params["config"]] if params.get("config") else [])
        args += ["--controlnet", params["controlnet"]] if params.get("controlnet") else []
    args += ["--class", str(params["class"])] if "class" in params else ["--prompt", params["prompt"]]
    if params.get("negative_prompt"):
        args += ["--negative-prompt", params["negative_prompt"]]
    args += ["--seed", str(params["seed"]), "--steps", str(params["steps"]), "--sampler", params["sampler"],
             "--scale", str(params["scale"]), "--H", str(params["height"]), "--W", str(params["width"]),
             "--n", "1", "--batch-size", "1"]
    if params.get("dtype") in DTYPE_FLAGS:
        args += ["--dtype", DTYPE_FLAGS[params["dtype"]]]
    if params.get("ema") is False:
        args.append("--no-ema")
    if params.get("control"):
        args += ["--control", _input(params["control"], folder), "--control-scale", str(params["control_scale"])]
    if params.get("init_image"):
        args += ["--init", _input(params["init_image"], folder), "--strength", str(params["strength"])]
    if params.get("mask"):
        args += ["--mask", _input(params["mask"], folder)]
    for lora in params.get("lora") or []:
        args += ["--lora", f"{lora['file']}:{lora['scale']}"]
    return args


def _input(recorded: str, folder: Path | None) -> str:
    """An input image's file: as recorded, or a kept upload's name in the output folder."""
    return str(folder / recorded if folder is not None else Path(recorded))


class Outputs:
    """Encodes drawn images as PNGs with their parameters and, given a folder, writes them there atomically."""

    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder) if folder is not None else None
        self._lock = threading.Lock()
        self._index = 0
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._index = next_index(self.folder)

    def keep_upload(self, name: str, data: bytes) -> Path | None:
        """Write an uploaded image (named by its content, ``ldm.serve.uploads.content_name``) to the folder; its
        absolute path (None without a folder: the image is drawn from memory)."""
        if self.folder is None:
            return None
        path = (self.folder / name).resolve()
        if not path.exists():
            write_bytes_atomic(path, data)
        return path

    def add(self, drawn: Drawn) -> Result:
        """The image as PNG bytes with its parameters (and written to the folder)."""
        buffer = io.BytesIO()
        drawn.image.save(buffer, format="PNG", pnginfo=png_info(drawn.params))
        condition = drawn.params.get("prompt", drawn.params.get("class_name", drawn.params.get("class")))
        with self._lock:
            name = f"{self._index:0{INDEX_DIGITS}d}-s{drawn.seed}-{slug(condition)}.png"
            self._index += 1
        png = buffer.getvalue()
        if self.folder is not None:
            write_bytes_atomic(self.folder / name, png)
        command = shlex.join(["python", "scripts/txt2img.py", *txt2img_arguments(drawn.params, self.folder)])
        return Result(name, drawn.seed, png, a1111_text(drawn.params), command)
