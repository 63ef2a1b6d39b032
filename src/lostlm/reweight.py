"""Loss-based sample reweighting (Sow et al., ICLR 2025), ``reweight.*`` in the config.

Per micro-batch, every sequence i of the *global* batch (all data-parallel ranks) has a
detached mean token loss ℓ_i. With δ > 0::

    x_i = δ (2ℓ_i − ℓmax − ℓmin) / (ℓmax − ℓmin)        ∈ [−δ, δ]   (0 when all ℓ are equal)
    linupper:  f = min(x + δ, δ)      quadratic:  f = 1 − x²/δ²      extremes:  f = |x|
    w = softmax(f / r)                 (sums to 1 over the global batch)

``uniform`` gives w_i = 1/N exactly, i.e. the plain mean loss. During ``warmup_steps`` every
strategy is uniform. linupper and extremes map into [0, δ] and quadratic into [0, 1], so
max(w)/min(w) ≤ e^{max(δ, 1)/r}, which is e^{1/r} for the default δ = 1.

The weights of a rank's own sequences are picked by its *global* rank (not the node-local
rank, a bug of the public reference code).
"""

from __future__ import annotations

import math

import torch

from .configs import ReweightConfig


def strategy_scores(losses: torch.Tensor, strategy: str, delta: float = 1.0) -> torch.Tensor:
    """f(x) of the normalised losses; a constant for ``uniform``."""
    losses = losses.detach().float()
    if strategy == "uniform":
        return torch.zeros_like(losses)
    spread = losses.max() - losses.min()
    if spread <= 0:  # all losses equal: nothing to prefer
        x = torch.zeros_like(losses)
    else:
        x = delta * (2 * losses - losses.max() - losses.min()) / spread
    if strategy == "linupper":
        return torch.clamp(x + delta, max=delta)
    if strategy == "quadratic":
        return 1 - x.pow(2) / (delta * delta)
    if strategy == "extremes":
        return x.abs()
    raise ValueError(f"unknown reweighting strategy {strategy!r}")


def sample_weights(global_losses: torch.Tensor, cfg: ReweightConfig, step: int) -> torch.Tensor:
    """Weights over the global batch (sum 1). Uniform during the reweighting warm-up."""
    strategy = cfg.strategy if step >= cfg.warmup_steps else "uniform"
    if strategy == "uniform":
        return torch.full_like(global_losses, 1.0 / global_losses.numel(), dtype=torch.float32)
    return torch.softmax(strategy_scores(global_losses, strategy, cfg.delta) / cfg.temperature, dim=0)


def weight_stats(weights: torch.Tensor) -> dict[str, float]:
    """Spread of the weights for logging: max/min ratio and normalised entropy (1 = uniform)."""
    w = weights.float()
    entropy = -(w * w.clamp_min(1e-30).log()).sum().item()
    return {"weight_max_min": (w.max() / w.min()).item(), "weight_entropy": entropy / math.log(max(2, w.numel()))}
