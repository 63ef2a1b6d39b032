"""Optimizer and learning-rate schedule.

* AdamW (β = 0.9/0.95) for every method; weight decay only on matrices (norm gains and other
  vectors are not decayed). ``train.optimizer=adamw8bit``: bitsandbytes' ``AdamW8bit`` (8-bit
  blockwise-quantised moments, CPU kernels included; tensors under 4096 numbers keep fp32
  moments, bitsandbytes' ``min_8bit_size``), its update of a large tensor run in slices
  (:mod:`lostlm.adamw8bit`: same numbers, a fraction of the temporaries), for every method
  except GaLore (galore-torch's ``GaLoreAdamW8bit`` asserts CUDA). Its state is tensors and
  ints: checkpoints hold it exactly.
* ``train.untargeted_lr_scale`` (default 1): the parameters outside the targeted linear layers
  (``layer.targets``: token embedding, LM head, norm gains) train at that multiple of the
  schedule's lr, in param groups of their own with an ``lr_scale`` the trainer applies. GaLore
  has this split built in (its projected layers move at ``galore_scale`` × lr); the setting
  lets a sweep give every method the same freedom.
* Methods whose registry entry asks for ``optimizer="galore"`` (``layer.method = galore``):
  the targeted projections stay dense and are trained with ``galore_torch.GaLoreAdamW`` (gradient projected to rank ``layer.galore_rank``, projection
  refreshed every ``layer.galore_update_gap`` steps); everything else with plain Adam inside
  the same optimizer, as in the GaLore paper.
* Schedule: linear warmup from 0 to the peak, then cosine decay to ``min_lr_ratio`` × peak.
  The rate is a pure function of the step, so resume needs no scheduler state.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import methods
from .configs import Config
from .convert import matches
from .errors import LostLMError


# Numbers per slice of the 8-bit update (lostlm.adamw8bit): each fp32 temporary is at most 4 MiB.
UPDATE_SLICE_NUMEL = 1 << 20


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    t = cfg.train
    warmup = t.warmup_steps if t.warmup_steps is not None else max(1, t.steps // 10)
    if warmup > 0 and step < warmup:
        return t.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, t.steps - warmup))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return t.lr * (t.min_lr_ratio + (1.0 - t.min_lr_ratio) * cosine)


def _param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """Matrices (decayed) and vectors (not); with ``train.untargeted_lr_scale`` != 1, the
    parameters outside the targeted layers move to two more groups carrying that ``lr_scale``."""
    t = cfg.train
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.untargeted_lr_scale == 1.0:
        return groups
    targeted = {id(p) for name, module in model.named_modules() if matches(name, cfg.layer.targets)
                for p in module.parameters()}
    return ([{**g, "params": [p for p in g["params"] if id(p) in targeted]} for g in groups]
            + [{**g, "params": [p for p in g["params"] if id(p) not in targeted], "lr_scale": t.untargeted_lr_scale}
               for g in groups])


def _adamw(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adamw8bit":
        try:
            from .adamw8bit import SlicedAdamW8bit
        except ImportError:
            raise LostLMError("train.optimizer=adamw8bit needs bitsandbytes; pip install 'lostlm[8bit]' "
                              "(or pip install bitsandbytes)") from None
        return SlicedAdamW8bit(_param_groups(model, cfg), lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8,
                               slice_numel=UPDATE_SLICE_NUMEL)
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(_param_groups(model, cfg), lr=t.lr, betas=(t.beta1, t.beta2), fused=fused or None)


def _galore(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    from galore_torch import GaLoreAdamW

    t = cfg.train
    if t.optimizer == "adamw8bit":
        raise LostLMError("train.optimizer=adamw8bit does not combine with layer.method=galore (galore-torch's "
                          "GaLoreAdamW8bit needs CUDA); use train.optimizer=adamw")
    galore_ids = set()
    galore_params = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and matches(name, cfg.layer.targets):
            galore_params.append(module.weight)
            galore_ids.add(id(module.weight))
    groups = _param_groups(model, cfg)
    for group in groups:
        group["params"] = [p for p in group["params"] if id(p) not in galore_ids]
    groups.append({"params": galore_params, "weight_decay": t.weight_decay, "rank": cfg.layer.galore_rank,
                   "update_proj_gap": cfg.layer.galore_update_gap, "scale": cfg.layer.galore_scale, "proj_type": "std"})
    return GaLoreAdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, no_deprecation_warning=True)


# The optimizers a registered method may ask for (``Method.optimizer``).
OPTIMIZERS = {"adamw": _adamw, "galore": _galore}


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """The optimizer ``layer.method`` asks for (its registry entry's ``optimizer``)."""
    return OPTIMIZERS[methods.get(cfg.layer.method).optimizer](model, cfg)
