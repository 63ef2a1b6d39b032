"""PNG plots of training curves (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a metrics.jsonl file."""
    train, evals = [], []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                (evals if "val_loss" in record else train).append(record)
    return train, evals


def plot_run(metrics_path: Path, out_path: Path, title: str = "") -> Path:
    """Training loss and validation loss against tokens, one PNG."""
    train, evals = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        ax.plot([r["tokens"] / 1e6 for r in train], [r["loss"] for r in train], label="train loss", alpha=0.8)
    if evals:
        ax.plot([r["tokens"] / 1e6 for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
    ax.set_xlabel("tokens (millions)")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return Path(out_path)
