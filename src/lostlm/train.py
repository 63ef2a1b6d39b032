"""The training loop: optimizer, schedule, accumulation, evaluation, checkpoints, logging.

One process (the default job: LOST, ``tiny`` preset, bundled corpus)::

    lostlm train
    lostlm train configs/tiny.yaml --method full train.steps=200

One node, 8 GPUs (DDP; ``train.parallel=fsdp`` for FSDP2)::

    torchrun --nproc_per_node 8 -m lostlm train configs/60m.yaml

Several nodes::

    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        -m lostlm train configs/1b.yaml

``train.batch_size`` is the global batch in sequences; each process takes its slice of every
global batch, and ``train.micro_batch_size`` sets gradient accumulation. The loss of a
micro-batch is the (optionally reweighted) mean of per-sequence mean token losses, so
accumulating 4 micro-batches of B/4 gives the gradient of one batch of B.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint as ckpt_io
from .configs import Config, read_config_file, save_config
from .build import build_model
from .data import build_data, cache_root
from .errors import LostLMError
from .evaluate import evaluate_loss, token_losses
from .metrics import cached_peak_flops, parameter_breakdown, peak_memory_bytes, training_flops_per_step
from .optim import build_optimizer, lr_at
from .reweight import sample_weights, weight_stats

# Keys that may change between a checkpoint and its resume (they do not change the math).
OPERATIONAL_KEYS = {"train": {"steps", "eval_every", "log_every", "checkpoint_every", "keep_checkpoints", "out_dir",
                              "resume", "device", "threads", "progress", "compile", "peak_flops"},
                    "data": {"cache_dir"}}


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistEnv:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
        # Leave the group before the interpreter shuts down: otherwise gloo's worker threads can
        # abort the process at exit ("terminate called without an active exception", SIGABRT).
        atexit.register(_leave_process_group)
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(cfg: Config, env: DistEnv) -> torch.device:
    kind = cfg.train.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise LostLMError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu or auto")
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def _cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the hardware does bf16 matmuls natively; None means fp32."""
    if cfg.train.precision == "fp32":
        return None
    if cfg.train.precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if _cpu_supports_bf16() else None


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def _interrupt_on_sigterm():
    """Treat SIGTERM (a scheduler's pre-emption, ``kill``) like Ctrl-C: save, then stop.
    Returns the previous handler, or None off the main thread where handlers cannot be set."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)


def significant_differences(saved: dict, current: dict) -> list[str]:
    """Config keys whose change would make a resumed run differ from an uninterrupted one."""
    diffs = []
    for section, values in current.items():
        for key, value in values.items():
            if key in OPERATIONAL_KEYS.get(section, set()):
                continue
            old = saved.get(section, {}).get(key)
            if old != value:
                diffs.append(f"{section}.{key}: {old!r} -> {value!r}")
    return diffs


def sequence_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean token cross-entropy (float32; -100 targets ignored)."""
    sums, counts = token_losses(logits, targets)
    return sums / counts.clamp_min(1)


def z_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean over non-ignored tokens of logsumexp(logits)², in float32 (DESIGN.md §4)."""
    lse = torch.logsumexp(logits.float(), dim=-1)
    mask = (targets != -100).float()
    return (lse.pow(2) * mask).sum() / mask.sum().clamp_min(1)


class Trainer:
    """Builds everything from a :class:`Config` and runs ``train()``; see the module docstring."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        t = cfg.train
        if t.parallel == "fsdp" and cfg.layer.method == "galore":
            raise LostLMError("layer.method=galore needs whole gradient matrices for its projection; "
                              "use train.parallel=ddp with GaLore")
        if t.threads:
            torch.set_num_threads(t.threads)
        self.env = init_distributed("cuda" if t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available()) else "cpu")
        self.device = resolve_device(cfg, self.env)
        if t.batch_size % self.env.world_size:
            raise LostLMError(f"train.batch_size={t.batch_size} is not divisible by the {self.env.world_size} processes; "
                              "pick a multiple of the world size")
        self.local_batch = t.batch_size // self.env.world_size
        self.micro_batch = t.micro_batch_size or self.local_batch
        if self.local_batch % self.micro_batch:
            raise LostLMError(f"train.micro_batch_size={self.micro_batch} does not divide the per-process batch "
                              f"{self.local_batch} (batch_size {t.batch_size} / {self.env.world_size} processes)")
        self.accumulation = self.local_batch // self.micro_batch
        self.run_dir = Path(t.out_dir)
        self.amp_dtype = autocast_dtype(cfg, self.device)

        torch.manual_seed(t.seed)
        self.data = build_data(cfg.data, t.seed)
        self.model, self.conversion = build_model(cfg, self.data.vocab_size)
        self.model.to(self.device)
        self.step = 0
        self.tokens_seen = 0
        self.train_seconds = 0.0
        self._optimizer_state = None
        self._resume_or_start()  # weights now, the optimizer's state once it exists
        self.train_model = self._wrap(self.model)
        # Built after wrapping: FSDP2 replaces the parameters by sharded DTensors.
        self.optimizer = build_optimizer(self.model, cfg)
        if self._optimizer_state is not None:
            self._load_optimizer_state(*self._optimizer_state)
            self._optimizer_state = None

    # -- set-up ---------------------------------------------------------------------------

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.env.world_size > 1:
            if self.cfg.train.parallel == "fsdp":
                from .parallel import apply_fsdp
                model = apply_fsdp(model, self.device)
            else:
                from torch.nn.parallel import DistributedDataParallel
                ids = [self.device.index] if self.device.type == "cuda" else None
                # Our buffers (RoPE tables, LOST channel indices) never change: no sync before every
                # forward. torch >= 2.13 still syncs them once at construction; older torch
                # (broadcast_buffers=False) does not, which is harmless: every rank builds the same
                # buffers from the same seed, or loads them from the same checkpoint.
                params = inspect.signature(DistributedDataParallel).parameters
                no_resync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
                model = DistributedDataParallel(model, device_ids=ids, **no_resync)
        if self.cfg.train.compile:
            model = torch.compile(model)
        return model

    def _resume_or_start(self) -> None:
        t = self.cfg.train
        latest = ckpt_io.latest_checkpoint(self.run_dir)
        config_file = self.run_dir / "config.yaml"
        current = self.cfg.to_dict()
        if config_file.is_file():
            saved = read_config_file(config_file)
            diffs = significant_differences(saved, current)
            if diffs:
                raise LostLMError(f"train.out_dir={self.run_dir} holds a run with a different config ({diffs[0]}"
                                  f"{f' and {len(diffs) - 1} more' if len(diffs) > 1 else ''}); "
                                  "use another train.out_dir, or the run's own config to continue it")
        if latest is not None and t.resume == "never":
            raise LostLMError(f"train.out_dir={self.run_dir} already holds a checkpoint ({latest.name}); "
                              "use another train.out_dir, or train.resume=auto to continue it")
        if latest is not None:
            self._restore(latest)
        if self.env.world_size > 1:
            dist.barrier()  # every rank has read config.yaml and the checkpoint before rank 0 rewrites them
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, config_file)
            self.data.tokenizer.save_pretrained(str(self.run_dir / "tokenizer"))
            self._trim_metrics()
        if self.env.world_size > 1:
            dist.barrier()

    def _restore(self, path: Path) -> None:
        state = ckpt_io.read_state(path)
        ckpt_io.load_weights_into(self.model, ckpt_io.load_model_state(path), path)
        optimizer_state, rng = ckpt_io.load_optimizer_state(path, state)
        self._optimizer_state = (optimizer_state, path)  # loaded after wrapping, in __init__
        ckpt_io.restore_rng(rng)
        self.data.load_state_dict(state["data"])
        self.step = state["step"]
        self.tokens_seen = state["tokens"]
        self.train_seconds = state.get("train_seconds", 0.0)

    def _load_optimizer_state(self, optimizer_state: dict, path: Path) -> None:
        try:
            if self.cfg.train.parallel == "fsdp":
                from .parallel import load_full_optimizer_state
                load_full_optimizer_state(self.model, self.optimizer, optimizer_state)
            else:
                self.optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError) as exc:
            raise LostLMError(f"checkpoint {path} has optimizer state that does not fit ({exc}); "
                              "it was made with a different layer.method or model") from None

    def _trim_metrics(self) -> None:
        """After a resume, drop log lines from steps the checkpoint does not contain."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= self.step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    # -- one step ---------------------------------------------------------------------------

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _gather(self, values: torch.Tensor) -> torch.Tensor:
        if self.env.world_size == 1:
            return values
        parts = [torch.empty_like(values) for _ in range(self.env.world_size)]
        dist.all_gather(parts, values.contiguous())
        return torch.cat(parts)

    def train_step(self, batch: torch.Tensor) -> dict[str, float]:
        """Forward/backward over the micro-batches of this process's slice, then one update."""
        self.train_model.train()
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = batch.to(self.device, non_blocking=True)
        loss_sum, z_sum, spread = 0.0, 0.0, {}
        for index, micro in enumerate(batch.split(self.micro_batch)):
            inputs, targets = micro[:, :-1], micro[:, 1:]
            last = index == self.accumulation - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.train_model, "no_sync") else self.train_model.no_sync()
            with sync:
                with self._autocast():
                    logits = self.train_model(inputs)
                seq_loss = sequence_losses(logits, targets)
                global_losses = self._gather(seq_loss.detach())
                weights = sample_weights(global_losses, self.cfg.reweight, self.step)
                start = self.env.rank * seq_loss.numel()  # this process's rows, by *global* rank
                local_weights = weights[start:start + seq_loss.numel()]
                loss = (local_weights * seq_loss).sum() * self.env.world_size
                if self.cfg.train.z_loss > 0:
                    z = z_loss(logits, targets)
                    loss = loss + self.cfg.train.z_loss * z
                    z_sum += z.item()
                (loss / self.accumulation).backward()
            loss_sum += global_losses.mean().item()
            if self.cfg.reweight.strategy != "uniform":
                spread = weight_stats(weights)
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        out = {"loss": loss_sum / self.accumulation, "lr": lr, "grad_norm": grad_norm, **spread}
        if self.cfg.train.z_loss > 0:
            out["z_loss"] = z_sum / self.accumulation
        return out

    def _clip_gradients(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    # -- evaluation -----------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Token-weighted validation loss over the whole held-out set (all processes)."""
        batches = self.data.val_batches(self.micro_batch, self.env.rank, self.env.world_size)
        if self.env.world_size > 1 and self.cfg.train.parallel == "fsdp":
            from .parallel import even_batches  # FSDP2: every forward is collective
            batches = even_batches(batches, self.device)
        return evaluate_loss(self.train_model, batches, self.device, self._autocast, self.env.world_size > 1)

    def unigram_perplexity(self) -> float:
        """Perplexity of the best unigram model *fitted on the validation targets themselves*:
        a floor no context-free predictor can beat, to show the model learned context."""
        counts = torch.zeros(self.data.vocab_size, dtype=torch.float64)
        for batch in self.data.val_batches(self.micro_batch, 0, 1):
            counts += torch.bincount(batch[:, 1:].flatten(), minlength=self.data.vocab_size).double()
        p = counts[counts > 0] / counts.sum()
        return math.exp(-(p * p.log()).sum().item())

    # -- checkpoint -------------------------------------------------------------------------

    def save(self) -> Path | None:
        model_state, optimizer_state = self._state_dicts()
        if not self.env.is_main:
            return None
        state = {"data": self.data.state_dict(), "tokens": self.tokens_seen, "train_seconds": self.train_seconds,
                 "config": self.cfg.to_dict(), "world_size": self.env.world_size}
        return ckpt_io.save_checkpoint(self.run_dir, self.step, model_state, optimizer_state, state,
                                       keep=self.cfg.train.keep_checkpoints)

    def _state_dicts(self):
        if self.cfg.train.parallel == "fsdp":  # name-keyed optimizer state, also for one process
            from .parallel import gathered_state_dicts
            return gathered_state_dicts(self.model, self.optimizer)
        return self.model.state_dict(), self.optimizer.state_dict()

    # -- the loop ---------------------------------------------------------------------------

    def _log(self, record: dict) -> None:
        if self.env.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def train(self) -> dict:
        """Run to ``train.steps``, then evaluate, write summary.json and curves.png."""
        t = self.cfg.train
        tokens_per_step = t.batch_size * self.cfg.data.seq_len
        progress = None
        if self.env.is_main and t.progress and self.step < t.steps:
            from tqdm.auto import tqdm
            progress = tqdm(total=t.steps, initial=self.step, desc=f"{self.cfg.layer.method}", unit="step", dynamic_ncols=True)
        session_tokens, session_seconds, step_seconds = 0, 0.0, []
        last_eval = None
        previous_handler = _interrupt_on_sigterm()
        try:
            while self.step < t.steps:
                start = time.perf_counter()
                position = self.data.state_dict()  # to roll back a step interrupted half-way
                batch = self.data.next_batch(t.batch_size, self.env.rank, self.env.world_size)
                try:
                    stats = self.train_step(batch)
                except KeyboardInterrupt:
                    self.optimizer.zero_grad(set_to_none=True)
                    self.data.load_state_dict(position)
                    raise
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                elapsed = time.perf_counter() - start
                self.tokens_seen += tokens_per_step
                self.train_seconds += elapsed
                session_tokens += tokens_per_step
                session_seconds += elapsed
                step_seconds.append(elapsed)
                if not math.isfinite(stats["loss"]):
                    self.save()
                    raise LostLMError(f"loss became {stats['loss']} at step {self.step}; the checkpoint is saved; "
                                      "lower train.lr, raise train.warmup_steps, or set train.z_loss=1e-4")
                if self.step % t.log_every == 0 or self.step == t.steps:
                    self._log({"step": self.step, "tokens": self.tokens_seen, **stats,
                               "tok_per_s": tokens_per_step / elapsed, "time": self.train_seconds})
                if self.step % t.eval_every == 0 or self.step == t.steps:
                    last_eval = self.evaluate()
                    self._log({"step": self.step, "tokens": self.tokens_seen, "time": self.train_seconds, **last_eval})
                if (t.checkpoint_every and self.step % t.checkpoint_every == 0) or self.step == t.steps:
                    self.save()
                if progress is not None:
                    progress.update(1)
                    postfix = {"loss": f"{stats['loss']:.3f}", "lr": f"{stats['lr']:.2e}", "tok/s": f"{tokens_per_step / elapsed:.0f}"}
                    if last_eval:
                        postfix["val"] = f"{last_eval['val_loss']:.3f}"
                    progress.set_postfix(postfix)
        except KeyboardInterrupt:
            if progress is not None:
                progress.close()
            path = self.save()
            raise LostLMError(f"interrupted at step {self.step}; saved {path}; run the same command to resume") from None
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
        if progress is not None:
            progress.close()
        if last_eval is None:
            last_eval = self.evaluate()
        return self._summarise(last_eval, session_tokens, session_seconds, step_seconds)

    def _summarise(self, evaluation: dict, tokens: int, seconds: float, step_seconds: list[float]) -> dict:
        t = self.cfg.train
        summary = {"method": self.cfg.layer.method, "preset": self.cfg.model.preset, "step": self.step,
                   "tokens": self.tokens_seen, **evaluation, "parameters": parameter_breakdown(self.model),
                   "device": str(self.device), "world_size": self.env.world_size,
                   "precision": str(self.amp_dtype or torch.float32).replace("torch.", "")}
        if self.env.is_main:
            summary["unigram_ppl"] = self.unigram_perplexity()
        if tokens:
            flops = training_flops_per_step(self.model, self.cfg.data.seq_len, t.batch_size * self.cfg.data.seq_len,
                                            t.batch_size // self.micro_batch)
            steps = tokens / (t.batch_size * self.cfg.data.seq_len)
            peak = t.peak_flops or cached_peak_flops(cache_root(self.cfg.data), self.device, self.amp_dtype or torch.float32)
            achieved = flops * steps / seconds / self.env.world_size  # per device
            # The median step is robust to other processes stealing the CPU for a while.
            median_step = sorted(step_seconds)[len(step_seconds) // 2]
            summary.update({"session_tokens": tokens, "tokens_per_s": tokens / seconds,
                            "tokens_per_s_median_step": t.batch_size * self.cfg.data.seq_len / median_step,
                            "model_flops_per_s": achieved, "peak_flops_per_s": peak, "mfu": achieved / peak})
        summary["peak_memory_bytes"] = peak_memory_bytes(self.device)
        if self.env.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            from .plots import plot_run
            plot_run(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png", title=f"{summary['method']} · {summary['preset']}")
        return summary


def format_summary(summary: dict) -> str:
    """The performance block printed at the end of every run."""
    lines = [f"== {summary['method']} · preset {summary['preset']} · step {summary['step']} · {summary['device']} "
             f"x{summary['world_size']} · {summary['precision']} =="]
    lines.append(f"validation loss {summary['val_loss']:.4f}   perplexity {summary['val_ppl']:.2f}"
                 + (f"   (unigram floor {summary['unigram_ppl']:.1f})" if "unigram_ppl" in summary else ""))
    params = summary["parameters"]
    lines.append(f"trainable parameters {params['total'] / 1e6:.2f}M (linear layers {params['linear_layers'] / 1e6:.2f}M, "
                 f"embedding+head {params['embedding_and_head'] / 1e6:.2f}M)")
    if "tokens_per_s" in summary:
        lines.append(f"tokens {summary['tokens']:,} (this session {summary['session_tokens']:,})   "
                     f"tokens/s {summary['tokens_per_s']:,.0f} (median step {summary['tokens_per_s_median_step']:,.0f})   MFU {100 * summary['mfu']:.1f}% of measured "
                     f"{summary['peak_flops_per_s'] / 1e9:.0f} GFLOP/s")
    lines.append(f"peak memory {summary['peak_memory_bytes'] / 2**20:,.0f} MiB "
                 f"({'max_memory_allocated' if summary['device'].startswith('cuda') else 'process peak RSS'})")
    return "\n".join(lines)

