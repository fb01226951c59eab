"""Stage 1½: encode a dataset once with a trained VAE into a latent cache for stage 2.

    python stages/cache_latents.py --vae runs/vae/latest                        # the shapes text config's data
    python stages/cache_latents.py --vae runs/vae/latest --cfg configs/ldm/shapes-class.yaml --out cache/mine
    python stages/cache_latents.py --cfg configs/ldm/folder-class.yaml --data digits/   # as train_ldm.py --data would
"""

from ldm.core.cli import add_threads_argument, script_parser

DEFAULT_CONFIG = "configs/ldm/shapes-text.yaml"


def build_parser():
    """The command line (parsed before torch loads)."""
    parser = script_parser(__doc__)
    parser.add_argument("--vae", help="stage-1 run directory or checkpoint (default: the config's cache.vae)")
    parser.add_argument("--cfg", default=DEFAULT_CONFIG, help="stage-2 config whose `cache:` section to build "
                        "(default: %(default)s)")
    parser.add_argument("--out", help="cache folder (default: the config's cache.dir)")
    parser.add_argument("--data", metavar="DIR", help="encode the images in DIR (as the training stages' --data)")
    parser.add_argument("--captions", metavar="MODE", help="with --data: the caption mode (default: detected)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be encoded, with which VAE, into "
                        "which folder, and exit without encoding")
    add_threads_argument(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def main(argv=None) -> dict | None:
    """Parse arguments, encode, and print where the cache is and its scale factor."""
    args = build_parser().parse_args(argv)
    from ldm.training.cache_stage import run  # torch loads once the arguments are parsed (--help answers at once)

    return run(args)


if __name__ == "__main__":
    main()
