"""Train a noise-aware latent classifier for classifier guidance, on the latent cache (built first when missing).

    python stages/train_classifier.py --cfg configs/classifier/shapes-latent.yaml
    python stages/train_classifier.py --resume runs/classifier/latest
"""

from ldm.training.driver import train

if __name__ == "__main__":
    train("classifier")  # default config and stage hooks: ldm.training.stages
