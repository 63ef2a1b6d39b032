"""The end-of-run summary: quality, size, throughput, MFU and memory (``summary.json``).

MFU = achieved model FLOP/s per device (:mod:`lostlm.costs`, 3× forward) ÷ the measured matmul
ceiling of this machine (:mod:`lostlm.peak`), over the training steps of this session only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .configs import Config
from .costs import parameter_breakdown, peak_memory_bytes, training_flops_per_step
from .data import cache_root
from .peak import cached_peak_flops
from .runtime import atomic_write_text

SUMMARY_FILE = "summary.json"


@dataclass
class Session:
    """Training tokens and seconds of this process's session (a resume starts a new one)."""

    tokens: int = 0
    seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self.step_seconds.append(seconds)


def throughput(cfg: Config, model: nn.Module, device: torch.device, world_size: int, amp_dtype: torch.dtype | None,
               micro_batch: int, session: Session) -> dict:
    """Tokens/s (mean and median step), achieved model FLOP/s per device, the peak, MFU."""
    t = cfg.train
    tokens_per_step = t.batch_size * cfg.data.seq_len
    flops = training_flops_per_step(model, cfg.data.seq_len, tokens_per_step, t.batch_size // micro_batch)
    steps = session.tokens / tokens_per_step
    peak = t.peak_flops or cached_peak_flops(cache_root(cfg.data), device, amp_dtype or torch.float32)
    achieved = flops * steps / session.seconds / world_size  # per device
    # The median step is robust to other processes stealing the CPU for a while.
    median_step = sorted(session.step_seconds)[len(session.step_seconds) // 2]
    return {"session_tokens": session.tokens, "tokens_per_s": session.tokens / session.seconds,
            "tokens_per_s_median_step": tokens_per_step / median_step,
            "model_flops_per_s": achieved, "peak_flops_per_s": peak, "mfu": achieved / peak}


def build_summary(cfg: Config, model: nn.Module, device: torch.device, world_size: int, amp_dtype: torch.dtype | None,
                  progress: dict, evaluation: dict, micro_batch: int, session: Session,
                  unigram_ppl: float | None = None) -> dict:
    """The summary dict; ``progress`` is ``{"step": ..., "tokens": ...}`` of the run so far."""
    summary = {"method": cfg.layer.method, "preset": cfg.model.preset, "step": progress["step"],
               "tokens": progress["tokens"], **evaluation, "parameters": parameter_breakdown(model),
               "device": str(device), "world_size": world_size,
               "precision": str(amp_dtype or torch.float32).replace("torch.", "")}
    if unigram_ppl is not None:
        summary["unigram_ppl"] = unigram_ppl
    if session.tokens:
        summary.update(throughput(cfg, model, device, world_size, amp_dtype, micro_batch, session))
    summary["peak_memory_bytes"] = peak_memory_bytes(device)
    return summary


def write_summary(run_dir: Path, summary: dict) -> None:
    """summary.json and curves.png (the loss curves of metrics.jsonl) in the run folder."""
    import json

    from .plots import plot_run

    run_dir = Path(run_dir)
    atomic_write_text(run_dir / SUMMARY_FILE, json.dumps(summary, indent=1))
    plot_run(run_dir / "metrics.jsonl", run_dir / "curves.png", title=f"{summary['method']} · {summary['preset']}")


def format_summary(summary: dict) -> str:
    """The performance block printed at the end of every run."""
    lines = [f"== {summary['method']} · preset {summary['preset']} · step {summary['step']} · {summary['device']} "
             f"x{summary['world_size']} · {summary['precision']} =="]
    lines.append(f"validation loss {summary['val_loss']:.4f}   perplexity {summary['val_ppl']:.2f}"
                 + (f"   (unigram floor {summary['unigram_ppl']:.1f})" if "unigram_ppl" in summary else ""))
    params = summary["parameters"]
    lines.append(f"trainable parameters {params['total'] / 1e6:.2f}M (linear layers {params['linear_layers'] / 1e6:.2f}M, "
                 f"embedding+head {params['embedding_and_head'] / 1e6:.2f}M)")
    if "tokens_per_s" in summary:
        lines.append(f"tokens {summary['tokens']:,} (this session {summary['session_tokens']:,})   "
                     f"tokens/s {summary['tokens_per_s']:,.0f} (median step {summary['tokens_per_s_median_step']:,.0f})   "
                     f"MFU {100 * summary['mfu']:.1f}% of measured {summary['peak_flops_per_s'] / 1e9:.0f} GFLOP/s")
    lines.append(f"peak memory {summary['peak_memory_bytes'] / 2**20:,.0f} MiB "
                 f"({'max_memory_allocated' if summary['device'].startswith('cuda') else 'process peak RSS'})")
    return "\n".join(lines)
