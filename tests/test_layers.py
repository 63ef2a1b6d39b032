"""LOST and the baseline layers against independent computations of their formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from lostlm.layers import LOSTLinear, LowRankLinear, NotMergeable, SLTrainLinear

M, N, R = 48, 40, 8  # out, in, rank


@pytest.fixture
def w0() -> torch.Tensor:
    return torch.randn(M, N, generator=torch.Generator().manual_seed(0)) * 0.02


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(3, 5, N, generator=torch.Generator().manual_seed(1))


def reference_lost(w0, rank, density, score="l2", axis="input", init="residual", window=None):
    """docs/method.md ("LOST") step by step, written independently of the layer."""
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    a = vh[:rank].T @ torch.diag(s[:rank].sqrt())          # n×r = V_r Σ^½
    b = torch.diag(s[:rank].sqrt()) @ u[:, :rank].T        # r×m = Σ^½ U_rᵀ
    stop = len(s) if window is None else rank + window
    w_c = w0 - u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank] if window is None else \
        u[:, rank:stop] @ torch.diag(s[rank:stop]) @ vh[rank:stop]
    dim = 0 if axis == "input" else 1
    scores = w_c.abs().sum(dim) if score == "l1" else (w_c ** 2).sum(dim).sqrt()
    count = w0.shape[1] if axis == "input" else w0.shape[0]
    k = max(1, math.floor(density * count))
    index = sorted(torch.argsort(scores, descending=True)[:k].tolist())
    src = w_c if init == "residual" else w0
    sparse = src[:, index] if axis == "input" else src[index, :]
    return a, b, torch.tensor(index), sparse


@pytest.mark.parametrize("activation", ["silu", "identity"])
def test_lost_init_and_forward_match_reference(w0, x, activation):
    layer = LOSTLinear(w0, R, density=0.1, gamma=0.3, activation=activation)
    a, b, index, sparse = reference_lost(w0, R, 0.1)
    assert torch.allclose(layer.lowrank_down.T, a, atol=1e-6)
    assert torch.allclose(layer.lowrank_up.T, b, atol=1e-6)
    assert torch.equal(layer.channel_index, index)
    assert torch.allclose(layer.sparse_weight, sparse, atol=1e-6)
    act = F.silu if activation == "silu" else (lambda t: t)
    expected = 0.3 * act(x @ a) @ b + 0.7 * x[..., index] @ sparse.T
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_lost_top_r_reconstructs_the_svd_part(w0):
    layer = LOSTLinear(w0, R, density=0.1, gamma=1.0, activation="identity")
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    w_r = u[:, :R] @ torch.diag(s[:R]) @ vh[:R]
    assert torch.allclose(layer.merged_weight(), w_r, atol=1e-6)


def test_lost_identity_equals_its_merged_dense_matrix(w0, x):
    layer = LOSTLinear(w0, R, density=0.1, gamma=0.6, activation="identity")
    with torch.no_grad():  # make the parameters generic, not just their initial values
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    assert torch.allclose(layer(x), x @ layer.merged_weight().T, atol=1e-6)
    out_layer = LOSTLinear(w0, R, density=0.1, gamma=0.6, activation="identity", sparse_axis="output")  # the other axis
    assert torch.allclose(out_layer(x), x @ out_layer.merged_weight().T, atol=1e-6)


def test_lost_silu_refuses_to_merge(w0):
    with pytest.raises(NotMergeable, match="activation=silu"):
        LOSTLinear(w0, R, activation="silu").merged_weight()


@pytest.mark.parametrize("density", [0.01, 0.05, 0.25])
def test_lost_parameter_count(w0, density):
    layer = LOSTLinear(w0, R, density=density)
    k = max(1, math.floor(density * N))
    assert sum(p.numel() for p in layer.parameters()) == R * (M + N) + M * k == layer.trainable_parameters()
    assert layer.num_channels == k


@pytest.mark.parametrize("score,axis,init,window", [("l1", "input", "residual", None), ("l2", "output", "residual", None),
                                                    ("l2", "input", "original", None), ("l2", "input", "residual", 4)])
def test_lost_open_choices_match_reference(w0, x, score, axis, init, window):
    layer = LOSTLinear(w0, R, density=0.1, gamma=0.5, activation="identity", channel_score=score,
                       sparse_axis=axis, sparse_init=init, svd_window=window)
    a, b, index, sparse = reference_lost(w0, R, 0.1, score, axis, init, window)
    assert torch.equal(layer.channel_index, index)
    assert torch.allclose(layer.sparse_weight, sparse, atol=1e-6)
    if axis == "input":
        expected = 0.5 * x @ a @ b + 0.5 * x[..., index] @ sparse.T
    else:
        expected = 0.5 * x @ a @ b
        expected[..., index] += 0.5 * x @ sparse.T
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_lost_random_channels_are_seeded_and_differ_from_l2(w0):
    one = LOSTLinear(w0, R, density=0.2, channel_score="random", generator=torch.Generator().manual_seed(3))
    two = LOSTLinear(w0, R, density=0.2, channel_score="random", generator=torch.Generator().manual_seed(3))
    l2 = LOSTLinear(w0, R, density=0.2)
    assert torch.equal(one.channel_index, two.channel_index)
    assert not torch.equal(one.channel_index, l2.channel_index)


def test_lost_gradients_reach_every_trainable_part(w0, x):
    layer = LOSTLinear(w0, R, density=0.1)
    layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_lowrank_svd_forward(w0, x):
    layer = LowRankLinear(w0, R, init="svd", activation="identity")
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    w_r = u[:, :R] @ torch.diag(s[:R]) @ vh[:R]
    assert torch.allclose(layer(x), x @ w_r.T, atol=1e-6)
    assert layer.trainable_parameters() == R * (M + N)


def test_random_lowrank_and_cola_forward(w0, x):
    lowrank = LowRankLinear(w0, R, init="random", activation="identity", generator=torch.Generator().manual_seed(0))
    a, b = lowrank.lowrank_down.T, lowrank.lowrank_up.T
    assert torch.allclose(lowrank(x), x @ a @ b, atol=1e-6)
    product_std = (lowrank.lowrank_up @ lowrank.lowrank_down).std().item()
    assert 0.01 < product_std < 0.04  # product starts at the dense init's scale (0.02)
    cola = LowRankLinear(w0, R, init="random", activation="silu", generator=torch.Generator().manual_seed(0))
    assert torch.allclose(cola(x), F.silu(x @ cola.lowrank_down.T) @ cola.lowrank_up.T, atol=1e-6)
    with pytest.raises(NotMergeable):
        cola.merged_weight()


def test_sltrain_forward_and_support(w0, x):
    layer = SLTrainLinear(w0, R, density=0.05, generator=torch.Generator().manual_seed(0))
    nnz = math.floor(0.05 * M * N)
    assert layer.sparse_values.numel() == nnz == layer.sparse_index.unique().numel()
    dense_s = torch.zeros(M * N)
    dense_s[layer.sparse_index] = layer.sparse_values.detach()
    w = layer.lowrank_up @ layer.lowrank_down + dense_s.view(M, N)
    assert torch.allclose(layer(x), x @ w.T, atol=1e-6)
    assert layer.trainable_parameters() == R * (M + N) + nnz


def test_bias_is_kept(w0, x):
    bias = torch.randn(M)
    for layer in (LOSTLinear(w0, R, bias=bias, activation="identity"), LowRankLinear(w0, R, init="svd", bias=bias),
                  SLTrainLinear(w0, R, bias=bias)):
        assert torch.allclose(layer(x), x @ layer.merged_weight().T + bias, atol=1e-5)


# ---- the LOST autograd function against the plain formulation ----------------------------------

def plain_lost(x, layer):
    """γ σ(x A) B + (1-γ) x[:, I] W_sᵀ (+ bias) with plain autograd ops, from the layer's parameters."""
    act = F.silu if layer.activation == "silu" else (lambda t: t)
    y = layer.gamma * act(x @ layer.lowrank_down.T) @ layer.lowrank_up.T \
        + (1.0 - layer.gamma) * x[..., layer.channel_index] @ layer.sparse_weight.T
    return y if layer.bias is None else y + layer.bias


def _generic_lost(dtype, activation, with_bias, density=0.1):
    g = torch.Generator().manual_seed(7)
    w0 = (torch.randn(M, N, generator=g) * 0.02).to(dtype)
    bias = torch.randn(M, generator=g).to(dtype) if with_bias else None
    layer = LOSTLinear(w0, R, density=density, gamma=0.3, activation=activation, bias=bias)
    with torch.no_grad():  # generic parameters, not just the SVD init
        for p in layer.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(dtype) * 0.05)
    return layer


@pytest.mark.parametrize("activation", ["silu", "identity"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("one_gemm,pad_to", [(False, 16), (True, 16), (False, 1), (True, 1)])
def test_lost_function_gradcheck_float64(activation, with_bias, one_gemm, pad_to, monkeypatch):
    from lostlm.layers import _LOSTInputChannels

    monkeypatch.setattr(_LOSTInputChannels, "grad_x_one_gemm", one_gemm)
    monkeypatch.setattr(_LOSTInputChannels, "pad_to", pad_to)
    layer = _generic_lost(torch.float64, activation, with_bias)
    x = torch.randn(2, 3, N, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    params = list(layer.parameters())
    assert torch.autograd.gradcheck(lambda x, *ps: layer(x), [x, *params])
    # and the same gradients as the plain formulation, to float64 rounding
    names = [n for n, _ in layer.named_parameters()]
    got = torch.autograd.grad(layer(x).square().sum(), [x, *params])
    want = torch.autograd.grad(plain_lost(x, layer).square().sum(), [x, *params])
    for name, a, b in zip(["x", *names], got, want):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("activation", ["silu", "identity"])
def test_lost_function_matches_plain_formulation_fp32(activation):
    layer = _generic_lost(torch.float32, activation, with_bias=True, density=0.25)
    x = torch.randn(4, 6, N, generator=torch.Generator().manual_seed(3), requires_grad=True)
    gy = torch.randn(4, 6, M, generator=torch.Generator().manual_seed(4))
    params = list(layer.parameters())
    y = layer(x)
    assert torch.allclose(y, plain_lost(x, layer), rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(y, [x, *params], gy)
    want = torch.autograd.grad(plain_lost(x, layer), [x, *params], gy)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == torch.float32
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_lost_function_under_bf16_autocast():
    layer = _generic_lost(torch.float32, "silu", with_bias=False, density=0.25)
    x = torch.randn(64, N, generator=torch.Generator().manual_seed(5), requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in layer.parameters())
    ref_x = x.detach().clone().requires_grad_(True)
    ref = plain_lost(ref_x, layer)
    assert torch.allclose(y.float(), ref, rtol=0.05, atol=0.02 * ref.abs().max().item())
    ref.square().sum().backward()
    assert torch.allclose(x.grad, ref_x.grad, rtol=0.05, atol=0.03 * ref_x.grad.abs().max().item())


def test_lost_state_dict_names_and_shapes_are_unchanged(w0):
    layer = LOSTLinear(w0, R, density=0.1)
    k = math.floor(0.1 * N)
    assert {k_: tuple(v.shape) for k_, v in layer.state_dict().items()} == {
        "lowrank_down": (R, N), "lowrank_up": (M, R), "sparse_weight": (M, k), "channel_index": (k,)}


@pytest.mark.parametrize("rank, setting, expected", [
    (64, 0, 1), (127, 0, 1), (128, 0, 16), (255, 0, 16), (256, 0, 64), (512, 0, 64),  # auto
    (512, 1, 1), (64, 32, 32)])                                                         # explicit
def test_lost_pad_multiple_rule(rank, setting, expected):
    from lostlm.layers import lost_pad_multiple

    assert lost_pad_multiple(rank, setting) == expected


def test_build_model_sets_lost_padding_and_the_padded_model_computes_the_same(monkeypatch):
    """``layer.lost_pad_to`` (auto) pads r + k = 128 + 1 = 129 up to 144 at rank 128; the loss and
    every gradient match the unpadded layer to fp32 rounding."""
    from lostlm.build import build_model
    from lostlm.configs import load_config
    from lostlm.errors import LostLMError
    from lostlm.layers import _LOSTInputChannels

    monkeypatch.setattr(_LOSTInputChannels, "pad_to", 1)
    shape = ["model.hidden_size=160", "model.intermediate_size=160", "model.num_heads=4", "model.num_layers=1",
             "layer.rank=128", "layer.density=0.01"]
    model, _ = build_model(load_config(None, shape), 40)
    assert _LOSTInputChannels.pad_to == 16
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))

    def loss_and_grads():
        model.zero_grad()
        per_token, _ = model(ids[:, :-1], ids[:, 1:], with_lse=False)
        per_token.mean().backward()
        return per_token.mean().detach(), [p.grad.clone() for p in model.parameters()]

    padded, padded_grads = loss_and_grads()
    _LOSTInputChannels.pad_to = 1
    plain, plain_grads = loss_and_grads()
    assert torch.allclose(padded, plain, rtol=1e-6)
    for a, b in zip(padded_grads, plain_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    build_model(load_config(None, [*shape, "layer.lost_pad_to=1"]), 40)
    assert _LOSTInputChannels.pad_to == 1
    with pytest.raises(LostLMError, match="layer.lost_pad_to=-1 must be 0"):
        load_config(None, [*shape, "layer.lost_pad_to=-1"])
