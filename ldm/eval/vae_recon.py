"""`evaluate.py vae`: held-out reconstruction quality of a stage-1 KL-VAE run (PSNR / SSIM / LPIPS).

Reconstructions use the posterior mode (no sampling noise), on the data the run was trained on: its
config's ``data.params.val`` (or ``train`` with ``--split train``); without one, the DataModule's held-out
fraction; without that, the shapes val split at the VAE's resolution. Beside the VAE, the same images go through
bicubic ×f down-and-up (f: the VAE's downsampling factor), the baseline a VAE must beat; both are also measured on
the inputs' saturated pixels (``ldm.core.colour``: mean absolute error and the signed bias per channel).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ldm.core.colour import SaturatedError, bicubic_roundtrip
from ldm.core.config import get_obj_from_str, instantiate_from_config, is_node
from ldm.core.errors import UserError
from ldm.core.images import image_grid, save_image_atomic
from ldm.core.metrics import SSIM_WINDOW, psnr, ssim
from ldm.data.shapes import ShapesDataset
from ldm.eval.lpips import lpips_distance, lpips_unavailable_reason
from ldm.eval.report import EvalError
from ldm.inference.loaders import load_autoencoder
from ldm.io.runs import resolve_run, run_config
from ldm.nets.autoencoder.model import AutoencoderKL

log = logging.getLogger(__name__)

DEFAULT_N = 512
DEFAULT_BATCH = 32
GRID_IMAGES = 8
LPIPS_NA = "n/a (no VGG weights)"
SPLITS = ("val", "train")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `vae` subcommand's options."""
    parser.add_argument("--run", required=True, help="stage-1 run directory, e.g. runs/vae/latest, or a checkpoint in one")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help=f"number of held-out images (default {DEFAULT_N})")
    parser.add_argument("--split", choices=SPLITS, default="val", help="which of the run's data sets (default val)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    parser.add_argument("--by-source", action="store_true",
                        help="also one row per source image of crops named <source>-<n>.png (make_photo_crops.py)")
    parser.add_argument("--grid", nargs="?", const="", default=None, metavar="PNG",
                        help="also save inputs above reconstructions (bare --grid: vae-recon.png next to the CSV)")


def check_vae_run(run: Path, cfg: dict) -> None:
    """Refuse a run whose model is not an AutoencoderKL, before loading anything heavy."""
    target = (cfg.get("model") or {}).get("target", "<none>")
    try:
        cls = get_obj_from_str(target, "model")
    except UserError:
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, AutoencoderKL)):
        raise EvalError(f"{run} is not a VAE run: its model is {target}; pass a stage-1 run such as runs/vae/latest")


def held_out_dataset(cfg: dict, split: str, resolution: int) -> tuple[Dataset, str]:
    """The run's `split` dataset and a short description of where it came from."""
    data = cfg.get("data") or {}
    node = (data.get("params") or {}).get(split)
    try:
        if is_node(node):
            return instantiate_from_config(node, f"data.params.{split}"), f"data.{split}"
        module = instantiate_from_config(data, "data") if is_node(data) else None
    except (ValueError, OSError) as e:  # a dataset that cannot be built (folder moved, ...)
        raise EvalError(f"cannot build the run's {split} data: {e}") from e
    dataset = getattr(module, f"{split}_dataset", None)
    if dataset is not None:
        return dataset, f"data.{split} (held out by the DataModule)" if split == "val" else f"data.{split}"
    return ShapesDataset(size=resolution, split="val"), f"shapes val @ {resolution}px (the run has no {split} set)"


def run(args: argparse.Namespace) -> dict | list[dict]:
    """Evaluate a VAE run → one result row, or with --by-source one more per source (also saves the grid)."""
    if args.n < 1:
        raise EvalError(f"--n must be a positive number of images, got {args.n}")
    if args.batch_size < 1:
        raise EvalError(f"--batch-size must be positive, got {args.batch_size}")
    run_dir = resolve_run(args.run)
    cfg = run_config(args.run)
    check_vae_run(run_dir, cfg)
    vae, info = load_autoencoder(args.run)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae = vae.to(device)
    resolution = int(cfg["model"]["params"].get("ddconfig", {}).get("resolution", 32))
    dataset, source = held_out_dataset(cfg, args.split, resolution)
    n = min(args.n, len(dataset))
    loader = DataLoader(Subset(dataset, range(n)), batch_size=args.batch_size, shuffle=False)
    scores: dict[str, list[torch.Tensor]] = {"psnr": [], "ssim": [], "lpips": [], "bicubic_psnr": [],
                                              "bicubic_ssim": []}
    colour = {"vae": SaturatedError(), "bicubic": SaturatedError()}
    factor = int(info["downsampling_factor"])
    grid_rows, paths = None, []
    with torch.no_grad():
        for batch in loader:
            paths += list(batch.get("path", [""] * len(batch["image"])))
            x = batch["image"].to(device)  # (B, 3, H, W) in [-1, 1]
            recon = vae.decode(vae.encode(x).mode()).clamp(-1, 1)  # (B, 3, H, W)
            baseline = bicubic_roundtrip(x, factor)  # (B, 3, H, W)
            for name, y in (("", recon), ("bicubic_", baseline)):
                scores[f"{name}psnr"].append(psnr(x, y).cpu())
                if min(x.shape[-2:]) >= SSIM_WINDOW:
                    scores[f"{name}ssim"].append(ssim(x, y).cpu())
            colour["vae"].update(x, recon)
            colour["bicubic"].update(x, baseline)
            distance = lpips_distance(x, recon)
            if distance is not None:
                scores["lpips"].append(distance.cpu())
            if grid_rows is None:
                grid_rows = [x[:GRID_IMAGES].cpu(), recon[:GRID_IMAGES].cpu()]
    mean = {k: torch.cat(v).mean().item() if v else None for k, v in scores.items()}
    if args.grid is not None and grid_rows is not None:
        grid_path = Path(args.grid) if args.grid else Path(args.csv).parent / "vae-recon.png"
        save_image_atomic(image_grid(grid_rows), grid_path)
        log.info("grid: %s", grid_path)
    row = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "vae",
        "run": run_dir.name,
        "checkpoint": info["checkpoint"],
        "data": source,
        "n": n,
        "psnr_db": mean["psnr"],
        "ssim": mean["ssim"] if mean["ssim"] is not None else f"n/a (images < {SSIM_WINDOW} px)",
        "lpips": mean["lpips"] if mean["lpips"] is not None else LPIPS_NA,
        f"bicubic_x{factor}_psnr_db": mean["bicubic_psnr"],
        f"bicubic_x{factor}_ssim": mean["bicubic_ssim"] if mean["bicubic_ssim"] is not None else "n/a",
        "numbers_per_image": f"{latent_numbers(vae, x.shape)} (bicubic {3 * x.shape[-2] * x.shape[-1] // factor**2})",
        "saturated_mae": colour["vae"].mean_absolute(),
        "saturated_bias_rgb": colour["vae"].bias(),
        "bicubic_saturated_mae": colour["bicubic"].mean_absolute(),
        "bicubic_saturated_bias_rgb": colour["bicubic"].bias(),
    }
    if not args.by_source:
        return row
    return [row] + by_source(row, paths, torch.cat(scores["psnr"]), torch.cat(scores["bicubic_psnr"]), factor)


def by_source(row: dict, paths: list[str], vae_psnr: torch.Tensor, bicubic_psnr: torch.Tensor, factor: int) -> list[dict]:
    """Rows of mean PSNR per source image (the file name before its last ``-``), VAE and bicubic."""
    sources = [Path(p).stem.rsplit("-", 1)[0] for p in paths]
    rows = []
    for source in sorted(set(sources)):
        picked = torch.tensor([s == source for s in sources])
        rows.append({"time": row["time"], "command": "vae", "run": row["run"], "checkpoint": row["checkpoint"],
                     "data": f"{row['data']}: {source}", "n": int(picked.sum()),
                     "psnr_db": vae_psnr[picked].mean().item(),
                     f"bicubic_x{factor}_psnr_db": bicubic_psnr[picked].mean().item()})
    return rows


def latent_numbers(vae: AutoencoderKL, shape: torch.Size) -> int:
    """Numbers the VAE keeps per image: latent channels × H/f × W/f."""
    return int(vae.embed_dim) * (shape[-2] // vae.downsampling_factor) * (shape[-1] // vae.downsampling_factor)


def note(row: dict) -> str | None:
    """A line to print under the table, if a measure was skipped."""
    return lpips_unavailable_reason() if row.get("lpips") == LPIPS_NA else None
