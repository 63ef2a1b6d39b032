"""Packed sequences and their resumable position: the objects the trainer consumes.

:class:`PackedData` holds the fixed validation sequences; :class:`MapPackedData` (default/files:
all tokens in memory, one seeded permutation per epoch) and :class:`StreamingPackedData` (hf:
tokenized on the fly, each rank from its own part of the stream) hand out the training batches
and save/restore their position exactly.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..configs import DataConfig
from ..errors import LostLMError
from .common import log
from .readers import is_held_out, open_stream, text_of
from .tokenizer import encode

_SHUFFLE_BUFFER = 10_000  # hf: documents in datasets' shuffle buffer
_STREAM_CHUNK = 16  # hf: documents tokenized at once (bounds the leftover buffer in the state)


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")


def _check_slice(batch_size: int, rank: int, world_size: int) -> int:
    """This rank's number of rows of a global batch of `batch_size`."""
    _check_rank(rank, world_size)
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
    per_rank_position = False
    """True when ranks read different documents, so each rank's position must be saved."""

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
            log(f"warning: validation has {have * cfg.seq_len} tokens, fewer than data.val_tokens={cfg.val_tokens}; "
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
        _check_rank(rank, world_size)
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
    """hf: documents are streamed, tokenized and packed on the fly.

    With several processes each rank reads its own part of the stream
    (``datasets.distributed.split_dataset_by_node``: whole shards per rank when the number of
    shards is a multiple of the world size, else one document in world_size) and packs its own
    rows of every global batch from it, so no document is tokenized twice. Each epoch streams
    the split through ``dataset.shuffle(seed, buffer_size=10000)`` with a seed derived from
    (seed, epoch), the same on every rank, then starts the next epoch (each rank on its own).
    With hf_val_split=null the held-out documents (by hash) are skipped.

    State (per rank): ``{"epoch", "documents_consumed", "buffer", "rank", "world_size"}``
    (documents of this rank's stream, leftover token ids); resume re-opens this rank's stream
    and skips ``documents_consumed`` documents (re-read, not tokenized). The first
    ``next_batch`` fixes the (rank, world_size) the position belongs to; the trainer gathers the
    positions of all ranks into one checkpoint (:func:`gathered_position`).
    """

    per_rank_position = True

    def __init__(self, cfg: DataConfig, seed: int, tokenizer: Any, val: np.ndarray, info: dict) -> None:
        super().__init__(cfg, seed, tokenizer, val, info)
        self._cfg = cfg
        self.epoch, self.documents_consumed = 0, 0
        self._buffer = np.zeros(0, dtype=np.int32)
        self._iter: Iterator[dict] | None = None
        self._split: tuple[int, int] | None = None  # (rank, world_size) of the stream read, set by the first batch
        self._info.update(documents="streaming", train_tokens="streaming")

    def _open_epoch(self) -> Iterator[dict]:
        ds = open_stream(self._cfg, self._cfg.hf_split)
        if self._cfg.max_documents:
            ds = ds.take(self._cfg.max_documents)
        epoch_seed = int(np.random.SeedSequence([self.seed & 0xFFFFFFFF, self.epoch]).generate_state(1)[0])
        ds = ds.shuffle(seed=epoch_seed, buffer_size=_SHUFFLE_BUFFER)
        rank, world_size = self._split or (0, 1)
        if world_size > 1:
            ds = split_stream(ds, rank, world_size, by_document=bool(self._cfg.max_documents))
        # islice, not ds.skip: after split_dataset_by_node, skip(n) counts documents of the
        # whole stream, not of this rank's part
        return itertools.islice(iter(ds), self.documents_consumed, None)

    def _bind(self, rank: int, world_size: int) -> None:
        if self._split is None:
            self._split = (rank, world_size)
        elif self._split != (rank, world_size):
            raise LostLMError(f"this stream position belongs to rank {self._split[0]} of {self._split[1]} processes, "
                              f"not rank {rank} of {world_size}; resume a data.source=hf run with the number of "
                              "processes it started with")

    def next_batch(self, batch_size: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        local = _check_slice(batch_size, rank, world_size)
        self._bind(rank, world_size)
        need, empty_epochs = local * (self.seq_len + 1), 0
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
            texts = [t for t in (text_of(ex, self._cfg) for ex in examples) if t and not is_held_out(t, self._cfg)]
            if texts:
                empty_epochs = 0
                self._buffer = np.concatenate([self._buffer, encode(self.tokenizer, texts)])
        rows = self._buffer[:need].reshape(local, self.seq_len + 1)
        self._buffer = self._buffer[need:].copy()
        return torch.from_numpy(rows.astype(np.int64))

    def state_dict(self) -> dict:
        rank, world_size = self._split or (None, None)
        return {"kind": "stream", "epoch": self.epoch, "documents_consumed": self.documents_consumed,
                "buffer": self._buffer.tolist(), "rank": rank, "world_size": world_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "stream":
            raise LostLMError(f"the saved data position ({sorted(state)}) is not from a streaming source; "
                              "resume with the run's own data settings")
        self.epoch, self.documents_consumed = int(state["epoch"]), int(state["documents_consumed"])
        self._buffer = np.asarray(state["buffer"], dtype=np.int32)
        rank, world_size = state.get("rank"), state.get("world_size")
        self._split = None if rank is None else (int(rank), int(world_size))
        self._iter = None


def split_stream(ds: Any, rank: int, world_size: int, by_document: bool) -> Any:
    """This rank's part of a streamed dataset (``datasets.distributed.split_dataset_by_node``):
    whole shards when their number is a multiple of world_size, else one document in world_size;
    ``by_document`` always takes one document in world_size (needed after ``take``, which the
    shard split would apply to every shard)."""
    from datasets.distributed import split_dataset_by_node

    if not by_document:
        return split_dataset_by_node(ds, rank=rank, world_size=world_size)
    if "strategy" not in inspect.signature(split_dataset_by_node).parameters:
        raise LostLMError("data.max_documents with several processes needs split_dataset_by_node(strategy=...), "
                          "which this datasets version lacks; upgrade datasets, or unset data.max_documents")
    return split_dataset_by_node(ds, rank=rank, world_size=world_size, strategy="examples")


def gathered_position(states: list[dict]) -> dict:
    """One checkpoint entry for the positions of all ranks (rank order), for a source whose
    ranks read different documents (``per_rank_position``)."""
    return {"kind": "ranks", "ranks": list(states)}


def checkpoint_position(data, world_size: int) -> dict:
    """The data position to checkpoint; for a source whose ranks read different documents
    (``per_rank_position``: hf streams), every rank's, gathered (a collective: every process calls it)."""
    position = data.state_dict()
    if world_size > 1 and getattr(data, "per_rank_position", False):
        import torch.distributed as dist

        positions = [None] * world_size
        dist.all_gather_object(positions, position)
        position = gathered_position(positions)
    return position


def position_of_rank(state: dict, rank: int, world_size: int) -> dict:
    """This rank's position in a checkpoint's data entry (the entry itself unless gathered)."""
    if state.get("kind") != "ranks":
        return state
    ranks = state.get("ranks")
    if not isinstance(ranks, list) or len(ranks) != world_size:
        count = len(ranks) if isinstance(ranks, list) else "?"
        raise LostLMError(f"the checkpoint holds the data positions of {count} processes, and this run has "
                          f"{world_size}; resume with the number of processes the run started with")
    return ranks[rank]
