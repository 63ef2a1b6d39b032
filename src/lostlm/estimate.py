"""Analytic cost of a model before training it: parameters, FLOPs per token and memory.

    lostlm estimate                              # every method at 60m … 7b, paper convention
    lostlm estimate --preset 1b --micro-batch 8 --seq-len 256
    lostlm estimate --dtype fp32 --preset 60m    # what our CPU runs hold (fp32 master weights)

Everything is computed from the shapes (nothing is allocated): the targeted projections of a
LLaMA block (q, k, v, o, gate, up, down) get the parameter/FLOP count of their
parametrisation, with the same formulas as :mod:`lostlm.layers` (tests check the two agree
on real models); embeddings, norms and the LM head stay dense.

Memory convention (what the papers call "weights + optimizer states")::

    weights    = P_total × bytes(dtype)
    grads      = P_trainable × bytes(dtype)
    optimizer  = Adam's two moments: 2 × bytes(dtype) per trainable number, except for GaLore,
                 whose projected matrices keep 2 × r × max(m, n) moments plus the r × min(m, n)
                 projector (galore_torch's ``std`` projection)
    activations= tensors saved for backward for one micro-batch (see :func:`activation_bytes`)
    transient  = the largest short-lived buffers of backward: the loss's (tokens × vocab, or
                 chunk × vocab when chunked) and one recomputed block under checkpointing
    update     = the optimizer step's own temporaries, alive after backward (activations gone,
                 grads still held): see :func:`optimizer_step_bytes`
    peak       = weights + grads + optimizer + max(activations + transient, update)

The levers (``train.*``): ``optimizer=adamw8bit`` keeps each moment of a matrix in 1 byte plus
one fp32 absmax per 256-number block (bitsandbytes' blockwise quantisation; tensors under 4096
numbers, here the norm gains, keep fp32 moments); ``activation_checkpointing=k`` keeps only the
fp32 input (4·d per token) of every k-th block; ``loss_impl=chunked`` keeps one fp32 log-sum-exp
per token instead of the logits and their log-softmax.

The GaLore paper's full-rank column (60M 0.36G, 130M 0.76G, 350M 2.06G, 1B 7.80G) is
``weights + optimizer`` with BF16 weights and BF16 Adam moments (6 bytes per parameter), the
vocabulary 32000, LLaMA shapes of the presets (``configs.PRESETS``) and untied embeddings. Its "G" sits between
GB and GiB: with G = 10⁹ bytes the four come out 0.348/0.805/2.207/8.034 (-3.3 %, +5.9 %,
+7.1 %, +3.0 %); with G = 2³⁰ bytes 0.324/0.750/2.056/7.483 (-10 %, -1.4 %, -0.2 %, -4.1 %).
No per-parameter formula fits all four within 5 % (the paper's bytes per parameter range from
5.60 to 6.20 in GB units; the 60M figure is the outlier). We report G = GB = 10⁹ bytes:
SLTrain's Table 2 recomputes the same column as 0.35/0.81/2.21/8.04, which is exactly this
formula with the T5 tokenizer's 32100 entries. The unit is printed with every table; see
docs/benchmarks.md for the comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import asdict, dataclass

from . import methods
from .configs import METHODS, PRESET_VOCAB, PRESETS, Config, LayerConfig, ModelConfig
from .convert import matches
from .errors import LostLMError
from .optim import UPDATE_SLICE_NUMEL

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
PAPER_PRESETS = ("60m", "130m", "350m", "1b", "7b")


# ---------------------------------------------------------------------------------------------
# shapes and per-layer counts (the formulas of lostlm.methods; tests compare them with the layers)


def projection_shapes(model: ModelConfig) -> list[tuple[str, int, int]]:
    """(name, out m, in n) of the seven projections of one decoder block."""
    d, heads = model.hidden_size, model.num_heads
    head_dim = d // heads
    kv = (model.num_kv_heads or heads) * head_dim
    i = model.intermediate_size
    return [("q_proj", heads * head_dim, d), ("k_proj", kv, d), ("v_proj", kv, d), ("o_proj", d, heads * head_dim),
            ("gate_proj", i, d), ("up_proj", i, d), ("down_proj", d, i)]


def layer_parameters(method: str, m: int, n: int, rank: int, layer: LayerConfig) -> int:
    """Trainable numbers of one m×n projection under ``method`` (no bias: LLaMA has none)."""
    return methods.get(method).parameters(m, n, rank, layer)


def layer_flops_per_token(method: str, m: int, n: int, rank: int, layer: LayerConfig) -> int:
    """Forward FLOPs of one projection for one token (2 per multiply-add), as ``flops_per_token``."""
    return methods.get(method).flops_per_token(m, n, rank, layer)


def galore_state_numbers(m: int, n: int, rank: int) -> int:
    """Adam moments (2 × r × max) plus the projector (r × min) of one GaLore-projected matrix."""
    r = min(rank, m, n)
    return 2 * r * max(m, n) + r * min(m, n)


# ---------------------------------------------------------------------------------------------
# the whole model


@dataclass
class Estimate:
    method: str
    preset: str
    dtype: str
    params_total: int
    params_trainable: int
    params_embedding_head: int
    params_linear: int
    params_other: int
    forward_flops_per_token: int
    train_flops_per_token: float
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    micro_batch: int
    seq_len: int
    transient_bytes: int = 0
    update_bytes: int = 0
    optimizer: str = "adamw"
    checkpointing: int = 0
    loss_chunk: int = 0

    @property
    def weights_optimizer_bytes(self) -> int:
        return self.weights_bytes + self.optimizer_bytes

    @property
    def state_bytes(self) -> int:
        """weights + grads + optimizer state."""
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> int:
        """The peak: backward (activations + its buffers) or the optimizer update, whichever is larger."""
        return self.state_bytes + max(self.activations_bytes + self.transient_bytes, self.update_bytes)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(weights_optimizer_bytes=self.weights_optimizer_bytes, state_bytes=self.state_bytes,
                   total_bytes=self.total_bytes)
        return out


def _resolve(cfg: Config, vocab_size: int | None) -> ModelConfig:
    model = cfg.resolved_model()
    if vocab_size is not None:
        model.vocab_size = vocab_size
    if model.vocab_size is None:
        model.vocab_size = PRESET_VOCAB
    return model


def activation_bytes(model: ModelConfig, method: str, rank: int, layer: LayerConfig, micro_batch: int, seq_len: int,
                     amp: bool = True, checkpointing: int = 0, loss_chunk: int = 0) -> int:
    """Bytes autograd keeps for backward over one micro-batch of our LlamaLM.

    Per token and block, with c the compute bytes (2 under bf16 autocast, 4 in fp32); the
    residual stream and RMSNorm are fp32 (each norm keeps its input and normalised output,
    2·4d; in fp32 also the gain-scaled output, which the projections then share):

    * under autocast, q, k, v, gate and up each keep their own bf16 copy of the normed input
      (o and down get bf16 inputs already kept elsewhere); factorised layers keep the rank-r
      intermediate (×2 with SiLU: its input and output), LOST also its k gathered inputs and
      its mixed weight [γB ; (1-γ)W_sᵀ] (c·m·(r+k) per layer and micro-batch), SLTrain its
      rebuilt dense W (c·m·n per layer and micro-batch);
    * attention keeps q, k, v and the output (4 c d);
    * SwiGLU keeps gate, up, silu(gate) and their product (4 c I);
    * head: final norm, LM-head input, the live logits (c V) and the fp32 log-softmax (4 V).

    Parameters and autocast's cached low-precision weight copies are not activations and are
    not counted. tests/test_estimate.py checks this against ``costs.saved_activation_bytes``.
    ``checkpointing`` = k: blocks 0, k, 2k, ... keep only their fp32 input (4 d); ``loss_chunk``
    > 0: the head keeps one fp32 log-sum-exp per token besides its input, not c V + 4 V.
    """
    c = 2 if amp else 4
    d, i, v = model.hidden_size, model.intermediate_size, model.vocab_size
    spec = methods.get(method)
    per_token = per_batch = 0
    for name, m, n in projection_shapes(model):
        if amp and name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            per_token += c * n  # autocast's bf16 copy of the fp32 normed input, one per projection
        if matches(name, layer.targets):
            token_bytes, batch_bytes = spec.activation_bytes(m, n, rank, layer, c)
            per_token += token_bytes
            per_batch += batch_bytes
    norm = (2 if amp else 3) * 4 * d  # fp32 input and normalised output (+ gain-scaled output in fp32)
    per_token += 2 * norm + 4 * c * d + 4 * c * i  # norms, attention q/k/v/out, SwiGLU gate/up/silu/product
    head = norm + (c * d if amp else 0) + (4 if loss_chunk else c * v + 4 * v)
    saved = checkpointed_blocks(model.num_layers, checkpointing)
    blocks = (model.num_layers - saved) * per_token + saved * 4 * d
    return (blocks + head) * micro_batch * seq_len + per_batch * (model.num_layers - saved)


def checkpointed_blocks(layers: int, every: int) -> int:
    """How many of ``layers`` blocks ``train.activation_checkpointing=every`` recomputes."""
    return 0 if every <= 0 else (layers + every - 1) // every


def transient_bytes(model: ModelConfig, method: str, rank: int, layer: LayerConfig, micro_batch: int, seq_len: int,
                    amp: bool = True, checkpointing: int = 0, loss_chunk: int = 0) -> int:
    """The largest short-lived buffers of backward, on top of the saved activations: the
    loss's gradient buffers (plain: the fp32 gradient of the logits and its compute-dtype copy,
    (4 + c) V per token; chunked: per chunk the fp32 logits and their shifted copy, 8 V per
    token, and the chunk's head-gradient product, c V d, plus under autocast the fp32
    head-gradient accumulator, 4 V d; measured in fp32 by bench/memory.py's phase peaks)
    and, under checkpointing, one recomputed block's activations."""
    c = 2 if amp else 4
    d, v, tokens = model.hidden_size, model.vocab_size, micro_batch * seq_len
    if loss_chunk:
        # per chunk (losses.ChunkedLinearCrossEntropy.backward): the fp32 logits and their shifted
        # copy (8 V), and the chunk's head-gradient product (V d, compute dtype); under autocast
        # also the fp32 head-gradient accumulator (4 V d; in fp32 it is the grad itself). The
        # forward's logits + logsumexp temporaries (8 V per token in fp32) are no larger.
        loss = min(loss_chunk, tokens) * v * 8 + v * d * (c + (4 if amp else 0))
    else:
        loss = tokens * v * (4 + c)
    recompute = 0
    if checkpointed_blocks(model.num_layers, checkpointing):
        single = dataclasses.replace(model, num_layers=1)
        full = activation_bytes(single, method, rank, layer, micro_batch, seq_len, amp, 0, loss_chunk)
        head_only = activation_bytes(dataclasses.replace(model, num_layers=0), method, rank, layer, micro_batch,
                                     seq_len, amp, 0, loss_chunk)
        recompute = full - head_only
    return max(loss, recompute)


# Parameter-sized fp32 temporaries alive at once while one parameter is updated, measured on
# CPU (bench/memory.py phase peaks; tests/test_estimate.py): torch's AdamW (the per-tensor
# path, torch's default for CPU tensors) builds ``exp_avg_sq.sqrt() / bias_correction`` (2);
# bitsandbytes' CPU AdamW8bit dequantises both moments to fp32, copies the gradient and builds
# the same denominator (5); GaLore's AdamW (galore-torch) keeps sqrt + the normalised update (2).
UPDATE_TEMPORARIES = {"adamw": 2, "adamw8bit": 5, "galore": 2}


def optimizer_step_bytes(optimizer: str, largest_parameter: int, slice_numel: int = UPDATE_SLICE_NUMEL) -> int:
    """Peak temporaries of one optimizer step: the optimizers above update one parameter at a
    time, so the largest parameter (the embedding or the LM head) sets them, in fp32; lostlm's
    8-bit update runs over slices of at most ``slice_numel`` numbers (lostlm.adamw8bit)."""
    numbers = min(largest_parameter, slice_numel) if optimizer == "adamw8bit" else largest_parameter
    return UPDATE_TEMPORARIES[optimizer] * 4 * numbers


def optimizer_8bit_bytes(numbers: int) -> int:
    """bitsandbytes' AdamW8bit state of one matrix: two uint8 moments + an fp32 absmax per 256."""
    return 2 * numbers + 2 * 4 * ((numbers + 255) // 256)


def estimate(cfg: Config, vocab_size: int | None = None, *, dtype: str = "bf16", micro_batch: int = 1,
             seq_len: int | None = None, galore_rank: int | None = None, amp: bool = True, optimizer: str = "adamw",
             checkpointing: int = 0, loss_chunk: int = 0) -> Estimate:
    """Analytic parameters, FLOPs and memory of ``cfg``'s model (``dtype`` for weights, grads and
    optimizer state; activations in bf16 when ``amp``). ``galore_rank`` overrides layer.galore_rank.
    The levers: ``optimizer`` (adamw, adamw8bit), ``checkpointing`` (every k-th block, 0 off),
    ``loss_chunk`` (tokens per chunk of the chunked loss, 0: the plain loss)."""
    if dtype not in DTYPE_BYTES:
        raise LostLMError(f"dtype {dtype!r} is not valid; use one of {', '.join(DTYPE_BYTES)}")
    model = _resolve(cfg, vocab_size)
    method, layer, rank = cfg.layer.method, cfg.layer, cfg.resolved_rank()
    seq_len = seq_len or cfg.data.seq_len
    g_rank = galore_rank or layer.galore_rank
    d, v, layers = model.hidden_size, model.vocab_size, model.num_layers
    embed_head = v * d * (1 if model.tie_embeddings else 2)
    norms = (2 * layers + 1) * d
    spec, dense = methods.get(method), methods.get("full")
    linear = flops = optimizer_numbers = rebuild = optimizer_8bit = 0
    eight = optimizer == "adamw8bit"
    largest = v * d  # the embedding (and the head): larger than any projection in every preset
    for name, m, n in projection_shapes(model):
        targeted = matches(name, layer.targets)
        kind = spec if targeted else dense
        params = kind.parameters(m, n, rank, layer)
        largest = max(largest, params)
        linear += params * layers
        flops += kind.flops_per_token(m, n, rank, layer) * layers
        if targeted and kind.rebuild_flops is not None:
            rebuild += kind.rebuild_flops(m, n, rank, layer) * layers
        if targeted and kind.optimizer == "galore":
            optimizer_numbers += galore_state_numbers(m, n, g_rank) * layers
        elif eight:
            optimizer_8bit += optimizer_8bit_bytes(params) * layers
        else:
            optimizer_numbers += 2 * params * layers
    if eight:  # embeddings/head in 8 bits; the norm gains (< 4096 numbers each) keep fp32 moments
        optimizer_8bit += optimizer_8bit_bytes(embed_head) + 2 * 4 * norms
    else:
        optimizer_numbers += 2 * (embed_head + norms)
    total = embed_head + linear + norms
    flops += 2 * d * v + 2 * 2 * layers * seq_len * d  # LM head + attention scores (the convention of lostlm.costs)
    # Work done once per forward (SLTrain rebuilds W = A B + S), shared by the micro-batch's tokens.
    train_flops = 3.0 * flops + 3.0 * rebuild / (micro_batch * seq_len)
    b = DTYPE_BYTES[dtype]
    return Estimate(method=method, preset=cfg.model.preset, dtype=dtype, params_total=total, params_trainable=total,
                    params_embedding_head=embed_head, params_linear=linear, params_other=norms,
                    forward_flops_per_token=flops, train_flops_per_token=train_flops,
                    weights_bytes=total * b, grads_bytes=total * b, optimizer_bytes=optimizer_numbers * b + optimizer_8bit,
                    activations_bytes=activation_bytes(model, method, rank, layer, micro_batch, seq_len, amp,
                                                       checkpointing, loss_chunk),
                    micro_batch=micro_batch, seq_len=seq_len,
                    transient_bytes=transient_bytes(model, method, rank, layer, micro_batch, seq_len, amp,
                                                    checkpointing, loss_chunk),
                    update_bytes=optimizer_step_bytes("galore" if spec.optimizer == "galore" else optimizer, largest),
                    optimizer=optimizer, checkpointing=checkpointing, loss_chunk=loss_chunk)


def estimate_preset(preset: str, method: str, **kwargs) -> Estimate:
    """:func:`estimate` for a named preset with the paper's vocabulary (32000) and ranks; GaLore
    uses the preset rank as its projection rank, as in the GaLore paper."""
    cfg = Config()
    cfg.model.preset = preset
    cfg.layer.method = method
    kwargs.setdefault("galore_rank", PRESETS[preset]["rank"])
    return estimate(cfg, PRESET_VOCAB, **kwargs)


def estimate_run(cfg: Config, vocab_size: int, micro_batch: int, amp: bool | None = None) -> Estimate:
    """What one of *our* runs holds: fp32 master weights, grads and Adam state, bf16 activations
    when autocast is on (pass ``amp``: the trainer's choice, which depends on the CPU), and the
    run's levers (optimizer, activation checkpointing, loss path)."""
    t = cfg.train
    if amp is None:
        amp = t.precision != "fp32"
    return estimate(cfg, vocab_size, dtype="fp32", micro_batch=micro_batch, amp=amp, optimizer=t.optimizer,
                    checkpointing=t.activation_checkpointing,
                    loss_chunk=t.loss_chunk_tokens if t.loss_impl == "chunked" else 0)


# ---------------------------------------------------------------------------------------------
# command line


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f}"


def format_table(rows: list[Estimate]) -> str:
    """Markdown table of estimates (G = 10⁹)."""
    head = ("| preset | method | params (M) | trainable linear (M) | fwd GFLOP/token | weights+optim (GB) | "
            "weights+grads+optim (GB) | activations (GB) | loss/recompute buffers (GB) | update (GB) | peak (GB) | "
            "vs full (W+G+O) |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    full = {r.preset: r for r in rows if r.method == "full"}
    for r in rows:
        ratio = r.state_bytes / full[r.preset].state_bytes if r.preset in full else float("nan")
        lines.append(f"| {r.preset} | {r.method} | {r.params_total / 1e6:.1f} | {r.params_linear / 1e6:.1f} | "
                     f"{r.forward_flops_per_token / 1e9:.3f} | {_gb(r.weights_optimizer_bytes)} | {_gb(r.state_bytes)} | "
                     f"{_gb(r.activations_bytes)} | {_gb(r.transient_bytes)} | {_gb(r.update_bytes)} | {_gb(r.total_bytes)} | "
                     f"{ratio:.2f} |")
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("estimate", help="analytic params, FLOPs and memory per method and preset (no training)")
    p.add_argument("--preset", action="append", help=f"preset(s) (default: {', '.join(PAPER_PRESETS)})")
    p.add_argument("--method", action="append", choices=METHODS, help="method(s) (default: all)")
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPE_BYTES), help="weights/grads/optimizer dtype (bf16: paper convention)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per forward for the activation estimate")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw8bit"), help="Adam moments in dtype or 8-bit")
    p.add_argument("--checkpointing", type=int, default=0, metavar="K", help="recompute every K-th block (0: off)")
    p.add_argument("--loss", default="plain", choices=("plain", "chunked"), help="loss path (train.loss_impl)")
    p.add_argument("--loss-chunk", type=int, default=1024, help="tokens per chunk of the chunked loss")
    p.add_argument("--fp32-activations", action="store_true", help="activations in fp32 (no bf16 autocast)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_estimate)


def cmd_estimate(args: argparse.Namespace) -> int:
    import json

    presets = args.preset or list(PAPER_PRESETS)
    for preset in presets:
        if preset not in PRESETS:
            raise LostLMError(f"--preset {preset} is not a preset; use one of {', '.join(PRESETS)}")
    if args.micro_batch < 1 or args.seq_len < 2 or args.checkpointing < 0 or args.loss_chunk < 1:
        raise LostLMError("--micro-batch must be >= 1, --seq-len >= 2, --checkpointing >= 0 and --loss-chunk >= 1")
    methods = args.method or list(METHODS)
    levers = dict(optimizer=args.optimizer, checkpointing=args.checkpointing, amp=not args.fp32_activations,
                  loss_chunk=args.loss_chunk if args.loss == "chunked" else 0)
    rows = [estimate_preset(p, m, dtype=args.dtype, micro_batch=args.micro_batch, seq_len=args.seq_len, **levers)
            for p in presets for m in methods]
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=1))
        return 0
    print(f"Analytic estimate: {args.dtype} weights/grads, {args.optimizer} moments, "
          f"{'fp32' if args.fp32_activations else 'bf16'} activations for micro-batch {args.micro_batch} × "
          f"{args.seq_len} tokens, checkpointing every {args.checkpointing or '-'} block(s), {args.loss} loss, "
          f"vocab {PRESET_VOCAB}, preset ranks; 1 GB = 10⁹ bytes.")
    print(format_table(rows))
    return 0
