"""The run's model: ``build_model`` (a LlamaLM of the configured shape, or a local Llama
checkpoint for ``model.init_from``), with the targeted projections converted to ``layer.method``."""

from __future__ import annotations

import torch

from .configs import Config
from .convert import ConvertedLayer, convert_linear_layers
from .errors import LostLMError
from .interop.llama_reader import llama_from_pretrained
from .layers import _LOSTInputChannels, lost_pad_multiple
from .model import LlamaLM


def build_model(cfg: Config, vocab_size: int) -> tuple[LlamaLM, list[ConvertedLayer]]:
    """The run's model: a LlamaLM of the resolved shape, initialised from ``train.seed``, with
    the targeted projections converted to ``layer.method``. Same seed ⇒ same W0 for every
    method, so methods differ only in their parametrisation."""
    if cfg.model.init_from:
        model = llama_from_pretrained(cfg.model.init_from)
        if model.config.vocab_size < vocab_size:
            raise LostLMError(f"model.init_from={cfg.model.init_from} has {model.config.vocab_size} embeddings but the "
                              f"tokenizer has {vocab_size} tokens; set data.tokenizer to the same folder")
        report = convert_linear_layers(model, cfg.layer, cfg.resolved_rank(), seed=cfg.train.seed + 1,
                                       init_std=model.config.init_std)
        _set_lost_padding(cfg)
        return model, report
    model_cfg = cfg.resolved_model()
    if model_cfg.vocab_size is None:
        model_cfg.vocab_size = vocab_size
    elif model_cfg.vocab_size < vocab_size:
        raise LostLMError(f"config model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({vocab_size}); remove model.vocab_size or raise it")
    model = LlamaLM(model_cfg, torch.Generator().manual_seed(cfg.train.seed))
    report = convert_linear_layers(model, cfg.layer, cfg.resolved_rank(), seed=cfg.train.seed + 1, init_std=model_cfg.init_std)
    _set_lost_padding(cfg)
    return model, report


def _set_lost_padding(cfg: Config) -> None:
    """LOST's GEMM width padding (``layer.lost_pad_to``). It is a process-wide setting of the
    layer's autograd function, like the thread count: one run per process, and a speed choice
    that leaves the function unchanged (so it is not part of a bench run's key either)."""
    if cfg.layer.method == "lost":
        _LOSTInputChannels.pad_to = lost_pad_multiple(cfg.resolved_rank(), cfg.layer.lost_pad_to)
