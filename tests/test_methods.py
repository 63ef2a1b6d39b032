"""The method registry: a toy parametrisation added through it alone trains, and every
built-in method's cost formulas agree with its real layer."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lostlm import methods
from lostlm.configs import METHODS, LayerConfig, load_config
from lostlm.build import build_model
from lostlm.convert import build_layer
from lostlm.errors import LostLMError
from lostlm.estimate import estimate
from lostlm.train import Trainer

M, N, R = 96, 80, 16  # out, in, rank of the one-layer checks


class RowScaleLinear(nn.Module):
    """Toy parametrisation: ``W = diag(g) W0`` with W0 frozen and one trainable gain per output."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("frozen", weight.detach().clone(), persistent=True)
        self.gain = nn.Parameter(torch.ones(weight.shape[0], dtype=weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.frozen) * self.gain

    def trainable_parameters(self) -> int:
        return self.gain.numel()

    def flops_per_token(self) -> int:
        return 2 * self.in_features * self.out_features + self.out_features  # the GEMM, then the gains

    def merged_weight(self) -> torch.Tensor:
        return self.gain[:, None] * self.frozen


TOY = methods.Method(
    name="toy-rowscale",
    parameters=lambda m, n, rank, layer: m,
    flops_per_token=lambda m, n, rank, layer: 2 * m * n + m,
    build=lambda linear, layer, rank, generator, init_std: RowScaleLinear(linear.weight.data),
)


@pytest.fixture
def toy_method():
    methods.register(TOY)
    yield TOY
    methods.unregister(TOY.name)


def _losses(run_dir):
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def test_a_registered_toy_method_is_valid_everywhere_and_trains(toy_method, tiny_run, tmp_path):
    assert "toy-rowscale" in METHODS  # configs' list (and --method's choices) is the live registry
    cfg = load_config(None, tiny_run("toy", layer__method="toy-rowscale", train__steps=16, train__lr=1e-2,
                                     train__eval_every=16, train__checkpoint_every=0))
    trainer = Trainer(cfg)
    converted = [m for m in trainer.model.modules() if isinstance(m, RowScaleLinear)]
    assert len(converted) == 7 * 2 and all(c.relative_error < 1e-6 for c in trainer.conversion)
    summary = trainer.train()
    curve = _losses(tmp_path / "toy")
    assert sum(curve[-3:]) / 3 < curve[0] - 0.5, curve
    assert summary["method"] == "toy-rowscale" and summary["mfu"] > 0
    # the registry's formulas drive the analytic estimate, which matches the trained model
    est = estimate(cfg, trainer.data.vocab_size)
    assert est.params_total == sum(p.numel() for p in trainer.model.parameters())


def test_unknown_and_duplicate_methods_are_refused(toy_method):
    with pytest.raises(LostLMError, match="toy-rowscale"):  # the error lists the registered names
        load_config(None, ["layer.method=nope"])
    with pytest.raises(LostLMError, match="already registered"):
        methods.register(TOY)
    with pytest.raises(LostLMError, match="not known"):
        methods.get("nope")


def _layer_configs(name):
    if name == "lost":
        return [LayerConfig(method=name, density=0.1, sparse_axis=axis, activation=act)
                for axis in ("input", "output") for act in ("silu", "identity")]
    return [LayerConfig(method=name, density=0.1)]


@pytest.mark.parametrize("name", ["full", "lowrank", "lowrank-svd", "cola", "sltrain", "lost", "galore"])
def test_registry_formulas_match_the_real_layers(name):
    spec = methods.get(name)
    for layer_cfg in _layer_configs(name):
        linear = nn.Linear(N, M, bias=False)
        layer = linear if spec.dense else build_layer(linear, layer_cfg, R, torch.Generator().manual_seed(0))
        trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        flops = 2 * M * N if spec.dense else layer.flops_per_token()
        if not spec.dense:
            assert layer.trainable_parameters() == trainable
        assert spec.parameters(M, N, R, layer_cfg) == trainable, layer_cfg
        assert spec.flops_per_token(M, N, R, layer_cfg) == flops, layer_cfg
        rebuild = layer.reconstruction_flops() if hasattr(layer, "reconstruction_flops") else None
        assert (spec.rebuild_flops(M, N, R, layer_cfg) if spec.rebuild_flops else None) == rebuild
        if not spec.dense:  # mergeable ⇔ merged_weight() gives the dense matrix the layer applies
            x = torch.randn(3, N)
            if spec.mergeable(layer_cfg):
                torch.testing.assert_close(F.linear(x, layer.merged_weight()), layer(x), rtol=1e-4, atol=1e-5)
            else:
                with pytest.raises(LostLMError):
                    layer.merged_weight()


def test_dense_methods_keep_linear_layers_and_name_their_needs():
    cfg = load_config(None, ["layer.method=galore", "model.hidden_size=32", "model.intermediate_size=64",
                             "model.num_heads=4", "model.num_layers=1"])
    model, report = build_model(cfg, 300)
    assert report == [] and not any(hasattr(m, "flops_per_token") for m in model.modules())
    galore = methods.get("galore")
    assert galore.dense and galore.optimizer == "galore" and galore.no_fsdp
    assert all(methods.get(n).optimizer == "adamw" and methods.get(n).no_fsdp is None for n in METHODS if n != "galore")
