"""Each baseline's initialisation as its authors define it, against independent computations.

Sampling tolerances are four standard errors, derived from the sample size in each test.
Sources (paper + public code file) are listed in docs/method.md, section "Baselines".
"""

import math

import pytest
import torch

from lostlm.configs import LayerConfig
from lostlm.convert import build_layer
from lostlm.layers import LowRankLinear, SLTrainLinear


def _w0(m, n, seed=0):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_cola_init_product_std_is_in_plus_out_to_minus_half():
    m, n, r = 1024, 768, 256
    layer = LowRankLinear(_w0(m, n), r, activation="silu", generator=torch.Generator().manual_seed(1))
    assert layer.init == "cola"
    target = (n + m) ** -0.5  # CoLA: product std (in+out)^-1/2
    # each factor i.i.d. N(0, s²) with s = (in+out)^-1/4 / r^1/4: rel. SE of a sample std is 1/sqrt(2N)
    factor = (n + m) ** -0.25 / r ** 0.25
    for f in (layer.lowrank_down, layer.lowrank_up):
        assert abs(f.std().item() / factor - 1) < 4 / math.sqrt(2 * f.numel())
        assert abs(f.mean().item()) < 4 * factor / math.sqrt(f.numel())
    # product P = up·down: ‖P‖²_F/(mn) has rel. variance ≈ 2/(n r) + 2/(m r) + 2/(m n) (Gaussian
    # factors); the std's rel. SE is half the square root of that.
    product = (layer.lowrank_up @ layer.lowrank_down).double()
    rel_se = 0.5 * math.sqrt(2 / (n * r) + 2 / (m * r) + 2 / (m * n))
    std = product.square().mean().sqrt().item()
    assert abs(std / target - 1) < 4 * rel_se


def test_cola_through_convert_uses_cola_init_and_silu():
    linear = torch.nn.Linear(256, 256, bias=False)
    layer = build_layer(linear, LayerConfig(method="cola"), 64, torch.Generator().manual_seed(0))
    assert isinstance(layer, LowRankLinear) and layer.activation == "silu" and layer.init == "cola"
    x = torch.randn(5, 256)
    expected = torch.nn.functional.silu(x @ layer.lowrank_down.T) @ layer.lowrank_up.T
    assert torch.allclose(layer(x), expected, atol=1e-6)


def _uniform_var_ok(t: torch.Tensor, bound: float) -> bool:
    """U(-b, b): variance b²/3; the sample mean of t² has rel. SE sqrt((b⁴/5 - b⁴/9)/N)/(b²/3) = sqrt(0.8/N)."""
    ratio = t.double().square().mean().item() / (bound * bound / 3)
    return t.abs().max().item() <= bound and abs(ratio - 1) < 4 * math.sqrt(0.8 / t.numel())


def test_lowrank_init_is_kaiming_uniform_factors():
    m, n, r = 512, 640, 128
    layer = LowRankLinear(_w0(m, n), r, generator=torch.Generator().manual_seed(2))
    assert layer.init == "kaiming" and layer.activation == "identity" and layer.scale == 1.0
    assert _uniform_var_ok(layer.lowrank_down, 1 / math.sqrt(n))  # fan_in of A is n
    assert _uniform_var_ok(layer.lowrank_up, 1 / math.sqrt(r))    # fan_in of B is r
    x = torch.randn(7, n)
    assert torch.allclose(layer(x), x @ layer.lowrank_down.T @ layer.lowrank_up.T, atol=1e-6)
    built = build_layer(torch.nn.Linear(n, m, bias=False), LayerConfig(method="lowrank"), r)
    assert built.init == "kaiming" and built.activation == "identity"


def test_lowrank_svd_is_the_best_rank_r_approximation():
    m, n, r = 96, 80, 16
    w0 = _w0(m, n, seed=3)
    layer = LowRankLinear(w0, r, init="svd")
    u, s, vh = torch.linalg.svd(w0.double(), full_matrices=False)
    best = (u[:, :r] * s[:r]) @ vh[:r]  # Eckart–Young
    assert torch.allclose(layer.merged_weight().double(), best, atol=1e-6)
    # balanced: both factors carry Σ^½
    assert torch.allclose(layer.lowrank_down.double().norm(dim=1), s[:r].sqrt(), atol=1e-5)
    assert torch.allclose(layer.lowrank_up.double().norm(dim=0), s[:r].sqrt(), atol=1e-5)


@pytest.mark.parametrize("alpha", [32.0, 8.0])
def test_sltrain_init_and_output(alpha):
    m, n, r, rho = 384, 256, 64, 0.03
    layer = SLTrainLinear(_w0(m, n), r, density=rho, alpha=alpha, generator=torch.Generator().manual_seed(4))
    nnz = math.floor(rho * m * n)
    # support: nnz distinct flat positions of the m×n matrix
    assert layer.sparse_index.numel() == nnz == layer.sparse_index.unique().numel()
    assert 0 <= layer.sparse_index.min() and layer.sparse_index.max() < m * n
    # a uniform random support: the fraction of nonzeros in each half of the rows is 1/2 ± 4 SE
    upper = (layer.sparse_index < (m // 2) * n).double().mean().item()
    assert abs(upper - 0.5) < 4 * math.sqrt(0.25 / nnz)
    assert _uniform_var_ok(layer.sparse_values, 1 / math.sqrt(n))     # values U(±1/√in)
    assert _uniform_var_ok(layer.lowrank_down, 1 / math.sqrt(n))      # A kaiming-uniform
    assert torch.count_nonzero(layer.lowrank_up) == 0                 # B zero
    assert layer.scale == alpha / r
    # output = (α/r)·x (B A)ᵀ + x Sᵀ, with generic (non-zero) B, computed independently
    with torch.no_grad():
        layer.lowrank_up.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
    dense_s = torch.zeros(m, n)
    rows, cols = layer.sparse_index // n, layer.sparse_index % n
    dense_s[rows, cols] = layer.sparse_values.detach()
    x = torch.randn(3, 4, n)
    b_a = layer.lowrank_up.detach() @ layer.lowrank_down.detach()
    expected = (alpha / r) * x @ b_a.T + x @ dense_s.T
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_sltrain_through_convert_defaults_to_alpha_32():
    linear = torch.nn.Linear(128, 128, bias=False)
    layer = build_layer(linear, LayerConfig(method="sltrain"), 32, torch.Generator().manual_seed(0))
    assert isinstance(layer, SLTrainLinear) and layer.init == "sltrain"
    assert layer.alpha == getattr(LayerConfig(), "sltrain_alpha", 32.0) and layer.scale == layer.alpha / 32
