"""Stage 2: train the conditional U-Net on cached latents.

    python stages/train_ldm.py --cfg configs/ldm/shapes-text.yaml      # builds the latent cache first if missing
    python stages/train_ldm.py --cfg configs/ldm/shapes-class.yaml
    python stages/train_ldm.py --resume runs/ldm/latest
"""

from ldm.data.cache_setup import ensure_cache
from ldm.train import REPO_ROOT, train

DEFAULT_CONFIG = REPO_ROOT / "configs" / "ldm" / "shapes-text.yaml"

if __name__ == "__main__":
    train("ldm", str(DEFAULT_CONFIG), before_build=lambda cfg, path: ensure_cache(cfg, path))
