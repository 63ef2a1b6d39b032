"""A background thread that prepares the next batches while the model computes (``data.prefetch``).

:class:`Prefetched` wraps any :class:`~lostlm.data.packing.PackedData` and keeps its contract:
``next_batch`` returns exactly the batches the wrapped object would return, in the same order,
and ``state_dict`` is the position *after the batches handed out* (not after those read ahead),
so a checkpoint resumes exactly. Only the producer thread touches the wrapped object's position;
``load_state_dict`` stops it, restores the position and lets the next ``next_batch`` restart it.
The thread runs Python (numpy indexing, file reads, tokenisation in ``tokenizers``' Rust code)
that releases the GIL for most of its time, so it overlaps the forward/backward pass.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from typing import Any

import torch

from .packing import PackedData

# Every wrapper whose thread may be running: stopped and joined at interpreter exit, because a
# daemon thread still inside a torch call while the interpreter finalises aborts the process
# ("terminate called without an active exception").
_LIVE: "weakref.WeakSet[Prefetched]" = weakref.WeakSet()


@atexit.register
def _halt_all() -> None:
    for prefetched in list(_LIVE):
        prefetched.close()


class Prefetched:
    """``depth`` batches read ahead by one daemon thread; everything else is the wrapped object's."""

    def __init__(self, data: PackedData, depth: int) -> None:
        self.inner, self.depth = data, depth
        self._state = data.state_dict()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._args: tuple[int, int, int] | None = None

    def __getattr__(self, name: str) -> Any:  # tokenizer, vocab_size, val_batches, describe ...
        return getattr(self.inner, name)

    @staticmethod
    def _produce(inner: PackedData, args: tuple[int, int, int], out: queue.Queue, stop: threading.Event) -> None:
        # No reference to the wrapper here: when it is garbage-collected, its finalizer sets
        # ``stop`` and this thread ends (a forgotten Trainer does not leave a thread behind).
        while not stop.is_set():
            try:
                item: Any = (inner.next_batch(*args), inner.state_dict())
            except BaseException as exc:  # handed to the consumer, raised there
                item = exc
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def _halt(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._thread, self._queue, self._args = None, None, None

    def next_batch(self, batch_size: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        args = (batch_size, rank, world_size)
        if self._thread is None or args != self._args:
            self._halt()
            self.inner.load_state_dict(self._state)  # continue from what was handed out
            self._stop = threading.Event()
            self._queue = queue.Queue(maxsize=self.depth)
            self._args = args
            self._thread = threading.Thread(target=Prefetched._produce, args=(self.inner, args, self._queue, self._stop),
                                            name="lostlm-prefetch", daemon=True)
            weakref.finalize(self, self._stop.set)
            _LIVE.add(self)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._halt()
            raise item
        batch, self._state = item
        return batch

    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, state: dict) -> None:
        self._halt()
        self.inner.load_state_dict(state)
        self._state = self.inner.state_dict()

    def close(self) -> None:
        self._halt()
