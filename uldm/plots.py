"""Pictures people would rather look at than read: loss curves, guidance sweeps, fidelity-diversity curves."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import numpy as np


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


# Validation metrics drawn under the losses, one panel per scale: (title, keys on the left axis, keys on the right).
VALIDATION_PANELS = (
    ("FID / KID (lower is better)", ("fid",), ("kid",)),
    ("subject: similarity to the photos, diversity", ("dino", "clip_i", "div_dino", "div_clip_i"), ()),
)


def plot_loss_curve(metrics_path: str | os.PathLike, output_path: str | os.PathLike,
                    keys: tuple[str, ...] = ("loss",)) -> Path | None:
    """Plot the logged losses (raw and smoothed) against the step, as a PNG. Extra keys ending in
    `_loss` (e.g. DreamBooth's instance_loss and prior_loss) are drawn too; validation metrics (FID/KID,
    DINO/CLIP-I) go in panels below, on the same steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if not rows:
        return None
    panels = [panel for panel in VALIDATION_PANELS if any(key in row for row in rows for key in panel[1] + panel[2])]
    figure, axes = plt.subplots(1 + len(panels), 1, figsize=(7, 4 + 2.5 * len(panels)), dpi=100, sharex=True,
                                squeeze=False, gridspec_kw={"height_ratios": [1.6] + [1] * len(panels)})
    axis = axes[0, 0]
    names = list(keys) + sorted({k for row in rows for k in row if k.endswith("_loss") and k not in keys})
    for name in names:
        points = [(row["step"], row[name]) for row in rows if name in row]
        if not points:
            continue
        steps, values = map(np.asarray, zip(*points))
        window = max(1, len(values) // 50)
        line = axis.plot(steps, values, alpha=0.25, linewidth=0.8)[0]
        smoothed = _smooth(values, window)
        axis.plot(steps[len(steps) - len(smoothed):], smoothed, color=line.get_color(), label=name)
    axis.set_ylabel("loss")
    if all(row.get("loss", 1) > 0 for row in rows):
        axis.set_yscale("log")
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:  # e.g. a run that only validated (resumed at its last step)
        axis.legend()
    for (title, left, right), panel_axes in zip(panels, axes[1:, 0]):
        _plot_validation_panel(panel_axes, rows, title, left, right)
    axes[-1, 0].set_xlabel("optimiser step")
    figure.tight_layout()
    output_path = Path(output_path)
    figure.savefig(output_path)
    plt.close(figure)
    return output_path


def _points(rows: list[dict], key: str) -> tuple[list, list]:
    points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
    return ([p[0] for p in points], [p[1] for p in points]) if points else ([], [])


def _plot_validation_panel(axis, rows: list[dict], title: str, left: tuple[str, ...], right: tuple[str, ...]) -> None:
    """Each key as a line with markers (one point per validation); `right` keys on a second y-axis."""
    handles = []
    for key in left:
        steps, values = _points(rows, key)
        if steps:
            handles += axis.plot(steps, values, marker="o", markersize=3, label=key)
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    right_keys = [key for key in right if _points(rows, key)[0]]
    if right_keys:
        twin = axis.twinx()
        for key in right_keys:
            steps, values = _points(rows, key)
            handles += twin.plot(steps, values, marker="s", markersize=3, linestyle="--", color="tab:gray", label=key)
        twin.set_ylabel(", ".join(right_keys))
    axis.set_ylabel(", ".join(key for key in left if _points(rows, key)[0]))
    if handles:
        axis.legend(handles=handles, fontsize=8)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, output_path: str | os.PathLike) -> Path:
    """Lay out, write (its folder made if missing) and close a figure."""
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(output_path)
    pyplot().close(figure)
    return output_path


def plot_guidance_sweep(rows: list[dict], output_path: str | os.PathLike, title: str = "") -> Path:
    """FID against the guidance weight (one line per guide EMA length where rows have `guide_sigma_rel`), the best
    point circled, w = 1 (unguided) marked by a vertical line."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 4), dpi=100)
    for sigma_rel in dict.fromkeys(row.get("guide_sigma_rel") for row in rows):
        line = [row for row in rows if row.get("guide_sigma_rel") == sigma_rel]
        axis.plot([row["guidance_scale"] for row in line], [row["fid"] for row in line], marker="o",
                  label="guide as loaded" if sigma_rel is None else f"guide sigma_rel {sigma_rel:g}")
    best = min(rows, key=lambda row: row["fid"])
    axis.scatter([best["guidance_scale"]], [best["fid"]], s=160, facecolors="none", edgecolors="black",
                 label=f"best: w = {best['guidance_scale']:g}", zorder=3)
    axis.axvline(1.0, color="gray", linestyle=":", label="w = 1: unguided")
    axis.set_xlabel("guidance weight w")
    axis.set_ylabel("FID (lower is better)")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return save_figure(figure, output_path)


def plot_fidelity_diversity(curves: dict[str, list[dict]], output_path: str | os.PathLike, fidelity_label: str,
                            diversity_label: str, lower_is_more_subject: bool = False) -> Path:
    """One line per dial (`curves`: name -> points with "value", "fidelity", "diversity"), each point labelled
    with its dial value: subject fidelity against the variety between samples, "more subject" always up."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.5), dpi=100)
    for (name, points), marker in zip(curves.items(), "osD^v"):
        if not points:
            continue
        xs, ys = [p["diversity"] for p in points], [p["fidelity"] for p in points]
        axis.plot(xs, ys, marker=marker, label=name)
        for point, x, y in zip(points, xs, ys):
            axis.annotate(f"{point['value']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if lower_is_more_subject:
        axis.invert_yaxis()
    axis.set_xlabel(f"{diversity_label} (more variety ->)")
    axis.set_ylabel(textwrap.fill(f"{fidelity_label} (more subject: up)", 50), fontsize=9)  # long labels fit
    axis.set_title("Subject fidelity against variety, per dial", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return save_figure(figure, output_path)
