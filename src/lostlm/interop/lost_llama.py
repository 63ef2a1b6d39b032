"""The ``lost_llama`` transformers model type: our LlamaLM (LOST or any baseline layers) as a ``PreTrainedModel``.

:class:`LostLlamaForCausalLM` is our :class:`~lostlm.model.LlamaLM` as a transformers causal
LM. Importing ``lostlm`` registers it with ``AutoConfig`` / ``AutoModelForCausalLM``, so a
saved folder works with the usual calls::

    import lostlm, transformers
    model = transformers.AutoModelForCausalLM.from_pretrained("out/lost-hf")
    model.generate(**tokenizer("The king", return_tensors="pt"), max_new_tokens=20)

:func:`to_hf` wraps a trained run (``load_trained_run``) or a LlamaLM without copying;
:func:`save_hf` writes it as such a folder (``lostlm export RUN --out DIR``);
:func:`load_hf_folder` reads a lost_llama or llama folder back for ``lostlm generate``.
Parameter names are exactly those of our checkpoints. Generation uses transformers' cache API
(a ``DynamicCache`` of keys and values per layer), so each new token costs one position, not
the whole prefix; ``use_cache=False`` (or a padded batch) recomputes the prefix instead.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GenerationMixin,
                          PretrainedConfig, PreTrainedModel)
from transformers.modeling_outputs import CausalLMOutputWithPast


from ..configs import DataConfig, LayerConfig, ModelConfig, config_from_dict
from ..convert import convert_linear_layers
from ..errors import LostLMError
from ..model import LlamaLM, apply_rope, rope_tables
from ..weights import state_mismatch, tied_head_names
from .names import hf_fields, model_fields, special_token_ids

MODEL_TYPE = "lost_llama"
# LayerConfig fields a lost_llama config carries (the galore_* fields only matter to the optimizer).
LAYER_KEYS = ("method", "targets", "rank", "density", "gamma", "activation", "channel_score", "sparse_axis",
              "sparse_init", "svd_window", "svd_dtype")


class LostLlamaConfig(PretrainedConfig):
    """The LLaMA shape under transformers' names plus our layer config (``method``, ``rank`` ...).

    Written with an explicit ``__init__`` (the classic custom-config pattern) so it works with
    transformers 4.x and 5.x alike."""

    model_type = MODEL_TYPE

    def __init__(self, vocab_size: int = 32000, hidden_size: int = 256, intermediate_size: int = 688,
                 num_hidden_layers: int = 4, num_attention_heads: int = 4, num_key_value_heads: int | None = None,
                 max_position_embeddings: int = 2048, rope_theta: float = 10000.0, rms_norm_eps: float = 1e-6,
                 initializer_range: float = 0.02, tie_word_embeddings: bool = False,
                 method: str = "lost", targets: list[str] | None = None, rank: int = 64, density: float = 0.03,
                 gamma: float = 0.5, activation: str = "silu", channel_score: str = "l2", sparse_axis: str = "input",
                 sparse_init: str = "residual", svd_window: int | None = None, svd_dtype: str = "float32",
                 bos_token_id: int | None = None, eos_token_id: int | None = None, pad_token_id: int | None = None,
                 **kwargs: Any) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = float(rope_theta)
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.method = method
        self.targets = list(targets) if targets is not None else list(LayerConfig().targets)
        self.rank = rank
        self.density = density
        self.gamma = gamma
        self.activation = activation
        self.channel_score = channel_score
        self.sparse_axis = sparse_axis
        self.sparse_init = sparse_init
        self.svd_window = svd_window
        self.svd_dtype = svd_dtype
        # Through the base class: transformers 4.x sets these four in its own __init__.
        super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, **kwargs)

    # -- to and from our own configs -------------------------------------------------
    def lostlm_configs(self) -> tuple[ModelConfig, LayerConfig]:
        """(ModelConfig, LayerConfig), validated by lostlm's own rules (LostLMError on bad values)."""
        # Only the model and layer sections matter here; the data section's sequence length is
        # kept within the model's positions so that the whole config validates.
        data = {"seq_len": min(DataConfig.seq_len, self.max_position_embeddings)}
        cfg = config_from_dict({"model": model_fields(self), "layer": {key: getattr(self, key) for key in LAYER_KEYS},
                                "data": data})
        return cfg.resolved_model(), cfg.layer

    @classmethod
    def from_lostlm(cls, model_cfg: ModelConfig, layer_cfg: LayerConfig, rank: int, **kwargs: Any) -> "LostLlamaConfig":
        layer = {key: getattr(layer_cfg, key) for key in LAYER_KEYS if key != "rank"}
        return cls(**hf_fields(model_cfg), rank=rank, **layer, **kwargs)


class LostLlamaForCausalLM(PreTrainedModel, GenerationMixin):
    """Our LlamaLM as a transformers causal LM. ``forward(input_ids, attention_mask, labels)``.

    Built from the config alone (``from_config``/``from_pretrained``), the LlamaLM is created and
    its projections converted exactly as ``build_model`` does; ``from_pretrained`` does that on
    the meta device, so the SVD of the LOST initialisation costs nothing there and the channel
    indices come from the checkpoint. Given ``lm``, the model adopts that LlamaLM's modules as
    they are (no copy): this is how :func:`to_hf` wraps a trained run.
    """

    config_class = LostLlamaConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderLayer"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LostLlamaConfig, lm: LlamaLM | None = None) -> None:
        super().__init__(config)
        if lm is None:
            model_cfg, layer_cfg = config.lostlm_configs()
            lm = LlamaLM(model_cfg)  # on the meta device under from_pretrained: shapes only, no SVD cost
            convert_linear_layers(lm, layer_cfg, config.rank, seed=1, init_std=model_cfg.init_std)
        self.model = lm.model
        self.lm_head = lm.lm_head
        self.register_buffer("rope_cos", lm.rope_cos, persistent=False)
        self.register_buffer("rope_sin", lm.rope_sin, persistent=False)
        self.post_init()

    # -- transformers plumbing -------------------------------------------------------
    def _init_weights(self, module: nn.Module) -> None:
        # Everything else is initialised by LlamaLM or comes from the checkpoint; only the RoPE
        # tables (non-persistent buffers, left empty by from_pretrained's meta init) are computed.
        if module is self:
            try:  # transformers 5: the init functions that respect its "already loaded" flags
                from transformers.initialization import copy_
            except ImportError:  # transformers 4.x
                copy_ = torch.Tensor.copy_
            cos, sin = rope_tables(self.config.hidden_size // self.config.num_attention_heads,
                                   self.config.max_position_embeddings, self.config.rope_theta)
            with torch.no_grad():
                copy_(self.rope_cos, cos.to(self.rope_cos.dtype))
                copy_(self.rope_sin, sin.to(self.rope_sin.dtype))

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """transformers' from_pretrained, but a checkpoint that lacks any tensor is an error
        (a LOST layer left at its meta-device placeholder would silently produce garbage)."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        # What the file provided: every tensor of the model but those transformers reports missing.
        own = model.state_dict()
        missing = set(info.get("missing_keys", ()))
        problem = state_mismatch(own, {k: v for k, v in own.items() if k not in missing}, tied_head_names(model))
        if problem:
            raise ValueError(f"lost_llama checkpoint does not fit its config ({problem}); "
                             "it was saved with a different layer config")
        return (model, info) if want_info else model

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                      cache: Any = None, past_key_values: Any = None, **kwargs: Any) -> dict[str, Any]:
        # transformers 5 passes the cache as ``cache``, 4.x as ``past_key_values``. With a cache,
        # feed only the tokens it has not seen; without one (use_cache=False, or a padded batch,
        # which the cached path does not handle), the whole sequence. Only the last position
        # needs logits either way.
        cache = cache if cache is not None else past_key_values
        if cache is None or (attention_mask is not None and not bool(attention_mask.all())):
            return {"input_ids": input_ids, "attention_mask": attention_mask, "logits_to_keep": 1}
        return {"input_ids": input_ids[:, cache.get_seq_length():], "cache": cache, "logits_to_keep": 1}

    # -- the model -------------------------------------------------------------------
    def _logits(self, input_ids: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.rope_cos.shape[0]:
            raise ValueError(f"sequence of {length} tokens exceeds max_position_embeddings={self.rope_cos.shape[0]}")
        hidden = self.model(input_ids, self.rope_cos[:length], self.rope_sin[:length])
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.lm_head(hidden)

    def _cached_logits(self, input_ids: torch.Tensor, cache: Any, logits_to_keep: int) -> torch.Tensor:
        """The backbone's forward (model.py's DecoderLayer/Attention, step by step) on the new
        tokens only, with earlier keys/values from ``cache`` (``cache.update`` appends them)."""
        past, length = cache.get_seq_length(), input_ids.shape[1]
        if past + length > self.rope_cos.shape[0]:
            raise ValueError(f"sequence of {past + length} tokens exceeds max_position_embeddings={self.rope_cos.shape[0]}")
        cos, sin = self.rope_cos[past:past + length], self.rope_sin[past:past + length]
        # New token i (absolute position past + i) sees positions 0 .. past + i.
        mask = None if length == 1 else torch.ones(length, past + length, dtype=torch.bool,
                                                   device=input_ids.device).tril(past)
        x = self.model.embed_tokens(input_ids)
        for index, layer in enumerate(self.model.layers):
            attn, h = layer.self_attn, layer.input_layernorm(x)
            shape = (x.shape[0], length, -1, attn.head_dim)
            q = attn.q_proj(h).view(shape).transpose(1, 2)
            k = attn.k_proj(h).view(shape).transpose(1, 2)
            v = attn.v_proj(h).view(shape).transpose(1, 2)
            q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
            k, v = cache.update(k, v, index)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=attn.num_kv_heads != attn.num_heads)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(x.shape[0], length, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        hidden = self.model.norm(x)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.lm_head(hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, logits_to_keep: int = 0, cache: Any = None,
                past_key_values: Any = None, use_cache: bool | None = None, **kwargs: Any) -> CausalLMOutputWithPast:
        """Logits (batch, length, vocab); ``loss`` (mean next-token cross-entropy, -100 ignored)
        when ``labels`` are given (unshifted, as in transformers). Other keyword arguments that
        transformers passes (``return_dict`` ...) are accepted and ignored.

        ``attention_mask`` with zeros (padding, left or right): each row is run on its unmasked
        tokens alone, so positions and attention match an unpadded run exactly; masked positions
        get logits 0. No position ids.

        ``cache`` (``past_key_values`` in transformers 4.x), a transformers ``Cache`` such as
        ``DynamicCache()``: ``input_ids`` are the tokens after those it holds, and it is
        returned updated (``use_cache=True`` without one starts a new ``DynamicCache``). Not
        with a padding mask."""
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache and labels is None:
            from transformers import DynamicCache
            cache = DynamicCache()
        if cache is not None:
            if attention_mask is not None and not bool(attention_mask.all()):
                raise ValueError("the KV cache path does not take padding; pass use_cache=False with a padded batch")
            logits = self._cached_logits(input_ids, cache, logits_to_keep)
        elif attention_mask is None or bool(attention_mask.all()):
            logits = self._logits(input_ids, logits_to_keep)
        else:
            keep = attention_mask.bool()
            rows = []
            for ids, row_keep in zip(input_ids, keep):
                row = torch.zeros(input_ids.shape[1], self.config.vocab_size, dtype=self.lm_head.weight.dtype,
                                  device=input_ids.device)
                if row_keep.any():
                    row[row_keep] = self._logits(ids[row_keep][None], 0)[0].to(row.dtype)
                rows.append(row)
            logits = torch.stack(rows)
            if logits_to_keep:
                logits = logits[:, -logits_to_keep:]
        loss = None
        if labels is not None:
            if logits_to_keep:
                raise ValueError("labels need the logits of every position; do not pass logits_to_keep with labels")
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})

    def lostlm_model(self) -> LlamaLM:
        """A LlamaLM that shares this model's modules (for lostlm's own tools)."""
        model_cfg, _ = self.config.lostlm_configs()
        with torch.device("meta"):
            lm = LlamaLM(model_cfg)
        lm.model, lm.lm_head = self.model, self.lm_head
        lm.rope_cos, lm.rope_sin = self.rope_cos, self.rope_sin
        return lm


# The output's cache field: ``cache`` in transformers 5, ``past_key_values`` in 4.x.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"

AutoConfig.register(MODEL_TYPE, LostLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(LostLlamaConfig, LostLlamaForCausalLM, exist_ok=True)


# ----------------------------------------------------------------------------------------
# lostlm run -> lost_llama folder, and back


def to_hf(source: Any, layer: LayerConfig | None = None, rank: int | None = None, tokenizer: Any = None) -> LostLlamaForCausalLM:
    """Wrap a trained run (``load_trained_run``'s TrainedRun) or a bare LlamaLM as a
    :class:`LostLlamaForCausalLM` that shares its modules. A bare LlamaLM needs the
    ``layer`` config and ``rank`` it was converted with (``dense`` models: neither)."""
    if isinstance(source, LlamaLM):
        model = source
        layer = layer if layer is not None else LayerConfig(method="full")
        rank = rank if rank is not None else 1
    else:  # TrainedRun
        model = source.model
        layer = source.config.layer if layer is None else layer
        rank = source.config.resolved_rank() if rank is None else rank
        tokenizer = source.tokenizer if tokenizer is None else tokenizer
    config = LostLlamaConfig.from_lostlm(model.config, layer, rank, **special_token_ids(tokenizer))
    config.architectures = [LostLlamaForCausalLM.__name__]
    _check_fits(config, model)
    hf_model = LostLlamaForCausalLM(config, lm=model)
    hf_model.generation_config = GenerationConfig(**special_token_ids(tokenizer))
    return hf_model


def _check_fits(config: LostLlamaConfig, model: LlamaLM) -> None:
    """The config rebuilds exactly this module tree (shapes of every tensor), checked on meta."""
    with torch.device("meta"):
        skeleton = LostLlamaForCausalLM(config).state_dict()
    problem = state_mismatch(skeleton, model.state_dict())
    if problem:
        raise LostLMError(f"layer config method={config.method} rank={config.rank} density={config.density} does not "
                          f"rebuild this model (against what the config builds: {problem}); pass the layer config and rank the model was converted with")


def save_hf(run: Any, out_dir: str | Path, tokenizer: Any = None, **kwargs: Any) -> Path:
    """Write a run (TrainedRun) or a LlamaLM (with ``layer=``, ``rank=``) as a lost_llama folder:
    config.json, generation_config.json, model.safetensors and the tokenizer files."""
    out = Path(out_dir)
    hf_model = to_hf(run, tokenizer=tokenizer, **kwargs)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(str(out), safe_serialization=True)
    tokenizer = tokenizer if tokenizer is not None else getattr(run, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def load_hf_folder(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a lost_llama or llama folder, for generate; LostLMError otherwise."""
    folder = Path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise LostLMError(f"{folder} is not a loadable transformers model folder ({first})") from None
    return model.to(device).eval(), tokenizer

