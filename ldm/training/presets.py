"""Point any training recipe at a folder of images in one command: ``--data DIR`` (or ``data.root=DIR``).

    python stages/train_vae.py --data photos/                                  # the default VAE recipe, your photos
    python stages/train_ldm.py --cfg configs/ldm/folder-class.yaml data.root=digits/
    python stages/train_ldm.py --cfg configs/ldm/shapes-text.yaml --data captioned/ --captions txt
    python stages/train_ldm.py --cfg configs/ldm/folder-text.yaml --data photos/ data.buckets.resolution=32

The config's datasets (``data.params.train/val`` for stage 1, ``cache.data.train/val`` for stages 2 and 3) become
``ImageFolderDataset`` nodes at the recipe's image size; the caption mode is detected from the folder (or
``--captions`` / ``data.captions=``) and reported. The held-out split is ``DIR/val`` when the folder has ``train/``
and ``val/``, else 5 % of the images chosen by a hash of their paths. A class-conditional recipe gets
``n_classes`` and its sample-grid labels from the class folders; a text recipe its sample prompts from the
captions; stages 2 and 3 get a latent cache folder of their own for this data. ``data.buckets.KEY=VALUE`` (e.g.
``data.buckets.resolution=256``) trains on aspect-ratio buckets (``ldm.data.buckets``) instead of square crops.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from ldm.core.config import ConfigError, get_obj_from_str
from ldm.data.folder import FOLDER_TARGET, ImageFolderDataset
from ldm.data.folder_layout import CAPTION_MODES, DEFAULT_VAL_FRACTION, FolderSummary, summarize
from ldm.nets.autoencoder.model import downsampling_factor
from ldm.nets.conditioning.embedders import ClassEmbedder
from ldm.training.cache import class_embedder_params

log = logging.getLogger(__name__)
SAMPLE_GRID_TARGETS = ("ldm.training.samples.SampleGrid",)
ROOT_KEY, CAPTIONS_KEY, PRESET_KEY, BUCKETS_PREFIX = "data.root", "data.captions", "data", "data.buckets."
PRESET_NAME = "folder"
GRID_CONDITIONS = 8  # labels or prompts drawn by a sample grid
DEFAULT_SIZE = 256
HASH_DIGITS = 8


@dataclass(frozen=True)
class FolderRequest:
    """The folder a recipe should train on and its caption mode (``auto``: detected)."""

    root: str
    captions: str = "auto"
    buckets: dict | None = None  # aspect-ratio buckets (ldm.data.buckets settings), or square crops


def take_folder_overrides(overrides: list[str], data: str | None = None,
                          captions: str | None = None) -> tuple[list[str], FolderRequest | None]:
    """Split ``data.root=DIR`` / ``data.captions=MODE`` / ``data=folder`` from the other overrides; merge them
    with ``--data`` / ``--captions`` → (other overrides, the request or None)."""
    rest, preset, buckets = [], False, {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key.startswith(BUCKETS_PREFIX):
            buckets[key[len(BUCKETS_PREFIX):]] = yaml.safe_load(value)
        elif key == ROOT_KEY:
            data = value
        elif key == CAPTIONS_KEY:
            captions = value
        elif key == PRESET_KEY:
            if value != PRESET_NAME:
                raise ConfigError(f"data={value}: the only data preset is data={PRESET_NAME} (with data.root=DIR)")
            preset = True
        else:
            rest.append(item)
    if data is None:
        if captions is not None or preset or buckets:
            raise ConfigError("a folder preset needs its folder: add --data DIR (or data.root=DIR); without one, set "
                              "buckets in the config's folder datasets (cache.data.train.params.buckets)")
        return rest, None
    if captions is not None and captions not in CAPTION_MODES:
        raise ConfigError(f"--captions / data.captions: expected one of {', '.join(CAPTION_MODES)}, got {captions!r}")
    return rest, FolderRequest(data, captions or "auto", buckets or None)


def _params(node: object) -> dict:
    return (node.get("params") or {}) if isinstance(node, dict) else {}


def dataset_slots(cfg: dict) -> tuple[str, dict]:
    """Where a config's datasets live: ``cache.data`` (stages 2, 3) or ``data.params`` (stage 1)."""
    if isinstance(cfg.get("cache"), dict) and isinstance(cfg["cache"].get("data"), dict):
        return "cache.data", cfg["cache"]["data"]
    params = _params(cfg.get("data"))
    if "train" not in params:
        raise ConfigError("--data: this config has neither cache.data nor data.params.train to replace")
    return "data.params", params


def _size(train: object, cfg: dict) -> int:
    """The recipe's image size: its training dataset's ``size``, else the VAE's resolution."""
    size = _params(train).get("size")
    if size is None:
        size = (_params((cfg.get("model") or {})).get("ddconfig") or {}).get("resolution", DEFAULT_SIZE)
    return int(size)


def _is_text_model(cfg: dict) -> bool:
    cond = _params(cfg.get("model")).get("cond_stage")
    if not isinstance(cond, dict) or "target" not in cond:
        return False
    cls = get_obj_from_str(cond["target"], "model.params.cond_stage")
    return not (isinstance(cls, type) and issubclass(cls, ClassEmbedder))


def spread(n: int, k: int = GRID_CONDITIONS) -> list[int]:
    """Up to ``k`` labels spread evenly over ``0..n-1`` (all of them when n ≤ k)."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _set_grid_conditions(cfg: dict, conditions: list) -> None:
    for node in cfg.get("callbacks") or []:
        if isinstance(node, dict) and node.get("target") in SAMPLE_GRID_TARGETS and conditions:
            node.setdefault("params", {})["conditions"] = conditions


def _check_fit(cfg: dict, summary: FolderSummary, class_params: dict | None) -> None:
    """A class recipe needs class folders; a text recipe needs captions (or folder names as captions)."""
    name = cfg.get("name", "this config")
    if class_params is not None and summary.captions != "subfolders":
        raise ConfigError(f"{name} is class-conditional: --data needs one sub-folder of images per class, but "
                          f"{summary.root} has captions: {summary.captions}; use a text recipe "
                          f"(configs/ldm/folder-text.yaml) or --captions subfolders")
    if _is_text_model(cfg) and summary.captions == "none":
        raise ConfigError(f"{name} is text-conditional, but {summary.root} has no captions (no metadata.jsonl, no "
                          f".txt beside the images, no class sub-folders); add captions or use a class recipe")


def apply_folder(cfg: dict, request: FolderRequest) -> list[str]:
    """Rewrite ``cfg`` (in place) to train on ``request.root``; returns the lines that say what was chosen."""
    try:
        summary = summarize(request.root, request.captions)
    except ValueError as e:
        raise ConfigError(f"--data: {e}") from e
    where, slots = dataset_slots(cfg)
    train = slots.get("train")
    size = _size(train, cfg)
    hint = bool(_params(train).get("hint") or _params(train).get("hint_dir"))
    class_params = class_embedder_params(cfg)
    _check_fit(cfg, summary, class_params)
    for split in ("train", "val"):
        old = slots.get(split)
        kept = dict(_params(old)) if isinstance(old, dict) and old.get("target") == FOLDER_TARGET else {}
        kept.pop("hint_dir", None)  # edges stored for another folder; Canny of each crop instead (hint: true)
        params = {**kept, "root": str(summary.root), "size": size, "captions": summary.captions, "split": split}
        if request.buckets:
            params["buckets"] = {**(kept.get("buckets") or {}), **request.buckets}
            if where == "data.params" and params["buckets"].get("step") is None:  # stage 1: the VAE's own factor
                params["buckets"]["step"] = downsampling_factor(_params(cfg.get("model")).get("ddconfig") or {})
        slots[split] = {"target": FOLDER_TARGET, "params": {**params, **({"hint": True} if hint else {})}}
    lines = [f"data: {summary.describe()}",
             f"data: {size}-px crops → {where}.train / {where}.val; held out: " +
             (f"{summary.root}/val" if summary.split_dirs else
              f"{DEFAULT_VAL_FRACTION:.0%} of the images, chosen by a hash of their paths")]
    buckets = _params(slots["train"]).get("buckets")
    if buckets:
        lines.append(f"data: aspect-ratio buckets {json.dumps(buckets)} instead of {size}-px square crops")
    if class_params is not None:
        class_params["n_classes"] = len(summary.classes)
        _set_grid_conditions(cfg, spread(len(summary.classes)))
        shown = ", ".join(f"{n}={i}" for i, n in enumerate(summary.classes[:GRID_CONDITIONS]))
        more = ", …" if len(summary.classes) > GRID_CONDITIONS else ""
        lines.append(f"classes: n_classes={len(summary.classes)} from the folders ({shown}{more})")
    elif _is_text_model(cfg):
        prompts = _prompts(slots["val"])
        _set_grid_conditions(cfg, prompts)
        lines.append(f"sample prompts: the captions of {len(prompts)} held-out images")
    if where == "cache.data":
        parts = [summary.root.resolve(), size, summary.captions, hint] + ([json.dumps(buckets, sort_keys=True)]
                                                                           if buckets else [])
        key = "|".join(map(str, parts)).encode()
        folder = f"{summary.root.resolve().name}-{size}px-{hashlib.sha256(key).hexdigest()[:HASH_DIGITS]}"
        old, new = cfg["cache"]["dir"], str(Path(cfg["cache"]["dir"]).parent / folder)
        cfg["cache"]["dir"] = new
        for node in _params(cfg.get("data")).values():  # the latent datasets named the old folder (${cache.dir})
            if _params(node).get("cache_dir") == old:
                node["params"]["cache_dir"] = new
        lines.append(f"cache: {new}")
    cfg["name"] = f"{cfg.get('name', 'run')}-{summary.root.resolve().name}"
    return lines


def _prompts(node: dict) -> list[str]:
    """Up to GRID_CONDITIONS distinct non-empty captions of a folder dataset node, for the sample grid."""
    try:
        dataset = ImageFolderDataset(**{k: v for k, v in node["params"].items() if k != "buckets"})  # captions only
    except ValueError as e:  # e.g. every image smaller than min_size
        raise ConfigError(f"--data: {e}; give images of at least min_size pixels on the shorter side (each is "
                          f"resized to cover the recipe's {node['params'].get('size')}-px crop)") from e
    captions = list(dict.fromkeys(r.caption for r in dataset.records if r.caption))
    return captions[:GRID_CONDITIONS]
