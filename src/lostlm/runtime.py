"""Where and how a process runs: device, distributed environment, autocast, durable writes.

The lowest layer of the package: it imports nothing from ``lostlm`` except :mod:`lostlm.errors`,
so every other module (data, trainer, evaluation, bench, interop) can use it without circles.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import LostLMError

# -- host memory ----------------------------------------------------------------------------

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
RELEASE_THRESHOLD = 1 << 20  # bytes: every buffer this large or larger gets its own mapping


def release_freed_memory() -> None:
    """Make glibc give every freed buffer of 1 MiB or more back to the OS at once.

    By default glibc raises its mmap threshold to the largest block freed so far (up to 32 MiB)
    and serves smaller requests from the heap, whose freed blocks stay resident for reuse: a
    training process then holds up to ~1 GB more than its live tensors (docs/results.md (f)).
    A fixed threshold (``mallopt(M_MMAP_THRESHOLD, 1 MiB)``, as ``MALLOC_MMAP_THRESHOLD_=1048576``
    does from the environment) maps every such buffer on its own and unmaps it when freed; the
    cost is fresh, zero-filled pages for each big allocation."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        libc = None
    # gnu_get_libc_version is glibc's own symbol: other C libraries give mallopt other meanings
    if libc is None or not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        raise LostLMError("train.release_freed_memory needs glibc (Linux); set it false on this system")
    if libc.mallopt(M_MMAP_THRESHOLD, RELEASE_THRESHOLD) != 1:
        raise LostLMError("train.release_freed_memory: glibc refused mallopt(M_MMAP_THRESHOLD); set it false")

# -- distributed environment ------------------------------------------------------------------


@dataclass
class DistEnv:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist_info()[1] > 1


def init_distributed(device_kind: str) -> DistEnv:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
        # Leave the group before the interpreter shuts down: otherwise gloo's worker threads can
        # abort the process at exit ("terminate called without an active exception", SIGABRT).
        atexit.register(_leave_process_group)
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# -- device and precision ---------------------------------------------------------------------


def device_kind(requested: str) -> str:
    """``auto`` resolved to ``cuda`` or ``cpu``; other values returned as given."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """The torch device for ``train.device`` (auto / cpu / cuda); selects the local GPU."""
    kind = device_kind(requested)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise LostLMError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu or auto")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmul instructions (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the hardware does bf16 matmuls natively; None means fp32.

    ``precision`` is ``train.precision``: ``auto``, ``bf16`` or ``fp32``."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_supports_bf16() else None


def precision_name(precision: str, device: str) -> str:
    """What ``train.precision`` trains in on ``device`` (``train.device``) here: ``float32`` or
    ``bfloat16``. ``auto`` depends on the machine, so this, not the config text, says whether two
    runs (or a checkpoint and its resume) share their maths."""
    dtype = autocast_dtype(precision, torch.device(device_kind(device)))
    return str(dtype or torch.float32).removeprefix("torch.")


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts (a no-op context when ``dtype`` is None, i.e. fp32)."""
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


# -- durable writes ---------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename is durable only once its directory is synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` so that a reader sees the old or the new content, never a mix: a private
    temporary file in the same folder, fsync, rename, fsync of the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Fill a temporary folder, then rename it to ``final``; a concurrent writer's result wins."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is a normal folder
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.exists():
                raise
        fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
