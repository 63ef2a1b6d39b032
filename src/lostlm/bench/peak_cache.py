"""The bench's peak matmul rate (the MFU denominator): measured over a few sizes, cached where
the trainer looks (``<data cache>/peak_flops.json``) so runs and bench agree."""

# TODO(merge): replaced by lostlm.peak — delete this module and import training_dtype,
# measure_peak and cached_peak from there (runner.py and command.py are the only users).

from __future__ import annotations

from pathlib import Path

from ..configs import Config


def training_dtype(cfg: Config):
    """The dtype the trainer will run its matmuls in on this machine (bf16 autocast or fp32)."""
    import torch

    from ..runtime import autocast_dtype

    device = torch.device("cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu")
    return device, autocast_dtype(cfg.train.precision, device) or torch.float32


def measure_peak(cfg: Config | None = None, force: bool = False, seconds: float = 6.0) -> dict:
    """Measure (or read the cached) matmul FLOP/s in the training dtype; stored where the
    trainer looks (``<data cache>/peak_flops.json``) so runs and bench agree."""
    import torch

    from ..data import cache_root

    cfg = cfg or Config()
    device, dtype = training_dtype(cfg)
    cache = cache_root(cfg.data)
    threads = torch.get_num_threads()
    if cfg.train.threads:  # measure with the runs' thread count (part of the cache key)
        torch.set_num_threads(cfg.train.threads)
    try:
        return _measure_peak(cfg, device, dtype, cache, force, seconds)
    finally:
        torch.set_num_threads(threads)


def _measure_peak(cfg: Config, device, dtype, cache: Path, force: bool, seconds: float) -> dict:
    from ..metrics import measure_peak_flops, store_peak_flops, stored_peak_flops

    value = None if force else stored_peak_flops(cache, device, dtype)
    if value is None:
        # Best of a few sizes: 1024² under-reports a CPU by ~20% (the training GEMMs, e.g. the
        # 4096×512×32000 LM head, run faster than that), which would give MFU > 1.
        sizes = (4096, 8192) if device.type == "cuda" else (1024, 2048, 4096)
        value = max(measure_peak_flops(device, dtype, size=size, seconds=seconds / len(sizes)) for size in sizes)
        store_peak_flops(cache, device, dtype, value)
    return _peak_record(device, dtype, value, cache)


def _peak_record(device, dtype, value: float, cache: Path) -> dict:
    """The peak.json record (taken with the thread count in force now)."""
    import torch

    from ..metrics import peak_flops_key

    return {"key": peak_flops_key(device, dtype), "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "peak_flops_per_s": value, "cache": str(cache / "peak_flops.json")}


def _cached_peak(cfg: Config) -> dict | None:
    """measure_peak's answer when it is already cached (no measurement, no lock)."""
    import torch

    from ..data import cache_root
    from ..metrics import stored_peak_flops

    device, dtype = training_dtype(cfg)
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        value = stored_peak_flops(cache_root(cfg.data), device, dtype)
        return None if value is None else _peak_record(device, dtype, value, cache_root(cfg.data))
    finally:
        torch.set_num_threads(threads)
