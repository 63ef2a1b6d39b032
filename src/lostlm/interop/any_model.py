"""LOST (or any baseline parametrisation) on any transformers causal LM, the way PEFT users expect.

    from transformers import AutoModelForCausalLM
    from lostlm.interop import any_model

    model = AutoModelForCausalLM.from_pretrained("my-llama")          # Llama, Qwen2, Mistral, Gemma, GPT-2 ...
    any_model.convert_for_training(model, method="lost", rank=64, density=0.03)
    ...  # train: transformers' Trainer, accelerate, a plain loop
    model.save_pretrained("out/lost-llama")                          # config.json + lost_config.json + safetensors
    model = any_model.from_pretrained("out/lost-llama")              # the same tensors, the same logits

:func:`convert_for_training` converts the model in place (:func:`lostlm.convert.convert_linear_layers`,
from the model's current weights: LOST starts from their SVD) and returns it. GPT-2-style
``Conv1D`` projections (weight stored in x out) are first replaced by the equivalent
``nn.Linear`` (weight transposed, bias kept). The settings travel with the model: its
``save_pretrained`` also writes ``lost_config.json`` (:data:`LOST_CONFIG`) and marks
``config.json`` with ``model_type: "lostlm_converted"`` (the original type is kept as
``lostlm_base_model_type``), so a plain ``AutoModelForCausalLM.from_pretrained`` of the folder
fails loudly instead of silently building a dense model with random weights where the LOST
layers were. :func:`from_pretrained` builds the base architecture from config.json, converts it
with the stored settings (the targeted layers on the meta device: no SVD, no copies) and loads
every tensor strictly (:func:`lostlm.weights.load_strict`): a missing settings file or tensor
is a one-line :class:`~lostlm.errors.LostLMError`.
"""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..configs import LayerConfig, config_from_dict
from ..convert import convert_linear_layers, matches
from ..errors import LostLMError
from ..weights import load_strict, read_safetensors_folder

LOST_CONFIG = "lost_config.json"
FORMAT = "lostlm-any-model"
MARKED_TYPE = "lostlm_converted"
BASE_TYPE_KEY = "lostlm_base_model_type"
# Default layer.targets per model_type where transformers' names differ from Llama's.
DEFAULT_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"]}


def _layer_config(model: nn.Module, layer: LayerConfig | None, kwargs: dict) -> LayerConfig:
    if layer is not None and kwargs:
        raise LostLMError("pass either a LayerConfig or keyword settings (method=..., density=...), not both")
    if layer is None:
        values = dict(kwargs)
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if "targets" not in values and model_type in DEFAULT_TARGETS:
            values["targets"] = DEFAULT_TARGETS[model_type]
        layer = config_from_dict({"layer": values}).layer  # validated by lostlm's own rules
    return layer


def _conv1d_to_linear(model: nn.Module, targets: list[str], device: str | torch.device | None = None) -> list[str]:
    """Replace every matched transformers ``Conv1D`` (y = x @ W + b, W in x out) by an equal nn.Linear."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old transformers
        return []
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D) and matches(name, targets):
            n_in, n_out = module.weight.shape
            linear = nn.Linear(n_in, n_out, bias=module.bias is not None, device=device or module.weight.device,
                               dtype=module.weight.dtype)
            if not module.weight.is_meta and linear.weight.device.type != "meta":
                with torch.no_grad():
                    linear.weight.copy_(module.weight.t())
                    if module.bias is not None:
                        linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear)
            replaced.append(name)
    return replaced


def _attach(model: nn.Module, settings: dict) -> None:
    """Remember the settings on the model and make its save_pretrained write them."""
    model.lostlm_settings = settings
    if getattr(model, "_lostlm_original_save", None) is None:
        model._lostlm_original_save = model.save_pretrained
        model.save_pretrained = types.MethodType(_save_pretrained, model)


def _save_pretrained(self: nn.Module, save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:
    result = self._lostlm_original_save(save_directory, *args, **kwargs)
    folder = Path(save_directory)
    config_file = folder / "config.json"
    if config_file.is_file():  # the main process of a distributed save writes it
        config = json.loads(config_file.read_text())
        if config.get("model_type") != MARKED_TYPE:
            config[BASE_TYPE_KEY] = config["model_type"]
            config["model_type"] = MARKED_TYPE
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (folder / LOST_CONFIG).write_text(json.dumps(self.lostlm_settings, indent=1) + "\n")
    return result


def convert_for_training(model: nn.Module, layer: LayerConfig | None = None, *, rank: int = 64, seed: int = 0,
                         init_std: float = 0.02, **layer_settings: Any) -> nn.Module:
    """Convert a transformers causal LM in place and return it (see the module docstring).

    ``layer`` or keyword ``layer_settings`` (``method="lost"``, ``density=0.03``, ``targets=[...]``
    ... any :class:`~lostlm.configs.LayerConfig` field) choose the parametrisation; ``rank`` its
    rank. Default targets: Llama's names (q/k/v/o, gate/up/down: also Qwen2, Mistral, Gemma),
    ``c_attn``/``c_proj``/``c_fc`` for GPT-2."""
    if getattr(model, "lostlm_settings", None) is not None:
        raise LostLMError("this model is already converted; convert the original model once")
    layer = _layer_config(model, layer, layer_settings)
    conv1d = _conv1d_to_linear(model, layer.targets)
    report = convert_linear_layers(model, layer, rank, seed=seed, init_std=init_std)
    settings = {"format": FORMAT, "version": 1, "layer": dataclasses.asdict(layer), "rank": rank, "seed": seed,
                "init_std": init_std, "conv1d": conv1d, "converted": [entry.name for entry in report]}
    _attach(model, settings)
    return model


def from_pretrained(folder: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """A folder written by a converted model's ``save_pretrained``, back as that model (eval mode
    off, on the CPU; ``.to(device)`` it). Strict: every tensor must be present and fit."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    settings_file, config_file = folder / LOST_CONFIG, folder / "config.json"
    if not config_file.is_file():
        raise LostLMError(f"{folder} has no config.json; pass a folder written by save_pretrained")
    if not settings_file.is_file():
        raise LostLMError(f"{folder} has no {LOST_CONFIG}: it was not saved from a model converted with "
                          "lostlm.interop.any_model.convert_for_training; load a plain model with AutoModelForCausalLM")
    settings = json.loads(settings_file.read_text())
    if settings.get("format") != FORMAT:
        raise LostLMError(f"{settings_file} is not a {FORMAT} settings file")
    raw = json.loads(config_file.read_text())
    base_type = raw.pop(BASE_TYPE_KEY, None) or raw.get("model_type")
    raw.pop("model_type", None)
    config = AutoConfig.for_model(base_type, **raw)
    if dtype is not None:
        config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype) if dtype else AutoModelForCausalLM.from_config(config)
    layer = config_from_dict({"layer": settings["layer"]}).layer
    conv1d = _conv1d_to_linear(model, layer.targets, device="meta")
    for name, module in model.named_modules():  # the targets on meta: conversion builds skeletons only
        if isinstance(module, nn.Linear) and matches(name, layer.targets):
            module.to("meta")
    report = convert_linear_layers(model, layer, settings["rank"], seed=settings["seed"], init_std=settings["init_std"])
    for entry in report:
        model.get_submodule(entry.name).to_empty(device="cpu")
    if conv1d != settings["conv1d"] or [e.name for e in report] != settings["converted"]:
        raise LostLMError(f"{settings_file} does not rebuild the saved model (converted layers differ); "
                          "was config.json edited?")
    tied = ("lm_head.weight",) if getattr(config, "tie_word_embeddings", False) else ()
    load_strict(model, read_safetensors_folder(folder, "save the model with save_pretrained (safetensors)"), folder, "save the converted model again with save_pretrained", tied)
    if tied:
        model.tie_weights()
    _attach(model, settings)
    return model
