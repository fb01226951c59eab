"""Stage 3: train a ControlNet on edge maps over a frozen stage-2 model (or a Stable Diffusion file).

    python stages/train_controlnet.py                                    # base: runs/ldm/latest, shapes + Canny
    python stages/train_controlnet.py --cfg configs/controlnet/sd15-canny.yaml data.params.train.params.root=/data
    python stages/train_controlnet.py --resume runs/controlnet/latest

The hint-carrying latent cache is built first when missing (as stage 2 does); `base:` is pinned to the run
it names now, and the U-Net, text encoder, schedule and VAE are taken from it.
"""

from ldm.training.driver import train

if __name__ == "__main__":
    train("controlnet")  # default config and stage hooks: ldm.training.stages
