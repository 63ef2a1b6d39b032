"""Validation loss and perplexity, token-weighted over the whole held-out set.

Token-weighted means Σ(token losses) / Σ(tokens) over all batches and processes, not a mean
of per-batch means (the shared evaluator of the GaLore code lineage divides by N+1 batches).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .losses import sequence_sums
from .runtime import autocast_context, autocast_dtype, resolve_device


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device,
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                  distributed: bool = False, chunk: int = 1024) -> dict[str, float]:
    """Loss over ``batches`` of (B, T+1) token ids; all-reduced over processes when distributed.
    ``chunk`` > 0: the chunked head + loss (never all logits, :mod:`lostlm.losses`); 0: plain."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        batch = batch.to(device)
        with autocast():
            per_token, _ = model(batch[:, :-1], batch[:, 1:], chunk=chunk, with_lse=False)
        sums, counts = sequence_sums(per_token, batch[:, 1:])
        totals += torch.stack([sums.sum(), counts.sum()]).double()
    if distributed:
        dist.all_reduce(totals)
    model.train(was_training)
    loss = (totals[0] / totals[1]).item()
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(totals[1].item())}


def unigram_perplexity(batches: Iterable[torch.Tensor], vocab_size: int) -> float:
    """Perplexity of the best unigram model *fitted on the validation targets themselves*:
    a floor no context-free predictor can beat, to show the model learned context."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for batch in batches:
        counts += torch.bincount(batch[:, 1:].flatten(), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return math.exp(-(p * p.log()).sum().item())


def evaluate_checkpoint(path: Path, overrides: list[str] | None = None) -> dict:
    """``lostlm eval``: rebuild a run's model and data and evaluate its checkpoint."""
    from .data import build_data
    from .loading import load_trained_run

    run = load_trained_run(path, overrides)
    device = resolve_device(run.config.train.device)
    amp = autocast_dtype(run.config.train.precision, device)
    data = build_data(run.config.data, run.config.train.seed)
    model = run.model.to(device)
    batch = run.config.train.micro_batch_size or run.config.train.batch_size
    chunk = run.config.train.loss_chunk_tokens if run.config.train.loss_impl == "chunked" else 0
    result = evaluate_loss(model, data.val_batches(batch), device, autocast_context(device, amp), chunk=chunk)
    return {"checkpoint": str(run.checkpoint), "step": run.step, "method": run.config.layer.method, **result}
