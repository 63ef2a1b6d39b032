"""A small single-device LLaMA decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention.

Module and parameter names follow Hugging Face's ``LlamaForCausalLM`` exactly
(``model.layers.0.self_attn.q_proj.weight`` ...), and RoPE uses the same rotate-half
convention, so a dense model's state dict loads into ``transformers`` as it is and the
parameter count equals ``LlamaForCausalLM``'s for the same config. The projections are plain
``nn.Linear`` here; :mod:`lostlm.convert` swaps them for LOST or baseline layers. Nothing in
this file knows about devices, parallelism or compilation: the trainer applies those.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .configs import ModelConfig
from .losses import head_losses


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 (as HF does) so bf16 autocast does not lose the small variances.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout, as transformers' Llama
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.checkpointed = False  # set by set_activation_checkpointing

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.checkpointed and self.training and torch.is_grad_enabled():
            # Non-reentrant (as torchtitan's checkpoint_wrapper): keeps only this block's input
            # and reruns its forward in backward. Inside forward, so FSDP2's hooks stay outside.
            return checkpoint(self._block, x, cos, sin, use_reentrant=False)
        return self._block(x, cos, sin)

    def _block(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBackbone(nn.Module):
    """The ``model.`` prefix of HF's LlamaForCausalLM: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, input_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class LlamaLM(nn.Module):
    """Decoder-only LM. ``forward(input_ids) -> logits`` (batch, length, vocab);
    ``forward(input_ids, targets, chunk=...) -> (per-token loss, log-sum-exp)`` (batch, length),
    float32, without ever holding all the logits when ``chunk`` > 0 (:mod:`lostlm.losses`).
    The loss is computed inside forward so DDP, FSDP2 and torch.compile see the LM head used
    where they expect it."""

    def __init__(self, cfg: ModelConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set (it comes from the tokenizer)")
        self.config = cfg
        self.model = LlamaBackbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(cfg.hidden_size // cfg.num_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """LLaMA init: every matrix N(0, init_std²), norms at 1. Seeded by ``generator``."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, self.config.init_std, generator=generator)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The final-norm output (batch, length, hidden): what the LM head reads."""
        length = input_ids.shape[1]
        if length > self.config.max_seq_len:
            raise ValueError(f"sequence of {length} tokens exceeds model.max_seq_len={self.config.max_seq_len}")
        cos, sin = self.rope_cos[:length], self.rope_sin[:length]
        return self.model(input_ids, cos, sin)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, chunk: int = 0,
                with_lse: bool = True):
        hidden = self.hidden_states(input_ids)
        if targets is None:
            return self.lm_head(hidden)
        return head_losses(hidden, self.lm_head.weight, targets, chunk, with_lse)


def set_activation_checkpointing(model: nn.Module, every: int) -> int:
    """Checkpoint every ``every``-th decoder block (blocks 0, k, 2k, ...; 0 switches it off).
    Returns how many blocks are checkpointed."""
    blocks = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    for index, block in enumerate(blocks):
        block.checkpointed = every > 0 and index % every == 0
    return sum(block.checkpointed for block in blocks)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Distinct parameters (tied weights counted once)."""
    seen = {id(p): p for p in module.parameters() if p.requires_grad or not trainable_only}
    return sum(p.numel() for p in seen.values())
