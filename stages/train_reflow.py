"""Reflow a rectified-flow run: draw (noise, latent) pairs with it (built first when missing), fine-tune a copy on them.

    python stages/train_reflow.py --cfg configs/ldm/shapes-text-reflow.yaml reflow.source=runs/ldm/<flow run>
    python stages/train_reflow.py --resume runs/reflow/latest
"""

from ldm.training.cli import parse_stage_args

if __name__ == "__main__":
    args = parse_stage_args("reflow", __doc__)  # before torch and Lightning load: --help answers at once
    from ldm.training.driver import train

    train("reflow", args=args)  # default config and stage hooks: ldm.training.stages
