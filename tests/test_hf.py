"""transformers integration: the lost_llama model type, Llama import, LOST from a pretrained model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lostlm.build import build_model
from lostlm.cli import main
from lostlm.configs import config_from_dict
from lostlm.errors import LostLMError
from lostlm.interop.llama_reader import llama_from_pretrained
from lostlm.interop.lost_llama import LostLlamaConfig, LostLlamaForCausalLM, to_hf
from lostlm.interop.pretrained import convert_pretrained
from lostlm.layers import LOSTLinear

VOCAB = 300
SHAPE = dict(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, num_layers=2, max_seq_len=64)


def lost_model(method: str = "lost", tie: bool = False, **layer):
    cfg = config_from_dict({"model": {**SHAPE, "tie_embeddings": tie}, "layer": {"method": method, "rank": 8, **layer},
                            "data": {"seq_len": SHAPE["max_seq_len"]}})
    model, _ = build_model(cfg, VOCAB)
    with torch.no_grad():  # move away from the initialisation, as training would
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    return model.eval(), cfg


def ids(batch: int = 2, length: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method,tie,layer", [
    ("lost", False, {}),
    ("lost", True, {"sparse_axis": "output", "channel_score": "random", "activation": "identity"}),
    ("sltrain", False, {}),
    ("cola", False, {}),
    ("full", True, {}),
])
def test_save_and_load_through_auto_classes_is_exact(tmp_path, method, tie, layer):
    model, cfg = lost_model(method, tie, **layer)
    to_hf(model, layer=cfg.layer, rank=8).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "lost_llama"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), LostLlamaConfig)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(back, LostLlamaForCausalLM)
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():  # bitwise-equal tensors; mmapped storage changes SIMD rounding at 1e-8
        assert torch.allclose(back(ids()).logits, model(ids()), rtol=0, atol=1e-6)
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == tie
    with torch.no_grad():  # and back to a LlamaLM for lostlm's own tools
        assert torch.equal(back.lostlm_model()(ids()), back(ids()).logits)


def test_a_checkpoint_missing_a_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model, cfg = lost_model("lost")
    to_hf(model, layer=cfg.layer, rank=8).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.channel_index"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="1 tensors missing, first model.layers.1.mlp.up_proj.channel_index"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_wrong_layer_config_is_refused(tmp_path):
    model, cfg = lost_model("lost")
    with pytest.raises(LostLMError, match="rebuild this model"):
        to_hf(model, layer=cfg.layer, rank=4)
    with pytest.raises(LostLMError, match="layer.method"):
        LostLlamaForCausalLM(LostLlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, method="bogus"))


def test_generate_is_deterministic_for_a_seed_and_greedy_equals_argmax():
    model, cfg = lost_model("lost")
    hf = to_hf(model, layer=cfg.layer, rank=8)
    prompt = torch.tensor([[5, 6, 7, 8]])

    def sample(seed):
        torch.manual_seed(seed)
        return hf.generate(prompt, max_new_tokens=10, do_sample=True, temperature=1.0, top_k=0, eos_token_id=None).tolist()

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    greedy = hf.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None)
    expected = prompt
    with torch.no_grad():
        for _ in range(6):
            expected = torch.cat([expected, model(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, expected)


def test_padding_mask_and_loss():
    model, cfg = lost_model("lost")
    hf = to_hf(model, layer=cfg.layer, rank=8)
    batch = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        out = hf(batch, attention_mask=mask)
        assert torch.equal(out.logits[0, 2:], model(batch[:1, 2:])[0])
        assert torch.equal(out.logits[1], model(batch[1:])[0])
        loss = hf(batch, labels=batch).loss
        expected = torch.nn.functional.cross_entropy(model(batch)[:, :-1].reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
    assert torch.allclose(loss, expected)
    left = hf.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    alone = hf.generate(batch[:1, 2:], max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert torch.equal(left[0, 2:], alone[0])


# -- transformers Llama -> lostlm ------------------------------------------------------------


def save_hf_llama(folder: Path, tie: bool = False, kv_heads: int = 2, **extra) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=kv_heads, num_hidden_layers=2, max_position_embeddings=64,
                         rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie, **extra)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("tie,kv_heads", [(False, 2), (True, 4)])
def test_llama_import_reproduces_logits(tmp_path, tie, kv_heads):
    reference = save_hf_llama(tmp_path, tie, kv_heads)
    ours = llama_from_pretrained(tmp_path)
    assert ours.config.rope_theta == 5000.0 and ours.config.norm_eps == 1e-5 and ours.config.num_kv_heads == kv_heads
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tie
    with torch.no_grad():
        assert torch.allclose(ours(ids()), reference(ids()).logits, atol=1e-4)


def test_full_rank_lost_conversion_reproduces_a_pretrained_model(tmp_path):
    reference = save_hf_llama(tmp_path)
    model, report, _, _ = convert_pretrained(tmp_path, ["layer.rank=128", "layer.gamma=1", "layer.activation=identity"])
    assert len(report) == 14 and max(r.relative_error for r in report) < 1e-5
    assert isinstance(model.model.layers[0].mlp.down_proj, LOSTLinear)
    with torch.no_grad():
        assert torch.allclose(model(ids()), reference(ids()).logits, atol=1e-4)


@pytest.mark.parametrize("extra,message", [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
])
def test_llama_import_refuses_unsupported_features(tmp_path, extra, message):
    save_hf_llama(tmp_path, **extra)
    with pytest.raises(LostLMError, match=message):
        llama_from_pretrained(tmp_path)


def test_llama_import_refuses_a_missing_folder(tmp_path):
    with pytest.raises(LostLMError, match="no config.json"):
        llama_from_pretrained(tmp_path / "nowhere")


def test_init_from_builds_the_pretrained_model_and_matches_convert_pretrained(tmp_path):
    source = tmp_path / "llama"
    reference = save_hf_llama(source)
    full = config_from_dict({"model": {"init_from": str(source)}, "layer": {"method": "full"}})
    dense, _ = build_model(full, VOCAB)
    with torch.no_grad():
        assert torch.allclose(dense(ids()), reference(ids()).logits, atol=1e-4)
    with pytest.raises(LostLMError, match="set data.tokenizer"):
        build_model(full, VOCAB + 1)

    lost = config_from_dict({"model": {"init_from": str(source)}, "layer": {"method": "lost", "rank": 8}})
    trained_from, report = build_model(lost, VOCAB)
    assert len(report) == 14 and isinstance(trained_from.model.layers[1].self_attn.q_proj, LOSTLinear)
    out = tmp_path / "lost"
    assert main(["convert-pretrained", str(source), "layer.rank=8", "--out", str(out)]) == 0
    converted = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():  # the folder is exactly the model `lostlm train model.init_from=...` starts from
        assert torch.allclose(converted(ids()).logits, trained_from(ids()), rtol=0, atol=1e-6)


def test_convert_pretrained_command_prints_report_and_next_step(tmp_path, capsys):
    save_hf_llama(tmp_path)
    assert main(["convert-pretrained", str(tmp_path), "layer.rank=8", "layer.activation=identity"]) == 0
    text = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in text and "14 layers: mean" in text
    assert f"lostlm train model.init_from={tmp_path}" in text and "layer.rank=8" in text
    assert main(["convert-pretrained", str(tmp_path), "train.lr=1"]) == 2
    assert capsys.readouterr().err.startswith("error: override 'train.lr=1' is not a layer.* key")
