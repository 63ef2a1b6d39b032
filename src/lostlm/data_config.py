"""The ``data`` section of the config (:class:`DataConfig`; its checks are in :mod:`lostlm.validation`).

Split from :mod:`lostlm.configs` (which re-exports both names) to keep that file short; see
``docs/data.md`` for the sources.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SOURCES = ("default", "files", "hf", "prepared")


@dataclass
class DataConfig:
    source: str = "default"
    """default (bundled public-domain corpus, fetched from package registries and cached),
    files (local .txt/.jsonl/.json/.parquet through Hugging Face datasets), hf (a hub
    dataset name such as allenai/c4, streamed, each rank reading its own part of the stream),
    or prepared (token shards written by ``lostlm prepare``, see data.prepared_dir)."""
    prepared_dir: str | None = None
    """source=prepared: the folder ``lostlm prepare`` wrote (manifest.json, shards, tokenizer/).
    The tokenizer and corpus keys below are then taken from its manifest, not from here."""
    paths: list[str] = field(default_factory=list)
    """source=files: file paths or globs."""
    hf_name: str = "allenai/c4"
    """source=hf: dataset name or local folder for datasets.load_dataset."""
    hf_subset: str | None = "en"
    """source=hf: dataset configuration (C4: en)."""
    hf_split: str = "train"
    """source=hf: training split; validation uses hf_val_split."""
    hf_val_split: str | None = "validation"
    """source=hf: validation split; None holds out documents from the training split."""
    text_field: str = "text"
    """Field that holds the document text (json/jsonl/parquet/hub)."""
    tokenizer: str = "bpe"
    """bpe: a byte-level BPE trained on the corpus with `tokenizers` and cached; otherwise a
    Hugging Face tokenizer name or local folder (paper recipes: t5-base)."""
    bpe_vocab_size: int = 8192
    """tokenizer=bpe: vocabulary size of the trained BPE."""
    seq_len: int = 256
    """Tokens per training sequence (documents are packed, EOS-separated)."""
    val_fraction: float = 0.04
    """Share of documents held out for validation (deterministic, by content hash)."""
    val_tokens: int = 131072
    """Tokens of held-out text used for each evaluation."""
    cache_dir: str | None = None
    """Where the corpus, tokenizer and token files are cached. None: $LOSTLM_CACHE or
    ~/.cache/lostlm."""
    max_documents: int | None = None
    """Use at most this many documents (quick experiments)."""
    prefetch: int = 2
    """Batches prepared ahead by a background thread while the model computes (0: none, the
    batch is made on the training thread)."""

