"""Model weights in and out: the one strict state-dict check, and tensors ready for safetensors.

Used by checkpoints, by the transformers integration and by export, so that "these weights do
not fit this model" is detected (and worded) in exactly one place.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from .errors import LostLMError


def state_for_saving(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies with tied tensors de-duplicated (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)) if tensor.numel() else None
        if key is not None and key in seen:
            continue  # tied weight: the first name (embed_tokens) carries it
        if key is not None:
            seen.add(key)
        out[name] = tensor.detach().cpu().contiguous()
    return out


def state_mismatch(own: dict[str, torch.Tensor], given: dict[str, torch.Tensor],
                   may_be_missing: Iterable[str] = ()) -> str | None:
    """A short description of why ``given`` does not fit a model whose state is ``own``
    (missing, unexpected or differently shaped tensors), or None when it fits."""
    optional = set(may_be_missing)
    missing = [k for k in own if k not in given and k not in optional]
    unexpected = [k for k in given if k not in own]
    mismatched = [k for k in given if k in own and tuple(own[k].shape) != tuple(given[k].shape)]
    if missing:
        return f"{len(missing)} tensors missing, first {missing[0]}"
    if unexpected:
        return f"{len(unexpected)} unexpected tensors, first {unexpected[0]}"
    if mismatched:
        name = mismatched[0]
        return f"shape of {name} is {tuple(given[name].shape)}, the model wants {tuple(own[name].shape)}"
    return None


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path, hint: str,
                may_be_missing: Iterable[str] = ()) -> None:
    """Load ``state`` into ``model`` or raise one line naming ``source``, the first mismatch
    and ``hint`` (what the user should do). ``may_be_missing``: names that may be absent
    (a tied ``lm_head.weight``). Values are copied, so bf16/fp16 weights are cast to the
    model's dtype."""
    problem = state_mismatch(model.state_dict(), state, may_be_missing)
    if problem:
        raise LostLMError(f"{source} does not fit this model ({problem}); {hint}")
    model.load_state_dict(state, strict=False)


def tied_head_names(model: torch.nn.Module) -> tuple[str, ...]:
    """``("lm_head.weight",)`` when the model ties its head to the embedding, else ``()``."""
    config = getattr(model, "config", None)
    tied = getattr(config, "tie_embeddings", None)
    if tied is None:
        tied = getattr(config, "tie_word_embeddings", False)
    return ("lm_head.weight",) if tied else ()


def read_safetensors_folder(folder: Path, hint: str) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face-style folder: ``model.safetensors``, or the shards its
    ``model.safetensors.index.json`` lists. A missing or unreadable file is one line naming it;
    ``hint`` says what to do when the folder has no safetensors weights at all."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LostLMError(f"{index} is not a safetensors index ({exc}); save the model again with save_pretrained") from None
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise LostLMError(f"{folder} has no model.safetensors (or sharded index); {hint}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise LostLMError(f"{path} is missing (listed in the safetensors index); copy the whole folder")
        try:
            state.update(load_file(str(path)))
        except (OSError, SafetensorError) as exc:
            raise LostLMError(f"{path} is not a readable safetensors file ({exc})") from None
    return state
