"""Read a local transformers Llama folder into our dense :class:`~lostlm.model.LlamaLM`, without transformers.

:func:`llama_from_pretrained` reads ``config.json`` (model_type ``llama``) and the safetensors
weights directly (no hub, no ``trust_remote_code``, no transformers model class): it is the
base of ``model.init_from`` (continued full-rank training, or LOST initialised from the SVD of
the real weights) and of ``lostlm convert-pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..configs import ModelConfig
from ..errors import LostLMError
from ..model import LlamaLM, rope_tables
from ..weights import load_strict, read_safetensors_folder, tied_head_names
from .names import model_fields

# Values transformers' LlamaConfig assumes when config.json leaves a key out.
LLAMA_DEFAULTS: dict[str, Any] = {"max_position_embeddings": 2048, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
                                  "initializer_range": 0.02, "tie_word_embeddings": False}


def _read_json(folder: Path) -> dict[str, Any]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise LostLMError(f"{folder} has no config.json; model.init_from must be a local transformers Llama folder "
                          "(save_pretrained output), not a hub name")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise LostLMError(f"{config_file} is not valid JSON ({exc})") from None
    model_type = hf.get("model_type")
    if model_type != "llama":
        raise LostLMError(f"{folder} holds model_type={model_type!r}; only llama checkpoints can be imported "
                          "(export dense lost models with lostlm export --dense first)")
    return hf


def _unsupported(hf: dict[str, Any]) -> list[str]:
    """What a Llama config asks for that our LlamaLM does not model."""
    rope = hf.get("rope_parameters") or {}
    unsupported = []
    if hf.get("attention_bias"):
        unsupported.append("attention_bias=true")
    if hf.get("mlp_bias"):
        unsupported.append("mlp_bias=true")
    if hf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hf['hidden_act']}")
    if hf.get("head_dim") not in (None, hf["hidden_size"] // hf["num_attention_heads"]):
        unsupported.append(f"head_dim={hf['head_dim']} (not hidden_size/num_attention_heads)")
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        unsupported.append(f"rope_scaling={scaling}")
    return unsupported


def read_llama_config(path: str | Path) -> ModelConfig:
    """ModelConfig of a local transformers Llama folder; LostLMError for what we do not model."""
    folder = Path(path)
    hf = _read_json(folder)
    unsupported = _unsupported(hf)
    if unsupported:
        raise LostLMError(f"{folder}: {', '.join(unsupported)} is not supported by lostlm's LlamaLM; "
                          "use a plain Llama checkpoint (no biases, default RoPE)")
    values = {**LLAMA_DEFAULTS, **{key: value for key, value in hf.items() if value is not None}}
    rope = hf.get("rope_parameters") or {}
    values["rope_theta"] = float(rope.get("rope_theta", values["rope_theta"]))
    values["num_key_value_heads"] = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    values["tie_word_embeddings"] = bool(values["tie_word_embeddings"])
    return ModelConfig(**model_fields(values))


@torch.no_grad()
def llama_from_pretrained(path: str | Path) -> LlamaLM:
    """A local transformers Llama folder (config.json + safetensors) as our dense LlamaLM in
    float32. Built on the meta device and filled from the file, so no random init is spent."""
    folder = Path(path)
    model_cfg = read_llama_config(folder)
    state = {k: v for k, v in read_safetensors_folder(folder, "convert .bin weights to safetensors with transformers: "
                                                        "LlamaForCausalLM.from_pretrained(dir).save_pretrained(dir)").items() if not k.endswith("rotary_emb.inv_freq")}
    if model_cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = LlamaLM(model_cfg)
    model.to_empty(device="cpu")
    # load_strict copies, so bf16/fp16 checkpoints are cast to float32.
    load_strict(model, state, folder, "its weights do not match its config.json; is it a LlamaForCausalLM checkpoint?",
                may_be_missing=tied_head_names(model))
    if model_cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    cos, sin = rope_tables(model_cfg.hidden_size // model_cfg.num_heads, model_cfg.max_seq_len, model_cfg.rope_theta)
    model.rope_cos, model.rope_sin = cos, sin
    return model.eval()
