"""Training diagnostics for metrics.jsonl: where a loss spike starts.

At every log step (``train.diagnostics``, on by default) the trainer adds

* ``grad_norms``     {group: ‖g‖₂} of the raw (pre-clip) gradient of each parameter group;
  the root-sum-square over the groups is the record's ``grad_norm``;
* ``update_ratios``  {group: ‖ΔW‖₂ / ‖W‖₂} of the optimizer step just taken (W before it);
* ``max_logit``      the largest logit of the step's last micro-batch (final-norm hidden
  states captured by a forward hook, times the LM head, chunked, no grad);

and at every step after warm-up a loss spike (training loss more than :data:`SPIKE_NATS`
above the running minimum of all earlier steps) is written as an event record
``{"step", "event": "loss_spike", "loss", "running_min", "grad_norm", "grad_norm_ratio",
"unstable"}``, counted in ``summary.json`` (``loss_spikes``; ``unstable_spikes`` for the
unstable ones) and warned about on stderr when an episode starts.

A spike is **unstable** when the step's pre-clip gradient norm is at least
:data:`GRAD_JUMP` times the median of the previous :data:`GRAD_WINDOW` steps' norms, and a
**hard batch** otherwise. Why two kinds: over a small batch (4096 tokens at 60m) the loss of
one batch differs from the next by a few tenths of a nat, so "0.5 nats above the running
minimum" also fires on a hard batch that follows an easy one, for full-rank training as much as
for LOST (docs/results.md, the 60m spike). An optimisation instability moves the weights, and
its gradient norm jumps with the loss; a hard batch leaves the gradient norm where it was. In
the 60m runs of ``bench/results/spike-60m``, LOST's steps where loss and gradient norm jumped
together were at ×3.1–×4.6 the recent median (×52 in the 2-warm-up-step run of
docs/results.md), the hard batches at ×0.6–×0.9, and steps without a spike at most ×1.3;
:data:`GRAD_JUMP` = 2 sits between.

Groups (:func:`group_of`, from parameter names): ``embed``, ``head``, ``norm``, and per
projection kind ``attn.q`` ``attn.k`` ``attn.v`` ``attn.o`` ``mlp.gate`` ``mlp.up``
``mlp.down`` (summed over the decoder blocks), split for factorised methods into the parts
``.down`` / ``.up`` (the low-rank factors A, B), ``.sparse`` (LOST's channel block, SLTrain's
values) and ``.bias``; a dense projection's weight is the kind alone.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable

import torch
from torch import nn

from .errors import LostLMError

SPIKE_NATS = 0.5
"""A loss spike: a training loss more than this many nats above the running minimum."""
GRAD_JUMP = 2.0
"""An unstable spike: its gradient norm is at least this many times the recent median."""
GRAD_WINDOW = 20
"""How many earlier steps' gradient norms the recent median is taken over."""

_KINDS = {"q_proj": "attn.q", "k_proj": "attn.k", "v_proj": "attn.v", "o_proj": "attn.o",
          "gate_proj": "mlp.gate", "up_proj": "mlp.up", "down_proj": "mlp.down"}
_PARTS = {"weight": "", "lowrank_down": ".down", "lowrank_up": ".up", "sparse_weight": ".sparse",
          "sparse_values": ".sparse", "bias": ".bias"}
_PROJ = re.compile(r"(?:^|\.)(" + "|".join(_KINDS) + r")\.(\w+)$")


def group_of(name: str) -> str:
    """The diagnostics group of a parameter name (see the module docstring)."""
    match = _PROJ.search(name)
    if match:
        kind, part = _KINDS[match.group(1)], match.group(2)
        return kind + _PARTS.get(part, "." + part)
    if "embed" in name:
        return "embed"
    if "lm_head" in name:
        return "head"
    if "norm" in name:
        return "norm"
    return "other"


def _groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    seen = set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:  # tied weights once
            seen.add(id(p))
            groups.setdefault(group_of(name), []).append((name, p))
    return groups


def _sq_norm(t: torch.Tensor) -> float:
    value = torch.linalg.vector_norm(t.detach().float()) ** 2
    if hasattr(value, "full_tensor"):  # a sharded DTensor (FSDP2): collective, same on every rank
        value = value.full_tensor()
    return float(value)


def grad_norms(model: nn.Module) -> dict[str, float]:
    """{group: ‖gradient‖₂} over the parameters that have a gradient."""
    out = {}
    for group, params in _groups(model).items():
        grads = [p.grad for _, p in params if p.grad is not None]
        if grads:
            out[group] = math.sqrt(sum(_sq_norm(g) for g in grads))
    return out


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every trainable parameter (the weights before an update)."""
    return {name: p.detach().clone() for params in _groups(model).values() for name, p in params}


def update_ratios(model: nn.Module, before: dict[str, torch.Tensor]) -> dict[str, float]:
    """{group: ‖W_after − W_before‖₂ / ‖W_before‖₂} (0 where the weights were all zero)."""
    out = {}
    for group, params in _groups(model).items():
        delta = sum(_sq_norm(p.detach() - before[name]) for name, p in params)
        size = sum(_sq_norm(before[name]) for name, _ in params)
        out[group] = math.sqrt(delta / size) if size > 0 else 0.0
    return out


class MaxLogitProbe:
    """Captures the final-norm output of armed forwards and returns the largest logit.

    ``model`` must expose ``lm_head`` and ``model.norm`` (the LLaMA layout of this package and
    of transformers); otherwise :attr:`available` is False and nothing is recorded."""

    def __init__(self, model: nn.Module, chunk_tokens: int = 1024) -> None:
        self.head = getattr(model, "lm_head", None)
        norm = getattr(getattr(model, "model", None), "norm", None)
        self.available = isinstance(self.head, nn.Module) and isinstance(norm, nn.Module)
        self.chunk = max(1, chunk_tokens)
        self.armed = False
        self.hidden: torch.Tensor | None = None
        self._handle = norm.register_forward_hook(self._capture) if self.available else None

    def _capture(self, module, inputs, output) -> None:
        if self.armed and torch.is_grad_enabled():  # training forwards only, not evaluation
            self.hidden = output.detach()

    def arm(self) -> None:
        self.armed = self.available

    @torch.no_grad()
    def take(self) -> float | None:
        """The largest logit of the last captured forward (then disarmed and freed)."""
        hidden, self.hidden, self.armed = self.hidden, None, False
        if hidden is None:
            return None
        weight = self.head.weight.detach()
        if hasattr(weight, "full_tensor"):  # FSDP2 shards the head: gather it (collective, every rank is here)
            weight = weight.full_tensor()
        weight = weight.float()
        flat = hidden.reshape(-1, hidden.shape[-1]).float()
        best = max(float((rows @ weight.t()).max()) for rows in flat.split(self.chunk))
        return best

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class SpikeDetector:
    """Loss spikes after warm-up: a step (1-based, counted after it is taken) whose loss exceeds
    the running minimum of all earlier finite losses by more than ``threshold`` nats; each one
    classified unstable or hard batch by its gradient norm (module docstring)."""

    def __init__(self, warmup_steps: int, threshold: float = SPIKE_NATS) -> None:
        self.warmup = warmup_steps
        self.threshold = threshold
        self.running_min = math.inf
        self.count = 0
        self.unstable = 0
        self.in_spike = False
        self.recent_grad_norms: list[float] = []

    def update(self, step: int, loss: float, grad_norm: float | None = None) -> dict | None:
        """Feed one step's loss (and pre-clip gradient norm); returns the event record of a spike
        step, else None. Without gradient norms every spike counts as unstable."""
        if not math.isfinite(loss):
            return None
        event = None
        norm_known = grad_norm is not None and math.isfinite(grad_norm)
        if step > self.warmup and loss > self.running_min + self.threshold:
            ratio = None
            if norm_known and self.recent_grad_norms:
                ratio = grad_norm / max(statistics.median(self.recent_grad_norms), 1e-12)
            unstable = ratio is None or ratio >= GRAD_JUMP
            self.count += 1
            self.unstable += unstable
            event = {"step": step, "event": "loss_spike", "loss": loss, "running_min": self.running_min,
                     "grad_norm": grad_norm, "grad_norm_ratio": ratio, "unstable": unstable,
                     "first": not self.in_spike}
            self.in_spike = True
        else:
            self.in_spike = False
        self.running_min = min(self.running_min, loss)
        if norm_known:
            self.recent_grad_norms = (self.recent_grad_norms + [float(grad_norm)])[-GRAD_WINDOW:]
        return event

    def state_dict(self) -> dict:
        return {"running_min": self.running_min if math.isfinite(self.running_min) else None,
                "count": self.count, "unstable": self.unstable, "in_spike": self.in_spike,
                "recent_grad_norms": list(self.recent_grad_norms)}

    def load_state_dict(self, state: dict | None, source: object = "state") -> None:
        """Restore from a checkpoint's state.json (``source`` names it in the error of a damaged
        record). Checkpoints made before the classification have no gradient history: the first
        spikes after such a resume count as unstable."""
        if not state:
            return
        try:
            value = state.get("running_min")
            running_min = math.inf if value is None else float(value)
            count = int(state.get("count", 0))
            unstable = int(state.get("unstable", count))
            norms = [float(v) for v in state.get("recent_grad_norms") or []]
        except (TypeError, ValueError, AttributeError) as exc:
            raise LostLMError(f"checkpoint {source}: its loss_spikes record is damaged ({exc}); "
                              "move it away to fall back to the previous one") from None
        self.running_min, self.count, self.unstable = running_min, count, unstable
        self.in_spike = bool(state.get("in_spike", False))
        self.recent_grad_norms = [v for v in norms if math.isfinite(v)][-GRAD_WINDOW:]


def spike_warning(event: dict, threshold: float) -> str:
    """The one-line stderr warning for the first step of a spike episode, with what to do."""
    ratio = event["grad_norm_ratio"]
    jump = "" if ratio is None else f", gradient norm {ratio:.1f}x its recent median"
    head = (f"warning: loss spike at step {event['step']}: loss {event['loss']:.3f} is more than {threshold} "
            f"nats above the running minimum {event['running_min']:.3f}{jump}")
    if event["unstable"]:
        return (f"{head}; unstable: if it recurs, lower train.lr or lengthen train.warmup_steps "
                "(see metrics.jsonl grad_norms/update_ratios)")
    return (f"{head}; likely a hard batch, not instability (the gradient norm did not jump); "
            "a larger train.batch_size smooths the loss")


def _json_safe(value):
    """``value`` with every non-finite float (nested in dicts) replaced by None."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Diagnostics:
    """What the trainer calls around one step (``train.diagnostics`` off: group norms, update
    ratios and the max logit are skipped; spike detection always runs, it costs nothing)."""

    def __init__(self, model: nn.Module, train_cfg, warmup_steps: int, enabled: bool) -> None:
        self.model = model
        self.cfg = train_cfg
        self.enabled = enabled
        self.probe = MaxLogitProbe(model, train_cfg.loss_chunk_tokens) if enabled and not train_cfg.compile else None
        self.spikes = SpikeDetector(warmup_steps)
        self.active = False
        self.record: dict = {}
        self._before: dict[str, torch.Tensor] | None = None

    def start_step(self, step: int) -> None:
        """Before step ``step`` (0-based): watch it when it will be logged."""
        number = step + 1
        self.active = self.enabled and (number % self.cfg.log_every == 0 or number == self.cfg.steps)
        self.record = {}
        if self.active and self.probe is not None:
            self.probe.arm()

    def after_backward(self) -> None:
        if self.active:
            self.record["grad_norms"] = grad_norms(self.model)

    def before_update(self) -> None:
        if self.active:
            self._before = snapshot(self.model)

    def after_update(self) -> None:
        if self._before is not None:
            self.record["update_ratios"] = update_ratios(self.model, self._before)
            self._before = None

    def finish_step(self, step: int, loss: float, grad_norm: float | None = None) -> tuple[dict, dict | None]:
        """(fields for the step's log record, a loss-spike event or None) after step ``step`` (1-based)."""
        record, self.record = self.record, {}
        if self.probe is not None and self.active:
            value = self.probe.take()
            if value is not None:
                record["max_logit"] = value
        record = _json_safe(record)  # a skipped (non-finite) step: null, metrics.jsonl stays strict JSON
        self.active = False
        return record, self.spikes.update(step, loss, grad_norm)


def spike_episodes(losses: Iterable[tuple], warmup_steps: int, threshold: float = SPIKE_NATS) -> list[dict]:
    """The spike events of a whole run after the fact (metrics.jsonl): ``[(step, loss), ...]`` or
    ``[(step, loss, grad_norm), ...]`` (the latter also classifies each spike)."""
    detector = SpikeDetector(warmup_steps, threshold)
    return [e for row in losses if (e := detector.update(*row)) is not None]
