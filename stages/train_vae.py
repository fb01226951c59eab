"""Stage 1: train the KL-VAE.

    python stages/train_vae.py                                   # embedded shapes data, default config
    python stages/train_vae.py --cfg configs/vae/shapes-kl-f4.yaml trainer.max_steps=500
    python stages/train_vae.py --resume runs/vae/latest          # continue a stopped run
"""

from ldm.training.driver import train

if __name__ == "__main__":
    train("vae")  # default config and stage hooks: ldm.training.stages
