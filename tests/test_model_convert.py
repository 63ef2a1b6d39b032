"""The LLaMA model against transformers, and conversion by name patterns."""

import math

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lostlm.build import build_model
from lostlm.configs import DataConfig, PRESETS, Config, LayerConfig, ModelConfig
from lostlm.convert import convert_linear_layers
from lostlm.errors import LostLMError
from lostlm.interop.names import hf_fields
from lostlm.layers import LOSTLinear, LowRankLinear, SLTrainLinear
from lostlm.model import LlamaLM, count_parameters


def hf_config(m: ModelConfig) -> LlamaConfig:
    return LlamaConfig(**hf_fields(m))


def small_model_config(**kw) -> ModelConfig:
    cfg = Config(model=ModelConfig(preset="tiny", vocab_size=97, hidden_size=32, intermediate_size=64, num_heads=4,
                                   num_layers=2, max_seq_len=64, **kw), data=DataConfig(seq_len=64))
    return cfg.resolved_model()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_parameter_count_equals_transformers(preset):
    m = Config(model=ModelConfig(preset=preset, vocab_size=32000)).resolved_model()
    with torch.device("meta"):
        ours = count_parameters(LlamaLM(m))
        theirs = sum(p.numel() for p in LlamaForCausalLM(hf_config(m)).parameters())
    assert ours == theirs


@pytest.mark.parametrize("kv_heads,tie", [(4, False), (2, True)])
def test_logits_equal_transformers_with_same_weights(kv_heads, tie):
    m = small_model_config(num_kv_heads=kv_heads, tie_embeddings=tie)
    ours = LlamaLM(m, torch.Generator().manual_seed(0)).eval()
    hf = LlamaForCausalLM(hf_config(m)).eval()
    hf.load_state_dict(ours.state_dict(), strict=not tie)
    ids = torch.randint(0, m.vocab_size, (2, 17))
    with torch.no_grad():
        assert torch.allclose(ours(ids), hf(ids).logits, atol=1e-5)


def test_init_is_llama_normal_and_seeded():
    m = small_model_config()
    a, b = LlamaLM(m, torch.Generator().manual_seed(5)), LlamaLM(m, torch.Generator().manual_seed(5))
    q = a.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(q, b.model.layers[0].self_attn.q_proj.weight)
    assert abs(q.std().item() - 0.02) < 0.003
    assert torch.equal(a.model.norm.weight, torch.ones(32))


EXPECTED = {"lost": LOSTLinear, "lowrank": LowRankLinear, "lowrank-svd": LowRankLinear, "cola": LowRankLinear,
            "sltrain": SLTrainLinear}


@pytest.mark.parametrize("method", list(EXPECTED))
def test_conversion_of_transformers_llama_replaces_exactly_the_matched_modules(method):
    m = small_model_config()
    hf = LlamaForCausalLM(hf_config(m))
    before = {name for name, mod in hf.named_modules() if isinstance(mod, nn.Linear)}
    report = convert_linear_layers(hf, LayerConfig(method=method), rank=8)
    after = {name: mod for name, mod in hf.named_modules()}
    targets = {n for n in before if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    assert {r.name for r in report} == targets and len(targets) == 7 * m.num_layers
    for name in targets:
        assert isinstance(after[name], EXPECTED[method])
    assert isinstance(after["lm_head"], nn.Linear) and type(after["lm_head"]) is nn.Linear
    out = hf(torch.randint(0, m.vocab_size, (1, 9))).logits
    assert out.shape == (1, 9, m.vocab_size) and torch.isfinite(out).all()


def test_conversion_patterns_and_globs():
    m = small_model_config()
    model = LlamaLM(m)
    report = convert_linear_layers(model, LayerConfig(method="lost", targets=["*.mlp.*"]), rank=4)
    assert len(report) == 3 * m.num_layers and all(".mlp." in r.name for r in report)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    with pytest.raises(LostLMError, match="matched no nn.Linear"):
        convert_linear_layers(LlamaLM(m), LayerConfig(targets=["qproj"]), rank=4)


@pytest.mark.parametrize("method", ["lost", "cola"])
def test_conversion_frees_each_dense_layer_once_replaced(method, monkeypatch):
    """The build's peak: when layer i is built, the dense weights of layers 0..i-1 are gone (a
    dense and a converted model never live side by side)."""
    import gc
    import weakref

    import lostlm.convert as convert

    model = LlamaLM(small_model_config())
    dense = [weakref.ref(mod.weight) for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and name != "lm_head"]
    alive, real = [], convert.build_layer

    def counting(linear, *args, **kwargs):
        gc.collect()
        alive.append(sum(ref() is not None for ref in dense))
        return real(linear, *args, **kwargs)

    monkeypatch.setattr(convert, "build_layer", counting)
    convert_linear_layers(model, LayerConfig(method=method), rank=4)
    assert alive == list(range(len(dense), 0, -1))


def test_lost_model_has_fewer_parameters_as_designed():
    cfg = Config(model=ModelConfig(preset="tiny", vocab_size=1000), layer=LayerConfig(method="lost", density=0.05))
    model, report = build_model(cfg, 1000)
    m = cfg.resolved_model()
    d, f, r = m.hidden_size, m.intermediate_size, cfg.resolved_rank()
    k_d, k_f = int(0.05 * d), int(0.05 * f)
    per_layer = 4 * (r * 2 * d + d * k_d) + 2 * (r * (d + f) + f * k_d) + (r * (f + d) + d * k_f)
    expected = m.num_layers * (per_layer + 2 * d) + 2 * 1000 * d + d
    assert count_parameters(model) == expected
    assert all(math.isnan(r.relative_error) for r in report)  # silu layers cannot be merged: no error to report


def test_build_model_same_seed_same_w0_across_methods():
    base = Config(model=ModelConfig(preset="tiny", vocab_size=300), layer=LayerConfig(method="full"))
    lost = Config(model=ModelConfig(preset="tiny", vocab_size=300), layer=LayerConfig(method="lost", gamma=1.0,
                                                                                      activation="identity", rank=256))
    dense, _ = build_model(base, 300)
    converted, report = build_model(lost, 300)
    assert max(r.relative_error for r in report) < 1e-5  # full rank, γ=1: the LOST layer is W0
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.allclose(dense(ids), converted(ids), atol=1e-4)
