"""The method registry: one place that says what a ``layer.method`` is.

A :class:`Method` maps a name to everything the rest of the package needs to know about a
parametrisation of the targeted projections:

* ``build``        the layer that replaces an ``nn.Linear`` (None: the projection stays dense),
* ``mergeable``    whether the layer equals one dense matrix (export, conversion error),
* ``optimizer``    which optimizer trains it (``adamw``, or ``galore`` for GaLore's projection),
* ``no_fsdp``      why FSDP cannot shard it (None: it can),
* ``parameters`` / ``flops_per_token`` / ``rebuild_flops`` / ``activation_bytes``
                   its per-layer cost formulas for one m×n projection (the analytic estimate;
                   tests check them against the real layers' ``trainable_parameters()`` and
                   ``flops_per_token()``).

Adding a parametrisation is a layer class plus one :func:`register` call (see
tests/test_methods.py, which registers a toy method and trains it). The names live in
:mod:`lostlm.registry`, below :mod:`lostlm.configs`, so configs can validate ``layer.method``
without importing this module. The layers are described in ``docs/method.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import registry
from .errors import LostLMError
from .layers import LOSTLinear, LowRankLinear, SLTrainLinear

if TYPE_CHECKING:
    from .configs import LayerConfig

# (linear to replace, layer config, rank, generator, init std) -> replacement layer
Builder = Callable[[nn.Linear, "LayerConfig", int, "torch.Generator | None", float], nn.Module]
# (out m, in n, rank, layer config) -> a count
Formula = Callable[[int, int, int, "LayerConfig"], int]


def _always(layer: LayerConfig) -> bool:
    return True


def _no_extra_activations(m: int, n: int, rank: int, layer: LayerConfig, c: int) -> tuple[int, int]:
    return 0, 0


@dataclass(frozen=True)
class Method:
    """What one ``layer.method`` is; see the module docstring for the fields."""

    name: str
    parameters: Formula
    """Trainable numbers of one m×n projection (no bias: LLaMA has none)."""
    flops_per_token: Formula
    """Forward FLOPs of one m×n projection for one token (2 per multiply-add)."""
    build: Builder | None = None
    """The replacement of one ``nn.Linear``; None for dense methods (the layer is kept)."""
    mergeable: Callable[[LayerConfig], bool] = _always
    """True when the built layer equals one dense matrix (``merged_weight()`` works)."""
    optimizer: str = "adamw"
    """The optimizer :func:`lostlm.optim.build_optimizer` uses: ``adamw`` or ``galore``."""
    no_fsdp: str | None = None
    """Why FSDP cannot shard this method (None: it can)."""
    rebuild_flops: Formula | None = None
    """Forward FLOPs spent once per forward (not per token), e.g. SLTrain's rebuild of W."""
    activation_bytes: Callable[[int, int, int, LayerConfig, int], tuple[int, int]] = _no_extra_activations
    """(bytes per token, bytes per micro-batch) saved for backward beyond a dense projection's,
    with ``c`` bytes per compute number (2 under bf16 autocast, 4 in fp32)."""

    @property
    def dense(self) -> bool:
        """The targeted projections stay ``nn.Linear`` (full, galore)."""
        return self.build is None


def register(method: Method, *, replace: bool = False) -> Method:
    """Make ``method`` a valid ``layer.method`` everywhere (configs, conversion, costs, optimizer)."""
    if registry.lookup(method.name) is not None and not replace:
        raise LostLMError(f"layer.method={method.name!r} is already registered; pass replace=True to redefine it")
    registry.add(method.name, method)
    return method


def unregister(name: str) -> None:
    """Remove a registered method (tests that register a temporary one)."""
    registry.remove(name)


def get(name: str) -> Method:
    """The registered method ``name``; a one-line error listing the valid names otherwise."""
    method = registry.lookup(name)
    if method is None:
        raise LostLMError(f"layer.method={name!r} is not known; use one of {', '.join(registry.names())}")
    return method


def names() -> tuple[str, ...]:
    return registry.names()


# -- the built-in methods ---------------------------------------------------------------------


def _rank(rank: int, m: int, n: int) -> int:
    return min(rank, m, n)


def _dense_parameters(m: int, n: int, rank: int, layer: LayerConfig) -> int:
    return m * n


def _dense_flops(m: int, n: int, rank: int, layer: LayerConfig) -> int:
    return 2 * m * n


def _lowrank_parameters(m: int, n: int, rank: int, layer: LayerConfig) -> int:
    return _rank(rank, m, n) * (m + n)


def _lowrank_flops(m: int, n: int, rank: int, layer: LayerConfig) -> int:
    return 2 * _rank(rank, m, n) * (m + n)


def _lost_channels(m: int, n: int, layer: LayerConfig) -> int:
    return max(1, math.floor(layer.density * (n if layer.sparse_axis == "input" else m)))


def _lost_parameters(m: int, n: int, rank: int, layer: LayerConfig) -> int:
    k = _lost_channels(m, n, layer)
    return _rank(rank, m, n) * (m + n) + k * (m if layer.sparse_axis == "input" else n)


def _lost_flops(m: int, n: int, rank: int, layer: LayerConfig) -> int:
    return 2 * _lost_parameters(m, n, rank, layer)  # low-rank GEMMs + the k sparse channels


def _sltrain_parameters(m: int, n: int, rank: int, layer: LayerConfig) -> int:
    return _rank(rank, m, n) * (m + n) + max(1, math.floor(layer.density * m * n))


def _sltrain_rebuild(m: int, n: int, rank: int, layer: LayerConfig) -> int:
    return 2 * _rank(rank, m, n) * m * n  # W = A B (+ S) rebuilt once per forward


def _rank_activations(factor: int) -> Callable[[int, int, int, LayerConfig, int], tuple[int, int]]:
    """The rank-r intermediate, kept ``factor`` times (2 with SiLU: its input and output)."""
    return lambda m, n, rank, layer, c: (factor * c * _rank(rank, m, n), 0)


def _lost_activations(m: int, n: int, rank: int, layer: LayerConfig, c: int) -> tuple[int, int]:
    r = _rank(rank, m, n)
    per_token = (1 if layer.activation == "identity" else 2) * c * r
    if layer.sparse_axis == "input":
        k = _lost_channels(m, n, layer)
        # the k gathered inputs, and the mixed weight [γB ; (1-γ)W_sᵀ] of the single output GEMM
        return per_token + c * k, c * m * (r + k)
    return per_token, c * m * r  # γB


def _sltrain_activations(m: int, n: int, rank: int, layer: LayerConfig, c: int) -> tuple[int, int]:
    return 0, c * m * n  # the rebuilt dense W


def _build_lost(linear: nn.Linear, layer: LayerConfig, rank: int, generator, init_std: float) -> nn.Module:
    return LOSTLinear(linear.weight.data, rank, density=layer.density, gamma=layer.gamma, activation=layer.activation,
                      channel_score=layer.channel_score, sparse_axis=layer.sparse_axis, sparse_init=layer.sparse_init,
                      svd_window=layer.svd_window, svd_dtype=layer.svd_dtype, bias=_bias(linear), generator=generator)


def _build_lowrank(linear: nn.Linear, layer: LayerConfig, rank: int, generator, init_std: float) -> nn.Module:
    return LowRankLinear(linear.weight.data, rank, activation="identity", bias=_bias(linear), generator=generator)


def _build_lowrank_svd(linear: nn.Linear, layer: LayerConfig, rank: int, generator, init_std: float) -> nn.Module:
    return LowRankLinear(linear.weight.data, rank, init="svd", activation="identity", bias=_bias(linear),
                         svd_dtype=layer.svd_dtype)


def _build_cola(linear: nn.Linear, layer: LayerConfig, rank: int, generator, init_std: float) -> nn.Module:
    return LowRankLinear(linear.weight.data, rank, activation="silu", bias=_bias(linear), generator=generator)


def _build_sltrain(linear: nn.Linear, layer: LayerConfig, rank: int, generator, init_std: float) -> nn.Module:
    return SLTrainLinear(linear.weight.data, rank, density=layer.density, alpha=layer.sltrain_alpha, bias=_bias(linear),
                         generator=generator)


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return linear.bias.data if linear.bias is not None else None


# Registration order is the order of ``configs.METHODS``, ``lostlm estimate`` and ``--method``.
register(Method("full", _dense_parameters, _dense_flops))
register(Method("lowrank", _lowrank_parameters, _lowrank_flops, build=_build_lowrank,
                activation_bytes=_rank_activations(1)))
register(Method("lowrank-svd", _lowrank_parameters, _lowrank_flops, build=_build_lowrank_svd,
                activation_bytes=_rank_activations(1)))
register(Method("cola", _lowrank_parameters, _lowrank_flops, build=_build_cola, mergeable=lambda layer: False,
                activation_bytes=_rank_activations(2)))
# SLTrain multiplies by the rebuilt dense W: per token it costs a dense GEMM, plus the rebuild.
register(Method("sltrain", _sltrain_parameters, _dense_flops, build=_build_sltrain, rebuild_flops=_sltrain_rebuild,
                activation_bytes=_sltrain_activations))
register(Method("lost", _lost_parameters, _lost_flops, build=_build_lost,
                mergeable=lambda layer: layer.activation == "identity", activation_bytes=_lost_activations))
register(Method("galore", _dense_parameters, _dense_flops, optimizer="galore",
                no_fsdp="needs whole gradient matrices for its projection; use train.parallel=ddp with GaLore"))
