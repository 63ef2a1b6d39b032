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

import contextlib
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint as ckpt_io
from . import methods, rundir
from .runlock import RunLock
from .validation import check_threads
from .build import build_model
from .configs import Config
from .data import build_data, checkpoint_position, position_of_rank
from .diagnostics import Diagnostics, spike_warning
from .errors import LostLMError
from .evaluate import evaluate_loss, unigram_perplexity
from .loggers import Loggers
from .losses import sequence_means, z_loss_from_lse
from .model import set_activation_checkpointing
from .optim import build_optimizer, lr_at
from .parallel import wrap_for_training
from .reweight import sample_weights, weight_stats
from .runtime import autocast_context, autocast_dtype, device_kind, init_distributed, precision_name, release_freed_memory, resolve_device
from .summary import Session, build_summary, format_summary, write_summary

__all__ = ["Trainer", "format_summary"]


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
    """SIGTERM (a scheduler's pre-emption, ``kill``) and SIGINT (Ctrl-C) only set a flag: the loop
    saves at the next consistent point (after the whole step, its logging and the evaluation in
    progress) and stops, so the checkpoint is one that an uninterrupted run also passes through.
    A second signal exits at once (status 128+signal): every file is written atomically, so
    nothing is corrupted, and the run resumes from its last checkpoint."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def handle(self, signum, frame) -> None:
        if self.signum is not None:
            os.write(2, f"error: second {signal.Signals(signum).name}: stopped at once; resume from the last checkpoint\n".encode())
            os._exit(128 + signum)
        self.signum = signum

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # handlers can be set there only
            self.previous = {s: signal.signal(s, self.handle) for s in STOP_SIGNALS}

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}


class Trainer:
    """Builds everything from a :class:`Config` and runs ``train()``; see the module docstring."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        t = cfg.train
        refusal = methods.get(cfg.layer.method).no_fsdp
        if t.parallel == "fsdp" and refusal:
            raise LostLMError(f"layer.method={cfg.layer.method} {refusal}")
        check_threads(t.threads)
        if t.threads:
            torch.set_num_threads(t.threads)
        if t.release_freed_memory:
            release_freed_memory()
        self.env = init_distributed(device_kind(t.device))
        self.device = resolve_device(t.device, self.env.local_rank)
        self._set_batch_sizes()
        self.run_dir = Path(t.out_dir)
        # One writer per run folder, held for the trainer's life (released by close() / at exit).
        self.lock = RunLock(self.run_dir).acquire() if self.env.is_main else None
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the data prefetch thread and release the run folder (the trainer cannot save any more)."""
        data = getattr(self, "data", None)  # absent when building failed before the data existed
        if data is not None and hasattr(data, "close"):
            data.close()
        if self.lock is not None:
            self.lock.release()

    def _build(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.amp_dtype = autocast_dtype(t.precision, self.device)
        self._autocast = autocast_context(self.device, self.amp_dtype)

        torch.manual_seed(t.seed)
        self.data = build_data(cfg.data, t.seed)
        self.model, self.conversion = build_model(cfg, self.data.vocab_size)
        self.model.to(self.device)
        self.step = 0
        self.tokens_seen = 0
        self.train_seconds = 0.0
        self.bad_steps = 0  # consecutive skipped (non-finite) steps, part of the checkpoint
        self._saved_step = None
        self.stop = StopFlag()
        self._optimizer_state = None
        warmup = t.warmup_steps if t.warmup_steps is not None else max(1, t.steps // 10)  # as optim.lr_at
        self.diag = Diagnostics(self.model, t, warmup, t.diagnostics)
        self._resume_or_start()  # weights now, the optimizer's state once it exists
        set_activation_checkpointing(self.model, t.activation_checkpointing)
        self.loss_chunk = t.loss_chunk_tokens if t.loss_impl == "chunked" else 0
        self.train_model = wrap_for_training(self.model, self.env, self.device, t.parallel, t.compile)
        # Built after wrapping: FSDP2 replaces the parameters by sharded DTensors.
        self.optimizer = build_optimizer(self.model, cfg)
        if self._optimizer_state is not None:
            self._load_optimizer_state(*self._optimizer_state)
            self._optimizer_state = None
        # metrics.jsonl plus the trackers of train.loggers, written by rank 0 only
        self.loggers = Loggers(self.run_dir, t.loggers, cfg.to_dict(), enabled=self.env.is_main)

    # -- set-up ---------------------------------------------------------------------------

    def _set_batch_sizes(self) -> None:
        t, world = self.cfg.train, self.env.world_size
        if t.batch_size % world:
            raise LostLMError(f"train.batch_size={t.batch_size} is not divisible by the {world} processes; "
                              "pick a multiple of the world size")
        self.local_batch = t.batch_size // world
        self.micro_batch = t.micro_batch_size or self.local_batch
        if self.local_batch % self.micro_batch:
            raise LostLMError(f"train.micro_batch_size={self.micro_batch} does not divide the per-process batch "
                              f"{self.local_batch} (batch_size {t.batch_size} / {world} processes)")
        self.accumulation = self.local_batch // self.micro_batch

    def _resume_or_start(self) -> None:
        latest = rundir.checkpoint_to_resume(self.run_dir, self.cfg)
        if latest is not None:
            self._restore(latest)
        if self.env.world_size > 1:
            dist.barrier()  # every rank has read config.yaml and the checkpoint before rank 0 rewrites them
        if self.env.is_main:
            rundir.write_run_files(self.run_dir, self.cfg, self.data.tokenizer, self.step)
        if self.env.world_size > 1:
            dist.barrier()

    def _restore(self, path: Path) -> None:
        state = ckpt_io.read_state(path)
        bad = [k for k, kind in (("data", dict), ("tokens", int)) if not isinstance(state.get(k), kind)]
        if bad:
            raise LostLMError(f"checkpoint {path}: state.json has no valid {bad[0]!r} entry; it is damaged or "
                              "not a training checkpoint; move it away to fall back to the previous one")
        ckpt_io.load_weights_into(self.model, ckpt_io.load_model_state(path), path)
        optimizer_state, rng = ckpt_io.load_optimizer_state(path, state)
        self._optimizer_state = (optimizer_state, path)  # loaded after wrapping, in __init__
        ckpt_io.restore_rng(rng)
        try:
            self.data.load_state_dict(position_of_rank(state["data"], self.env.rank, self.env.world_size))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise LostLMError(f"checkpoint {path}: its data position does not fit this data ({exc.__class__.__name__}); "
                              "it is damaged or from another corpus") from None
        self.diag.spikes.load_state_dict(state.get("loss_spikes"), source=path)
        self.step = state["step"]
        self.tokens_seen = state["tokens"]
        self.train_seconds = state.get("train_seconds", 0.0)
        self.bad_steps = state.get("bad_steps", 0)
        self._saved_step = self.step

    def _load_optimizer_state(self, optimizer_state: dict, path: Path) -> None:
        try:
            if self.cfg.train.parallel == "fsdp":
                from .parallel import load_full_optimizer_state
                load_full_optimizer_state(self.model, self.optimizer, optimizer_state)
            else:
                self.optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
            raise LostLMError(f"checkpoint {path} has optimizer state that does not fit ({exc}); "
                              "it was made with a different layer.method or model") from None

    # -- one step ---------------------------------------------------------------------------

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
        for group in self.optimizer.param_groups:  # an optional per-group "lr_scale" (bench/spike_60m.py)
            group["lr"] = lr * group.get("lr_scale", 1.0)
        batch = batch.to(self.device, non_blocking=True)
        loss_sum, z_sum, spread = 0.0, 0.0, {}
        self.diag.start_step(self.step)
        for index, micro in enumerate(batch.split(self.micro_batch)):
            last = index == self.accumulation - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.train_model, "no_sync") else self.train_model.no_sync()
            with sync:
                global_losses, weights, z = self._micro_step(micro[:, :-1], micro[:, 1:])
            loss_sum += global_losses.mean().item()
            z_sum += z
            if self.cfg.reweight.strategy != "uniform":
                spread = weight_stats(weights)
        self.diag.after_backward()  # pre-clip group norms
        grad_norm = self._clip_gradients()
        if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
            # Checked before the update: a non-finite step changes no weight and no optimizer
            # state; the batch is consumed and the step counted, so resume stays exact.
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.bad_steps += 1
            return {"loss": loss_sum / self.accumulation, "lr": lr, "grad_norm": grad_norm, "skipped": 1}
        self.bad_steps = 0
        self.diag.before_update()
        self.optimizer.step()
        self.diag.after_update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        out = {"loss": loss_sum / self.accumulation, "lr": lr, "grad_norm": grad_norm, **spread}
        if self.cfg.train.z_loss > 0:
            out["z_loss"] = z_sum / self.accumulation
        return out

    def _micro_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Forward and backward of one micro-batch: (global per-sequence losses, their weights, z-loss)."""
        with_lse = self.cfg.train.z_loss > 0
        with self._autocast():  # per-token losses and log-sum-exp, never all logits when chunked
            per_token, lse = self.train_model(inputs, targets, chunk=self.loss_chunk, with_lse=with_lse)
        seq_loss = sequence_means(per_token, targets)
        global_losses = self._gather(seq_loss.detach())
        weights = sample_weights(global_losses, self.cfg.reweight, self.step)
        start = self.env.rank * seq_loss.numel()  # this process's rows, by *global* rank
        local_weights = weights[start:start + seq_loss.numel()]
        loss = (local_weights * seq_loss).sum() * self.env.world_size
        z_value = 0.0
        if with_lse:
            z = z_loss_from_lse(lse, targets)
            loss = loss + self.cfg.train.z_loss * z
            z_value = z.item()
        (loss / self.accumulation).backward()
        return global_losses, weights, z_value

    def _clip_gradients(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    # -- evaluation and checkpoints ---------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Token-weighted validation loss over the whole held-out set (all processes)."""
        batches = self.data.val_batches(self.micro_batch, self.env.rank, self.env.world_size)
        if self.env.world_size > 1 and self.cfg.train.parallel == "fsdp":
            from .parallel import even_batches  # FSDP2: every forward is collective
            batches = even_batches(batches, self.device)
        return evaluate_loss(self.train_model, batches, self.device, self._autocast, self.env.world_size > 1,
                             chunk=self.loss_chunk)

    def save(self) -> Path | None:
        """Checkpoint this step (once: a step already saved is not written again)."""
        if self._saved_step == self.step:  # the same decision on every process (the gather is collective)
            return self.run_dir / "checkpoints" / f"step_{self.step:08d}"
        model_state, optimizer_state = self._state_dicts()
        data_position = checkpoint_position(self.data, self.env.world_size)
        if not self.env.is_main:
            self._saved_step = self.step
            return None
        state = {"data": data_position, "tokens": self.tokens_seen, "train_seconds": self.train_seconds,
                 "bad_steps": self.bad_steps, "config": self.cfg.to_dict(), "world_size": self.env.world_size,
                 "loss_spikes": self.diag.spikes.state_dict(),
                 "precision": precision_name(self.cfg.train.precision, self.cfg.train.device)}
        path = ckpt_io.save_checkpoint(self.run_dir, self.step, model_state, optimizer_state, state,
                                       keep=self.cfg.train.keep_checkpoints)
        self._saved_step = self.step
        return path

    def _state_dicts(self):
        if self.cfg.train.parallel == "fsdp":  # name-keyed optimizer state, also for one process
            from .parallel import gathered_state_dicts
            return gathered_state_dicts(self.model, self.optimizer)
        return self.model.state_dict(), self.optimizer.state_dict()

    # -- the loop ---------------------------------------------------------------------------

    def _log(self, record: dict) -> None:
        self.loggers.log(record)

    def train(self) -> dict:
        """Run to ``train.steps``, then evaluate, write summary.json and curves.png."""
        try:
            return self._train()
        finally:
            self.close()

    def _train(self) -> dict:
        progress = self._progress_bar()
        session, last_eval = Session(), None
        self.stop.install()
        try:
            while self.step < self.cfg.train.steps:
                stats, elapsed = self._timed_step(session)
                last_eval = self._after_step(stats, elapsed, last_eval, progress)
                if self._stop_requested():
                    path = self.save()
                    name = signal.Signals(self.stop.signum or signal.SIGTERM).name
                    raise LostLMError(f"interrupted at step {self.step} ({name}); saved {path}; run the same command to resume")
        except KeyboardInterrupt:  # raised by code, or off the main thread where no handler is set
            path = self.save()
            raise LostLMError(f"interrupted at step {self.step}; saved {path}; run the same command to resume") from None
        finally:
            self.stop.restore()
            if progress is not None:
                progress.close()
        if last_eval is None:
            last_eval = self.evaluate()
        return self._summarise(last_eval, session)

    def _stop_requested(self) -> bool:
        """Whether a stop signal arrived (on any process: all stop at the same step)."""
        flag = self.stop.signum is not None
        if self.env.world_size > 1:
            value = torch.tensor([int(flag)], device=self.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(value)
            flag = bool(value.item())
        return flag

    def _progress_bar(self):
        t = self.cfg.train
        if not (self.env.is_main and t.progress and self.step < t.steps):
            return None
        from tqdm.auto import tqdm
        return tqdm(total=t.steps, initial=self.step, desc=f"{self.cfg.layer.method}", unit="step", dynamic_ncols=True)

    def _timed_step(self, session: Session) -> tuple[dict, float]:
        """One optimizer step on the next batch; a step interrupted half-way is rolled back."""
        t = self.cfg.train
        tokens_per_step = t.batch_size * self.cfg.data.seq_len
        start = time.perf_counter()
        position = self.data.state_dict()
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
        session.add(tokens_per_step, elapsed)
        if stats.get("skipped"):
            self._non_finite_step(stats)
        return stats, elapsed

    def _non_finite_step(self, stats: dict) -> None:
        """A skipped step: warn, or stop (without saving) after train.max_bad_steps in a row."""
        what = f"loss {stats['loss']}, gradient norm {stats['grad_norm']}"
        if self.bad_steps > self.cfg.train.max_bad_steps:
            last = ckpt_io.latest_checkpoint(self.run_dir)
            raise LostLMError(f"non-finite {what} for {self.bad_steps} steps in a row up to step {self.step} "
                              f"(train.max_bad_steps={self.cfg.train.max_bad_steps}); stopped without saving, "
                              f"the last good checkpoint ({last.name if last else 'none'}) is kept; likely causes: "
                              "train.lr too high or train.warmup_steps too short, bf16 overflow (train.precision=fp32, "
                              "train.z_loss=1e-4), bad input data, or damaged weights")
        if self.env.is_main:
            print(f"warning: step {self.step} skipped: non-finite {what} ({self.bad_steps} in a row)", file=sys.stderr)

    def _after_step(self, stats: dict, elapsed: float, last_eval: dict | None, progress) -> dict | None:
        """Log, evaluate and checkpoint when due; returns the latest evaluation."""
        t = self.cfg.train
        tokens_per_step = t.batch_size * self.cfg.data.seq_len
        final = self.step == t.steps
        watched, spike = self.diag.finish_step(self.step, stats["loss"], stats["grad_norm"])
        if self.step % t.log_every == 0 or final:
            self._log({"step": self.step, "tokens": self.tokens_seen, **stats,
                       "tok_per_s": tokens_per_step / elapsed, "time": self.train_seconds, **watched})
        if spike is not None:
            self._loss_spike(spike)
        if self.step % t.eval_every == 0 or final:
            last_eval = self.evaluate()
            self._log({"step": self.step, "tokens": self.tokens_seen, "time": self.train_seconds, **last_eval})
        if ((t.checkpoint_every and self.step % t.checkpoint_every == 0) or final):
            self.save()
        if progress is not None:
            progress.update(1)
            postfix = {"loss": f"{stats['loss']:.3f}", "lr": f"{stats['lr']:.2e}", "tok/s": f"{tokens_per_step / elapsed:.0f}"}
            if last_eval:
                postfix["val"] = f"{last_eval['val_loss']:.3f}"
            progress.set_postfix(postfix)
        return last_eval

    def _loss_spike(self, event: dict) -> None:
        """Log a loss-spike event; warn when an episode starts (docs/results.md, 60m spike)."""
        self._log({**event, "tokens": self.tokens_seen, "time": self.train_seconds})
        if event["first"] and self.env.is_main:
            print(spike_warning(event, self.diag.spikes.threshold), file=sys.stderr)

    def _summarise(self, evaluation: dict, session: Session) -> dict:
        unigram = None
        if self.env.is_main:
            unigram = unigram_perplexity(self.data.val_batches(self.micro_batch, 0, 1), self.data.vocab_size)
        summary = build_summary(self.cfg, self.model, self.device, self.env.world_size, self.amp_dtype,
                                {"step": self.step, "tokens": self.tokens_seen}, evaluation, self.micro_batch,
                                session, unigram)
        summary["loss_spikes"] = self.diag.spikes.count
        summary["unstable_spikes"] = self.diag.spikes.unstable
        if self.env.is_main:
            write_summary(self.run_dir, summary)
            self.loggers.summary(summary)
            self.loggers.close()
        return summary
