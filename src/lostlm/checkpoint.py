"""Atomic checkpoints: safetensors for every tensor, JSON for everything else.

Layout of a run folder::

    <out_dir>/config.yaml                 the resolved config of the run
    <out_dir>/tokenizer/                  the tokenizer (save_pretrained), for eval/generate/export
    <out_dir>/checkpoints/step_00000400/
        model.safetensors                 model state dict (LOST channel indices included)
        optimizer.safetensors             optimizer tensors + RNG states
        state.json                        step, data position, optimizer non-tensor state, config
    <out_dir>/checkpoints/latest          name of the newest complete checkpoint

A checkpoint is written into ``step_XXXX.tmp`` and renamed into place, and ``latest`` is
replaced atomically after that, so a crash mid-write never leaves a half checkpoint that
resume would pick up, and never destroys the previous one.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import LostLMError
from .runtime import atomic_write_text, fsync_dir
from .weights import load_strict, state_for_saving, tied_head_names

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


# -- flattening arbitrary optimizer state into (tensors, JSON) ------------------------------

def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """Replace every tensor in a nested structure by a reference into ``tensors``. Objects
    (e.g. GaLore's projector) are stored as their class path plus their flattened attributes."""
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu().contiguous()
        if any(t.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr() for t in tensors.values()):
            tensor = tensor.clone()  # safetensors refuses shared storage (bitsandbytes shares its qmaps)
        tensors[prefix] = tensor
        if obj.dim() > 1 and not obj.is_contiguous():
            # Keep the memory layout: a matmul with a transposed/sliced view rounds differently
            # than with a contiguous copy, and resume must be bit-exact (GaLore's projectors).
            return {"__tensor__": prefix, "stride": list(obj.stride())}
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[flatten_state(k, tensors, f"{prefix}.k{i}"), flatten_state(v, tensors, f"{prefix}.{i}")]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [flatten_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "__dict__"):
        cls = type(obj)
        return {"__object__": f"{cls.__module__}:{cls.__qualname__}", "attrs": flatten_state(vars(obj), tensors, prefix)}
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__}")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            tensor = tensors[obj["__tensor__"]]
            if "stride" in obj:
                tensor = torch.empty_strided(tensor.shape, obj["stride"], dtype=tensor.dtype).copy_(tensor)
            return tensor
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in obj["__dict__"]}
        if "__object__" in obj:
            module, qualname = obj["__object__"].split(":")
            cls = importlib.import_module(module)
            for part in qualname.split("."):
                cls = getattr(cls, part)
            instance = cls.__new__(cls)
            instance.__dict__.update(unflatten_state(obj["attrs"], tensors))
            return instance
    return obj


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


# -- save / load ----------------------------------------------------------------------------

def save_checkpoint(run_dir: Path, step: int, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                    state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(state_for_saving(model_state), str(tmp / MODEL_FILE), metadata={"format": "pt"})
    tensors: dict[str, torch.Tensor] = {}
    optimizer_json = flatten_state(optimizer_state, tensors, "opt")
    tensors.update(rng_tensors())
    save_file(tensors, str(tmp / OPTIMIZER_FILE))
    (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "optimizer": optimizer_json}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    atomic_write_text(root / "latest", final.name + "\n")
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run folder (or a checkpoint folder itself), or None."""
    path = Path(run_dir)
    if (path / STATE_FILE).is_file():
        return path
    pointer = path / "checkpoints" / "latest"
    if pointer.is_file():
        candidate = path / "checkpoints" / pointer.read_text().strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    complete = sorted(p for p in (path / "checkpoints").glob("step_*") if (p / STATE_FILE).is_file()) if (path / "checkpoints").is_dir() else []
    return complete[-1] if complete else None


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LostLMError(f"checkpoint {ckpt} is unreadable ({exc.__class__.__name__}: {exc}); "
                          "delete it to fall back to the previous one") from None


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
    return unflatten_state(state["optimizer"], tensors), rng


def load_weights_into(model: torch.nn.Module, model_state: dict[str, torch.Tensor], source: Path) -> None:
    """Strict load with a one-line error when the checkpoint is from a different model."""
    load_strict(model, model_state, f"checkpoint {source}",
                "it was made with a different model/layer config: use that config, or another train.out_dir",
                may_be_missing=tied_head_names(model))
