"""Train a noise-aware latent classifier for classifier guidance, on the latent cache (built first when missing).

    python stages/train_classifier.py --cfg configs/classifier/shapes-latent.yaml
    python stages/train_classifier.py --resume runs/classifier/latest
"""

from ldm.training.cli import parse_stage_args

if __name__ == "__main__":
    args = parse_stage_args("classifier", __doc__)  # before torch and Lightning load: --help answers at once
    from ldm.training.driver import train

    train("classifier", args=args)  # default config and stage hooks: ldm.training.stages
