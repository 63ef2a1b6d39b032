"""The tokenizer: a byte-level BPE trained on the corpus (cached per corpus fingerprint and
vocabulary size) or any ``AutoTokenizer`` folder; and encoding documents into token ids."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..configs import DataConfig
from ..errors import LostLMError
from ..runtime import atomic_dir
from .common import cache_root, log, reason
from .readers import corpus_fingerprint, training_texts

BPE_EOS = "<|endoftext|>"


def _train_bpe(texts: Iterable[str], vocab_size: int, folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    log(f"training a byte-level BPE tokenizer with {vocab_size} tokens ...")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() < vocab_size:
        log(f"note: the corpus only supports {tok.get_vocab_size()} BPE tokens (data.bpe_vocab_size={vocab_size})")
    with atomic_dir(folder) as tmp:
        PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=BPE_EOS).save_pretrained(str(tmp))


def _ensure_eos(tok: Any) -> None:
    """Documents are separated by EOS, so every tokenizer needs one."""
    if tok.eos_token_id is None:
        vocab = tok.get_vocab()
        eos = next((t for t in ("</s>", BPE_EOS, "<eos>") if t in vocab), None)
        if eos is not None:
            tok.eos_token = eos
        else:
            tok.add_special_tokens({"eos_token": BPE_EOS})


def load_tokenizer_lazily(cfg: DataConfig, train_texts: Callable[[], Iterable[str]]) -> Any:
    """:func:`load_tokenizer`, calling ``train_texts()`` only when a BPE has to be trained."""
    from transformers import AutoTokenizer

    name = cfg.tokenizer
    if name == "bpe":
        folder = cache_root(cfg) / "tokenizers" / f"bpe{cfg.bpe_vocab_size}-{corpus_fingerprint(cfg)}"
        if not (folder / "tokenizer.json").is_file():
            _train_bpe(train_texts(), cfg.bpe_vocab_size, folder)
        name = str(folder)
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # OSError (missing), ValueError (bad repo id), ImportError (sentencepiece) ...
        raise LostLMError(f"data.tokenizer={cfg.tokenizer!r} could not be loaded ({reason(exc)}); "
                          "give a local tokenizer folder or 'bpe'") from None
    _ensure_eos(tok)
    return tok


def load_tokenizer(cfg: DataConfig, train_texts: Iterable[str] | None = None) -> Any:
    """data.tokenizer: ``bpe`` trains (once, then cached per corpus fingerprint and vocabulary
    size) a byte-level BPE with EOS ``<|endoftext|>`` on `train_texts`, or on the training
    documents of the configured corpus when None; any other value is a local folder or hub name
    for ``AutoTokenizer.from_pretrained``. The tokenizer always has an EOS token."""
    return load_tokenizer_lazily(cfg, (lambda: train_texts) if train_texts is not None else lambda: training_texts(cfg))


def tokenizer_fingerprint(tok: Any) -> str:
    """Identity of a tokenizer (its serialised backend or vocabulary, EOS and size)."""
    backend = getattr(tok, "backend_tokenizer", None)
    ident = backend.to_str() if backend is not None else sorted(tok.get_vocab().items())
    return hashlib.sha1(json.dumps([ident, tok.eos_token_id, len(tok)]).encode()).hexdigest()[:16]


def encode(tok: Any, texts: list[str]) -> np.ndarray:
    """Token ids of the documents, each followed by EOS, concatenated (int32)."""
    if not texts:
        return np.zeros(0, dtype=np.int32)
    backend = getattr(tok, "backend_tokenizer", None)
    # The Rust call gives tok(...)'s ids without offsets (~2x faster), unless the tokenizer.json
    # enables truncation/padding, which tok(...) would switch off first.
    if hasattr(backend, "encode_batch_fast") and backend.truncation is None and backend.padding is None:
        ids = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    else:
        ids = tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
    eos = [tok.eos_token_id]
    return np.concatenate([np.asarray(x + eos, dtype=np.int32) for x in ids])


def encode_all(tok: Any, texts: list[str], chunk: int = 256) -> np.ndarray:
    """:func:`encode` in chunks of `chunk` documents (the same ids, less peak memory)."""
    parts = [encode(tok, texts[i:i + chunk]) for i in range(0, len(texts), chunk)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
