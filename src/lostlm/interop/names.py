"""The one map between our :class:`~lostlm.configs.ModelConfig` and transformers' Llama config names.

Every conversion of a model shape to or from transformers goes through :data:`MODEL_TO_HF`:
the ``lost_llama`` config, the dense ``llama`` export, the Llama reader and the tests. The
tokenizer's special-token ids (``bos_token_id`` ...) that both exported configs carry are
gathered here too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# ModelConfig field -> transformers LlamaConfig (and LostLlamaConfig) field.
MODEL_TO_HF: dict[str, str] = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "max_seq_len": "max_position_embeddings",
    "rope_theta": "rope_theta",
    "norm_eps": "rms_norm_eps",
    "init_std": "initializer_range",
    "tie_embeddings": "tie_word_embeddings",
}

SPECIAL_TOKENS = ("bos", "eos", "pad")


def hf_fields(model_cfg: Any) -> dict[str, Any]:
    """transformers-named keyword arguments of a (resolved) ModelConfig."""
    return {theirs: getattr(model_cfg, ours) for ours, theirs in MODEL_TO_HF.items()}


def model_fields(values: Mapping[str, Any] | Any) -> dict[str, Any]:
    """ModelConfig keyword arguments from transformers-named values: a mapping (a parsed
    config.json; every key must be present) or an object with those attributes."""
    if isinstance(values, Mapping):
        return {ours: values[theirs] for ours, theirs in MODEL_TO_HF.items()}
    return {ours: getattr(values, theirs) for ours, theirs in MODEL_TO_HF.items()}


def special_token_ids(tokenizer: Any) -> dict[str, int | None]:
    """``{bos,eos,pad}_token_id`` of a tokenizer, only those it has ({} for None)."""
    if tokenizer is None:
        return {}
    ids = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id", None) for name in SPECIAL_TOKENS}
    return {key: value for key, value in ids.items() if value is not None}
