"""lostlm.interop.any_model: LOST on transformers causal LMs, save/load round trips, Trainer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from lostlm.errors import LostLMError
from lostlm.interop import any_model
from lostlm.layers import LOSTLinear

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "llama": SMALL,
    "qwen2": SMALL,
    "mistral": SMALL,
    "gemma": {**SMALL, "head_dim": 8},
    "gpt2": dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64),
}
IDS = torch.tensor([[5, 17, 80, 3, 9, 42, 7, 28, 1, 60], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])


def base_model(model_type: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **CONFIGS[model_type])).eval()


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_convert_save_load_round_trip(model_type, tmp_path):
    model = base_model(model_type)
    dense_logits = model(IDS).logits
    any_model.convert_for_training(model, method="lost", rank=4, density=0.25)
    lost_layers = [m for m in model.modules() if isinstance(m, LOSTLinear)]
    assert len(lost_layers) == (4 if model_type == "gpt2" else 7) * 2
    assert model(IDS).logits.shape == dense_logits.shape
    with torch.no_grad():  # move away from the initialisation, as training would
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    expected_state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(IDS).logits
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / any_model.LOST_CONFIG).is_file()

    back = any_model.from_pretrained(tmp_path / "out").eval()
    state = back.state_dict()
    assert state.keys() == expected_state.keys()
    assert all(torch.equal(state[k], expected_state[k]) for k in state)
    assert torch.equal(back(IDS).logits, expected)
    # and the loaded model saves again to the same folder format
    back.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / any_model.LOST_CONFIG).read_text()) == \
        json.loads((tmp_path / "out" / any_model.LOST_CONFIG).read_text())


def test_gpt2_conv1d_becomes_an_equal_linear():
    model = base_model("gpt2")
    expected = model(IDS).logits
    from lostlm.interop.any_model import _conv1d_to_linear
    replaced = _conv1d_to_linear(model, ["c_attn", "c_proj", "c_fc"])
    assert len(replaced) == 8
    assert torch.allclose(model(IDS).logits, expected, rtol=0, atol=1e-5)


@pytest.fixture
def saved(tmp_path):
    model = any_model.convert_for_training(base_model("llama"), method="lost", rank=4, density=0.25)
    model.save_pretrained(tmp_path / "out")
    return tmp_path / "out"


def test_plain_transformers_load_fails_loudly(saved):
    with pytest.raises((ValueError, KeyError, OSError)):
        AutoModelForCausalLM.from_pretrained(saved)


def test_missing_settings_or_tensors_are_one_line_errors(saved):
    (saved / any_model.LOST_CONFIG).rename(saved / "moved.json")
    with pytest.raises(LostLMError, match="lost_config.json") as info:
        any_model.from_pretrained(saved)
    assert "\n" not in str(info.value)
    (saved / "moved.json").rename(saved / any_model.LOST_CONFIG)
    state = load_file(str(saved / "model.safetensors"))
    dropped = next(k for k in state if "lowrank" in k)
    del state[dropped]
    save_file(state, str(saved / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LostLMError, match="missing") as info:
        any_model.from_pretrained(saved)
    assert "\n" not in str(info.value)


def test_trains_under_transformers_trainer(tmp_path):
    pytest.importorskip("accelerate")
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = any_model.convert_for_training(base_model("qwen2"), method="lost", rank=4, density=0.25)
    # a learnable sequence: ascending runs of token ids
    rows = [[(start + i) % 96 for i in range(16)] for start in range(64)]
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=16, max_steps=30,
                             learning_rate=1e-2, logging_steps=5, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.5 * losses[0]
    trainer.save_model(str(tmp_path / "saved"))
    back = any_model.from_pretrained(tmp_path / "saved").eval()
    ids = torch.tensor(rows[:2])
    assert torch.equal(back(ids).logits, model.eval()(ids).logits)
