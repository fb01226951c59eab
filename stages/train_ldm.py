"""Stage 2: train the conditional U-Net on cached latents.

    python stages/train_ldm.py --cfg configs/ldm/shapes-text.yaml      # builds the latent cache first if missing
    python stages/train_ldm.py --cfg configs/ldm/shapes-class.yaml
    python stages/train_ldm.py --resume runs/ldm/latest
"""

from ldm.training.cli import parse_stage_args

if __name__ == "__main__":
    args = parse_stage_args("ldm", __doc__)  # before torch and Lightning load: --help answers at once
    from ldm.training.driver import train

    train("ldm", args=args)  # default config and stage hooks: ldm.training.stages
