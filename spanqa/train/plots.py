"""Training curves as one PNG: loss against step and EM/F1 against epoch (the reference report's figs 3, 4).

Drawn on a bare `matplotlib.figure.Figure` with the Agg canvas, so no GUI backend and no pyplot global
state are involved (safe inside a training process on a headless node).
"""

from __future__ import annotations

import os
from pathlib import Path

from spanqa import io

# Score keys drawn in the right panel when present, with their line styles.
SCORE_CURVES = {
    "exact": ("EM", "-"),
    "f1": ("F1", "-"),
    "HasAns_f1": ("HasAns F1", "--"),
    "NoAns_f1": ("NoAns F1", ":"),
}


def plot_training_curves(history: list[dict], out_png: str | os.PathLike) -> Path:
    """Write the curves of `history` to `out_png` (atomically) and return its path.

    history: dicts with {"step", "loss"} for training steps and {"epoch", "exact", "f1", ...} for
    evaluations, in any order and mixed; entries with neither shape are ignored.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_png = Path(out_png)
    figure = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(figure)
    loss_axes, score_axes = figure.subplots(1, 2)
    _draw_loss(loss_axes, history)
    _draw_scores(score_axes, history)
    figure.tight_layout()

    out_png.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_file(out_png, binary=True) as f:
        figure.savefig(f, format="png")
    return out_png


def loss_points(history: list[dict]) -> tuple[list[float], list[float]]:
    points = sorted(
        (float(h["step"]), float(h["loss"])) for h in history if "step" in h and h.get("loss") is not None
    )
    return [s for s, _ in points], [v for _, v in points]


def score_points(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = sorted(
        (float(h["epoch"]), float(h[key])) for h in history if "epoch" in h and h.get(key) is not None
    )
    return [e for e, _ in points], [v for _, v in points]


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (per-step loss is too noisy to read on its own)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _draw_loss(axes, history: list[dict]) -> None:
    steps, losses = loss_points(history)
    axes.set_title("Training loss")
    axes.set_xlabel("global step")
    axes.set_ylabel("loss")
    if not steps:
        axes.text(0.5, 0.5, "no training steps logged", ha="center", va="center", transform=axes.transAxes)
        return
    window = max(1, len(losses) // 50)
    if window > 1:
        axes.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="per step")
        axes.plot(steps, moving_average(losses, window), color="tab:blue", label=f"mean of {window} steps")
        axes.legend(loc="upper right")
    else:
        axes.plot(steps, losses, color="tab:blue", marker="." if len(steps) < 30 else None)
    axes.grid(alpha=0.3)


def _draw_scores(axes, history: list[dict]) -> None:
    axes.set_title("Dev EM / F1")
    axes.set_xlabel("epoch")
    axes.set_ylabel("score (%)")
    drawn = 0
    for key, (label, style) in SCORE_CURVES.items():
        epochs, values = score_points(history, key)
        if epochs:
            axes.plot(epochs, values, linestyle=style, marker="o", label=label)
            drawn += 1
    if not drawn:
        axes.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=axes.transAxes)
        return
    axes.legend(loc="lower right")
    axes.grid(alpha=0.3)
