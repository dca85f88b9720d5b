"""Pictures people would rather look at than read: loss curves."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def plot_loss_curve(metrics_path: str | os.PathLike, output_path: str | os.PathLike,
                    keys: tuple[str, ...] = ("loss",)) -> Path | None:
    """Plot the logged losses (raw and smoothed) against the step, as a PNG. Extra keys ending in
    `_loss` (e.g. DreamBooth's instance_loss and prior_loss) are drawn too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if not rows:
        return None
    names = list(keys) + sorted({k for row in rows for k in row if k.endswith("_loss") and k not in keys})
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    for name in names:
        points = [(row["step"], row[name]) for row in rows if name in row]
        if not points:
            continue
        steps, values = map(np.asarray, zip(*points))
        window = max(1, len(values) // 50)
        line = axis.plot(steps, values, alpha=0.25, linewidth=0.8)[0]
        smoothed = _smooth(values, window)
        axis.plot(steps[len(steps) - len(smoothed):], smoothed, color=line.get_color(), label=name)
    axis.set_xlabel("optimiser step")
    axis.set_ylabel("loss")
    if all(row.get("loss", 1) > 0 for row in rows):
        axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    output_path = Path(output_path)
    figure.savefig(output_path)
    plt.close(figure)
    return output_path
