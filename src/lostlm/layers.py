"""LOST and the baseline parametrisations of a linear layer ``y = x Wᵀ``, one class each.

Every class takes ``W0`` (out × in, the model's normal initialisation) so that all methods
start from the same draw, and exposes

* ``forward(x)``                 the layer,
* ``trainable_parameters()``     count of trainable numbers,
* ``flops_per_token()``          forward multiply-adds × 2 for one input row,
* ``merged_weight()``            the dense ``W`` the layer equals (raises :class:`NotMergeable`
                                 when σ = SiLU makes that impossible).

LOST (DESIGN.md §1)::

    W0 = U Σ Vᵀ                          (float32 SVD, once, at creation)
    A  = V_r Σ_r^½   (n×r)     B = Σ_r^½ U_rᵀ   (r×m)          balanced top-r split
    W_c = Σ_{i>r} σ_i u_i v_iᵀ                                  residual (optionally a window)
    I   = sorted top-k input channels by ‖W_c[:, j]‖,  k = max(1, ⌊ρ n⌋)
    y   = γ σ(x A) B + (1-γ) x[:, I] W_sᵀ,   W_s ← W_c[:, I]

We store ``A`` and ``B`` transposed (``lowrank_down`` r×n, ``lowrank_up`` m×r) so that both
products are ``F.linear`` calls, i.e. single GEMMs with no transposes or copies.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LostLMError


class NotMergeable(LostLMError):
    """The layer has a nonlinearity between its factors, so no single dense W equals it."""


_ACTIVATIONS = {"silu": F.silu, "identity": lambda t: t}


def _svd(weight: torch.Tensor, dtype: str = "float32") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full thin SVD in float32/float64, singular values descending (torch's convention)."""
    u, s, vh = torch.linalg.svd(weight.detach().to(getattr(torch, dtype)), full_matrices=False)
    return u, s, vh


def balanced_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` balanced split: returns (down r×n = Σ^½ V_rᵀ, up m×r = U_r Σ^½)."""
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


def random_factors(out_features: int, in_features: int, rank: int, std: float, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random factors whose product has entries of std ``std`` (as the dense init would)."""
    factor_std = (std * std / rank) ** 0.25
    down = torch.randn(rank, in_features, generator=generator) * factor_std
    up = torch.randn(out_features, rank, generator=generator) * factor_std
    return down, up


class _Factorised(nn.Module):
    """Shared plumbing: the two low-rank factors and the bias."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = down.shape[1]
        self.out_features = up.shape[0]
        self.rank = down.shape[0]
        self.lowrank_down = nn.Parameter(down.contiguous())
        self.lowrank_up = nn.Parameter(up.contiguous())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def _lowrank_matrix(self) -> torch.Tensor:
        return self.lowrank_up @ self.lowrank_down  # m×n, = (A B)ᵀ

    def _bias_params(self) -> int:
        return self.bias.numel() if self.bias is not None else 0

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LowRankLinear(_Factorised):
    """``y = σ(x A) B``: ``lowrank`` (random init, σ=identity), ``lowrank-svd`` (top-r SVD of
    W0, σ=identity) and ``cola`` (σ=SiLU, CoLA's auto-encoder) are all this class."""

    def __init__(self, weight: torch.Tensor, rank: int, *, init: str = "random", activation: str = "identity",
                 bias: torch.Tensor | None = None, init_std: float = 0.02, svd_dtype: str = "float32",
                 generator: torch.Generator | None = None) -> None:
        out_features, in_features = weight.shape
        rank = min(rank, out_features, in_features)
        if init == "svd":
            down, up = balanced_factors(*_svd(weight, svd_dtype), rank)
        elif init == "random":
            down, up = random_factors(out_features, in_features, rank, init_std, generator)
        else:
            raise LostLMError(f"low-rank init {init!r} is not valid; use svd or random")
        super().__init__(down.to(weight.dtype), up.to(weight.dtype), bias)
        self.activation = activation
        self._act = _ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._act(F.linear(x, self.lowrank_down)), self.lowrank_up, self.bias)

    def trainable_parameters(self) -> int:
        return self.rank * (self.in_features + self.out_features) + self._bias_params()

    def flops_per_token(self) -> int:
        return 2 * self.rank * (self.in_features + self.out_features)

    def merged_weight(self) -> torch.Tensor:
        if self.activation != "identity":
            raise NotMergeable("a low-rank layer with activation=silu cannot be merged into one dense matrix; "
                               "train with layer.activation=identity to export a dense model")
        return self._lowrank_matrix()


class LOSTLinear(_Factorised):
    """LOST: low-rank branch from the top-r SVD plus a channel-wise sparse branch built from the
    remaining singular values. See the module docstring for the equations.

    ``sparse_axis="input"`` keeps k whole input columns: the sparse branch is a gather of k
    columns of x and one (b×k)·(k×m) GEMM. ``sparse_axis="output"`` keeps k output rows: a
    (b×n)·(n×k) GEMM whose result is scatter-added into k output columns.
    """

    def __init__(self, weight: torch.Tensor, rank: int, *, density: float = 0.03, gamma: float = 0.5,
                 activation: str = "silu", channel_score: str = "l2", sparse_axis: str = "input",
                 sparse_init: str = "residual", svd_window: int | None = None, svd_dtype: str = "float32",
                 bias: torch.Tensor | None = None, generator: torch.Generator | None = None) -> None:
        out_features, in_features = weight.shape
        rank = min(rank, out_features, in_features)
        u, s, vh = _svd(weight, svd_dtype)
        down, up = balanced_factors(u, s, vh, rank)
        stop = len(s) if svd_window is None else min(len(s), rank + svd_window)
        residual = (u[:, rank:stop] * s[rank:stop]) @ vh[rank:stop]  # W_c = Σ_{r<i≤stop} σ_i u_i v_iᵀ
        source = residual if sparse_init == "residual" else weight.detach().to(residual.dtype)
        channel_dim = 0 if sparse_axis == "input" else 1  # columns are scored over rows and vice versa
        num_channels = in_features if sparse_axis == "input" else out_features
        k = max(1, math.floor(density * num_channels))
        if channel_score == "l2":
            scores = residual.norm(p=2, dim=channel_dim)
        elif channel_score == "l1":
            scores = residual.norm(p=1, dim=channel_dim)
        elif channel_score == "random":
            scores = torch.rand(num_channels, generator=generator, dtype=residual.dtype)
        else:
            raise LostLMError(f"channel_score {channel_score!r} is not valid; use l2, l1 or random")
        index = torch.topk(scores, k).indices.sort().values
        sparse = source[:, index] if sparse_axis == "input" else source[index, :]
        super().__init__(down.to(weight.dtype), up.to(weight.dtype), bias)
        self.sparse_weight = nn.Parameter(sparse.to(weight.dtype).contiguous())  # m×k (input) / k×n (output)
        self.register_buffer("channel_index", index, persistent=True)
        self.gamma = float(gamma)
        self.activation = activation
        self.sparse_axis = sparse_axis
        self._act = _ACTIVATIONS[activation]

    @property
    def num_channels(self) -> int:
        return self.channel_index.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            # One cast shared by both branches: autocast would otherwise cast x for the first
            # GEMM and, separately, the gathered columns (gathered from fp32) for the sparse one.
            x = x.to(torch.get_autocast_dtype(x.device.type))
        hidden = self._act(F.linear(x, self.lowrank_down))  # (..., r)
        if self.sparse_axis == "input":
            # y = [σ(xA), x_I] · [γB ; (1-γ)W_sᵀ]: ONE GEMM over the inner dimension r+k. Two
            # GEMMs into b×m outputs plus a scale and an add over b×m (and their backward) cost
            # more than concatenating b×(r+k) activations and m×(r+k) weights.
            stacked = torch.cat([hidden, x.index_select(-1, self.channel_index)], dim=-1)
            weight = torch.cat([self.gamma * self.lowrank_up, (1.0 - self.gamma) * self.sparse_weight], dim=1)
            return F.linear(stacked, weight, self.bias)
        y = F.linear(hidden, self.gamma * self.lowrank_up, self.bias)
        return y.index_add(-1, self.channel_index, F.linear(x, self.sparse_weight), alpha=1.0 - self.gamma)

    def trainable_parameters(self) -> int:
        return self.rank * (self.in_features + self.out_features) + self.sparse_weight.numel() + self._bias_params()

    def flops_per_token(self) -> int:
        return 2 * self.rank * (self.in_features + self.out_features) + 2 * self.sparse_weight.numel()

    def merged_weight(self) -> torch.Tensor:
        if self.activation != "identity":
            raise NotMergeable("a LOST layer with activation=silu cannot be merged into one dense matrix; "
                               "train with layer.activation=identity to export a dense model")
        weight = self.gamma * self._lowrank_matrix()
        scaled = (1.0 - self.gamma) * self.sparse_weight
        if self.sparse_axis == "input":
            return weight.index_add(1, self.channel_index, scaled)
        return weight.index_add(0, self.channel_index, scaled)


class SLTrainLinear(_Factorised):
    """SLTrain: ``W = A B + S`` with S on a fixed random *unstructured* support of density ρ.

    The forward reconstructs the dense W (a scatter of the nonzeros into an m×n matrix) and
    does one dense GEMM, which is what SLTrain does; this is exactly the cost LOST avoids.
    """

    def __init__(self, weight: torch.Tensor, rank: int, *, density: float = 0.03, bias: torch.Tensor | None = None,
                 init_std: float = 0.02, generator: torch.Generator | None = None) -> None:
        out_features, in_features = weight.shape
        rank = min(rank, out_features, in_features)
        down, up = random_factors(out_features, in_features, rank, init_std, generator)
        super().__init__(down.to(weight.dtype), up.to(weight.dtype), bias)
        nnz = max(1, math.floor(density * out_features * in_features))
        support = torch.randperm(out_features * in_features, generator=generator)[:nnz].sort().values
        self.register_buffer("sparse_index", support, persistent=True)
        bound = 1.0 / math.sqrt(in_features)  # SLTrain's uniform init of the sparse values
        values = (torch.rand(nnz, generator=generator) * 2 - 1) * bound
        self.sparse_values = nn.Parameter(values.to(weight.dtype))

    def _sparse_matrix(self) -> torch.Tensor:
        flat = torch.zeros(self.out_features * self.in_features, dtype=self.sparse_values.dtype, device=self.sparse_values.device)
        return flat.index_add(0, self.sparse_index, self.sparse_values).view(self.out_features, self.in_features)

    def merged_weight(self) -> torch.Tensor:
        return self._lowrank_matrix() + self._sparse_matrix()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.merged_weight(), self.bias)

    def trainable_parameters(self) -> int:
        return self.rank * (self.in_features + self.out_features) + self.sparse_values.numel() + self._bias_params()

    def flops_per_token(self) -> int:
        # The GEMM with the reconstructed dense matrix; the reconstruction (2·r·m·n per step)
        # is per forward, not per token, and is counted by metrics.model_flops.
        return 2 * self.in_features * self.out_features

    def reconstruction_flops(self) -> int:
        return 2 * self.rank * self.in_features * self.out_features

