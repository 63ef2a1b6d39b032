"""lostlm prepare / data.source=prepared, and the data.prefetch thread."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from lostlm.cli import main
from lostlm.configs import DataConfig, load_config
from lostlm.data import Prefetched, build_data
from lostlm.data.prepared import MANIFEST, PreparedData, feistel_permutation, read_manifest
from lostlm.errors import LostLMError
from lostlm.train import Trainer

from conftest import generate_documents


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_feistel_is_a_permutation_that_depends_on_seed_and_epoch(n):
    perm = feistel_permutation(np.arange(n), n, seed=5, epoch=0)
    assert sorted(perm.tolist()) == list(range(n))
    if n >= 1000:
        assert not np.array_equal(perm, feistel_permutation(np.arange(n), n, seed=5, epoch=1))
        assert not np.array_equal(perm, np.arange(n))


@pytest.fixture
def prepared(tiny_run, tmp_path, capsys):
    """A prepared folder of the test corpus (small shards, so there are several)."""
    overrides = [o for o in tiny_run("unused") if o.startswith("data.")]
    out = tmp_path / "prepared"
    assert main(["prepare", *overrides, "--out", str(out), "--shard-tokens", "3000"]) == 0
    assert "training and" in capsys.readouterr().out
    return out


def test_prepare_writes_shards_that_decode_to_the_tokenised_corpus(prepared, tiny_run):
    manifest = read_manifest(prepared, verify=True)
    assert manifest["dtype"] == "uint16" and len(manifest["splits"]["train"]) > 2
    # Independent check: the files source's own tokenised training array (same corpus, same BPE).
    reference = build_data(load_config(None, tiny_run("ref", data__prefetch=0)).data, 0)
    tokens = np.concatenate([np.fromfile(prepared / s["file"], dtype="<u2") for s in manifest["splits"]["train"]])
    packed = np.asarray(reference.sequences).reshape(-1)  # the files source drops only its last partial sequence
    assert len(packed) <= len(tokens) < len(packed) + reference.seq_len + 1
    assert np.array_equal(tokens[: len(packed)], packed)
    assert all(s["tokens"] <= 3000 for s in manifest["splits"]["train"])


def test_prepared_batches_cover_every_sequence_once_per_epoch_and_split_by_rank(prepared, tiny_run):
    cfg = load_config(None, tiny_run("p", data__source="prepared", data__prepared_dir=str(prepared), data__prefetch=0))
    data = build_data(cfg.data, 0)
    assert isinstance(data, PreparedData)
    # every window of every shard, read straight from the files
    windows = []
    for shard in data.manifest["splits"]["train"]:
        array = np.fromfile(prepared / shard["file"], dtype="<u2").astype(np.int64)
        windows += [tuple(r) for r in array[: len(array) // 33 * 33].reshape(-1, 33)]
    seen = [tuple(data.next_batch(1)[0].tolist()) for _ in range(data.n)]
    assert data.n == len(windows) and sorted(seen) == sorted(windows) and seen != windows
    assert data.state_dict()["epoch"] == 1
    # two ranks see the two halves of what one process sees, from the same position
    one, r0, r1 = build_data(cfg.data, 0), build_data(cfg.data, 0), build_data(cfg.data, 0)
    for _ in range(3):
        whole = one.next_batch(4)
        assert torch.equal(torch.cat([r0.next_batch(4, 0, 2), r1.next_batch(4, 1, 2)]), whole)


def test_prepared_training_resumes_exactly_and_has_no_tokeniser_work(prepared, tiny_run, tmp_path, monkeypatch,
                                                                     interrupted_run):
    import lostlm.data.tokenizer as tokenizer_module

    def refuse(*args, **kwargs):
        raise AssertionError("tokenisation in the training process")

    monkeypatch.setattr(tokenizer_module, "encode", refuse)
    monkeypatch.setattr(tokenizer_module, "encode_all", refuse)
    common = dict(data__source="prepared", data__prepared_dir=str(prepared), train__checkpoint_every=0)
    Trainer(load_config(None, tiny_run("straight", **common))).train()
    interrupted_run("resumed", **common)  # half-way through step 4, with batches read ahead by the prefetch thread
    Trainer(load_config(None, tiny_run("resumed", **common))).train()

    def final(name):
        from lostlm.checkpoint import latest_checkpoint, load_model_state
        return load_model_state(latest_checkpoint(tmp_path / name))

    a, b = final("straight"), final("resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("val_split", [None, "validation"])
def test_prepare_from_a_streamed_dataset(tmp_path, cache_dir, capsys, val_split):
    """lostlm prepare data.source=hf: the call a hub name takes (load_dataset(name, subset,
    split, streaming=True)), here on a local dataset folder (no network)."""
    from transformers import AutoTokenizer

    docs, val_docs = generate_documents(120, seed=3), generate_documents(10, seed=4)
    folder = tmp_path / "dataset"
    folder.mkdir()
    for name, items in (("train", docs), ("validation", val_docs)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(items)))
    out = tmp_path / "prepared-hf"
    overrides = ["data.source=hf", f"data.hf_name={folder}", "data.hf_subset=null", f"data.hf_val_split={val_split or 'null'}",
                 f"data.cache_dir={cache_dir}", "data.bpe_vocab_size=400", "data.val_tokens=1024", "data.val_fraction=0.1"]
    assert main(["prepare", *overrides, "--out", str(out), "--shard-tokens", "2000"]) == 0
    assert f"data.prepared_dir={out}" in capsys.readouterr().out
    manifest = read_manifest(out, verify=True)
    assert manifest["corpus"] == {"source": "hf", "hf_name": str(folder), "hf_subset": None, "hf_split": "train"}
    assert len(manifest["splits"]["train"]) > 1

    # independent: the stream's documents in order, held out by sha1 (or the validation split),
    # each tokenised alone by the saved tokenizer and followed by EOS
    def unit(text: str) -> float:
        return int(hashlib.sha1(text.encode()).hexdigest(), 16) / 16**40

    train = docs if val_split else [d for d in docs if unit(d) >= 0.1]
    held = val_docs if val_split else [d for d in docs if unit(d) < 0.1]
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))

    def ids(texts: list[str]) -> list[int]:
        return [i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]

    def shards(split: str) -> list[int]:
        return np.concatenate([np.fromfile(out / s["file"], dtype="<u2") for s in manifest["splits"][split]]).tolist()

    assert held and shards("train") == ids(train) and shards("val") == ids(held)
    assert manifest["documents"] == {"train": len(train), "val": len(held)}
    data = build_data(DataConfig(source="prepared", prepared_dir=str(out), seq_len=32, val_tokens=64, prefetch=0), 0)
    assert data.next_batch(4).shape == (4, 33) and data.vocab_size == len(tok)


def test_prefetch_gives_the_same_batches_and_positions(tiny_run):
    cfg = load_config(None, tiny_run("pf", data__prefetch=0))
    plain, ahead = build_data(cfg.data, 0), Prefetched(build_data(cfg.data, 0), depth=3)
    for step in range(5):
        assert ahead.state_dict() == plain.state_dict()
        assert torch.equal(ahead.next_batch(8), plain.next_batch(8))
    saved = ahead.state_dict()
    expected = [plain.next_batch(8) for _ in range(2)]
    ahead.next_batch(8)  # read on, then go back
    ahead.load_state_dict(saved)
    assert all(torch.equal(ahead.next_batch(8), e) for e in expected)
    ahead.close()


def test_prepared_errors_are_one_line(prepared, tmp_path, capsys, tiny_run):
    with pytest.raises(LostLMError, match="manifest.json"):
        read_manifest(tmp_path / "nothing")
    shard = prepared / json.loads((prepared / MANIFEST).read_text())["splits"]["train"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(LostLMError, match="prepare the corpus again"):
        read_manifest(prepared)
    assert main(["prepare", "data.source=prepared", "data.prepared_dir=x", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_prefetch_thread_ends_when_the_wrapper_is_dropped(tiny_run):
    import gc
    import time

    cfg = load_config(None, tiny_run("gone", data__prefetch=0))
    ahead = Prefetched(build_data(cfg.data, 0), depth=2)
    ahead.next_batch(8)
    thread = ahead._thread
    del ahead
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()
