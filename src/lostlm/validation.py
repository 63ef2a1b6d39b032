"""Range checks of every config value (called by ``Config.__post_init__``).

Each check raises a one-line :class:`~lostlm.errors.LostLMError` naming the key, the bad value
and the valid range. Ranges decided here (see docs/reliability.md):

* every float is finite (``.nan``/``.inf`` from YAML are refused);
* ``model.init_std`` in (0, 1]; ``model.norm_eps`` in (0, 1); ``model.rope_theta`` > 1;
  ``data.seq_len`` <= ``model.max_seq_len`` (RoPE positions);
* ``train.beta1``/``beta2`` in [0, 1); ``train.threads`` in [1, 4096] here, and at most the
  CPUs this process may use when the trainer starts (:func:`check_threads`);
* ``train.out_dir`` not empty (whether it is a writable folder is checked when the trainer
  takes the folder's lock, :mod:`lostlm.runlock`).

It sits below :mod:`lostlm.configs` and takes the config duck-typed, so configs can call it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from . import registry
from .data_config import SOURCES
from .errors import LostLMError


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise LostLMError(message)


def _choice(section: str, key: str, value: Any, options: tuple[str, ...]) -> None:
    _require(value in options, f"config {section}.{key}={value!r} is not valid; use one of: {', '.join(options)}")


def _all_finite(cfg: Any) -> None:
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            _require(not (isinstance(value, float) and not math.isfinite(value)),
                     f"config {section.name}.{f.name}={value} must be a finite number")


def _ranges(cfg: Any) -> None:
    m, d, t = cfg.model, cfg.data, cfg.train
    _require(0.0 < m.init_std <= 1.0, f"config model.init_std={m.init_std} must be in (0, 1]; LLaMA uses 0.02")
    _require(0.0 < m.norm_eps < 1.0, f"config model.norm_eps={m.norm_eps} must be in (0, 1); typical values are 1e-6 to 1e-5")
    _require(m.rope_theta > 1.0, f"config model.rope_theta={m.rope_theta} must be greater than 1; LLaMA uses 10000")
    _require(m.max_seq_len >= 2, f"config model.max_seq_len={m.max_seq_len} must be at least 2")
    _require(d.seq_len <= m.max_seq_len, f"config data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len} "
             "(RoPE positions); lower data.seq_len or raise model.max_seq_len")
    for key in ("beta1", "beta2"):
        value = getattr(t, key)
        _require(0.0 <= value < 1.0, f"config train.{key}={value} must be in [0, 1); AdamW uses 0.9 / 0.95")
    _require(t.threads is None or 1 <= t.threads <= 4096, f"config train.threads={t.threads} must be between 1 and the CPU count, or null")
    _require(t.out_dir is None or str(t.out_dir).strip() != "", "config train.out_dir is empty; pass a folder path (or omit it)")
    _require(t.max_bad_steps >= 0, f"config train.max_bad_steps={t.max_bad_steps} must be >= 0")
    _require(t.peak_flops is None or t.peak_flops > 0, f"config train.peak_flops={t.peak_flops} must be positive or null")
    _require(d.max_documents is None or d.max_documents > 0, f"config data.max_documents={d.max_documents} must be positive or null")
    _require(m.vocab_size is None or m.vocab_size >= 2, f"config model.vocab_size={m.vocab_size} must be at least 2")
    _require(cfg.layer.galore_rank > 0 and cfg.layer.galore_update_gap > 0 and cfg.layer.galore_scale > 0,
             "config layer.galore_rank, galore_update_gap and galore_scale must be positive")


def check_threads(threads: int | None) -> None:
    """At run time: no more threads than CPUs this process may use."""
    if threads is None:
        return
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    _require(threads <= available, f"config train.threads={threads} exceeds the {available} CPUs available to this process; "
             f"use at most {available}")


def validate(cfg: Any, presets: dict) -> None:
    """Check every value of a Config (``presets``: configs.PRESETS, passed to avoid an import circle)."""
    _all_finite(cfg)
    m, layer, d, t, rw = cfg.model, cfg.layer, cfg.data, cfg.train, cfg.reweight
    _choice("model", "preset", m.preset, tuple(presets))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "num_layers"):
        value = getattr(m, key)
        _require(value is None or value > 0, f"config model.{key}={value} must be a positive integer")
    rm = cfg.resolved_model()
    _require(rm.hidden_size % rm.num_heads == 0,
             f"config model.hidden_size={rm.hidden_size} is not divisible by model.num_heads={rm.num_heads}; pick sizes that divide")
    _require(rm.num_heads % rm.num_kv_heads == 0,
             f"config model.num_heads={rm.num_heads} is not a multiple of model.num_kv_heads={rm.num_kv_heads}")
    _require((rm.hidden_size // rm.num_heads) % 2 == 0, "config model: head size (hidden_size/num_heads) must be even for RoPE")
    _choice("layer", "method", layer.method, registry.NAMES)
    _require(cfg.resolved_rank() > 0, f"config layer.rank={layer.rank} must be a positive integer")
    _require(0.0 < layer.density <= 1.0, f"config layer.density={layer.density} must be in (0, 1]; typical values are 0.01-0.05")
    _require(0.0 <= layer.gamma <= 1.0, f"config layer.gamma={layer.gamma} must be in [0, 1]")
    _choice("layer", "activation", layer.activation, ("silu", "identity"))
    _choice("layer", "channel_score", layer.channel_score, ("l2", "l1", "random"))
    _choice("layer", "sparse_axis", layer.sparse_axis, ("input", "output"))
    _choice("layer", "sparse_init", layer.sparse_init, ("residual", "original"))
    _choice("layer", "svd_dtype", layer.svd_dtype, ("float32", "float64"))
    _require(layer.svd_window is None or layer.svd_window > 0, "config layer.svd_window must be a positive integer or null")
    _require(layer.lost_pad_to >= 0, f"config layer.lost_pad_to={layer.lost_pad_to} must be 0 (auto), 1 (no padding) or a "
             "multiple such as 16 or 64")
    _require(len(layer.targets) > 0, "config layer.targets is empty; list module names such as q_proj")
    _choice("data", "source", d.source, SOURCES)
    _require(d.source != "files" or len(d.paths) > 0, "config data.source=files needs data.paths (files or globs)")
    _require(d.source != "prepared" or bool(d.prepared_dir),
             "config data.source=prepared needs data.prepared_dir (a folder written by `lostlm prepare`)")
    _require(d.seq_len >= 2, f"config data.seq_len={d.seq_len} must be at least 2")
    _require(0.0 < d.val_fraction < 1.0, f"config data.val_fraction={d.val_fraction} must be in (0, 1)")
    _require(d.val_tokens >= d.seq_len, f"config data.val_tokens={d.val_tokens} must be at least data.seq_len={d.seq_len}")
    _require(d.bpe_vocab_size >= 300, f"config data.bpe_vocab_size={d.bpe_vocab_size} must be at least 300 (256 bytes + specials)")
    _require(d.prefetch >= 0, f"config data.prefetch={d.prefetch} must be >= 0 (0: no prefetch thread)")
    _require(t.steps > 0, f"config train.steps={t.steps} must be positive")
    _require(t.batch_size > 0, f"config train.batch_size={t.batch_size} must be positive")
    _require(t.micro_batch_size is None or (t.micro_batch_size > 0 and t.batch_size % t.micro_batch_size == 0),
             f"config train.micro_batch_size={t.micro_batch_size} must divide train.batch_size={t.batch_size}")
    _require(t.lr > 0, f"config train.lr={t.lr} must be positive")
    _require(t.untargeted_lr_scale > 0, f"config train.untargeted_lr_scale={t.untargeted_lr_scale} must be positive "
             "(1: the same lr as the targeted layers)")
    _require(0.0 <= t.min_lr_ratio <= 1.0, f"config train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    _require(t.warmup_steps is None or 0 <= t.warmup_steps <= t.steps,
             f"config train.warmup_steps={t.warmup_steps} must be between 0 and train.steps={t.steps}")
    _require(t.grad_clip >= 0 and t.z_loss >= 0 and t.weight_decay >= 0, "config train.grad_clip, z_loss and weight_decay must be >= 0")
    _require(t.eval_every > 0 and t.log_every > 0 and t.checkpoint_every >= 0 and t.keep_checkpoints > 0,
             "config train.eval_every, log_every and keep_checkpoints must be positive, checkpoint_every >= 0")
    _choice("train", "precision", t.precision, ("auto", "bf16", "fp32"))
    _choice("train", "resume", t.resume, ("auto", "never"))
    _choice("train", "device", t.device, ("auto", "cpu", "cuda"))
    _choice("train", "parallel", t.parallel, ("ddp", "fsdp"))
    _choice("train", "loss_impl", t.loss_impl, ("chunked", "plain"))
    _choice("train", "optimizer", t.optimizer, ("adamw", "adamw8bit"))
    _require(t.loss_chunk_tokens > 0 and t.activation_checkpointing >= 0,
             "config train.loss_chunk_tokens must be positive and train.activation_checkpointing >= 0 (0 off, k every k-th block)")
    for logger in t.loggers:
        _choice("train", "loggers", logger, ("jsonl", "tensorboard", "wandb"))
    _choice("reweight", "strategy", rw.strategy, ("uniform", "linupper", "quadratic", "extremes"))
    _require(rw.temperature > 0, f"config reweight.temperature={rw.temperature} must be positive")
    _require(rw.delta > 0, f"config reweight.delta={rw.delta} must be positive")
    _require(rw.warmup_steps >= 0, "config reweight.warmup_steps must be >= 0")
    _ranges(cfg)
