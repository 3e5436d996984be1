"""Plot helpers: a headless matplotlib figure saved atomically, with the sign convention in the legend."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402

from diffin_lightning.store import atomic_write_bytes  # noqa: E402

SIGN_NOTE = "influence > 0: sample helped the target; < 0: harmful"

# One colour per meaning, the same in every panel and every plot.
COLORS = {
    "diffin": "tab:blue",  # ranked or selected by Diff-In influence; predicted changes
    "harmful": "tab:red",  # the most harmful samples removed; corrupted labels
    "clean": "tab:blue",
    "corrupted": "tab:red",
    "random": "tab:gray",
    "el2n": "tab:green",
    "forgetting": "tab:purple",
    "all data": "black",
}


def figure(columns: int = 1) -> tuple[Any, Any]:
    return plt.subplots(1, columns, figsize=(5.8 * columns, 4.6), squeeze=False)


def run_caption(run: Any, extra: str = "") -> str:
    """``run: <dir> (config seed S)`` plus what the plot needs said (seeds, error bars)."""
    text = f"run: {run.directory} (training seed {run.config.get('seed', '?')})"
    return text + (f"; {extra}" if extra else "")


def save(fig: Any, path: Path, caption: str | None = None, layout: bool = True) -> Path:
    """Save atomically; ``caption`` goes in small print under the axes (run, seeds, what error bars are).

    ``layout=False`` keeps a layout the caller already made (room for a figure legend).
    """
    buffer = io.BytesIO()
    if caption:
        fig.text(0.01, 0.01, caption, fontsize=7, ha="left", va="bottom", wrap=True, color="0.25")
    if layout:
        fig.tight_layout(rect=(0, 0.07 if caption else 0, 1, 0.95))
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path
