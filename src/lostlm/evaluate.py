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
import torch.nn.functional as F
from torch import nn


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence (sum of token losses, token count), cross-entropy in float32; -100 is ignored."""
    per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none", ignore_index=-100)
    mask = (targets != -100).float()
    return (per_token.view_as(mask) * mask).sum(1), mask.sum(1)


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device,
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                  distributed: bool = False) -> dict[str, float]:
    """Loss over ``batches`` of (B, T+1) token ids; all-reduced over processes when distributed."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        batch = batch.to(device)
        with autocast():
            logits = model(batch[:, :-1])
        sums, counts = token_losses(logits, batch[:, 1:])
        totals += torch.stack([sums.sum(), counts.sum()]).double()
    if distributed:
        dist.all_reduce(totals)
    model.train(was_training)
    loss = (totals[0] / totals[1]).item()
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(totals[1].item())}


def evaluate_checkpoint(path: Path, overrides: list[str] | None = None) -> dict:
    """``lostlm eval``: rebuild a run's model and data and evaluate its checkpoint."""
    from .data import build_data
    from .loading import load_trained_run
    from .train import autocast_dtype, DistEnv, resolve_device

    run = load_trained_run(path, overrides)
    device = resolve_device(run.config, DistEnv())
    amp = autocast_dtype(run.config, device)
    data = build_data(run.config.data, run.config.train.seed)
    model = run.model.to(device)
    ctx = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext
    batch = run.config.train.micro_batch_size or run.config.train.batch_size
    result = evaluate_loss(model, data.val_batches(batch), device, ctx)
    return {"checkpoint": str(run.checkpoint), "step": run.step, "method": run.config.layer.method, **result}
