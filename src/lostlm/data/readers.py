"""Documents: local files (``data.source=files``), the default corpus, hub/local streams
(``data.source=hf``), the validation hold-out by content hash, and the corpus fingerprint that
keys the caches."""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..configs import DataConfig
from ..errors import LostLMError
from .common import cache_root, reason, short_sha
from .corpus import DEFAULT_CORPUS, prepare_default_corpus

FORMAT = 1  # bump when tokenizing/packing changes, to invalidate cached token files
_BPE_STREAM_CHARS = 50_000_000  # hf: the BPE is trained on this much text from the stream's start
_KINDS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_COMPRESSED = (".gz", ".bz2", ".xz")

# -- map-style sources (default, files) -----------------------------------------------------------


def _file_kind(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes.pop()
    return _KINDS.get(suffixes[-1]) if suffixes else None


def _matches(pattern: str) -> list[Path]:
    path = os.path.expanduser(pattern)
    if os.path.isdir(path):  # a folder: every supported file inside it
        return sorted(p for p in Path(path).rglob("*") if p.is_file() and _file_kind(p) and not p.name.startswith("."))
    if glob.has_magic(path):
        return sorted(Path(p) for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    return [Path(path)] if os.path.isfile(path) else []


def resolve_paths(patterns: list[str]) -> list[Path]:
    """The files named by ``data.paths`` (files, folders, globs), in order, without repeats."""
    files: list[Path] = []
    for pattern in patterns:
        found = _matches(pattern)
        if not found:
            raise LostLMError(f"data.paths: no file matches {pattern!r}; check the path")
        for p in found:
            if _file_kind(p) is None:
                raise LostLMError(f"data.paths: {p} has an unsupported extension; use .txt, .jsonl, .json or .parquet "
                                  "(optionally .gz/.bz2/.xz)")
            if p not in files:
                files.append(p)
    return files


@contextmanager
def _quiet_datasets() -> Iterator[Any]:
    import datasets
    from datasets.utils import logging as ds_logging
    enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield datasets
    finally:
        if enabled:
            ds_logging.enable_progress_bar()


def _read_files(cfg: DataConfig) -> list[str]:
    texts: list[str] = []
    with _quiet_datasets() as datasets:
        # consecutive files of one kind are read by one load_dataset call (fast for many shards)
        for kind, group in itertools.groupby(resolve_paths(cfg.paths), key=_file_kind):
            names = [str(p) for p in group]
            shown = ", ".join(Path(n).name for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            options = {"sample_by": "paragraph"} if kind == "text" else {}
            try:
                ds = datasets.load_dataset(kind, data_files=names, split="train",
                                           cache_dir=str(cache_root(cfg) / "hf-datasets"), **options)
            except Exception as exc:  # malformed json, bad encoding, mixed schemas: the user's files
                raise LostLMError(f"data.paths: could not read {shown} as {kind} ({reason(exc)}); check the file format") from None
            field = "text" if kind == "text" else cfg.text_field
            if field not in ds.column_names:
                raise LostLMError(f"data.text_field={field!r} not found in {shown}; its fields are: {', '.join(ds.column_names)}")
            texts.extend(ds.data.column(field).to_pylist())  # straight from Arrow: ~30x faster than ds[field]
    return texts


def read_documents(cfg: DataConfig) -> list[str]:
    """All documents of a map-style source (stripped, empty ones dropped, capped at max_documents)."""
    if cfg.source == "default":
        with open(prepare_default_corpus(cache_root(cfg)), encoding="utf-8") as fh:
            raw = [json.loads(line)["text"] for line in fh if line.strip()]
        where = "the default corpus (delete <cache>/corpus/ to rebuild it)"
    elif cfg.source == "files":
        raw, where = _read_files(cfg), f"data.paths={cfg.paths}"
    else:
        raise ValueError("read_documents is for data.source=default or files")
    texts = [t.strip() for t in raw if isinstance(t, str) and t.strip()]
    if not texts:
        raise LostLMError(f"data: no text found in {where}; check the files and data.text_field={cfg.text_field!r}")
    return texts[: cfg.max_documents] if cfg.max_documents else texts


# -- hold-out ------------------------------------------------------------------------------------


def unit_hash(text: str) -> float:
    """sha1(text) as a number in [0, 1): a document is held out when this is below val_fraction."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_documents(texts: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, validation) by content hash; both non-empty; corpus order kept within each."""
    if len(texts) < 2:
        raise LostLMError(f"data: the corpus has {len(texts)} document(s); at least 2 are needed "
                          "(training and validation); add text")
    h = [unit_hash(t) for t in texts]
    held = [x < val_fraction for x in h]
    if not any(held):  # small corpora: still hold out one document
        held[int(np.argmin(h))] = True
    if all(held):
        held[int(np.argmax(h))] = False
    return [t for t, v in zip(texts, held) if not v], [t for t, v in zip(texts, held) if v]


def corpus_fingerprint(cfg: DataConfig) -> str:
    """Cheap identity of the corpus (no text is read): what the caches are keyed by."""
    if cfg.source == "default":
        ident: Any = [DEFAULT_CORPUS, prepare_default_corpus(cache_root(cfg)).stat().st_size]
    elif cfg.source == "files":
        ident = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in resolve_paths(cfg.paths)]
    else:
        local = Path(cfg.hf_name).expanduser()
        stats = ([[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(local.rglob("*")) if p.is_file()]
                 if local.is_dir() else None)
        ident = [cfg.hf_name, cfg.hf_subset, cfg.hf_split, cfg.hf_val_split, stats]
    return short_sha([FORMAT, cfg.source, ident, cfg.text_field, cfg.max_documents, cfg.val_fraction])


# -- streams (hf) -------------------------------------------------------------------------------


def open_stream(cfg: DataConfig, split: str) -> Any:
    """``datasets.load_dataset(hf_name, hf_subset, split=split, streaming=True)``."""
    with _quiet_datasets() as datasets:
        try:
            return datasets.load_dataset(cfg.hf_name, cfg.hf_subset, split=split, streaming=True)
        except Exception as exc:
            raise LostLMError(f"data.hf_name={cfg.hf_name!r} (subset {cfg.hf_subset!r}, split {split!r}) could not be "
                              f"opened ({reason(exc)}); check the name, data.hf_subset (null for a local folder) and "
                              "data.hf_split/hf_val_split (null holds documents out by hash)") from None


def text_of(example: dict, cfg: DataConfig) -> str | None:
    """The stripped text of one streamed example, None when empty."""
    if cfg.text_field not in example:
        raise LostLMError(f"data.text_field={cfg.text_field!r} not found in {cfg.hf_name}; its fields are: {', '.join(example)}")
    text = example[cfg.text_field]
    return text.strip() if isinstance(text, str) and text.strip() else None


def is_held_out(text: str, cfg: DataConfig) -> bool:
    """True for an hf document that validation takes from the training stream (by hash)."""
    return cfg.source == "hf" and cfg.hf_val_split is None and unit_hash(text) < cfg.val_fraction


def stream_texts(cfg: DataConfig, held_out: bool) -> Iterator[str]:
    """hf texts in stream order: the training documents, or the held-out ones (by hash)."""
    if held_out and cfg.hf_val_split is not None:
        ds = open_stream(cfg, cfg.hf_val_split)
    else:
        ds = open_stream(cfg, cfg.hf_split)
        ds = ds.take(cfg.max_documents) if cfg.max_documents else ds
    from_val_split = held_out and cfg.hf_val_split is not None
    for example in ds:
        text = text_of(example, cfg)
        if text and (from_val_split or is_held_out(text, cfg) == held_out):
            yield text


def training_texts(cfg: DataConfig) -> Iterable[str]:
    """The text a BPE is trained on: the training documents (hf: the first ~50 M characters)."""
    if cfg.source == "hf":
        total = 0
        for text in stream_texts(cfg, held_out=False):
            yield text
            total += len(text)
            if total >= _BPE_STREAM_CHARS:
                return
    else:
        yield from split_documents(read_documents(cfg), cfg.val_fraction)[0]
