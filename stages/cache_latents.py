"""Stage 1½: encode a dataset once with a trained VAE into a latent cache for stage 2.

    python stages/cache_latents.py --vae runs/vae/latest                        # the shapes text config's data
    python stages/cache_latents.py --vae runs/vae/latest --cfg configs/ldm/shapes-class.yaml --out cache/mine
    python stages/cache_latents.py --cfg configs/ldm/folder-class.yaml --data digits/   # as train_ldm.py --data would
"""

import argparse
import sys

from ldm.core.config import ConfigError, load_config
from ldm.core.logging import setup_cli_logging
from ldm.core.threads import ThreadsError, add_threads_argument, apply_threads
from ldm.data.latents import CacheError
from ldm.io.checkpoints import CheckpointError
from ldm.io.runs import RunError
from ldm.training.cache import ensure_cache, make_cache
from ldm.training.presets import apply_folder, take_folder_overrides

DEFAULT_CONFIG = "configs/ldm/shapes-text.yaml"


def main(argv=None) -> dict:
    """Parse arguments, encode, and print where the cache is and its scale factor."""
    setup_cli_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", help="stage-1 run directory or checkpoint (default: the config's cache.vae)")
    parser.add_argument("--cfg", default=DEFAULT_CONFIG, help="stage-2 config whose `cache:` section to build")
    parser.add_argument("--out", help="cache folder (default: the config's cache.dir)")
    parser.add_argument("--data", metavar="DIR", help="encode the images in DIR (as the training stages' --data)")
    parser.add_argument("--captions", metavar="MODE", help="with --data: the caption mode (default: detected)")
    add_threads_argument(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        overrides, folder = take_folder_overrides(list(args.overrides), args.data, args.captions)
        overrides += [f"cache.vae={args.vae}"] if args.vae else []
        cfg = load_config(args.cfg, overrides)
        for line in apply_folder(cfg, folder) if folder is not None else ():
            print(line)
        cfg["cache"]["dir"] = args.out or cfg["cache"]["dir"]
        apply_threads(args.threads)
        meta = make_cache(cfg) if args.out else ensure_cache(cfg)  # no --out: changed sources get a folder of their own
    except (ConfigError, CacheError, RunError, CheckpointError, ThreadsError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"cache: {cfg['cache']['dir']}  items: {meta['count']}  latent: {meta['latent_shape']}  "
          f"scale_factor: {meta['scale_factor']:.5f}")
    return meta


if __name__ == "__main__":
    main()
