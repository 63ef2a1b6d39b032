"""lostlm export (dense llama and lost_llama) and lostlm generate, on run folders made without training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from conftest import generate_documents
from lostlm.build import build_model
from lostlm.checkpoint import save_checkpoint
from lostlm.cli import main
from lostlm.configs import config_from_dict, save_config
from lostlm.export import export_dense
from lostlm.layers import NotMergeable
from lostlm.interop.lost_llama import to_hf
from lostlm.loading import load_trained_run

SHAPE = dict(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, num_layers=2, max_seq_len=64)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE of ~300 tokens trained on the test corpus (well under a second)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(generate_documents(40), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def make_run(folder: Path, method: str, tie: bool = False, **layer) -> Path:
    """A run folder as `lostlm train` leaves it (config.yaml, tokenizer/, one checkpoint), with
    the weights moved away from their initialisation as training would."""
    cfg = config_from_dict({"model": {**SHAPE, "tie_embeddings": tie}, "layer": {"method": method, "rank": 8, **layer},
                            "train": {"out_dir": str(folder)}, "data": {"seq_len": SHAPE["max_seq_len"]}})
    tokenizer = tiny_tokenizer()
    model, _ = build_model(cfg, len(tokenizer))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    folder.mkdir(parents=True)
    save_config(cfg, folder / "config.yaml")
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    save_checkpoint(folder, 7, model.state_dict(), {}, {})
    return folder


MERGEABLE = {
    "full": ("full", False, {}),
    "full-tied": ("full", True, {}),
    "galore": ("galore", False, {}),
    "lowrank": ("lowrank", False, {}),
    "lowrank-svd": ("lowrank-svd", False, {}),
    "sltrain": ("sltrain", False, {}),
    "lost-identity": ("lost", False, {"activation": "identity"}),
    "lost-identity-output": ("lost", True, {"activation": "identity", "sparse_axis": "output", "sparse_init": "original"}),
}
TOKENS = [[5, 17, 250, 3, 99, 42, 7, 280, 1], [0, 1, 2, 3, 4, 5, 6, 7, 8]]

# Runs in a fresh interpreter: only transformers, never lostlm.
CHECK = """
import json, sys, torch
from transformers import LlamaForCausalLM
folders, tokens, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
logits = {}
for name, folder in folders.items():
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits[name] = model(torch.tensor(tokens)).logits
assert not any(m.startswith("lostlm") for m in sys.modules), "lostlm was imported"
torch.save(logits, out)
"""


@pytest.fixture(scope="module")
def dense_exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    sources, folders = {}, {}
    for name, (method, tie, layer) in MERGEABLE.items():
        run = make_run(root / f"run-{name}", method, tie, **layer)
        with torch.no_grad():
            sources[name] = load_trained_run(run).model(torch.tensor(TOKENS))
        folders[name] = str(export_dense(run, root / f"out-{name}"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", CHECK, json.dumps(folders), json.dumps(TOKENS), str(root / "logits.pt")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return sources, torch.load(root / "logits.pt"), folders


@pytest.mark.parametrize("name", list(MERGEABLE))
def test_dense_export_loads_with_transformers_alone_and_matches(dense_exports, name):
    sources, exported, folders = dense_exports
    config = json.loads((Path(folders[name]) / "config.json").read_text())
    assert config["model_type"] == "llama" and config["eos_token_id"] == 0
    assert (Path(folders[name]) / "tokenizer.json").is_file()
    diff = (sources[name] - exported[name]).abs().max().item()
    assert diff < 1e-4


@pytest.mark.parametrize("method,layer", [("lost", {}), ("cola", {})])
def test_dense_export_refuses_silu(tmp_path, capsys, method, layer):
    run = make_run(tmp_path / "run", method, **layer)
    with pytest.raises(NotMergeable):
        export_dense(run, tmp_path / "out")
    assert main(["export", str(run), "--dense", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "activation=silu" in err and "\n" not in err


def test_export_lost_llama_folder(tmp_path, capsys):
    run = make_run(tmp_path / "run", "lost")
    out = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "lost_llama" and config["method"] == "lost" and config["rank"] == 8
    back = AutoModelForCausalLM.from_pretrained(out)
    source = load_trained_run(run).model
    with torch.no_grad():
        assert torch.allclose(back(torch.tensor(TOKENS)).logits, source(torch.tensor(TOKENS)), rtol=0, atol=1e-6)


def generate(capsys, path, *extra) -> str:
    assert main(["generate", str(path), "--prompt", "The king", "--max-new-tokens", "12", *extra]) == 0
    captured = capsys.readouterr()
    assert "model: " in captured.err
    return captured.out


def test_generate_streams_and_is_deterministic_for_a_seed(tmp_path, capsys):
    run = make_run(tmp_path / "run", "lost", activation="identity")
    first = generate(capsys, run, "--seed", "0", "--temperature", "1.0")
    assert first.startswith("The king") and len(first) > len("The king")
    assert generate(capsys, run, "--seed", "0", "--temperature", "1.0") == first
    assert generate(capsys, run, "--seed", "1", "--temperature", "1.0") != first
    # Greedy decoding of the run and of its dense export agree.
    assert main(["export", str(run), "--dense", "--out", str(tmp_path / "dense")]) == 0
    capsys.readouterr()
    assert generate(capsys, run, "--temperature", "0") == generate(capsys, tmp_path / "dense", "--temperature", "0")


def test_generate_refuses_more_tokens_than_positions(tmp_path, capsys):
    run = make_run(tmp_path / "run", "full")
    assert main(["generate", str(run), "--prompt", "The king", "--max-new-tokens", "100"]) == 2
    assert "exceeds the model's 64 positions" in capsys.readouterr().err


def test_kv_cache_greedy_equals_no_cache_and_logits_match(tmp_path):
    """Cached generation (transformers' DynamicCache) gives the same greedy tokens as recomputing
    the prefix, and the cached per-step logits equal a full forward's (fp32)."""
    from transformers import DynamicCache

    run = make_run(tmp_path / "run", "lost")  # SHAPE has grouped-query attention
    model = to_hf(load_trained_run(run)).eval()
    prompt = torch.tensor([TOKENS[0][:5]])
    options = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None, min_new_tokens=20)
    with torch.no_grad():
        cached = model.generate(prompt, attention_mask=torch.ones_like(prompt), use_cache=True, **options)
        plain = model.generate(prompt, attention_mask=torch.ones_like(prompt), use_cache=False, **options)
        assert cached.shape[1] == prompt.shape[1] + 20 and torch.equal(cached, plain)
        full = model(cached).logits
        cache = DynamicCache()
        first = model(cached[:, :7], cache=cache).logits  # a multi-token chunk, then one token at a time
        steps = [first] + [model(cached[:, i:i + 1], cache=cache).logits for i in range(7, cached.shape[1])]
    assert cache.get_seq_length() == cached.shape[1]
    assert torch.allclose(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
