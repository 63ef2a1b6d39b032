"""The analytic estimator and FLOP counter against hand counts, real models and the papers."""

import math

import pytest
import torch
from torch import nn

from lostlm.cli import main
from lostlm.configs import METHODS, LayerConfig, load_config
from lostlm.convert import build_layer, build_model
from lostlm.estimate import estimate, estimate_preset, layer_flops_per_token, layer_parameters
from lostlm.costs import forward_flops_per_token, linear_flops_per_token, saved_activation_bytes, training_flops_per_step

M, N, R = 96, 80, 16  # out, in, rank of the one-layer hand counts


@pytest.mark.parametrize("method", [m for m in METHODS if m != "galore"])
def test_flop_counter_matches_hand_count_for_one_layer(method):
    linear = nn.Linear(N, M, bias=False)
    layer = linear if method == "full" else build_layer(linear, LayerConfig(method=method, density=0.1), R)
    k = math.floor(0.1 * N)  # LOST keeps k input columns
    hand = {"full": 2 * M * N, "lowrank": 2 * R * (M + N), "lowrank-svd": 2 * R * (M + N), "cola": 2 * R * (M + N),
            "lost": 2 * R * (M + N) + 2 * M * k, "sltrain": 2 * M * N}[method]
    assert linear_flops_per_token(layer) == hand
    assert layer_flops_per_token(method, M, N, R, LayerConfig(method=method, density=0.1)) == hand
    assert layer_parameters(method, M, N, R, LayerConfig(method=method, density=0.1)) == sum(p.numel() for p in layer.parameters())
    if method == "sltrain":  # W = A B + S is rebuilt every forward: one r-inner-dim matmul of m×n outputs
        assert layer.reconstruction_flops() == 2 * R * M * N


@pytest.mark.parametrize("method,axis", [(m, "input") for m in METHODS] + [("lost", "output")])  # the axis only matters to LOST
def test_estimator_matches_real_models(method, axis):
    cfg = load_config(None, [f"layer.method={method}", f"layer.sparse_axis={axis}", "model.hidden_size=64",
                             "model.intermediate_size=160", "model.num_layers=2", "layer.rank=16", "data.seq_len=32"])
    model, _ = build_model(cfg, 500)
    est = estimate(cfg, 500, micro_batch=4, seq_len=32)
    assert est.params_total == sum(p.numel() for p in model.parameters())
    assert est.forward_flops_per_token == forward_flops_per_token(model, 32)
    tokens = 4 * 32
    assert est.train_flops_per_token * tokens == pytest.approx(training_flops_per_step(model, 32, tokens, 1))
    ids = torch.randint(0, 500, (4, 33), generator=torch.Generator().manual_seed(0))
    for amp in (True, False):
        measured = saved_activation_bytes(model, ids, torch.bfloat16 if amp else None)
        analytic = estimate(cfg, 500, micro_batch=4, seq_len=32, amp=amp).activations_bytes
        assert analytic == pytest.approx(measured, rel=0.03), (amp, analytic, measured)


# GaLore paper, Table 2, full-rank "weights + optimizer states" in BF16.
GALORE_FULL_RANK_G = {"60m": 0.36, "130m": 0.76, "350m": 2.06, "1b": 7.80}


def test_paper_full_rank_memory_estimates():
    """bf16 weights + two bf16 Adam moments, vocab 32000, G = 10⁹ bytes. No per-parameter
    formula puts all four of the paper's figures within 5% (see estimate.py); ours are within
    7.5% (60M -3.3%, 130M +5.9%, 350M +7.1%, 1B +3.0%), and with vocab 32100 they are
    SLTrain's reproduction of the same column digit for digit."""
    for preset, paper in GALORE_FULL_RANK_G.items():
        est = estimate_preset(preset, "full", dtype="bf16")
        assert est.weights_optimizer_bytes == 6 * est.params_total
        assert est.weights_optimizer_bytes / 1e9 == pytest.approx(paper, rel=0.075), preset
    # SLTrain's Table 2 repeats the same convention with the T5 tokenizer's 32100 entries, digit for digit
    sltrain_table = {"60m": 0.35, "130m": 0.81, "350m": 2.21, "1b": 8.04}
    for preset, value in sltrain_table.items():
        cfg = load_config(None, [f"model.preset={preset}", "layer.method=full"])
        assert round(estimate(cfg, 32100).weights_optimizer_bytes / 1e9, 2) == value


def test_lost_holds_about_half_of_full_rank_at_1b():
    full, lost = estimate_preset("1b", "full"), estimate_preset("1b", "lost")
    assert lost.state_bytes / full.state_bytes <= 0.55  # 0.48 (weights + grads + Adam moments)
    galore = estimate_preset("1b", "galore")
    assert galore.grads_bytes == full.grads_bytes and galore.optimizer_bytes < 0.5 * full.optimizer_bytes


def test_estimate_cli(capsys):
    assert main(["estimate", "--preset", "60m", "--preset", "1b"]) == 0
    out = capsys.readouterr().out
    rows = [l for l in out.splitlines() if l.startswith("| 60m") or l.startswith("| 1b")]
    assert len(rows) == 2 * len(METHODS) and "GB = 10⁹ bytes" in out
    assert main(["estimate", "--preset", "3b"]) == 2
    assert "not a preset" in capsys.readouterr().err
