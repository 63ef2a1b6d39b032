"""The training and validation losses, in float32 (``docs/method.md``, "Where the model and
trainer make the other choices"): per-token cross-entropy, per-sequence means, z-loss.

Targets equal to -100 are ignored everywhere.

Two ways to get per-token losses from the final hidden states (``train.loss_impl``):

* ``plain``: logits = hidden @ Wᵀ for every token, then ``F.cross_entropy`` — autograd keeps the
  (tokens × vocab) logits and their log-softmax, and backward makes their gradient;
* ``chunked`` (default): :class:`ChunkedLinearCrossEntropy` goes over ``chunk`` tokens at a time,
  keeps only each token's log-sum-exp, and recomputes a chunk's logits in backward. Peak extra
  memory is a few chunk × vocab buffers instead of several tokens × vocab ones.

Both return (per-token loss, log-sum-exp), so reweighting (per-sequence means), evaluation
(token-weighted sums) and the z-loss read the same thing. Under bf16 autocast the matmuls run
in bf16 and the softmax in float32, as in the plain path. Evaluation (no gradient, no z-loss)
uses torch's own chunked ``F.linear_cross_entropy`` with ``reduction='none'``
(docs/benchmarks.md, "Loss path", says why not ``'mean'``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def _accumulate_dtype(hidden: torch.Tensor) -> torch.dtype:
    """float32 for the softmax and sums (float64 when the inputs are: gradcheck)."""
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """(hidden (N, d), weight (V, d), targets (N,), chunk) -> (loss (N,), lse (N,)) in float32.

    loss[i] = lse[i] - logit[i, target[i]] (0 where target is -100), lse[i] = logsumexp(logits[i]).
    Saves hidden, weight, targets and lse; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        n, acc = hidden.shape[0], _accumulate_dtype(hidden)
        losses = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        valid = targets != IGNORE
        safe = torch.where(valid, targets, 0)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            logits = (hidden[start:end] @ weight.t()).to(acc)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe[start:end, None]).squeeze(1)
            lse[start:end] = chunk_lse
            losses[start:end] = torch.where(valid[start:end], chunk_lse - picked, 0.0)
        ctx.save_for_backward(hidden, weight, safe, valid, lse)
        ctx.chunk = chunk
        return losses, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        hidden, weight, safe, valid, lse = ctx.saved_tensors
        n, chunk, acc = hidden.shape[0], ctx.chunk, _accumulate_dtype(hidden)
        grad_loss = torch.zeros(n, dtype=acc, device=hidden.device) if grad_loss is None else grad_loss.to(acc)
        grad_lse = torch.zeros(n, dtype=acc, device=hidden.device) if grad_lse is None else grad_lse.to(acc)
        grad_loss = torch.where(valid, grad_loss, 0.0)  # ignored tokens have a constant loss of 0
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            h = hidden[start:end]
            # d(lse)/d(logits) = softmax; d(loss)/d(logits) = softmax - onehot(target)
            probs = ((h @ weight.t()).to(acc) - lse[start:end, None]).exp_()
            grad_logits = probs.mul_((grad_loss[start:end] + grad_lse[start:end])[:, None])
            grad_logits.scatter_add_(1, safe[start:end, None], -grad_loss[start:end, None])
            grad_logits = grad_logits.to(hidden.dtype)
            if need_h:
                grad_hidden[start:end] = grad_logits @ weight
            if need_w:
                grad_weight += grad_logits.t() @ h
        if need_w:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def head_losses(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 0,
                with_lse: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token (loss, log-sum-exp) of the LM head ``weight`` (V, d) over ``hidden`` (..., d),
    float32, shaped like ``targets``. ``chunk`` > 0: the chunked path over that many tokens;
    0: the plain path. ``with_lse=False`` may return None for the log-sum-exp."""
    shape = targets.shape
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if chunk <= 0:
        logits = F.linear(flat_h, weight).float()
        loss = F.cross_entropy(logits, flat_t, reduction="none", ignore_index=IGNORE)
        lse = torch.logsumexp(logits, dim=-1).view(shape) if with_lse else None
        return loss.view(shape), lse
    if not with_lse and not torch.is_grad_enabled():
        # Evaluation: torch's chunked kernel; per-token ('none') losses are exact (see module doc).
        loss = F.linear_cross_entropy(flat_h, weight, flat_t, reduction="none", ignore_index=IGNORE)
        return loss.float().view(shape), None
    dtype = _compute_dtype(flat_h)
    with torch.autocast(flat_h.device.type, enabled=False):
        loss, lse = ChunkedLinearCrossEntropy.apply(flat_h.to(dtype), weight.to(dtype), flat_t, chunk)
    return loss.view(shape), lse.view(shape)


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence (sum of token losses, token count), cross-entropy in float32; -100 is ignored."""
    per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none", ignore_index=-100)
    return sequence_sums(per_token.view_as(targets), targets)


def sequence_sums(per_token: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence (sum of per-token losses, count of non-ignored tokens) of (B, T) losses."""
    mask = (targets != IGNORE).float()
    return (per_token * mask).sum(1), mask.sum(1)


def sequence_means(per_token: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean of (B, T) per-token losses (-100 targets ignored)."""
    sums, counts = sequence_sums(per_token, targets)
    return sums / counts.clamp_min(1)


def sequence_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean token cross-entropy (float32; -100 targets ignored)."""
    sums, counts = token_losses(logits, targets)
    return sums / counts.clamp_min(1)


def z_loss_from_lse(lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over non-ignored tokens of lse² (PaLM's auxiliary loss, ``train.z_loss``)."""
    mask = (targets != IGNORE).float()
    return (lse.float().pow(2) * mask).sum() / mask.sum().clamp_min(1)


def z_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over non-ignored tokens of logsumexp(logits)², in float32 (PaLM's auxiliary loss,
    ``train.z_loss``): keeps the softmax normaliser near 1 so bf16 logits do not drift."""
    return z_loss_from_lse(torch.logsumexp(logits.float(), dim=-1), targets)
