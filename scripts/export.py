"""Export a trained model to one .safetensors file in Stable Diffusion's public key layout.

    python scripts/export.py runs/ldm/latest --out model.safetensors [--ema-only | --no-ema] [--half]
    python scripts/export.py runs/controlnet/latest --out control.safetensors --controlnet-only [--half]
    python scripts/export.py runs/ldm/<lora run> --out my-lora.safetensors [--lora-layout kohya | diffusers]
    python scripts/export.py runs/ldm/<lora run> --out merged.safetensors --merge
    python scripts/export.py v1-5-pruned.ckpt --config configs/sd/v1-inference.yaml \\
           --out v1-5-emaonly-fp16.safetensors --ema-only --half

SOURCE is a run directory (or a checkpoint inside one, whose config.yaml is used) or, with --config, any
checkpoint. The file has `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*` and, unless
--no-ema / --ema-only, `model_ema.*`; --ema-only writes the EMA weights as the U-Net's own (SD's "-emaonly"
files); an SDXL model is written in Stability's SDXL layout (conditioner.embedders.*), as sd_xl_base_1.0 is.
Its inference config is written beside it (<out>.yaml) and into its metadata, so
`python scripts/txt2img.py --ckpt <out> --config <out>.yaml …` samples from it.
--controlnet-only writes only `control_model.*` (a ControlNet file, as ControlNet v1.1 ships them).
A LoRA run (configs/sd/finetune-*-lora.yaml) gives a LoRA file: kohya's layout (lora_unet_… / lora_te_… with .alpha,
what AUTOMATIC1111 and ComfyUI load; for SDXL lora_te1_ / lora_te2_ and generative-models' U-Net block names) or diffusers' (unet.… / text_encoder.… lora_A / lora_B, for load_lora_weights),
the adapters' EMA when the run kept one (unless --no-ema), fp16 with --half; --merge writes its base with the adapters folded in, one SD
file like a full fine-tune's. `txt2img.py --lora FILE[:SCALE]` loads such files.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn, Sequence

from ldm.core.errors import UserError
from ldm.core.logging import setup_cli_logging
from ldm.core.threads import add_threads_argument, apply_threads
from ldm.inference.export import export_checkpoint
from ldm.io.checkpoints import UNSAFE_FLAG

EXIT_OK = 0
EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    p = _Parser(prog="export.py", description=__doc__.splitlines()[0])
    p.add_argument("source", help="run directory (runs/ldm/latest), a checkpoint in one, "
                                  "or any checkpoint with --config")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--config", help="the model's config, for a checkpoint outside a run directory")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--ema-only", action="store_true",
                     help="write the EMA weights as the U-Net's weights, no model_ema.*")
    ema.add_argument("--no-ema", action="store_true", help="write the raw weights only, no model_ema.*")
    add_threads_argument(p)
    p.add_argument("--half", action="store_true", help="fp16 weights (half the size)")
    p.add_argument("--controlnet-only", action="store_true", help="write only the ControlNet (control_model.*)")
    p.add_argument("--text-layout", choices=["auto", "hf", "openclip", "sdxl"], default="auto",
                   help="text-encoder key names: hf = SD1's CLIPTextModel, openclip = SD2's, sdxl = Stability's SDXL "
                        "file (default auto: the model's own)")
    p.add_argument("--lora-layout", choices=["kohya", "diffusers"],
                   help="a LoRA run's file layout (default kohya: lora_unet_… / lora_te_… with .alpha)")
    p.add_argument("--merge", action="store_true", help="a LoRA run: its base with the adapters folded in, one SD file")
    p.add_argument(UNSAFE_FLAG, dest="unsafe", action="store_true",
                   help="allow a pickled checkpoint that runs code when loaded (only for files you trust)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Export; 0 on success, 2 on bad input."""
    setup_cli_logging()
    args = parse_args(argv)
    ema = "only" if args.ema_only else "drop" if args.no_ema else "keep"
    try:
        apply_threads(args.threads, announce=False)  # a one-line error stands alone
        out = export_checkpoint(args.source, args.out, config=args.config, ema=ema, half=args.half,
                                controlnet_only=args.controlnet_only, text_layout=args.text_layout,
                                unsafe=args.unsafe, lora_layout=args.lora_layout, merge=args.merge)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    sidecar = out.with_suffix(".yaml")
    print(f"{out}" + (f"\n{sidecar}" if sidecar.is_file() and not args.controlnet_only else ""))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
