"""What a run costs: parameters, model FLOPs, measured peak memory and FLOP rate, MFU.

Model FLOPs are counted analytically from the layers themselves (each parametrisation knows
its ``flops_per_token``), in the PaLM convention: a training step costs 3× the forward
(forward + backward wrt activations + backward wrt weights), attention scores count
``2·2·L·T·d`` per sequence per layer (the causal half is not discounted), and embedding
lookups are free. MFU = achieved model FLOP/s ÷ a *measured* matmul ceiling of the machine
(:func:`measure_peak_flops`), so CPU numbers are honest rather than against a datasheet.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .layers import LOSTLinear, LowRankLinear, SLTrainLinear


def linear_flops_per_token(module: nn.Module) -> int:
    """Forward FLOPs of one linear-like layer for one input row."""
    if isinstance(module, (LOSTLinear, LowRankLinear, SLTrainLinear)):
        return module.flops_per_token()
    if isinstance(module, nn.Linear):
        return 2 * module.in_features * module.out_features
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def _linear_modules(model: nn.Module):
    for module in model.modules():
        if isinstance(module, (nn.Linear, LOSTLinear, LowRankLinear, SLTrainLinear)):
            yield module


def forward_flops_per_token(model: nn.Module, seq_len: int) -> int:
    """Forward FLOPs per token of a LlamaLM-shaped model: every linear layer + attention."""
    cfg = model.config
    linear = sum(linear_flops_per_token(m) for m in _linear_modules(model))
    attention = 2 * 2 * cfg.num_layers * seq_len * cfg.hidden_size
    return linear + attention


def training_flops_per_step(model: nn.Module, seq_len: int, tokens_per_step: int, forwards_per_step: int) -> float:
    """Model FLOPs of one optimizer step (3× forward), plus SLTrain's per-forward rebuild of W."""
    flops = 3.0 * forward_flops_per_token(model, seq_len) * tokens_per_step
    rebuild = sum(m.reconstruction_flops() for m in model.modules() if isinstance(m, SLTrainLinear))
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


def measure_peak_flops(device: torch.device, dtype: torch.dtype, size: int | None = None, seconds: float = 1.0) -> float:
    """Best sustained FLOP/s of a square matmul in ``dtype`` on ``device`` (the MFU ceiling)."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = 0.0

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):  # warm-up
        a @ b
    sync()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    return best


def peak_flops_key(device: torch.device, dtype: torch.dtype) -> str:
    """Cache key of a peak measurement: device name (CPU: thread count), dtype."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{torch.get_num_threads()}threads"
    return f"{name}|{dtype}"


def _peak_table(cache_dir: Path) -> dict:
    path = Path(cache_dir) / "peak_flops.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return {}
    return {}


def stored_peak_flops(cache_dir: Path, device: torch.device, dtype: torch.dtype) -> float | None:
    """The remembered peak for this device/dtype/thread count, or None."""
    return _peak_table(cache_dir).get(peak_flops_key(device, dtype))


def store_peak_flops(cache_dir: Path, device: torch.device, dtype: torch.dtype, value: float) -> None:
    """Remember a peak measurement (atomic write; ``lostlm bench --peak`` refreshes it)."""
    table = _peak_table(cache_dir)
    table[peak_flops_key(device, dtype)] = value
    path = Path(cache_dir) / "peak_flops.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(table, indent=1))
    os.replace(tmp, path)


def cached_peak_flops(cache_dir: Path, device: torch.device, dtype: torch.dtype) -> float:
    """The best of a fresh :func:`measure_peak_flops` and every earlier one on this
    device/dtype/thread count (remembered in the cache dir). Another process competing for the
    CPU can only make a measurement too *low*, so the running maximum converges on the real
    ceiling instead of freezing a polluted first reading (which would inflate MFU)."""
    stored = stored_peak_flops(cache_dir, device, dtype) or 0.0
    value = max(stored, measure_peak_flops(device, dtype))
    if value > stored:
        store_peak_flops(cache_dir, device, dtype, value)
    return value


def format_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def saved_activation_bytes(model: nn.Module, input_ids: torch.Tensor, amp_dtype: torch.dtype | None = None) -> int:
    """Bytes autograd keeps for backward in one forward + loss of ``model`` on ``input_ids``
    (unique storages of the tensors packed by ``saved_tensors_hooks``; parameters, their
    autocast copies and buffers excluded). The measured counterpart of the analytic
    ``lostlm.estimate.activation_bytes``."""
    import contextlib

    import torch.nn.functional as F

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

    ctx = torch.autocast(input_ids.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with ctx:
            logits = model(input_ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), input_ids[:, 1:].flatten())
        seen[logits.untyped_storage().data_ptr()] = logits.untyped_storage().nbytes()  # alive in the trainer
    del loss, logits
    return sum(seen.values())
