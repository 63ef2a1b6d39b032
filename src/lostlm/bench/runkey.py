"""A run's key: a short hash of everything that changes its maths, so stale runs are not reused.

A bench run lives in ``<results>/runs/<variant>/lr<lr>-<hash>/seed<k>/`` (stage one of a sweep:
``<results>/sweep/<variant>/lr<lr>-<hash>/seed<k>/``). The hash covers

* the resolved config (every section), minus the keys that only do bookkeeping
  (:data:`BOOKKEEPING`: folders, seed — the seed is the folder's own name —, threads, progress bar,
  logging and checkpoint intervals, the diagnostics switch, resume policy, the MFU denominator, the data cache folder,
  the allocator setting ``release_freed_memory``);
  the ``layer`` section counts only through the keys the method reads: ``method``,
  ``targets``, ``rank`` and the ``galore_*`` keys for a dense method (``full``, ``galore``:
  ``method``, ``targets``, ``galore_*``), plus, for the others, every ``layer.<key>`` their
  builder's reached definitions (below) mention — so a new config key another method reads
  does not move this method's runs;
* the precision the run will actually train in: ``train.precision: auto`` is keyed by what it
  resolves to on this machine (bf16 autocast where the CPU or GPU has native bf16, else fp32),
  so one recipe run on two kinds of machine never puts fp32 and bf16 runs in one folder. An
  fp32 run is keyed with the text ``auto`` whether the config says ``auto`` or ``fp32``: every
  key made before this rule came from ``auto`` on machines without native bf16, and they stay
  valid; a bf16 run is keyed ``bf16``;
* a fingerprint of the code the maths runs through: the syntax trees (no comments, no
  docstrings) of the whole of :data:`SHARED_MODULES` (every method), plus, in
  :data:`METHOD_MODULES` (``layers.py``, ``methods.py``), only the top-level definitions the
  method's builder reaches: its ``_build_<method>`` function and, transitively, every top-level
  name those bodies mention (``LOSTLinear`` -> ``_Factorised``, ``_svd``, ...). An edit to CoLA's
  initialisation therefore moves ``cola`` (and the methods that share its class) to new
  folders while ``full``, ``galore`` and ``lost`` runs stay valid.

Not covered (on purpose, documented in docs/benchmarks.md): the training loop in ``train.py``
(logging lands there often) and the data pipeline's code. A change of those that alters the
numbers needs a new results folder (or deleting ``runs/``).
"""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

from .. import runtime
from ..configs import Config

BOOKKEEPING = {
    "train": {"out_dir", "seed", "progress", "threads", "peak_flops", "log_every", "checkpoint_every", "keep_checkpoints",
              "resume", "diagnostics", "release_freed_memory"},
    "data": {"cache_dir"},
}
DENSE_LAYER_KEYS = ("method", "targets", "galore_rank", "galore_update_gap", "galore_scale")
PACKAGE = Path(__file__).resolve().parents[1]
SHARED_MODULES = ("model.py", "optim.py", "losses.py", "convert.py")
METHOD_MODULES = ("layers.py", "methods.py")
DENSE_METHODS = ("full", "galore")


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def _top_level(tree: ast.Module) -> dict[str, ast.AST]:
    """Top-level definitions by name (functions, classes, assignments)."""
    defs: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    defs[t.id] = node
    return defs


def _closure(roots: list[str], defs: dict[str, ast.AST]) -> list[str]:
    """Every top-level name reachable from ``roots`` through the names their bodies mention."""
    seen: list[str] = []
    todo = [r for r in roots if r in defs]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.append(name)
        for node in ast.walk(defs[name]):
            ref = node.id if isinstance(node, ast.Name) else None
            if ref in defs and ref not in seen:
                todo.append(ref)
    return sorted(seen)


def code_fingerprint(method: str, package: Path = PACKAGE) -> str:
    """sha256 over the docstring-free syntax trees of the shared modules and of the definitions
    in layers.py/methods.py that ``method``'s builder reaches (dense methods: none)."""
    h = hashlib.sha256()
    for name in SHARED_MODULES:
        h.update(name.encode())
        h.update(ast.dump(_strip_docstrings(ast.parse((package / name).read_text())), annotate_fields=False).encode())
    reached, defs = _reached(method, package)
    for name in reached:
        h.update(name.encode())
        h.update(ast.dump(defs[name], annotate_fields=False).encode())
    return h.hexdigest()


def _reached(method: str, package: Path = PACKAGE) -> tuple[list[str], dict[str, ast.AST]]:
    """The top-level definitions of layers.py/methods.py that ``method``'s builder reaches."""
    defs: dict[str, ast.AST] = {}
    for name in METHOD_MODULES:
        defs.update(_top_level(_strip_docstrings(ast.parse((package / name).read_text()))))
    if method in DENSE_METHODS:
        return [], defs
    builder = "_build_" + method.replace("-", "_")
    if builder not in defs:  # a method registered elsewhere: all of both files
        return sorted(defs), defs
    return _closure([builder], defs), defs


def layer_keys(method: str, package: Path = PACKAGE) -> list[str]:
    """The ``layer`` config keys a method's maths reads (see the module docstring)."""
    if method in DENSE_METHODS:
        return list(DENSE_LAYER_KEYS)
    reached, defs = _reached(method, package)
    read = {node.attr for name in reached for node in ast.walk(defs[name])
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "layer"}
    return sorted({"method", "targets", "rank", *read})


def maths_of(cfg: Config) -> dict:
    """The part of the resolved config that changes the numbers (see the module docstring)."""
    data = cfg.to_dict()
    for section, keys in BOOKKEEPING.items():
        for key in keys:
            data[section].pop(key, None)
    data["layer"] = {k: data["layer"][k] for k in layer_keys(cfg.layer.method) if k in data["layer"]}
    data["train"]["precision"] = keyed_precision(cfg)
    return data


def keyed_precision(cfg: Config) -> str:
    """``auto`` for a run that trains in fp32 here, ``bf16`` for one under bf16 autocast (see the
    module docstring: ``auto`` is the text the fp32 keys have always had)."""
    return "auto" if runtime.precision_name(cfg.train.precision, cfg.train.device) == "float32" else "bf16"


def run_key(cfg: Config) -> dict:
    """``{"hash": 10 hex digits, "maths": ..., "code": ...}``: the key of one run's folder."""
    code = code_fingerprint(cfg.layer.method)
    maths = maths_of(cfg)
    digest = hashlib.sha256(json.dumps({"maths": maths, "code": code}, sort_keys=True).encode()).hexdigest()
    return {"hash": digest[:10], "maths": maths, "code": code}


def lr_text(lr: float) -> str:
    """``3e-03`` style: readable, sortable enough, no dots in folder names."""
    return f"{lr:.3g}".replace("+", "")


def key_folder(cfg: Config) -> str:
    """``lr<lr>-<hash>``: the folder of one variant at one lr (seeds below it)."""
    return f"lr{lr_text(cfg.train.lr)}-{run_key(cfg)['hash']}"
