"""`evaluate.py all`: every quality measure of a project's runs gathered into one table (Markdown + CSV).

Each section runs its own subcommand (`vae`, `adherence`, `classes`, `fid`, `edges`) with its defaults, unless
--n / --samplers / --scale / --seed say otherwise, and turns its rows into long-form rows
``section | run | setting | measure | value``: one table holds measures of every kind without a column per
measure. Every named run is checked (exists, right kind) before anything heavy starts.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import ModuleType

from ldm.eval import adherence_eval, class_eval, edges_eval, fid_eval, vae_recon
from ldm.eval.report import EvalError
from ldm.eval.sampled import check_kind
from ldm.io.runs import resolve_run, run_config

DEFAULT_OUT = Path("results") / "eval"
VAE_MEASURES = {"psnr_db": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS"}
# section → (module, the option naming its run, the condition key it needs; None: any stage-2 run)
SECTIONS: dict[str, tuple[ModuleType, str, str | None]] = {
    "vae": (vae_recon, "vae", None),
    "adherence": (adherence_eval, "ldm", "caption"),
    "fid": (fid_eval, "ldm", None),
    "classes": (class_eval, "class_run", "label"),
    "edges": (edges_eval, "controlnet", None),
}
CLASSIFIER_SECTIONS = ("fid", "classes")
SINGLE_SAMPLER_SECTIONS = ("fid", "classes", "edges")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `all` subcommand's options."""
    parser.add_argument("--vae", help="stage-1 run (VAE reconstruction)")
    parser.add_argument("--ldm", help="text stage-2 run (adherence per sampler, images/s, feature FID)")
    parser.add_argument("--class-run", help="class-conditional stage-2 run (class accuracy, feature FID)")
    parser.add_argument("--controlnet", help="ControlNet run (edge F1)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"folder for eval.md and eval.csv (default {DEFAULT_OUT})")
    parser.add_argument("--n", type=int, default=None, help="images per measure (default: each measure's own)")
    parser.add_argument("--samplers", default=None, help="NAME:STEPS list for adherence (default: its own)")
    parser.add_argument("--sampler", default=None, help="NAME:STEPS for classes / fid / edges (default: their own)")
    parser.add_argument("--scale", type=float, default=None, help="guidance scale (default: each measure's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    parser.add_argument("--quick", action="store_true", help="quickly trained classifier, no speed row (smoke tests)")
    parser.add_argument("--classifier-cache", default=None, help="folder of trained shapes classifiers")
    parser.add_argument("--grids", action="store_true", help="save each section's sample grid into --out")


def _check_runs(args: argparse.Namespace) -> list[str]:
    """The sections to run, after checking each named run is there and of the right kind (one-line errors)."""
    sections = [name for name, (_, option, _) in SECTIONS.items() if getattr(args, option)]
    if not sections:
        raise EvalError("name at least one run: --vae, --ldm, --class-run or --controlnet")
    for name in sections:
        _, option, key = SECTIONS[name]
        run = getattr(args, option)
        if name == "vae":
            vae_recon.check_vae_run(resolve_run(run), run_config(run))
        elif name == "edges" and not edges_eval.takes_control():
            raise EvalError("--controlnet: ldm.inference.pipeline cannot take control images yet (no control= argument)")
        else:
            check_kind(run, key)
    return sections


def _section_args(name: str, args: argparse.Namespace) -> argparse.Namespace:
    """The namespace section ``name``'s own parser makes of the options `all` passes on."""
    module, option, _ = SECTIONS[name]
    argv = ["--run", getattr(args, option)]
    for flag, value in (("--n", args.n), ("--device", args.device)):
        argv += [flag, str(value)] if value is not None else []
    if name != "vae":
        argv += ["--seed", str(args.seed)] + (["--scale", str(args.scale)] if args.scale is not None else [])
    if name == "adherence":
        argv += (["--samplers", args.samplers] if args.samplers else []) + (["--no-speed"] if args.quick else [])
    if name in SINGLE_SAMPLER_SECTIONS and args.sampler:
        argv += ["--sampler", args.sampler]
    if name in CLASSIFIER_SECTIONS:
        argv += (["--quick"] if args.quick else []) + (
            ["--classifier-cache", args.classifier_cache] if args.classifier_cache else [])
    if args.grids:
        argv += ["--grid", str(Path(args.out) / f"{name}.png")]
    parser = argparse.ArgumentParser(prog=f"evaluate.py {name}")
    module.add_arguments(parser)
    return parser.parse_args(argv)


def _vae_summary(row: dict) -> list[tuple[str, str, object]]:
    setting = f"{row['n']} images of {row['data']}"
    return [(setting, label, row[key]) for key, label in VAE_MEASURES.items()]


def run(args: argparse.Namespace) -> list[dict]:
    """Run every named section; long-form rows (section, run, setting, measure, value)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    rows = []
    for name in _check_runs(args):
        module = SECTIONS[name][0]
        result = module.run(_section_args(name, args))
        summarize = _vae_summary if name == "vae" else module.summary
        for row in [result] if isinstance(result, dict) else result:
            rows += [{"time": stamp, "section": name, "run": row["run"], "setting": setting, "measure": measure,
                      "value": value} for setting, measure, value in summarize(row)]
    return rows
