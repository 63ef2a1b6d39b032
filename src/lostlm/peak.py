"""The machine's peak FLOP rate, the ceiling MFU divides by: measured, cached, remembered.

MFU = achieved model FLOP/s ÷ a *measured* matmul ceiling of this machine (not a datasheet
number), so CPU figures are honest. One path for everybody:

* :func:`measure_peak_flops`  best sustained FLOP/s of a square matmul of one size;
* :func:`measure_peak`        the best of several sizes in the training dtype, stored in the
                              cache (``lostlm bench --peak``, the bench runner);
* :func:`cached_peak`         that stored answer, without measuring;
* :func:`cached_peak_flops`   the trainer's value: the running maximum of a quick measurement
                              and every earlier one.

Measurements live in ``<data cache>/peak_flops.json``, keyed by :func:`peak_flops_key`
(device name, CPU thread count, dtype).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .configs import Config
from .data import cache_root
from .runtime import atomic_write_text, autocast_dtype, device_kind

PEAK_FILE = "peak_flops.json"


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
    path = Path(cache_dir) / PEAK_FILE
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
    atomic_write_text(Path(cache_dir) / PEAK_FILE, json.dumps(table, indent=1))


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


# -- in the training dtype of a config (bench) ------------------------------------------------


def training_dtype(cfg: Config) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) the trainer will run its matmuls in on this machine (bf16 autocast or fp32)."""
    device = torch.device("cuda" if cfg.train.device != "cpu" and device_kind("auto") == "cuda" else "cpu")
    return device, autocast_dtype(cfg.train.precision, device) or torch.float32


def _describe(device: torch.device, dtype: torch.dtype, value: float, cache: Path) -> dict:
    return {"key": peak_flops_key(device, dtype), "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "peak_flops_per_s": value, "cache": str(cache / PEAK_FILE)}


def _with_run_threads(cfg: Config, fn):
    """Call ``fn()`` with the runs' thread count (part of the cache key), then restore it."""
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def measure_peak(cfg: Config | None = None, force: bool = False, seconds: float = 6.0) -> dict:
    """Measure (or read the cached) matmul FLOP/s in the training dtype; stored where the
    trainer looks (``<data cache>/peak_flops.json``) so runs and bench agree."""
    cfg = cfg or Config()
    device, dtype = training_dtype(cfg)
    cache = cache_root(cfg.data)

    def measure() -> dict:
        value = None if force else stored_peak_flops(cache, device, dtype)
        if value is None:
            # Best of a few sizes: 1024² under-reports a CPU by ~20% (the training GEMMs, e.g. the
            # 4096×512×32000 LM head, run faster than that), which would give MFU > 1.
            sizes = (4096, 8192) if device.type == "cuda" else (1024, 2048, 4096)
            value = max(measure_peak_flops(device, dtype, size=size, seconds=seconds / len(sizes)) for size in sizes)
            store_peak_flops(cache, device, dtype, value)
        return _describe(device, dtype, value, cache)

    return _with_run_threads(cfg, measure)


def cached_peak(cfg: Config) -> dict | None:
    """:func:`measure_peak`'s answer when it is already cached (no measurement), else None."""
    device, dtype = training_dtype(cfg)
    cache = cache_root(cfg.data)

    def read() -> dict | None:
        value = stored_peak_flops(cache, device, dtype)
        return None if value is None else _describe(device, dtype, value, cache)

    return _with_run_threads(cfg, read)
