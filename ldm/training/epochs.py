"""A folder recipe's length in epochs of the data it is given: with ``--data``, ``folder_epochs: E`` in the recipe
caps ``trainer.max_steps`` at E epochs of the folder's training images (a small folder overfits long before the
recipe's step count: a captioned folder of ~1,200 photos read its lowest validation loss near 50 epochs), and spaces
validation, hence the best checkpoint, to see the run ``VALIDATIONS`` times. The plan prints what was chosen."""

from __future__ import annotations

import math

EPOCHS_KEY = "folder_epochs"
VALIDATIONS = 10  # validations (and chances for best.ckpt) per epoch-sized run
STEPS_OVERRIDE = "trainer.max_steps="


def batches_per_epoch(items: int, batch_size: int, drop_last: bool = True) -> int:
    """Training batches in one pass over ``items`` (the data module drops a last partial batch)."""
    return max(1, items // batch_size if drop_last and items >= batch_size else math.ceil(items / batch_size))


def size_by_epochs(cfg: dict, train_items: int | None) -> tuple[str, str] | None:
    """Cap ``trainer.max_steps`` of ``cfg`` (in place) at its recipe's ``folder_epochs`` epochs of ``train_items``;
    the (what, value) line that says so, or None when the recipe sets no epochs."""
    epochs = cfg.get(EPOCHS_KEY)
    if not epochs or not train_items:
        return None
    batch = int(((cfg.get("data") or {}).get("params") or {}).get("batch_size", 1))
    per_epoch = batches_per_epoch(train_items, batch)
    wanted = int(epochs) * per_epoch
    trainer = cfg.setdefault("trainer", {})
    configured = trainer.get("max_steps") or 0
    sizes = f"{epochs} epochs × {per_epoch} batches of {batch} ({train_items} training items)"
    if 0 < configured <= wanted:
        return "max_steps", f"{configured}, the recipe's ({sizes} would be {wanted})"
    trainer["max_steps"] = wanted
    every = max(1, wanted // VALIDATIONS)
    if trainer.get("check_val_every_n_epoch") is None:  # step-based validation: space it over the shorter run
        trainer["val_check_interval"] = min(int(trainer.get("val_check_interval") or every), every)
    checkpoint = cfg.setdefault("checkpoint", {})
    checkpoint["every_n_train_steps"] = min(int(checkpoint.get("every_n_train_steps") or every), every)
    return "max_steps", (f"{wanted} = {sizes}, below the recipe's {configured or 'unbounded'} ({EPOCHS_KEY}; "
                         f"set trainer.max_steps to choose); validation every {trainer.get('val_check_interval')} steps")
