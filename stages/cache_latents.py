"""Stage 1½: encode a dataset once with a trained VAE into a latent cache for stage 2.

    python stages/cache_latents.py --vae runs/vae/latest                        # the shapes text config's data
    python stages/cache_latents.py --vae runs/vae/latest --cfg configs/ldm/shapes-class.yaml --out cache/mine
"""

import argparse
import sys

from ldm.core.config import ConfigError, load_config
from ldm.core.logging import setup_cli_logging
from ldm.core.threads import ThreadsError, add_threads_argument, apply_threads
from ldm.data.latents import CacheError
from ldm.io.checkpoints import CheckpointError
from ldm.io.runs import RunError
from ldm.training.cache import make_cache

DEFAULT_CONFIG = "configs/ldm/shapes-text.yaml"


def main(argv=None) -> dict:
    """Parse arguments, encode, and print where the cache is and its scale factor."""
    setup_cli_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", help="stage-1 run directory or checkpoint (default: the config's cache.vae)")
    parser.add_argument("--cfg", default=DEFAULT_CONFIG, help="stage-2 config whose `cache:` section to build")
    parser.add_argument("--out", help="cache folder (default: the config's cache.dir)")
    add_threads_argument(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    overrides += [f"cache.vae={args.vae}"] if args.vae else []
    overrides += [f"cache.dir={args.out}"] if args.out else []
    try:
        apply_threads(args.threads)
        meta = make_cache(load_config(args.cfg, overrides))
    except (ConfigError, CacheError, RunError, CheckpointError, ThreadsError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    cache_dir = args.out or load_config(args.cfg, overrides)["cache"]["dir"]
    print(f"cache: {cache_dir}  items: {meta['count']}  latent: {meta['latent_shape']}  "
          f"scale_factor: {meta['scale_factor']:.5f}")
    return meta


if __name__ == "__main__":
    main()
