"""Dense export: a model as a plain transformers ``llama`` folder that loads with transformers alone.

:func:`save_dense` merges every factorised layer into one matrix with ``merged_weight()``:
full, galore, lowrank, lowrank-svd, sltrain, and lost with ``layer.activation=identity``.
cola and lost with SiLU have a nonlinearity between the factors, so no dense matrix equals
them: those are refused (write them as a lost_llama folder with
:func:`lostlm.interop.lost_llama.save_hf`, which takes every method). The dense folder holds
config.json (model_type llama), model.safetensors and the tokenizer; its logits equal the
model's to float32 rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LostLMError
from ..layers import LOSTLinear, LowRankLinear, SLTrainLinear
from ..weights import state_for_saving, state_mismatch
from .names import hf_fields, special_token_ids

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@torch.no_grad()
def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every factorised layer replaced by ``<name>.weight`` =
    its merged dense matrix. Raises NotMergeable (a LostLMError) for SiLU layers."""
    factorised = {name: module for name, module in model.named_modules()
                  if isinstance(module, (LOSTLinear, LowRankLinear, SLTrainLinear))}
    state = {}
    for name, tensor in model.state_dict().items():
        owner = name.rpartition(".")[0]
        if owner not in factorised:
            state[name] = tensor
    for name, module in factorised.items():
        if module.bias is not None:
            raise LostLMError(f"layer {name} has a bias, which transformers' Llama does not have; it cannot be exported dense")
        state[f"{name}.weight"] = module.merged_weight()
    return state


def llama_config(model_cfg: Any, tokenizer: Any = None, dtype: str = "float32") -> Any:
    """transformers LlamaConfig of our ModelConfig."""
    from transformers import LlamaConfig

    return LlamaConfig(**hf_fields(model_cfg), hidden_act="silu", attention_bias=False, mlp_bias=False,
                       architectures=["LlamaForCausalLM"], dtype=dtype,
                       **{"bos_token_id": None, "eos_token_id": None, **special_token_ids(tokenizer)})


def save_dense(model: nn.Module, out_dir: str | Path, tokenizer: Any = None, dtype: str = "float32") -> Path:
    """Write a LlamaLM (any mergeable parametrisation) as a plain LlamaForCausalLM folder."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaForCausalLM

    if dtype not in DTYPES:
        raise LostLMError(f"--dtype {dtype} is not valid; use one of: {', '.join(DTYPES)}")
    state = dense_state_dict(model)
    config = llama_config(model.config, tokenizer, dtype)
    tied = ("lm_head.weight",) if config.tie_word_embeddings else ()
    for name in tied:  # transformers omits a tied head from the file
        state.pop(name, None)
    # Check names and shapes against transformers' own class (built on meta: no memory, no init).
    with torch.device("meta"):
        reference = LlamaForCausalLM(config).state_dict()
    problem = state_mismatch(reference, state, may_be_missing=tied)
    if problem:
        raise LostLMError(f"the merged model does not fit transformers' LlamaForCausalLM ({problem}); "
                          "this is a bug in lostlm's export, please report it")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state_for_saving(state).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    GenerationConfig(**special_token_ids(tokenizer)).save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out

