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


def figure(columns: int = 1) -> tuple[Any, Any]:
    return plt.subplots(1, columns, figsize=(5.5 * columns, 4.2), squeeze=False)


def save(fig: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path
