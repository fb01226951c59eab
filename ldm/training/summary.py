"""The model summary a run prints at its start: each top-level module's type, parameters and mode, then the
totals. Lightning's own adds a FLOPs column, which reads 0 without an ``example_input_array`` (it measures nothing
here), so the driver turns it off and logs this one instead (``trainer.enable_model_summary: false`` turns both off).
"""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.utilities.model_summary import summarize
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count

log = logging.getLogger(__name__)
SUMMARY_KEY = "enable_model_summary"
COLUMNS = ("", "Name", "Type", "Params", "Mode")


def summary_table(module: L.LightningModule, max_depth: int = 1) -> str:
    """The table: one row per module down to ``max_depth``, then trainable / frozen / total parameters and size."""
    summary = summarize(module, max_depth=max_depth)
    rows = [(str(i), name, kind, get_human_readable_count(n), "train" if mode else "eval")
            for i, (name, kind, n, mode) in enumerate(zip(summary.layer_names, summary.layer_types,
                                                          summary.param_nums, summary.training_modes))]
    widths = [max(len(str(cell)) for cell in column) for column in zip(COLUMNS, *rows)]
    line = lambda cells: " | ".join(f"{c:<{w}}" for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    rule = "-" * (sum(widths) + 3 * (len(widths) - 1))
    trainable, total = summary.trainable_parameters, summary.total_parameters
    totals = [(get_human_readable_count(trainable), "Trainable params"),
              (get_human_readable_count(total - trainable), "Non-trainable params"),
              (get_human_readable_count(total), "Total params"),
              (f"{summary.model_size:,.3f}", "Total estimated model params size (MB)")]
    return "\n".join([line(COLUMNS), rule, *(line(r) for r in rows), rule, *(f"{a:<10} {b}" for a, b in totals)])


class ParameterSummary(L.Callback):
    """Log ``summary_table`` once, when fitting starts (rank zero)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            log.info("%s", summary_table(pl_module))


def summary_callback(trainer_kwargs: dict) -> ParameterSummary | None:
    """Turn Lightning's summary off in ``trainer_kwargs`` (in place); ours unless the config turned summaries off."""
    wanted = trainer_kwargs.get(SUMMARY_KEY, True) is not False
    trainer_kwargs[SUMMARY_KEY] = False
    return ParameterSummary() if wanted else None
