"""Small helpers shared by the data modules: the cache folder, rank-0 messages, error reasons."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..configs import DataConfig
from ..runtime import dist_info


def cache_root(cfg: DataConfig) -> Path:
    """data.cache_dir, else $LOSTLM_CACHE, else ~/.cache/lostlm."""
    return Path(cfg.cache_dir or os.environ.get("LOSTLM_CACHE") or "~/.cache/lostlm").expanduser()


def log(message: str) -> None:
    """Print ``lostlm: message`` to stderr, once per torchrun job (on rank 0)."""
    if dist_info()[0] == 0:
        print(f"lostlm: {message}", file=sys.stderr, flush=True)


def short_sha(obj: Any) -> str:
    """16 hex digits of the sha1 of ``obj`` as sorted JSON: the cache keys."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reason(exc: BaseException) -> str:
    """First line of the innermost cause: datasets wraps the useful message in its own."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"
