"""Atomic, checksummed checkpoints: safetensors for every tensor, JSON data for everything else.

Layout of a run folder::

    <out_dir>/config.yaml                 the resolved config of the run
    <out_dir>/tokenizer/                  the tokenizer (save_pretrained), for eval/generate/export
    <out_dir>/checkpoints/step_00000400/
        model.safetensors                 model state dict (LOST channel indices included)
        optimizer.safetensors             optimizer tensors + RNG states
        state.json                        step, data position, optimizer non-tensor state, config,
                                          and "files": the sha256 of each safetensors file
    <out_dir>/checkpoints/latest          name of the newest complete checkpoint

Writing: every file goes into ``step_XXXX.tmp`` and is fsynced, the folder is fsynced and
renamed into place, the parent fsynced, and only then is ``latest`` replaced atomically and
older checkpoints pruned. A crash at any moment leaves the previous checkpoint intact; a failed
save (disk full, permission) removes its temporary folder and raises a one-line error. State
with a non-finite tensor is never written.

Reading: :func:`find_checkpoint` walks from the newest checkpoint to the oldest and returns the
first that verifies (state.json parses and has its keys, every file matches its recorded
sha256); each damaged one it passes over gets a one-line warning naming it, and is left on disk
untouched. ``state.json`` holds data only, decoded by :mod:`lostlm.statecodec`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import statecodec
from .errors import LostLMError
from .runtime import atomic_write_text, fsync_dir
from .weights import load_strict, state_for_saving, tied_head_names

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
REQUIRED_KEYS = ("step", "optimizer")


def warn(message: str) -> None:
    """One ``warning: ...`` line on stderr (the CLI's counterpart of ``error: ...``)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


# -- RNG ------------------------------------------------------------------------------------

def rng_tensors() -> dict[str, torch.Tensor]:
    states = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["rng.cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    if "rng.cpu" in tensors:
        torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


# -- save -----------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def non_finite_tensor(tensors: dict[str, torch.Tensor]) -> str | None:
    """Name of the first floating tensor holding NaN or inf, or None."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def save_checkpoint(run_dir: Path, step: int, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                    state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` durably and atomically, then prune all but the newest ``keep``.

    Refuses (LostLMError, nothing written) state holding a non-finite tensor; a failed write
    removes its temporary folder and leaves every existing checkpoint as it was."""
    root = Path(run_dir) / "checkpoints"
    model_state = state_for_saving(model_state)
    tensors: dict[str, torch.Tensor] = {}
    optimizer_json = statecodec.encode(optimizer_state, tensors, "opt")
    bad = non_finite_tensor(model_state) or non_finite_tensor(tensors)
    if bad is not None:
        raise LostLMError(f"refusing to save step {step}: tensor {bad} is not finite; the last good checkpoint is kept")
    tensors.update(rng_tensors())
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(model_state, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        files = {}
        for name in (MODEL_FILE, OPTIMIZER_FILE):
            _fsync_file(tmp / name)
            files[name] = sha256_file(tmp / name)
        atomic_write_text(tmp / STATE_FILE, json.dumps({**state, "step": step, "files": files, "optimizer": optimizer_json},
                                                       indent=1, allow_nan=False))
        fsync_dir(tmp)
        if final.exists():  # the same step again (after a fallback): the old folder goes only once the new one is whole
            old = root / f"step_{step:08d}.replaced"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
        atomic_write_text(root / "latest", final.name + "\n")
    except (OSError, SafetensorError, ValueError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = f"{exc.__class__.__name__}: {exc}".splitlines()[0]
        raise LostLMError(f"could not save checkpoint step {step} in {root} ({reason}); the previous checkpoint is kept; "
                          "free disk space or fix the folder's permissions, then run the same command to resume") from None
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit())
    for old in complete[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


# -- find and verify ------------------------------------------------------------------------

def candidates(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, newest first (the ``latest`` pointer's first)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = sorted((p for p in root.glob("step_*") if p.name[5:].isdigit() and (p / STATE_FILE).is_file()), reverse=True)
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named in found:
            found.remove(named)
            found.insert(0, named)
    return found


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run folder (or a checkpoint folder itself), or None.
    Not verified: see :func:`find_checkpoint`."""
    path = Path(run_dir)
    if (path / STATE_FILE).is_file():
        return path
    found = candidates(path)
    return found[0] if found else None


def verify(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's state after checking its keys, the sha256 of each file it records, and
    the optimizer entry's structure (a dry decode against the tensor shapes of the optimizer
    file, on the meta device: no memory, nothing imported); a one-line LostLMError naming the
    first problem. (Checkpoints written before checksums existed have no ``files`` entry.)"""
    state = read_state(ckpt)
    files = state.get("files", {})
    if not isinstance(files, dict):
        raise LostLMError(f"checkpoint {ckpt}: state.json has a malformed 'files' entry")
    for name, expected in files.items():
        if name not in (MODEL_FILE, OPTIMIZER_FILE):
            raise LostLMError(f"checkpoint {ckpt}: state.json lists an unexpected file {str(name)[:60]!r}")
        path = Path(ckpt) / name
        if not path.is_file():
            raise LostLMError(f"checkpoint {ckpt}: {name} is missing")
        if sha256_file(path) != expected:
            raise LostLMError(f"checkpoint {ckpt}: {name} does not match its recorded sha256 (damaged on disk)")
    statecodec.decode(state["optimizer"], _meta_tensors(Path(ckpt) / OPTIMIZER_FILE, ckpt), f"checkpoint {ckpt}: optimizer state")
    return state


def _meta_tensors(path: Path, ckpt: Path) -> dict[str, torch.Tensor]:
    """Shape-only (meta) stand-ins of a safetensors file's tensors, read from its header."""
    try:
        with safe_open(str(path), "pt") as fh:
            return {name: torch.empty(fh.get_slice(name).get_shape(), device="meta") for name in fh.keys()}
    except (OSError, SafetensorError) as exc:
        raise LostLMError(f"checkpoint {ckpt}: {path.name} is unreadable ({str(exc).splitlines()[0][:120]})") from None


def find_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies, warning about each damaged newer one (kept on disk);
    None when the run has none; a LostLMError when every checkpoint is damaged."""
    path = Path(run_dir)
    if (path / STATE_FILE).is_file():  # an explicit checkpoint folder: no fallback
        verify(path)
        return path
    found = candidates(path)
    first_error = None
    for ckpt in found:
        try:
            verify(ckpt)
        except LostLMError as exc:
            first_error = first_error or exc
            warn(f"{exc}; falling back to the previous checkpoint ({ckpt.name} is kept, not deleted)")
            continue
        return ckpt
    if first_error is not None:
        raise LostLMError(f"{first_error}; no older checkpoint verifies either; "
                          "move the checkpoints/ folder away to start over") from None
    return None


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        state = json.loads((Path(ckpt) / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise LostLMError(f"checkpoint {ckpt}: {STATE_FILE} is unreadable ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise LostLMError(f"checkpoint {ckpt}: {STATE_FILE} is not a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise LostLMError(f"checkpoint {ckpt}: {STATE_FILE} has no {missing[0]!r} entry")
    if not isinstance(state["step"], int) or isinstance(state["step"], bool) or state["step"] < 0:
        raise LostLMError(f"checkpoint {ckpt}: {STATE_FILE} has an invalid step {str(state['step'])[:40]}")
    return state


def load_model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(Path(ckpt) / MODEL_FILE))
    except (OSError, SafetensorError) as exc:
        raise LostLMError(f"checkpoint {ckpt} has no readable {MODEL_FILE} ({exc}); "
                          "delete the folder to fall back to the previous checkpoint") from None


def load_optimizer_state(ckpt: Path, state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Returns (optimizer state dict, RNG tensors)."""
    try:
        tensors = load_file(str(Path(ckpt) / OPTIMIZER_FILE))
    except (OSError, SafetensorError) as exc:
        raise LostLMError(f"checkpoint {ckpt} has no readable {OPTIMIZER_FILE} ({exc}); "
                          "delete the folder to fall back to the previous checkpoint") from None
    rng = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    optimizer = statecodec.decode(state["optimizer"], tensors, f"checkpoint {ckpt}: optimizer state")
    if not isinstance(optimizer, dict):
        raise LostLMError(f"checkpoint {ckpt}: the optimizer state is not a dict; the checkpoint is damaged")
    return optimizer, rng


def load_weights_into(model: torch.nn.Module, model_state: dict[str, torch.Tensor], source: Path) -> None:
    """Strict load with a one-line error when the checkpoint is from a different model."""
    load_strict(model, model_state, f"checkpoint {source}",
                "it was made with a different model/layer config: use that config, or another train.out_dir",
                may_be_missing=tied_head_names(model))
