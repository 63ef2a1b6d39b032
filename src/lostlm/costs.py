"""What a run costs: parameters, model FLOPs, measured memory and saved activations.

Model FLOPs are counted analytically from the layers themselves (each parametrisation knows
its ``flops_per_token``; layers that rebuild a dense matrix per forward also report
``reconstruction_flops``), in the PaLM convention: a training step costs 3× the forward
(forward + backward wrt activations + backward wrt weights), attention scores count
``2·2·L·T·d`` per sequence per layer (the causal half is not discounted), and embedding
lookups are free. The FLOP-rate ceiling that MFU divides by is measured in :mod:`lostlm.peak`.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .runtime import autocast_context


def _is_linear_like(module: nn.Module) -> bool:
    """A dense ``nn.Linear`` or a parametrised replacement (anything with ``flops_per_token``)."""
    return isinstance(module, nn.Linear) or callable(getattr(module, "flops_per_token", None))


def linear_flops_per_token(module: nn.Module) -> int:
    """Forward FLOPs of one linear-like layer for one input row."""
    if callable(getattr(module, "flops_per_token", None)):
        return module.flops_per_token()
    if isinstance(module, nn.Linear):
        return 2 * module.in_features * module.out_features
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def _linear_modules(model: nn.Module) -> Iterator[nn.Module]:
    for module in model.modules():
        if _is_linear_like(module):
            yield module


def forward_flops_per_token(model: nn.Module, seq_len: int) -> int:
    """Forward FLOPs per token of a LlamaLM-shaped model: every linear layer + attention."""
    cfg = model.config
    linear = sum(linear_flops_per_token(m) for m in _linear_modules(model))
    attention = 2 * 2 * cfg.num_layers * seq_len * cfg.hidden_size
    return linear + attention


def training_flops_per_step(model: nn.Module, seq_len: int, tokens_per_step: int, forwards_per_step: int) -> float:
    """Model FLOPs of one optimizer step (3× forward), plus per-forward work such as SLTrain's
    rebuild of W (``reconstruction_flops``, once per micro-batch forward)."""
    flops = 3.0 * forward_flops_per_token(model, seq_len) * tokens_per_step
    rebuild = sum(m.reconstruction_flops() for m in model.modules() if callable(getattr(m, "reconstruction_flops", None)))
    return flops + 3.0 * rebuild * forwards_per_step


def parameter_breakdown(model: nn.Module) -> dict[str, int]:
    """Trainable parameters split into embedding/head, converted linear layers, and the rest."""
    seen: set[int] = set()
    out = {"embedding_and_head": 0, "linear_layers": 0, "other": 0}
    linear_params = {id(p) for m in _linear_modules(model) if m is not getattr(model, "lm_head", None) for p in m.parameters()}
    embed = {id(p) for name, p in model.named_parameters() if "embed_tokens" in name or name.startswith("lm_head")}
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        key = "embedding_and_head" if id(p) in embed else "linear_layers" if id(p) in linear_params else "other"
        out[key] += p.numel()
    out["total"] = sum(out.values())
    return out


def peak_memory_bytes(device: torch.device) -> int:
    """Measured peak: ``max_memory_allocated`` on CUDA, peak RSS of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def saved_activation_bytes(model: nn.Module, input_ids: torch.Tensor, amp_dtype: torch.dtype | None = None) -> int:
    """Bytes autograd keeps for backward in one forward + loss of ``model`` on ``input_ids``
    (unique storages of the tensors packed by ``saved_tensors_hooks``; parameters, their
    autocast copies and buffers excluded). The measured counterpart of the analytic
    ``lostlm.estimate.activation_bytes``."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: dict[int, int] = {}

    def is_weight_copy(t: torch.Tensor) -> bool:  # autocast's cast of a parameter (maybe viewed)
        fn = t.grad_fn
        for _ in range(4):
            if fn is None or not fn.next_functions:
                return False
            if type(fn).__name__ == "ToCopyBackward0":
                return any(type(nxt).__name__ == "AccumulateGrad" for nxt, _ in fn.next_functions if nxt is not None)
            fn = fn.next_functions[0][0]
        return False

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and not is_weight_copy(t):
            seen[ptr] = storage.nbytes()
        return t

    autocast = autocast_context(input_ids.device, amp_dtype)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast():
            logits = model(input_ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), input_ids[:, 1:].flatten())
        seen[logits.untyped_storage().data_ptr()] = logits.untyped_storage().nbytes()  # alive in the trainer
    del loss, logits
    return sum(seen.values())
