"""Typed configuration: dataclasses with a docstring per field, presets, YAML/TOML loading.

A run is fully described by one :class:`Config`, which nests five sections::

    model:    the LLaMA shape (or a ``preset`` name that fills it in)
    layer:    how the attention/MLP projections are parametrised (LOST and the baselines)
    data:     corpus, tokenizer, sequence length, validation hold-out
    train:    optimisation, schedule, precision, evaluation, checkpoints
    reweight: loss-based sample reweighting (Sow et al., ICLR 2025)

Recipes in ``configs/*.yaml`` (or ``.toml``) set any subset of the keys; ``key=value``
overrides on the command line are applied on top (``train.lr=1e-3``). Unknown keys and
out-of-range values raise :class:`~lostlm.errors.LostLMError` naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from . import registry
from .data_config import DataConfig
from .errors import LostLMError
from .validation import validate
from .presets import PRESET_VOCAB, PRESETS  # noqa: F401  (re-exported)

# Valid layer.method values: a live view of lostlm.registry, which lostlm.methods fills (configs
# sits below the methods and layers, so it reads the names from that table instead of importing
# them; see registry.py for why).
METHODS = registry.NAMES
TARGET_DEFAULT = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """Named shape (tiny, 9m, 20m, 60m, 130m, 350m, 1b, 7b). Explicit fields below override it."""
    vocab_size: int | None = None
    """Vocabulary size. None: taken from the tokenizer."""
    hidden_size: int | None = None
    """Model width d."""
    intermediate_size: int | None = None
    """SwiGLU inner width."""
    num_heads: int | None = None
    """Attention heads (query heads)."""
    num_kv_heads: int | None = None
    """Key/value heads (grouped-query attention). None: equal to num_heads."""
    num_layers: int | None = None
    """Decoder blocks."""
    max_seq_len: int = 2048
    """Longest sequence RoPE is prepared for."""
    rope_theta: float = 10000.0
    """RoPE base."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Std of the normal initialiser of every weight matrix (LLaMA: 0.02)."""
    tie_embeddings: bool = False
    """Share the input embedding and the LM head."""
    init_from: str | None = None
    """Local folder of a Hugging Face Llama checkpoint: its config sets the shape (preset and
    the shape keys above are ignored) and its weights are W0 of every layer, so LOST starts
    from the SVD of the real pretrained weights. Use the same folder as data.tokenizer."""


@dataclass
class LayerConfig:
    method: str = "lost"
    """Parametrisation of the targeted linear layers: full, lowrank, lowrank-svd, cola,
    sltrain, lost, or galore (dense weights trained with the GaLore optimizer)."""
    targets: list[str] = field(default_factory=lambda: list(TARGET_DEFAULT))
    """Module-name patterns to convert: a pattern matches a module whose dotted name ends
    with it (``q_proj``) or matches it as a glob (``*.mlp.*``)."""
    rank: int | None = None
    """Rank r of the low-rank branch. None: the preset's rank (60m 128 ... 7b 1024)."""
    density: float = 0.03
    """rho: fraction of channels kept dense in the sparse part (k = max(1, floor(rho*n)));
    also the density of SLTrain's random support."""
    gamma: float = 0.5
    """Fixed mixing weight: y = gamma*lowrank(x) + (1-gamma)*sparse(x). Not trained."""
    activation: str = "silu"
    """sigma inside the low-rank branch of LOST: silu (default, CoLA-style auto-encoder) or
    identity (the only choice that can be merged into one dense matrix)."""
    channel_score: str = "l2"
    """How residual channels are scored: l2 (default, the paper's best), l1, or random
    (a structured control with the same sparsity pattern shape)."""
    sparse_axis: str = "input"
    """Which channels are kept: input columns (default; a gather, no scatter) or output rows
    (needs a scatter-add into the output)."""
    sparse_init: str = "residual"
    """Initial value of the sparse block: residual W_c[:, I] (default, the paper's text) or
    original W0[:, I] (what the authors' public code does)."""
    svd_window: int | None = None
    """Residual built from all remaining singular triplets (None, default) or only the next
    K after the top r (the authors' code uses 256)."""
    svd_dtype: str = "float32"
    """Precision of the initialisation SVD: float32 or float64."""
    lost_pad_to: int = 0
    """LOST speed knob: zero-pad the inner GEMM width r + k to a multiple of this. 0 (auto): 64
    for r >= 256, 16 for 128 <= r < 256, none below (measured faster on CPU; see
    ``lostlm.layers.lost_pad_multiple``); 1: never pad. Same function up to float summation
    order, so, like train.threads, not part of a bench run's key."""
    sltrain_alpha: float = 32.0
    """SLTrain: the low-rank term is scaled by α/r (its recipes: 32 at 60M, 16 at 130M/350M, 8 at 1B/7B)."""
    galore_rank: int = 128
    """GaLore: rank of the gradient projection."""
    galore_update_gap: int = 200
    """GaLore: steps between projection updates."""
    galore_scale: float = 0.25
    """GaLore: scale of the projected update."""


@dataclass
class TrainConfig:
    steps: int = 400
    """Optimizer steps."""
    batch_size: int = 16
    """Sequences per optimizer step (global, over all processes)."""
    micro_batch_size: int | None = None
    """Sequences per forward/backward on one process. None: batch_size / world size (no
    accumulation). Gradient accumulation = batch_size / (micro_batch_size * world)."""
    lr: float = 3e-3
    """Peak learning rate."""
    untargeted_lr_scale: float = 1.0
    """Learning-rate multiplier of the parameters outside the targeted linear layers
    (``layer.targets``): token embedding, LM head and norm gains (GaLore's own split, where
    projected layers move at galore_scale x lr, comes on top)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at min_lr_ratio * lr."""
    warmup_steps: int | None = None
    """Linear warmup steps. None: 10% of steps."""
    weight_decay: float = 0.0
    """AdamW weight decay (applied to matrices only, not norms)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    z_loss: float = 0.0
    """Coefficient of the z-loss mean(logsumexp(logits)^2) (PaLM uses 1e-4). 0 disables."""
    precision: str = "auto"
    """auto (bf16 autocast where the hardware supports it, CPU included), bf16, or fp32."""
    compile: bool = False
    """Wrap the model in torch.compile (faster after a cold compile of ~30 s on CPU)."""
    eval_every: int = 100
    """Evaluate validation loss every N steps (and at the end)."""
    log_every: int = 10
    """Write a metrics line every N steps."""
    checkpoint_every: int = 200
    """Save a checkpoint every N steps (and at the end). 0: only at the end."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    out_dir: str | None = None
    """Run folder: checkpoints, metrics.jsonl, summary.json, curves.png. None: runs/<method>-<preset>."""
    resume: str = "auto"
    """auto: continue from the latest checkpoint in out_dir if there is one; never: refuse to
    start when out_dir holds a checkpoint (nothing is overwritten)."""
    seed: int = 0
    """Seed of the initialisation and the data order."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, or cuda."""
    threads: int | None = None
    """CPU threads for torch (None: torch's default)."""
    progress: bool = True
    """Show a progress bar."""
    parallel: str = "ddp"
    """Under torchrun: ddp or fsdp (FSDP2 fully_shard)."""
    peak_flops: float | None = None
    """Peak FLOP/s for MFU. None: measured once with a matmul benchmark and cached."""
    max_bad_steps: int = 3
    """Consecutive steps with a non-finite loss or gradient norm that are skipped (no update,
    recorded in metrics.jsonl) before the run stops with an error; 0 stops at the first."""
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])
    """Where metrics go (rank 0): jsonl (metrics.jsonl, always on), tensorboard (needs the
    ``[tensorboard]`` extra), wandb (offline, needs the ``[wandb]`` extra)."""
    diagnostics: bool = True
    """At every log step, add per-group gradient norms, update-to-weight ratios and the max
    logit to metrics.jsonl (lostlm.diagnostics; costs a copy of the weights and one LM-head
    product over a micro-batch per log step: those steps' peak memory grows by the trainable
    weights' size, so set it false when measuring peak memory). Loss-spike events are logged either way."""
    loss_impl: str = "chunked"
    """chunked (LM head + cross-entropy over token chunks, never all logits) or plain."""
    loss_chunk_tokens: int = 1024
    """Tokens per chunk of the chunked loss (each chunk holds a few chunk x vocab buffers)."""
    activation_checkpointing: int = 0
    """Recompute every k-th decoder block in backward (1: every block; 0: off)."""
    optimizer: str = "adamw"
    """adamw (fp32 moments) or adamw8bit (bitsandbytes' 8-bit blockwise moments; extra [8bit])."""
    release_freed_memory: bool = False
    """glibc (Linux) only: give every freed buffer of 1 MiB or more back to the OS at once, so the
    process's resident memory follows its live tensors instead of keeping freed heap blocks for
    reuse (a memory lever; costs fresh pages per big allocation). Does not change the numbers."""


@dataclass
class ReweightConfig:
    strategy: str = "uniform"
    """uniform (plain mean loss), linupper, quadratic, or extremes."""
    temperature: float = 1.0
    """r in softmax(f / r); the max/min weight ratio is at most e^(1/r)."""
    warmup_steps: int = 0
    """Steps of uniform weighting before the strategy is switched on."""
    delta: float = 1.0
    """delta of the min-max normalisation."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    layer: LayerConfig = field(default_factory=LayerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reweight: ReweightConfig = field(default_factory=ReweightConfig)

    def __post_init__(self) -> None:
        validate(self, PRESETS)
        if self.train.out_dir is None:
            self.train.out_dir = f"runs/{self.layer.method}-{self.model.preset}"

    # -- derived values -------------------------------------------------------------
    def resolved_model(self) -> ModelConfig:
        """ModelConfig with every None filled from the preset (vocab_size may stay None)."""
        m = dataclasses.replace(self.model)
        preset = PRESETS[m.preset]
        for key in ("hidden_size", "intermediate_size", "num_heads", "num_layers"):
            if getattr(m, key) is None:
                setattr(m, key, preset[key])
        if m.num_kv_heads is None:
            m.num_kv_heads = m.num_heads
        return m

    def resolved_rank(self) -> int:
        return self.layer.rank if self.layer.rank is not None else PRESETS[self.model.preset]["rank"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------
# building from dicts, files and overrides


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a value parsed from YAML/TOML/the command line to the field's declared type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise LostLMError(f"config {key} must be a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value]
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) else int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise LostLMError(f"config {key}={value!r} is not a valid {getattr(tp, '__name__', tp)}") from None
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise LostLMError(f"config section {prefix.rstrip('.') or 'root'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f"; valid keys: {', '.join(names)}"
            raise LostLMError(f"unknown config key {prefix}{key}{hint}")
        tp = hints[key]
        if _is_dataclass_type(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (unknown keys are an error)."""
    return _build(Config, data or {}, "")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or TOML recipe into a nested dict."""
    path = Path(path)
    if not path.is_file():
        raise LostLMError(f"config file {path} does not exist; pass a path to a .yaml or .toml recipe (see configs/)")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml", ".json"):
            data = yaml.safe_load(text) or {}
        else:
            raise LostLMError(f"config file {path} must end in .yaml, .yml, .toml or .json")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise LostLMError(f"config file {path} is not valid {path.suffix[1:].upper()}: {first}") from None
    if not isinstance(data, dict):
        raise LostLMError(f"config file {path} must hold a mapping of sections (model, layer, data, train, reweight)")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings; the value is parsed as YAML (numbers, lists, null)."""
    data = json.loads(json.dumps(data))  # deep copy
    for item in overrides:
        if "=" not in item:
            raise LostLMError(f"override {item!r} must look like section.key=value, e.g. train.lr=1e-3")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise LostLMError(f"override key {dotted!r} must be section.key (sections: model, layer, data, train, reweight)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        section = data.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise LostLMError(f"config section {parts[0]} must be a mapping")
        section[parts[1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Recipe file (optional) + command-line overrides -> validated Config."""
    data = read_config_file(path) if path else {}
    return config_from_dict(apply_overrides(data, overrides or []))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
