"""Prepared token shards: tokenise a corpus once (``lostlm prepare``), train from it many times.

    lostlm prepare data.source=files data.paths=[corpus/] --out prepared/mycorpus
    lostlm prepare data.source=hf data.hf_name=allenai/c4 data.tokenizer=t5-base --out prepared/c4
    lostlm train data.source=prepared data.prepared_dir=prepared/mycorpus

The folder (format in ``docs/data.md``): ``manifest.json``, ``tokenizer/`` and raw
little-endian ``uint16`` (vocabulary <= 65536) or ``uint32`` shards ``train-00000.bin`` ...,
``val-00000.bin`` ..., each a flat array of token ids, documents separated by EOS, with its
token count and sha256 in the manifest. Any tool can ``np.memmap`` a shard.

Training (:class:`PreparedData`) cuts each shard into non-overlapping ``seq_len + 1`` windows
(a shard's last partial window is dropped) and visits all windows once per epoch in a seeded
pseudo-random order computed per index (a Feistel permutation, no array of N indices), reading
only the rows of its own rank with ``os.pread``: memory stays flat however large the corpus
(nothing is mapped, pages stay in the OS cache, not in the process), and there is no
tokenisation in the training process. Position: ``{"epoch", "cursor"}``, resumed exactly.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from ..configs import DataConfig
from ..errors import LostLMError
from ..runtime import atomic_dir
from .common import log
from .packing import PackedData, _check_slice
from .readers import read_documents, split_documents, stream_texts
from .tokenizer import encode, load_tokenizer

FORMAT = "lostlm-prepared"
VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB of uint16 per shard


# -- writing ---------------------------------------------------------------------------------------


class ShardWriter:
    """Appends token arrays to ``<split>-NNNNN.bin`` files of at most ``shard_tokens`` tokens."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, np.dtype(dtype), shard_tokens
        self.shards: list[dict] = []
        self._fh, self._hash, self._count = None, None, 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._fh, self._hash, self._count = open(self.folder / name, "wb"), hashlib.sha256(), 0
        self.shards.append({"file": name, "tokens": 0, "sha256": ""})

    def _close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self.shards[-1].update(tokens=self._count, sha256=self._hash.hexdigest())
            self._fh = None

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        while len(tokens):
            if self._fh is None or self._count == self.shard_tokens:
                self._close()
                self._open()
            part = tokens[: self.shard_tokens - self._count].astype(self.dtype).astype("<" + self.dtype.str[1:])
            raw = part.tobytes()
            self._fh.write(raw)
            self._hash.update(raw)
            self._count += len(part)
            tokens = tokens[len(part):]

    def finish(self) -> list[dict]:
        self._close()
        return self.shards


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def write_prepared(out_dir: str | Path, tokenizer: Any, splits: dict[str, Iterable[np.ndarray]], info: dict,
                   shard_tokens: int = DEFAULT_SHARD_TOKENS) -> Path:
    """Write a prepared folder from token arrays per split (``train``, ``val``); atomic."""
    out = Path(out_dir)
    if (out / MANIFEST).exists():
        raise LostLMError(f"--out {out} already holds a prepared corpus; choose another folder or delete it")
    dtype = token_dtype(len(tokenizer))
    manifest = {"format": FORMAT, "version": VERSION, "dtype": dtype, "byte_order": "little",
                "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id, "tokenizer": "tokenizer",
                **info, "splits": {}}
    with atomic_dir(out) as tmp:
        for split, arrays in splits.items():
            writer = ShardWriter(tmp, split, np.dtype(dtype), shard_tokens)
            for array in arrays:
                writer.write(array)
            manifest["splits"][split] = writer.finish()
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def _chunks(texts: Iterable[str], tokenizer: Any, counter: dict, key: str, size: int = 1000) -> Iterable[np.ndarray]:
    it = iter(texts)
    while chunk := list(itertools.islice(it, size)):
        counter[key] = counter.get(key, 0) + len(chunk)
        yield encode(tokenizer, chunk)


def prepare(cfg: DataConfig, out_dir: str | Path, shard_tokens: int = DEFAULT_SHARD_TOKENS) -> Path:
    """Tokenise ``cfg``'s corpus (default/files/hf) into a prepared folder; the validation part
    is held out as in training (by hash, or hf_val_split) and capped at ``data.val_tokens``-ish."""
    if cfg.source == "prepared":
        raise LostLMError("lostlm prepare reads a corpus: set data.source to default, files or hf")
    tokenizer = load_tokenizer(cfg)
    counts: dict[str, int] = {}
    if cfg.source == "hf":
        train_texts: Iterable[str] = stream_texts(cfg, held_out=False)
        val_texts: Iterable[str] = itertools.islice(stream_texts(cfg, held_out=True), max(1, cfg.val_tokens // 50))
        source = {"source": "hf", "hf_name": cfg.hf_name, "hf_subset": cfg.hf_subset, "hf_split": cfg.hf_split}
    else:
        train_texts, val_texts = split_documents(read_documents(cfg), cfg.val_fraction)
        source = {"source": cfg.source, "paths": cfg.paths}
    log(f"tokenizing into {out_dir} ...")
    splits = {"train": _chunks(train_texts, tokenizer, counts, "train"), "val": _chunks(val_texts, tokenizer, counts, "val")}
    out = write_prepared(out_dir, tokenizer, splits, {"corpus": source}, shard_tokens)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["documents"] = counts
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return out


# -- reading ---------------------------------------------------------------------------------------


def read_manifest(folder: str | Path, verify: bool = False) -> dict:
    """The manifest, with every shard checked for its size (and its sha256 when ``verify``)."""
    folder = Path(folder).expanduser()
    path = folder / MANIFEST
    if not path.is_file():
        raise LostLMError(f"data.prepared_dir={folder} has no {MANIFEST}; write it with `lostlm prepare ... --out {folder}`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise LostLMError(f"{path} is not a {FORMAT} v{VERSION} manifest; prepare the corpus again with this lostlm")
    width = np.dtype(manifest["dtype"]).itemsize
    for split in ("train", "val"):
        if not manifest["splits"].get(split):
            raise LostLMError(f"{path} lists no {split} shards; prepare the corpus again")
        for shard in manifest["splits"][split]:
            file = folder / shard["file"]
            if not file.is_file() or file.stat().st_size != shard["tokens"] * width:
                raise LostLMError(f"shard {file} is missing or not {shard['tokens']} tokens long; prepare the corpus again")
            if verify and _sha256(file) != shard["sha256"]:
                raise LostLMError(f"shard {file} does not match its sha256 in {MANIFEST}; it is corrupt, prepare again")
    return manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def feistel_permutation(index: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """A seeded bijection of [0, n) evaluated at ``index`` without materialising it: a 4-round
    Feistel network on the smallest even number of bits covering n, cycle-walked into [0, n)."""
    bits = max(2, int(n - 1).bit_length())
    bits += bits % 2
    half, mask = bits // 2, np.uint64((1 << (bits // 2)) - 1)
    keys = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch]).generate_state(4, dtype=np.uint64)
    shift, mult = np.uint64(64 - half), np.uint64(0x9E3779B97F4A7C15)

    def rounds(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for key in keys:
            left, right = right, left ^ ((((right ^ key) * mult) >> shift) & mask)
        return (left << np.uint64(half)) | right

    with np.errstate(over="ignore"):
        out = rounds(np.asarray(index, dtype=np.uint64))
        while (outside := out >= n).any():
            out[outside] = rounds(out[outside])
    return out.astype(np.int64)


class PreparedData(PackedData):
    """data.source=prepared: sequences read from the shards on demand (see the module docstring)."""

    def __init__(self, cfg: DataConfig, seed: int) -> None:
        from transformers import AutoTokenizer

        folder = Path(cfg.prepared_dir).expanduser()
        self.manifest = read_manifest(folder)
        self.folder, self.dtype = folder, np.dtype(self.manifest["dtype"]).newbyteorder("<")
        tokenizer = AutoTokenizer.from_pretrained(str(folder / self.manifest["tokenizer"]))
        row = cfg.seq_len + 1
        self._train = [(folder / s["file"], s["tokens"] // row) for s in self.manifest["splits"]["train"]]
        self._first = np.cumsum([0] + [count for _, count in self._train])
        n = int(self._first[-1])
        if n == 0:
            raise LostLMError(f"data.prepared_dir={folder}: no shard holds one sequence of {row} tokens; lower data.seq_len")
        need = (max(1, cfg.val_tokens // cfg.seq_len) + 1) * row
        val = np.concatenate([self._read(folder / s["file"], 0, min(s["tokens"], need))
                              for s in self.manifest["splits"]["val"]])[:need]
        info = {"source": f"prepared ({folder})", "documents": self.manifest.get("documents", "unknown"),
                "train_sequences": n, "train_tokens": n * cfg.seq_len}
        super().__init__(cfg, seed, tokenizer, val, info)
        self._tokenizer_name = f"{folder / 'tokenizer'} (from the manifest)"
        self.n, self.row, self.epoch, self.cursor = n, row, 0, 0

    def _read(self, path: Path, start: int, count: int) -> np.ndarray:
        fd = os.open(path, os.O_RDONLY)
        try:
            raw = os.pread(fd, count * self.dtype.itemsize, start * self.dtype.itemsize)
        finally:
            os.close(fd)
        return np.frombuffer(raw, dtype=self.dtype)

    def sequences_at(self, indices: np.ndarray) -> torch.Tensor:
        """Training sequences by global index, (len(indices), seq_len + 1) int64."""
        shard = np.searchsorted(self._first, indices, side="right") - 1
        rows = [self._read(self._train[s][0], int(i - self._first[s]) * self.row, self.row) for s, i in zip(shard, indices)]
        return torch.from_numpy(np.stack(rows).astype(np.int64)) if rows else torch.zeros(0, self.row, dtype=torch.long)

    def next_batch(self, batch_size: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        local = _check_slice(batch_size, rank, world_size)
        positions, epochs = [], []
        for k in range(batch_size):  # the global batch, which may span two epochs
            positions.append(self.cursor)
            epochs.append(self.epoch)
            self.cursor += 1
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
        mine = slice(rank * local, (rank + 1) * local)
        positions, epochs = np.array(positions[mine], dtype=np.int64), np.array(epochs[mine])
        indices = np.empty(len(positions), dtype=np.int64)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            indices[chosen] = feistel_permutation(positions[chosen], self.n, self.seed, int(epoch))
        return self.sequences_at(indices)

    def state_dict(self) -> dict:
        return {"kind": "prepared", "epoch": self.epoch, "cursor": self.cursor, "sequences": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "prepared" or state.get("sequences") != self.n:
            raise LostLMError(f"the saved data position ({state}) is for another corpus or seq_len (this prepared corpus "
                              f"has {self.n} sequences); resume with the run's own data settings")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


# -- command line ------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenise a corpus once into token shards (data.source=prepared)")
    p.add_argument("config", nargs="?", help="recipe .yaml/.toml whose data section names the corpus")
    p.add_argument("overrides", nargs="*", help="data.key=value overrides, e.g. data.source=files data.paths=[docs/]")
    p.add_argument("--out", required=True, help="folder to write (must not hold a prepared corpus)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    p.add_argument("--verify", help="instead of preparing: check the sha256 of every shard of this folder", action="store_true")
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> int:
    from ..configs import load_config

    if args.verify:
        manifest = read_manifest(args.out, verify=True)
        print(f"{args.out}: {sum(len(v) for v in manifest['splits'].values())} shards verified")
        return 0
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not Path(config).exists():
        overrides.insert(0, config)
        config = None
    if args.shard_tokens < 1:
        raise LostLMError(f"--shard-tokens {args.shard_tokens} must be positive")
    cfg = load_config(config, overrides)
    out = prepare(cfg.data, args.out, args.shard_tokens)
    manifest = json.loads((out / MANIFEST).read_text())
    tokens = {split: sum(s["tokens"] for s in shards) for split, shards in manifest["splits"].items()}
    print(f"{out}: {tokens['train']} training and {tokens['val']} validation tokens ({manifest['dtype']}), "
          f"train with data.source=prepared data.prepared_dir={out}")
    return 0
