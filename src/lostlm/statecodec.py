"""Optimizer state <-> (tensors, JSON data): a closed set of types, nothing built by name.

A checkpoint's ``state.json`` holds data only: numbers, strings, booleans, null, lists, and
these tagged objects, each with one exact shape:

    {"__tensor__": "opt.3.exp_avg"}                 a tensor of optimizer.safetensors
    {"__tensor__": NAME, "stride": [..]}            the same, rebuilt with that memory layout
    {"__tuple__": [..]}                             a tuple
    {"__dict__": [[key, value], ..]}                a dict (keys: int or str; JSON keys are str only)
    {"__galore_projector__": {rank, verbose, update_proj_gap, scale, proj_type, ortho_matrix}}

The only object type saved is GaLore's ``GaLoreProjector``; it is written and rebuilt field by
field by :func:`_encode_projector` / :func:`_decode_projector`. Anything else (an unknown tag,
an extra key, a wrong type, a missing tensor, nesting deeper than :data:`MAX_DEPTH`) is a
one-line :class:`LostLMError`: loading never imports a module or builds a class a file names,
so a crafted ``state.json`` cannot run code (the old ``__object__`` tag, which imported any
``module:qualname``, is refused).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .errors import LostLMError

MAX_DEPTH = 32
PROJECTOR_TAG = "__galore_projector__"
_PROJECTOR_FIELDS = {"rank": int, "verbose": bool, "update_proj_gap": int, "scale": float, "proj_type": str}
_PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")


def _is_projector(obj: Any) -> bool:
    cls = type(obj)
    return cls.__name__ == "GaLoreProjector" and cls.__module__.startswith("galore_torch")


def encode(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """Replace every tensor by a reference into ``tensors``; GaLore projectors by their fields."""
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
        return {"__dict__": [[encode(k, tensors, f"{prefix}.k{i}"), encode(v, tensors, f"{prefix}.{i}")]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [encode(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise LostLMError(f"optimizer state holds the non-finite number {obj} at {prefix}; not saved")
        return obj
    if _is_projector(obj):
        return {PROJECTOR_TAG: _encode_projector(obj, tensors, prefix)}
    raise LostLMError(f"cannot checkpoint optimizer state of type {type(obj).__name__} at {prefix}; "
                      "add an explicit encoder for it to lostlm.statecodec")


def _encode_projector(proj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> dict:
    fields = {name: getattr(proj, name) for name in _PROJECTOR_FIELDS}
    fields["scale"] = float(fields["scale"])
    fields["ortho_matrix"] = encode(proj.ortho_matrix, tensors, f"{prefix}.ortho")
    return fields


def decode(obj: Any, tensors: dict[str, torch.Tensor], where: str = "optimizer", depth: int = 0) -> Any:
    """The inverse of :func:`encode`; a one-line LostLMError for anything it did not write."""
    if depth > MAX_DEPTH:
        raise LostLMError(f"{where} is nested deeper than {MAX_DEPTH} levels; the state file is damaged or crafted")
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [decode(v, tensors, where, depth + 1) for v in obj]
    if not isinstance(obj, dict):
        raise LostLMError(f"{where} holds a value of type {type(obj).__name__}; the state file is damaged")
    keys = set(obj)
    if "__tensor__" in obj and keys <= {"__tensor__", "stride"}:
        return _decode_tensor(obj, tensors, where)
    if keys == {"__tuple__"} and isinstance(obj["__tuple__"], list):
        return tuple(decode(v, tensors, where, depth + 1) for v in obj["__tuple__"])
    if keys == {"__dict__"} and isinstance(obj["__dict__"], list):
        out = {}
        for pair in obj["__dict__"]:
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], (int, str)) and not isinstance(pair[0], bool)):
                raise LostLMError(f"{where} has a dict entry that is not a [int-or-str key, value] pair; the state file is damaged")
            out[pair[0]] = decode(pair[1], tensors, where, depth + 1)
        return out
    if keys == {PROJECTOR_TAG} and isinstance(obj[PROJECTOR_TAG], dict):
        return _decode_projector(obj[PROJECTOR_TAG], tensors, where, depth)
    shown = ", ".join(sorted(map(str, keys)))[:80]
    raise LostLMError(f"{where} holds an object with unknown tag(s) {{{shown}}}; only tensors, tuples, dicts and "
                      "GaLore projectors are loaded (the state file is damaged, crafted, or from another program)")


def _decode_tensor(obj: dict, tensors: dict[str, torch.Tensor], where: str) -> torch.Tensor:
    name = obj["__tensor__"]
    if not isinstance(name, str) or name not in tensors:
        raise LostLMError(f"{where} names tensor {str(name)[:60]!r}, which the optimizer file does not hold; the checkpoint is damaged")
    tensor = tensors[name]
    if "stride" not in obj:
        return tensor
    stride = obj["stride"]
    ok = (isinstance(stride, list) and len(stride) == tensor.dim()
          and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in stride))
    # The layout may be a view into a bigger matrix (a transposed slice of GaLore's SVD factor),
    # but never asks for more storage than a square of the largest side: a crafted stride
    # cannot make the loader allocate without bound.
    span = 1 + sum((n - 1) * s for n, s in zip(tensor.shape, stride)) if ok and tensor.numel() else 0
    if not ok or span > max(tensor.shape, default=1) ** tensor.dim():
        raise LostLMError(f"{where} has an invalid stride {str(stride)[:60]} for tensor {name}; the checkpoint is damaged")
    return torch.empty_strided(tensor.shape, stride, dtype=tensor.dtype, device=tensor.device).copy_(tensor)


def _decode_projector(fields: dict, tensors: dict[str, torch.Tensor], where: str, depth: int) -> Any:
    expected = set(_PROJECTOR_FIELDS) | {"ortho_matrix"}
    if set(fields) != expected:
        raise LostLMError(f"{where} has a GaLore projector with fields {sorted(fields)}; expected {sorted(expected)}")
    for name, kind in _PROJECTOR_FIELDS.items():
        value = fields[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not kind:
            raise LostLMError(f"{where} has a GaLore projector whose {name} is {type(value).__name__}, not {kind.__name__}")
        fields[name] = value
    if fields["proj_type"] not in _PROJ_TYPES or fields["rank"] <= 0 or fields["update_proj_gap"] <= 0:
        raise LostLMError(f"{where} has a GaLore projector with out-of-range fields (rank, update_proj_gap, proj_type)")
    ortho = decode(fields["ortho_matrix"], tensors, where, depth + 1)
    if not (ortho is None or isinstance(ortho, torch.Tensor)
            or (isinstance(ortho, list) and len(ortho) == 2 and all(isinstance(m, torch.Tensor) for m in ortho))):
        raise LostLMError(f"{where} has a GaLore projector whose ortho_matrix is not a tensor, a pair of tensors or null")
    from galore_torch.galore_projector import GaLoreProjector  # the one class this module builds

    proj = GaLoreProjector(fields["rank"], verbose=fields["verbose"], update_proj_gap=fields["update_proj_gap"],
                           scale=fields["scale"], proj_type=fields["proj_type"])
    proj.ortho_matrix = ortho
    return proj
