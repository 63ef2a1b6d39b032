"""LOST and the baseline parametrisations of a linear layer ``y = x Wᵀ``, one class each.

Every class takes ``W0`` (out × in, the model's normal initialisation) so that all methods
start from the same draw, and exposes

* ``forward(x)``                 the layer,
* ``trainable_parameters()``     count of trainable numbers,
* ``flops_per_token()``          forward multiply-adds × 2 for one input row,
* ``merged_weight()``            the dense ``W`` the layer equals (raises :class:`NotMergeable`
                                 when σ = SiLU makes that impossible).

LOST (docs/method.md, section "LOST")::

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
    """Gaussian factors whose product has entries of std ``std``: each factor has std
    (std²/r)^¼, so that Σ_r (down·up) has variance r·(std²/r) = std²."""
    factor_std = (std * std / rank) ** 0.25
    down = torch.randn(rank, in_features, generator=generator) * factor_std
    up = torch.randn(out_features, rank, generator=generator) * factor_std
    return down, up


def cola_factors(out_features: int, in_features: int, rank: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CoLA's init (Liu et al. 2025, public code cola/cola_layer.py): each factor
    N(0, 1)·(in+out)^(-¼)/r^¼, so the product's entries have std (in+out)^(-½)."""
    return random_factors(out_features, in_features, rank, (in_features + out_features) ** -0.5, generator)


def kaiming_uniform(rows: int, fan_in: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``nn.init.kaiming_uniform_(w, a=√5)`` of a rows×fan_in matrix (nn.Linear's default
    weight init): U(-1/√fan_in, 1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(rows, fan_in, generator=generator) * 2 - 1) * bound


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
    """``y = scale · σ(x A) B``: ``lowrank`` (σ = identity), ``lowrank-svd`` (top-r SVD of W0,
    σ = identity) and ``cola`` (σ = SiLU, CoLA's auto-encoder) are all this class.

    ``init``: ``None`` (default) builds each baseline as its authors define it: ``cola`` when
    σ = SiLU (product std (in+out)^-½, CoLA's code), ``kaiming`` when σ = identity (both factors
    U(±1/√fan_in), the low-rank-only layer of the ReLoRA/GaLore code base). ``svd`` is the
    balanced top-r split of W0; ``random`` is Gaussian factors whose product has std
    ``init_std`` (this package's earlier default, kept for comparison). See docs/method.md.
    """

    INITS = ("cola", "kaiming", "svd", "random")

    def __init__(self, weight: torch.Tensor, rank: int, *, init: str | None = None, activation: str = "identity",
                 bias: torch.Tensor | None = None, init_std: float = 0.02, scale: float = 1.0, svd_dtype: str = "float32",
                 generator: torch.Generator | None = None) -> None:
        out_features, in_features = weight.shape
        rank = min(rank, out_features, in_features)
        if init is None:
            init = "cola" if activation == "silu" else "kaiming"
        if init == "svd":
            down, up = balanced_factors(*_svd(weight, svd_dtype), rank)
        elif init == "random":
            down, up = random_factors(out_features, in_features, rank, init_std, generator)
        elif init == "cola":
            down, up = cola_factors(out_features, in_features, rank, generator)
        elif init == "kaiming":
            down = kaiming_uniform(rank, in_features, generator)
            up = kaiming_uniform(out_features, rank, generator)
        else:
            raise LostLMError(f"low-rank init {init!r} is not valid; use one of {', '.join(self.INITS)}")
        super().__init__(down.to(weight.dtype), up.to(weight.dtype), bias)
        self.init = init
        self.activation = activation
        self.scale = float(scale)
        self._act = _ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self._act(F.linear(x, self.lowrank_down))
        if self.scale == 1.0:
            return F.linear(hidden, self.lowrank_up, self.bias)
        return F.linear(hidden * self.scale, self.lowrank_up, self.bias)

    def trainable_parameters(self) -> int:
        return self.rank * (self.in_features + self.out_features) + self._bias_params()

    def flops_per_token(self) -> int:
        return 2 * self.rank * (self.in_features + self.out_features)

    def merged_weight(self) -> torch.Tensor:
        if self.activation != "identity":
            raise NotMergeable("a low-rank layer with activation=silu cannot be merged into one dense matrix; "
                               "train with layer.activation=identity to export a dense model")
        return self.scale * self._lowrank_matrix()


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
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        if self.sparse_axis == "input":
            # One autograd node for the whole layer (see _LOSTInputChannels): one cast of x,
            # one GEMM over [σ(xA), x_I], and x's gradient from one GEMM over [A; E_I].
            shape = x.shape
            x2 = x.to(dtype).reshape(-1, shape[-1])
            with torch.autocast(device, enabled=False):
                y = _LOSTInputChannels.apply(x2, self.lowrank_down, self.lowrank_up, self.sparse_weight, self.bias,
                                             self.channel_index, self.gamma, self.activation == "silu")
            return y.view(*shape[:-1], y.shape[-1])
        x = x.to(dtype)
        hidden = self._act(F.linear(x, self.lowrank_down))  # (..., r)
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



class _LOSTInputChannels(torch.autograd.Function):
    """``y = [σ(x Aᵀ), x_I] · [γ B ; (1-γ) W_s]ᵀ + bias`` for a 2-D ``x`` (b×n) already in the
    compute dtype; the parameters are cast once here and their gradients returned in their own
    dtype. Every GEMM, cast and buffer is chosen by hand (measured in bench/layer_speed.py):

    forward   pre = x Aᵀ (b×r);  z = [σ(pre), x_I] written in place into one b×(r+k) buffer;
              y = z Wᵀ with W = [γ B, (1-γ) W_s] (m×(r+k)): one GEMM over the inner dim r+k.
    backward  g_z = g_y W (one GEMM);  g_W = g_yᵀ z (one GEMM, split into g_B and g_{W_s});
              σ'(pre) applied in place on g_z[:, :r];  g_A = g_preᵀ x;
              g_x = g_pre A with g_{x_I} added in place into its k columns (``index_add_``),
              or (``grad_x_one_gemm``) g_x = g_z · [A; E_I], ONE GEMM over A with the one-hot
              selection E_I (k×n) of the kept channels appended. Either way x's gradient has no
              zero-filled b×n buffer, no scatter into it and no add of two b×n gradients.
              Same function of x and the parameters as the plain formulation; only the
              floating-point summation order differs (tests/test_layers.py).
    """

    # True: g_x = g_z·[A; E_I] (one GEMM, k/r more FLOPs on it); False (default, faster in
    # bench/results/layer-speed-*): g_x = g_pre·A, then an in-place index_add_ of g_{x_I} into
    # its k columns (b·k adds, no zero-filled b×n buffer, no second b×n tensor, no b×n add).
    grad_x_one_gemm = False
    # The inner width r+k of the stacked GEMMs is padded with zero columns up to a multiple of
    # this: odd widths such as 143 or 573 ran 10-30 % slower per FLOP in the CPU BLAS. 1 here (a
    # layer used on its own); a training run sets it from layer.lost_pad_to (lost_pad_multiple
    # below, via lostlm.build.build_model).
    pad_to = 1

    @staticmethod
    def forward(ctx, x, down, up, sparse, bias, index, gamma, silu):
        dtype = x.dtype
        rank, k = down.shape[0], index.numel()
        pad_to = max(1, _LOSTInputChannels.pad_to)
        pad = (-(rank + k)) % pad_to
        down_c = down.to(dtype)
        parts = [up.to(dtype) * gamma, sparse.to(dtype) * (1.0 - gamma)]
        if pad:
            parts.append(up.new_zeros(up.shape[0], pad, dtype=dtype))
        weight = torch.cat(parts, dim=1)  # m×(r+k+pad)
        z = x.new_empty(x.shape[0], rank + k + pad)
        if pad:
            z[:, rank + k:].zero_()
        if silu:
            pre = torch.mm(x, down_c.t())
            torch.ops.aten.silu.out(pre, out=z[:, :rank])
        else:
            pre = None
            torch.mm(x, down_c.t(), out=z[:, :rank])
        torch.index_select(x, 1, index, out=z[:, rank:rank + k])
        y = torch.mm(z, weight.t()) if bias is None else torch.addmm(bias.to(dtype), z, weight.t())
        ctx.save_for_backward(x, pre, z, down_c, weight, index)
        ctx.gamma, ctx.silu, ctx.rank, ctx.k, ctx.pad = gamma, silu, rank, k, pad
        ctx.one_gemm = _LOSTInputChannels.grad_x_one_gemm
        ctx.param_dtypes = (down.dtype, up.dtype, sparse.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, pre, z, down_c, weight, index = ctx.saved_tensors
        gamma, rank, k = ctx.gamma, ctx.rank, ctx.k
        down_dt, up_dt, sparse_dt, bias_dt = ctx.param_dtypes
        need_x, need_down, need_up, need_sparse, need_bias = ctx.needs_input_grad[:5]
        grad_x = grad_down = grad_up = grad_sparse = grad_bias = None
        with torch.autocast(x.device.type, enabled=False):
            grad_y = grad_y.to(x.dtype).contiguous()
            if need_up or need_sparse:
                grad_w = torch.mm(grad_y.t(), z)  # m×(r+k)
                if need_up:
                    grad_up = grad_w[:, :rank].to(up_dt).mul_(gamma)
                if need_sparse:
                    grad_sparse = grad_w[:, rank:rank + k].to(sparse_dt).mul_(1.0 - gamma)
            if need_bias:
                grad_bias = grad_y.sum(0).to(bias_dt)
            if need_x or need_down:
                grad_z = torch.mm(grad_y, weight)  # b×(r+k): [g_σ, g_{x_I}]
                grad_pre = grad_z[:, :rank]
                if ctx.silu:
                    torch.ops.aten.silu_backward.grad_input(grad_pre, pre, grad_input=grad_pre)
                if need_down:
                    grad_down = torch.mm(grad_pre.t(), x).to(down_dt)
                if need_x and ctx.one_gemm:
                    selection = torch.zeros(k + ctx.pad, x.shape[1], dtype=x.dtype, device=x.device)
                    selection[torch.arange(k, device=x.device), index] = 1
                    grad_x = torch.mm(grad_z, torch.cat([down_c, selection], dim=0))  # g_z · [A; E_I]
                elif need_x:  # measured alternative: GEMM over A, then add the k columns in place
                    grad_x = torch.mm(grad_pre, down_c).index_add_(1, index, grad_z[:, rank:rank + k])
        return grad_x, grad_down, grad_up, grad_sparse, grad_bias, None, None, None


def lost_pad_multiple(rank: int, setting: int = 0) -> int:
    """The multiple that LOST's inner GEMM width r + k is zero-padded to (``layer.lost_pad_to``;
    :func:`lostlm.build.build_model` sets :attr:`_LOSTInputChannels.pad_to` from it).

    ``setting`` ≥ 1 is taken as it is (1: no padding). 0 (auto): 64 for r ≥ 256, 16 for
    128 ≤ r < 256, no padding below r = 128 — what was faster than the unpadded layer in
    ``bench/layer_speed.py --fp32`` on a quiet 2-core AVX2 CPU (docs/results.md (f), "The LOST
    layer": 60m r + k = 143 → 144 and 169 → 176; 350m 286 → 320, 338 → 384; 1b 573 → 576,
    675 → 704); smaller ranks were not measured. The padded columns are zeros, so the function
    is the same; only the floating-point summation order can differ."""
    if setting >= 1:
        return setting
    return 64 if rank >= 256 else 16 if rank >= 128 else 1


class SLTrainLinear(_Factorised):
    """SLTrain (Han et al. 2024): ``W = (α/r) B A + S`` with S on a fixed random *unstructured*
    support of density ρ.

    ``init="sltrain"`` (default) is the authors' code (splora/splora_linear.py): A (r×n, our
    ``lowrank_down``) kaiming-uniform U(±1/√n), B (m×r, ``lowrank_up``) zero, the support
    ⌊ρ·m·n⌋ flat positions drawn uniformly without replacement, the values U(±1/√n), and
    α = ``alpha`` (their recipes: 32 at 60M, 16 at 130M/350M, 8 at 1B/7B). ``init="random"``
    is this package's earlier variant (Gaussian factors with product std ``init_std``).

    The forward reconstructs the dense W (a scatter of the nonzeros into an m×n matrix) and
    does one dense GEMM, which is what SLTrain does; this is exactly the cost LOST avoids.
    """

    def __init__(self, weight: torch.Tensor, rank: int, *, density: float = 0.03, alpha: float = 32.0,
                 init: str = "sltrain", bias: torch.Tensor | None = None, init_std: float = 0.02,
                 generator: torch.Generator | None = None) -> None:
        out_features, in_features = weight.shape
        rank = min(rank, out_features, in_features)
        if init == "sltrain":
            down = kaiming_uniform(rank, in_features, generator)
            up = torch.zeros(out_features, rank)
        elif init == "random":
            down, up = random_factors(out_features, in_features, rank, init_std, generator)
        else:
            raise LostLMError(f"SLTrain init {init!r} is not valid; use sltrain or random")
        super().__init__(down.to(weight.dtype), up.to(weight.dtype), bias)
        self.init = init
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
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
        return self._sparse_matrix().add(self._lowrank_matrix(), alpha=self.scale)

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

