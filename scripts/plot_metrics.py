"""Loss curves of a run: one panel per metric from its metrics.csv, steps on x, log-y for losses.

    python scripts/plot_metrics.py runs/ldm/latest                          # every */loss column
    python scripts/plot_metrics.py runs/vae/latest --keys train/rec_loss val/psnr --smooth 0.9 --out vae.png
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from typing import NoReturn, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

METRICS_FILE = "metrics.csv"
DEFAULT_OUT_NAME = "loss.png"
INDEX_COLUMNS = ("step", "epoch")
LOSS_WORD = "loss"
DEFAULT_KEYS = ("train/loss", "val/loss")  # the stage-2/3 systems' losses; else every column with "loss"
PANEL_SIZE = (6.0, 3.0)  # inches per panel (width, height)
DPI = 100
EXIT_BAD_INPUT = 2


class PlotError(ValueError):
    """A missing or unusable metrics file or key."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = _Parser(prog="plot_metrics.py", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory (or runs/<stage>/latest, or a metrics.csv file)")
    parser.add_argument("--out", help=f"PNG to write (default <run>/{DEFAULT_OUT_NAME})")
    parser.add_argument("--keys", nargs="+", help="columns to plot (default: train/loss and val/loss where logged, "
                        "else every column with 'loss' in its name)")
    parser.add_argument("--smooth", type=float, default=0.0,
                        help="exponential moving average weight in [0, 1) drawn over the raw curve (e.g. 0.9)")
    return parser.parse_args(argv)


def read_metrics(path: Path) -> dict[str, tuple[list[float], list[float]]]:
    """metrics.csv → {column: (steps, values)} over the rows where that column has a finite number."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "step" not in reader.fieldnames:
            raise PlotError(f"{path} has no 'step' column; is it a run's {METRICS_FILE}?")
        series: dict[str, tuple[list[float], list[float]]] = {
            k: ([], []) for k in reader.fieldnames if k not in INDEX_COLUMNS}
        for row in reader:
            try:
                step = float(row["step"])
            except (TypeError, ValueError):
                continue
            for key, (steps, values) in series.items():
                try:
                    value = float(row.get(key) or "nan")
                except ValueError:
                    continue
                if math.isfinite(value):
                    steps.append(step)
                    values.append(value)
    return {k: v for k, v in series.items() if v[0]}


def smooth(values: list[float], weight: float) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing); weight 0 returns the values."""
    if weight <= 0:
        return list(values)
    out, average = [], 0.0
    for i, v in enumerate(values, start=1):
        average = weight * average + (1 - weight) * v
        out.append(average / (1 - weight**i))
    return out


def plot(series: dict[str, tuple[list[float], list[float]]], keys: Sequence[str], out: Path,
         smoothing: float = 0.0, title: str = "") -> Path:
    """Draw one panel per key (log-y when the key is a loss with positive values) and save a PNG."""
    fig, axes = plt.subplots(len(keys), 1, figsize=(PANEL_SIZE[0], PANEL_SIZE[1] * len(keys)),
                             squeeze=False, sharex=True)
    for ax, key in zip(axes[:, 0], keys):
        steps, values = series[key]
        if smoothing > 0:
            ax.plot(steps, values, alpha=0.3, color="C0", label="raw")
            ax.plot(steps, smooth(values, smoothing), color="C0", label=f"EMA {smoothing}")
            ax.legend(loc="best")
        else:
            ax.plot(steps, values, color="C0", marker="." if len(steps) < 50 else None)
        if LOSS_WORD in key.lower() and min(values) > 0:
            ax.set_yscale("log")
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png", dpi=DPI)
    plt.close(fig)
    tmp.replace(out)
    return out


def default_keys(series: dict) -> list[str]:
    """train/loss and val/loss where logged, else every column whose name contains "loss"."""
    return [k for k in DEFAULT_KEYS if k in series] or [k for k in series if LOSS_WORD in k.lower()]


def main(argv: Sequence[str] | None = None) -> Path:
    """Run from the command line; bad input → one `error:` line and exit code 2."""
    args = parse_args(argv)
    source = Path(args.run)
    try:
        if not 0.0 <= args.smooth < 1.0:
            raise PlotError(f"--smooth must be in [0, 1), got {args.smooth}")
        path = source if source.is_file() else source / METRICS_FILE
        if not path.is_file():
            raise PlotError(f"no {METRICS_FILE} found at {path} (has the run logged a step yet?)")
        series = read_metrics(path)
        keys = args.keys or default_keys(series)
        if not keys:
            raise PlotError(f"{path} has no loss columns; choose --keys from: {', '.join(series) or '(none)'}")
        missing = [k for k in keys if k not in series]
        if missing:
            raise PlotError(f"no values for {', '.join(missing)} in {path}; available: {', '.join(series)}")
        out = Path(args.out) if args.out else path.parent / DEFAULT_OUT_NAME
        plot(series, keys, out, args.smooth, title=path.resolve().parent.name)
    except (PlotError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    print(f"wrote {out} ({len(keys)} panel(s): {', '.join(keys)})")
    return out


if __name__ == "__main__":
    main()
