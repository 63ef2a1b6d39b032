"""Swap the linear layers of any ``nn.Module`` for LOST or a baseline parametrisation.

Works on our :class:`~lostlm.model.LlamaLM` and equally on a Hugging Face
``LlamaForCausalLM``: modules are matched by name, the current weight of each matched
``nn.Linear`` is the ``W0`` the new layer is built from (so converting a *pretrained* model
uses the SVD of its real weights), and the replacement is installed in place.

    model = LlamaLM(cfg)
    report = convert_linear_layers(model, LayerConfig(method="lost"), rank=64)

A pattern matches a module whose dotted name ends with ``.pattern`` (``q_proj`` matches
``model.layers.0.self_attn.q_proj``) or equals it, or that matches it as an fnmatch glob.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from . import methods
from .configs import LayerConfig
from .errors import LostLMError


@dataclass
class ConvertedLayer:
    name: str
    shape: tuple[int, int]
    relative_error: float
    """‖W_layer − W0‖_F / ‖W0‖_F of the merged layer at creation (nan when not mergeable)."""


def matches(name: str, patterns: list[str] | tuple[str, ...]) -> bool:
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def build_layer(linear: nn.Linear, layer_cfg: LayerConfig, rank: int, generator: torch.Generator | None = None,
                init_std: float = 0.02) -> nn.Module:
    """One replacement for ``linear`` according to ``layer_cfg.method`` (its registered builder)."""
    method = methods.get(layer_cfg.method)
    if method.dense:
        raise LostLMError(f"layer.method={method.name!r} keeps dense layers and has no layer to build; use one of "
                          f"{', '.join(m for m in methods.names() if not methods.get(m).dense)}")
    return method.build(linear, layer_cfg, rank, generator, init_std)


@torch.no_grad()
def convert_linear_layers(model: nn.Module, layer_cfg: LayerConfig, rank: int, seed: int = 0,
                          init_std: float = 0.02) -> list[ConvertedLayer]:
    """Replace every ``nn.Linear`` whose name matches ``layer_cfg.targets``; returns one entry
    per replaced layer (works on the meta device too, to build skeletons for loading). Dense
    methods (full, galore) leave the model untouched. Raises :class:`LostLMError` when no
    module matches, since that is always a mistake."""
    method = methods.get(layer_cfg.method)
    if method.dense:
        return []
    generator = torch.Generator().manual_seed(seed)
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and matches(name, layer_cfg.targets)]
    if not targets:
        raise LostLMError(f"layer.targets={layer_cfg.targets} matched no nn.Linear in the model; "
                          "use module names such as q_proj, or globs such as *.mlp.*")
    report = []
    targets.reverse()
    while targets:
        # Popped, not iterated: once its replacement is installed nothing holds the dense layer, so
        # its weight is freed at once and the build's peak is the model plus one new layer (not the
        # dense and the converted model side by side: +2.5 GB at the 1b preset, docs/results.md (f)).
        name, linear = targets.pop()
        replacement = build_layer(linear, layer_cfg, rank, generator, init_std).to(linear.weight.device)
        error = float("nan")  # not mergeable (σ = SiLU), or a meta-device skeleton with no values
        if not linear.weight.is_meta and method.mergeable(layer_cfg):
            merged = replacement.merged_weight()
            error = ((merged - linear.weight).norm() / linear.weight.norm()).item()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, replacement)
        report.append(ConvertedLayer(name, tuple(linear.weight.shape), error))
        del linear, replacement
    return report

