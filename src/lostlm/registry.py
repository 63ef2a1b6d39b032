"""The table of parametrisation names that ``layer.method`` is checked against.

Why a module of its own: :mod:`lostlm.configs` must validate ``layer.method``, but the
methods themselves (:mod:`lostlm.methods`: layer builders, cost formulas) sit *above* configs
and the layers, and configs may not import them (not even lazily: that would be a lower module
importing a higher one). So this table sits below configs and knows nothing of torch or the
layers; :mod:`lostlm.methods` fills it with the built-in methods when it is imported (the
package ``__init__`` imports it, so the table is full before any config is validated), and
:func:`lostlm.methods.register` adds new ones. Read the specs through :mod:`lostlm.methods`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

_TABLE: dict[str, Any] = {}


def add(name: str, spec: Any) -> None:
    """Enter (or replace) ``name``; registration order is the listing order."""
    _TABLE[name] = spec


def remove(name: str) -> None:
    _TABLE.pop(name, None)


def lookup(name: str) -> Any | None:
    """The spec registered under ``name``, or None."""
    return _TABLE.get(name)


def names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(_TABLE)


class _LiveNames(Sequence):
    """A read-only, always-current view of the registered names (``configs.METHODS``), so that
    a method registered later is listed by ``--method`` choices and by validation alike."""

    def __getitem__(self, index):
        return names()[index]

    def __len__(self) -> int:
        return len(_TABLE)

    def __iter__(self) -> Iterator[str]:
        return iter(names())

    def __contains__(self, name: object) -> bool:
        return name in _TABLE

    def __repr__(self) -> str:
        return repr(names())


NAMES: Sequence[str] = _LiveNames()
