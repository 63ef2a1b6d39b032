"""PNG plots (matplotlib, headless): one run's training curves, and a bench's comparison plots.

The only module that draws: the trainer calls :func:`plot_run`, ``lostlm bench``'s report calls
:func:`plot_bench` (which takes the variants list of :func:`lostlm.bench.report.collect`)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a metrics.jsonl file (event records, such as loss
    spikes, are neither)."""
    train, evals = [], []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if "event" in record:
                    continue
                (evals if "val_loss" in record else train).append(record)
    return train, evals


def _save(fig, path: Path) -> Path:
    """Lay out, write and close ``fig`` (pyplot keeps every open figure alive until closed)."""
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


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
    return _save(fig, out_path)


def plot_bench(variants: list[dict], out: Path) -> list[Path]:
    """A bench's three PNGs in ``out``: validation loss against tokens and against training
    time (one line per run), and perplexity against memory (one point per variant)."""
    out = Path(out)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = [_plot_eval_curves(variants, out / "loss_vs_tokens.png", "tokens", "tokens (millions)", 1e6, colors),
               _plot_eval_curves(variants, out / "loss_vs_time.png", "time", "training wall time (s, excluding evaluation)",
                                 1.0, colors)]
    written.append(_plot_ppl_vs_memory(variants, out / "ppl_vs_memory.png", colors))
    return written


def _plot_eval_curves(variants: list[dict], path: Path, key: str, xlabel: str, scale: float, colors: list) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for i, v in enumerate(variants):
        for j, run in enumerate(v["runs"]):
            curve = [p for p in run["eval_curve"] if p.get(key) is not None]
            if curve:
                ax.plot([p[key] / scale for p in curve], [p["val_loss"] for p in curve], "o-", ms=3,
                        color=colors[i % len(colors)], alpha=0.85 if j == 0 else 0.4,
                        label=v["name"] if j == 0 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (nats)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a report written during stage one has no runs yet
        ax.legend(fontsize=7)
    return _save(fig, path)


def _plot_ppl_vs_memory(variants: list[dict], path: Path, colors: list) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for i, v in enumerate(variants):
        a = v.get("aggregate")
        if not a:
            continue
        color = colors[i % len(colors)]
        ax.errorbar([a["peak_memory_bytes_mean"] / 2**20], [a["val_ppl_mean"]], yerr=[a["val_ppl_std"]], fmt="o",
                    color=color, label=f"{v['name']} (measured peak)")
        if "state_bytes" in a:
            ax.plot([a["state_bytes"] / 2**20], [a["val_ppl_mean"]], "s", mfc="none", color=color)
    ax.set_xscale("log")
    ax.set_xlabel("memory (MiB, log): ● measured peak, □ analytic weights+grads+optimizer")
    ax.set_ylabel("validation perplexity")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:  # a report written during stage one has no runs yet
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_sweep(sweep: dict, path: Path) -> Path:
    """Stage one of a learning-rate sweep: final validation loss against lr (log) per variant,
    the chosen lr circled, diverged points drawn as crosses at the top of the axes."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    finite = [p["val_loss"] for v in sweep["variants"].values() for p in v["points"] if not p["diverged"]]
    top = max(finite) if finite else 1.0
    for i, (name, v) in enumerate(sweep["variants"].items()):
        color = colors[i % len(colors)]
        ok = [p for p in v["points"] if not p["diverged"]]
        ax.plot([p["lr"] for p in ok], [p["val_loss"] for p in ok], "o-", ms=4, color=color, label=name)
        bad = [p["lr"] for p in v["points"] if p["diverged"]]
        if bad:
            ax.plot(bad, [top] * len(bad), "x", color=color, ms=8)
        chosen = [p for p in ok if v.get("chosen_lr") == p["lr"]]
        if chosen:
            ax.plot([chosen[0]["lr"]], [chosen[0]["val_loss"]], "o", ms=11, mfc="none", color=color)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate (log); ○ chosen, × diverged")
    ax.set_ylabel("final validation loss (nats)")
    ax.set_title(f"lr sweep, stage one (seed {sweep.get('seed', '?')})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_scaling(panels: list[dict], path: Path) -> Path:
    """A scaling report: one panel per method, validation loss against tokens (log-log) per model
    size (points; faint: dropped from the fit), the fitted law's curve per size (line), the
    held-out size in black. ``panels``: [{"title", "runs": [{"label", "held_out", "curve":
    [[tokens, loss]], "drop_tokens", "fitted": [[tokens, loss]]}]}]."""
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.0 * max(1, len(panels)), 4.5), dpi=120, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes[0], panels):
        for i, run in enumerate(panel["runs"]):
            color = "black" if run["held_out"] else colors[i % len(colors)]
            kept = [p for p in run["curve"] if p[0] > run["drop_tokens"]]
            dropped = [p for p in run["curve"] if p[0] <= run["drop_tokens"]]
            ax.plot([p[0] for p in kept], [p[1] for p in kept], "o", ms=3.5, color=color, label=run["label"])
            ax.plot([p[0] for p in dropped], [p[1] for p in dropped], "o", ms=3, color=color, alpha=0.25)
            if run["fitted"]:
                ax.plot([p[0] for p in run["fitted"]], [p[1] for p in run["fitted"]], "--" if run["held_out"] else "-",
                        color=color, lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{panel['title']}: fit (lines), held out (black, dashed = predicted)", fontsize=8)
        ax.set_xlabel("tokens seen D (log)")
        ax.set_ylabel("validation loss (nats, log)")
        ax.grid(alpha=0.3, which="both")
        if panel["runs"]:
            ax.legend(fontsize=6)
    return _save(fig, path)
