"""Stage 1: train the KL-VAE.

    python stages/train_vae.py                                   # embedded shapes data, default config
    python stages/train_vae.py --cfg configs/vae/shapes-kl-f4.yaml trainer.max_steps=500
    python stages/train_vae.py --resume runs/vae/latest          # continue a stopped run
"""

from ldm.training.cli import parse_stage_args

if __name__ == "__main__":
    args = parse_stage_args("vae", __doc__)  # before torch and Lightning load: --help answers at once
    from ldm.training.driver import train

    train("vae", args=args)  # default config and stage hooks: ldm.training.stages
