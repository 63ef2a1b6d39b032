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

from .configs import Config, LayerConfig
from .errors import LostLMError
from .layers import LOSTLinear, LowRankLinear, SLTrainLinear
from .model import LlamaLM

# Methods whose layers are plain nn.Linear (galore trains dense weights with another optimizer).
DENSE_METHODS = ("full", "galore")


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
    """One replacement for ``linear`` according to ``layer_cfg.method``."""
    weight, bias = linear.weight.data, linear.bias.data if linear.bias is not None else None
    method = layer_cfg.method
    if method == "lost":
        return LOSTLinear(weight, rank, density=layer_cfg.density, gamma=layer_cfg.gamma, activation=layer_cfg.activation,
                          channel_score=layer_cfg.channel_score, sparse_axis=layer_cfg.sparse_axis,
                          sparse_init=layer_cfg.sparse_init, svd_window=layer_cfg.svd_window,
                          svd_dtype=layer_cfg.svd_dtype, bias=bias, generator=generator)
    if method == "lowrank":
        return LowRankLinear(weight, rank, activation="identity", bias=bias, generator=generator)  # authors' init (layers.py)
    if method == "lowrank-svd":
        return LowRankLinear(weight, rank, init="svd", activation="identity", bias=bias, svd_dtype=layer_cfg.svd_dtype)
    if method == "cola":
        return LowRankLinear(weight, rank, activation="silu", bias=bias, generator=generator)  # CoLA's init (layers.py)
    if method == "sltrain":
        return SLTrainLinear(weight, rank, density=layer_cfg.density, alpha=getattr(layer_cfg, "sltrain_alpha", 32.0),
                             bias=bias, generator=generator)
    raise LostLMError(f"layer.method={method!r} has no layer to build; use one of lost, lowrank, lowrank-svd, cola, sltrain, full")


@torch.no_grad()
def convert_linear_layers(model: nn.Module, layer_cfg: LayerConfig, rank: int, seed: int = 0,
                          init_std: float = 0.02) -> list[ConvertedLayer]:
    """Replace every ``nn.Linear`` whose name matches ``layer_cfg.targets``; returns one entry
    per replaced layer (works on the meta device too, to build skeletons for loading). Dense methods (full, galore) leave the model untouched. Raises
    :class:`LostLMError` when no module matches, since that is always a mistake."""
    if layer_cfg.method in DENSE_METHODS:
        return []
    generator = torch.Generator().manual_seed(seed)
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and matches(name, layer_cfg.targets)]
    if not targets:
        raise LostLMError(f"layer.targets={layer_cfg.targets} matched no nn.Linear in the model; "
                          "use module names such as q_proj, or globs such as *.mlp.*")
    report = []
    for name, linear in targets:
        replacement = build_layer(linear, layer_cfg, rank, generator, init_std).to(linear.weight.device)
        error = float("nan")  # not mergeable (σ = SiLU), or a meta-device skeleton with no values
        if not linear.weight.is_meta:
            try:
                merged = replacement.merged_weight()
                error = ((merged - linear.weight).norm() / linear.weight.norm()).item()
            except LostLMError:
                pass
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, replacement)
        report.append(ConvertedLayer(name, tuple(linear.weight.shape), error))
    return report


def build_model(cfg: Config, vocab_size: int) -> tuple[LlamaLM, list[ConvertedLayer]]:
    """The run's model: a LlamaLM of the resolved shape, initialised from ``train.seed``, with
    the targeted projections converted to ``layer.method``. Same seed ⇒ same W0 for every
    method, so methods differ only in their parametrisation."""
    if cfg.model.init_from:
        from .hf import llama_from_pretrained  # weights of a local transformers checkpoint

        model = llama_from_pretrained(cfg.model.init_from)
        if model.config.vocab_size < vocab_size:
            raise LostLMError(f"model.init_from={cfg.model.init_from} has {model.config.vocab_size} embeddings but the "
                              f"tokenizer has {vocab_size} tokens; set data.tokenizer to the same folder")
        report = convert_linear_layers(model, cfg.layer, cfg.resolved_rank(), seed=cfg.train.seed + 1,
                                       init_std=model.config.init_std)
        return model, report
    model_cfg = cfg.resolved_model()
    if model_cfg.vocab_size is None:
        model_cfg.vocab_size = vocab_size
    elif model_cfg.vocab_size < vocab_size:
        raise LostLMError(f"config model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({vocab_size}); remove model.vocab_size or raise it")
    model = LlamaLM(model_cfg, torch.Generator().manual_seed(cfg.train.seed))
    report = convert_linear_layers(model, cfg.layer, cfg.resolved_rank(), seed=cfg.train.seed + 1, init_std=model_cfg.init_std)
    return model, report
