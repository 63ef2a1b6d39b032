"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the trainer: sharding, full state dicts.

Used by :class:`lostlm.train.Trainer` through :func:`wrap_for_training` (DDP or FSDP2, then
``torch.compile``) and, when ``train.parallel=fsdp``, for state dicts and evaluation.
The model code knows nothing about this; the order the trainer follows is::

    build_model (SVD init, same seed on every rank)  ->  load a checkpoint's full weights
    -> apply_fsdp (broadcast from rank 0, shard each decoder block, then the root)
    -> build the optimizer (on the sharded DTensor parameters)  ->  load_full_optimizer_state

Each ``DecoderLayer`` is one FSDP unit (its LOST layers' factors and sparse blocks are sharded
with it and all-gathered together before the block runs); the root unit holds the embeddings,
the final norm and the LM head. Buffers (RoPE tables, LOST channel indices) are not sharded:
every rank keeps a full copy.

Checkpoints stay the single-file format of :mod:`lostlm.checkpoint`: before saving, the
sharded weights and optimizer state are gathered into full CPU tensors on rank 0
(``gathered_state_dicts``), and the optimizer state is keyed by parameter name, so a run can be
resumed with a different number of processes.

FSDP2 needs every rank to run the same number of forward passes (each one all-gathers the
parameters), also in evaluation, where ranks may hold different numbers of validation batches;
``even_batches`` re-cuts the shorter ranks' batches (an empty batch would not do: the model
cannot reshape a 0-row batch).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from .errors import LostLMError
from .model import DecoderLayer
from .runtime import DistEnv, is_distributed

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@torch.no_grad()
def broadcast_module_states(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank.

    The SVD initialisation already gives identical weights on every rank (same seed, same
    code; tests/test_distributed.py checks it), but LAPACK/cuSOLVER builds on different
    nodes may return singular vectors with different signs. DDP broadcasts at construction;
    FSDP2 does not, and each rank would keep *its own* shard of its own copy, so we do it here.
    """
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)


def wrap_for_training(model: nn.Module, env: DistEnv, device: torch.device, parallel: str, compile: bool) -> nn.Module:
    """The module the trainer runs: ``model`` under DDP or FSDP2 (``parallel``) when there are
    several processes, then ``torch.compile``d if asked. FSDP2 shards ``model`` in place."""
    if env.world_size > 1:
        if parallel == "fsdp":
            model = apply_fsdp(model, device)
        else:
            from torch.nn.parallel import DistributedDataParallel
            ids = [device.index] if device.type == "cuda" else None
            # Our buffers (RoPE tables, LOST channel indices) never change: no sync before every
            # forward. torch >= 2.13 still syncs them once at construction; older torch
            # (broadcast_buffers=False) does not, which is harmless: every rank builds the same
            # buffers from the same seed, or loads them from the same checkpoint.
            params = inspect.signature(DistributedDataParallel).parameters
            no_resync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
            model = DistributedDataParallel(model, device_ids=ids, **no_resync)
    if compile:
        model = torch.compile(model)
    return model


def apply_fsdp(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over all processes (one block per unit, then the
    root) and return it. Parameters become DTensors: build the optimizer afterwards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    broadcast_module_states(model)
    for module in model.modules():
        if isinstance(module, DecoderLayer):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def gathered_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full, unsharded CPU (model, optimizer) state dicts on rank 0; empty dicts on the other
    ranks. Collective: every rank must call it. The optimizer state is keyed by parameter name
    (``model.layers.0.mlp.up_proj.lowrank_down``), not by position."""
    if not is_distributed():  # one process: same format without the gathering
        options = StateDictOptions(full_state_dict=True)
        return ({k: v.detach().cpu() for k, v in get_model_state_dict(model, options=options).items()},
                get_optimizer_state_dict(model, optimizer, options=options))
    return get_model_state_dict(model, options=_FULL), get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full, name-keyed optimizer state (from ``gathered_state_dicts``; every rank has
    read it from the checkpoint) into an optimizer over sharded or plain parameters."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def even_batches(batches: Iterable[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """This rank's batches, re-cut so that every rank has as many as the rank with the most:
    FSDP2 forwards are collective, so all ranks must run the same number. The largest batches
    are split in two until the count matches; the rows, hence a token-weighted loss, are
    unchanged. Validation shares differ by at most one sequence, so this fails only when a
    rank has fewer sequences than another rank has batches (a tiny validation set)."""
    batches = list(batches)
    count = torch.tensor([len(batches)], dtype=torch.int64, device=device)  # NCCL reduces GPU tensors only
    if is_distributed():
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    while len(batches) < count.item():
        largest = max(range(len(batches)), key=lambda i: len(batches[i]), default=None)
        if largest is None or len(batches[largest]) < 2:
            raise LostLMError(f"validation: this process has {sum(len(b) for b in batches)} sequences but another has "
                              f"{count.item()} batches, and FSDP needs the same number of forward passes on every "
                              "process; raise data.val_tokens or train.micro_batch_size")
        batch = batches.pop(largest)
        half = len(batch) // 2
        batches[largest:largest] = [batch[:half], batch[half:]]
    return batches
