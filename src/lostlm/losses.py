"""The training and validation losses, in float32 (``docs/method.md``, "Where the model and
trainer make the other choices"): per-token cross-entropy, per-sequence means, z-loss.

Targets equal to -100 are ignored everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence (sum of token losses, token count), cross-entropy in float32; -100 is ignored."""
    per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none", ignore_index=-100)
    mask = (targets != -100).float()
    return (per_token.view_as(mask) * mask).sum(1), mask.sum(1)


def sequence_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean token cross-entropy (float32; -100 targets ignored)."""
    sums, counts = token_losses(logits, targets)
    return sums / counts.clamp_min(1)


def z_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over non-ignored tokens of logsumexp(logits)², in float32 (PaLM's auxiliary loss,
    ``train.z_loss``): keeps the softmax normaliser near 1 so bf16 logits do not drift."""
    lse = torch.logsumexp(logits.float(), dim=-1)
    mask = (targets != -100).float()
    return (lse.pow(2) * mask).sum() / mask.sum().clamp_min(1)
