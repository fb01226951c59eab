"""Stage 3: train a ControlNet on edge maps over a frozen stage-2 model (or a Stable Diffusion file).

    python stages/train_controlnet.py                                    # base: runs/ldm/latest, shapes + Canny
    python stages/train_controlnet.py --cfg configs/controlnet/sd15-canny.yaml data.params.train.params.root=/data
    python stages/train_controlnet.py --resume runs/controlnet/latest

The hint-carrying latent cache is built first when missing (as stage 2 does); `base:` is pinned to the run
it names now, and the U-Net, text encoder, schedule and VAE are taken from it.
"""

from ldm.training.cli import parse_stage_args

if __name__ == "__main__":
    args = parse_stage_args("controlnet", __doc__)  # before torch and Lightning load: --help answers at once
    from ldm.training.driver import train

    train("controlnet", args=args)  # default config and stage hooks: ldm.training.stages
