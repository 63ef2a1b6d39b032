"""Scaling recipes: methods × a ladder of model shapes × token budgets × seeds, as bench runs.

A recipe (YAML, ``lostlm scaling RECIPE``)::

    name: scaling                      # results in bench/results/<name> unless `results:` is set
    base: {config: configs/tiny.yaml, overrides: {train.batch_size: 16}}   # as in a bench recipe
    methods: [full, lost, cola]        # names, or {name, method, overrides} as in a bench recipe
    seeds: [0]
    lr_from: bench/results/tuned-tiny  # each method's lr: that sweep's choice where it has one ...
    lr: {cola: 2.5e-3}                 # ... else this (a number for every method, or per name)
    sizes:                             # the fitted ladder (at least 2; 4 or more for a useful fit)
      - {name: d64, hidden_size: 64, intermediate_size: 176, num_heads: 2, num_layers: 4, rank: 16}
    held_out: {name: d512, ...}        # one larger shape, predicted and not fitted
    tokens: [1024000]                  # token budget(s) of every run: steps × batch × seq_len
    warmup_fraction: 0.1               # warm-up steps = this × steps
    evals: 10                          # validation points per run (eval_every = steps / evals)
    fit: {drop_fraction: 0.25, bootstrap: 200, huber_delta: 1.0e-3, starts: 20, tokens_per_param: 20}

Every method × shape × budget is a bench :class:`~.recipe.Variant` named
``<method>-<shape>-<tokens>`` whose overrides set the shape (``model.*``, ``layer.rank``) and the
budget (``train.steps``, ``train.warmup_steps``, ``train.eval_every``); it runs through
:mod:`.runner` like any bench run (own folder keyed by :mod:`.runkey`, one process per run,
resumable, the same data order at a given seed for every method and shape).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..configs import load_config
from ..errors import LostLMError
from .recipe import (RESULTS_ROOT, Recipe, Variant, _lr_from, _override_list, _read_mapping, _seeds, _variants, pick_variants,
                     run_config)
from .sweep import chosen_lr

LADDER_KEYS = ("name", "description", "base", "methods", "seeds", "results", "isolate", "lr_from", "lr", "sizes", "held_out",
               "tokens", "warmup_fraction", "evals", "fit")
SHAPE_KEYS = ("name", "hidden_size", "intermediate_size", "num_heads", "num_layers", "rank")
FIT_KEYS = ("drop_fraction", "bootstrap", "huber_delta", "starts", "tokens_per_param")


@dataclass
class Shape:
    name: str
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    rank: int

    def overrides(self) -> list[str]:
        return [f"model.hidden_size={self.hidden_size}", f"model.intermediate_size={self.intermediate_size}",
                f"model.num_heads={self.num_heads}", f"model.num_layers={self.num_layers}", f"layer.rank={self.rank}"]


@dataclass
class FitSettings:
    drop_fraction: float = 0.25
    """Points of a run at or before this fraction of its tokens are not fitted (warm-up, early transient)."""
    bootstrap: int = 200
    """Refits on runs resampled with replacement (intervals)."""
    huber_delta: float = 1e-3
    """Huber's delta on log L (Chinchilla's)."""
    starts: int = 20
    """L-BFGS starts: the best points of the initialisation grid."""
    tokens_per_param: float = 20.0
    """D = this × N where the comparison of two methods needs a data budget for a size."""


@dataclass
class Ladder:
    name: str
    description: str
    bench: Recipe
    """The runs as a bench recipe (one variant per method × shape × budget)."""
    methods: list[Variant]
    sizes: list[Shape]
    held_out: Shape
    tokens: list[int]
    lrs: dict[str, tuple[float, str]]
    """method name -> (lr, where it came from)."""
    fit: FitSettings = field(default_factory=FitSettings)
    cells: list[tuple[Variant, Shape, int, Variant]] = field(default_factory=list)
    """(method, shape, tokens, bench variant) of every run, method by method, shapes ascending."""

    @property
    def results(self) -> Path:
        return self.bench.results


def _shape(raw, where: str) -> Shape:
    if not isinstance(raw, dict) or set(raw) != set(SHAPE_KEYS):
        raise LostLMError(f"{where} must be a mapping with exactly {', '.join(SHAPE_KEYS)} "
                          "(e.g. {name: d64, hidden_size: 64, intermediate_size: 176, num_heads: 2, num_layers: 4, rank: 16})")
    ints = {k: raw[k] for k in SHAPE_KEYS[1:]}
    if not all(isinstance(v, int) and v > 0 for v in ints.values()):
        raise LostLMError(f"{where} ({raw['name']}): {', '.join(SHAPE_KEYS[1:])} must be positive integers")
    return Shape(name=str(raw["name"]), **ints)


def _number(raw: dict, key: str, default, lo: float, hi: float, where: str, kind=float):
    value = raw.get(key, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or isinstance(value, int))
    if not ok or not lo <= value <= hi:
        raise LostLMError(f"{where}: {key} must be a{'n integer' if kind is int else ' number'} in [{lo:g}, {hi:g}] (got {value!r})")
    return kind(value)


def _fit(raw, path: Path) -> FitSettings:
    raw = raw or {}
    if not isinstance(raw, dict) or set(raw) - set(FIT_KEYS):
        raise LostLMError(f"scaling recipe {path}: fit must be a mapping with keys {', '.join(FIT_KEYS)}")
    w = f"scaling recipe {path}: fit"
    d = FitSettings()
    return FitSettings(drop_fraction=_number(raw, "drop_fraction", d.drop_fraction, 0, 0.9, w),
                       bootstrap=_number(raw, "bootstrap", d.bootstrap, 0, 100000, w, int),
                       huber_delta=_number(raw, "huber_delta", d.huber_delta, 1e-8, 1, w),
                       starts=_number(raw, "starts", d.starts, 1, 10000, w, int),
                       tokens_per_param=_number(raw, "tokens_per_param", d.tokens_per_param, 1e-3, 1e6, w))


def _lr(method: Variant, data: dict, probe: Recipe, path: Path) -> tuple[float, str]:
    """This method's lr: ``lr_from``'s sweep choice where there is one, else the recipe's ``lr``."""
    why = ""
    if probe.lr_from is not None:
        try:
            return chosen_lr(probe, method), f"chosen by the sweep in {probe.lr_from['results']}"
        except LostLMError as exc:
            why = f" ({exc})"
    explicit = data.get("lr")
    if isinstance(explicit, dict):
        explicit = explicit.get(method.name, explicit.get(method.method))
    if isinstance(explicit, (int, float)) and not isinstance(explicit, bool) and explicit > 0:
        return float(explicit), "explicit in the recipe" + (f"; lr_from has none{why}" if probe.lr_from else "")
    raise LostLMError(f"scaling recipe {path}: no learning rate for {method.name}{why}; add lr: {{{method.name}: 2.5e-3}} "
                      "(or lr_from: a tuned sweep's results folder)")


def _budget_overrides(tokens: int, per_step: int, warmup_fraction: float, evals: int, where: str) -> list[str]:
    steps, rest = divmod(tokens, per_step)
    if rest or steps < evals:
        raise LostLMError(f"{where}: tokens {tokens} must be a multiple of batch_size × seq_len = {per_step} and give at "
                          f"least evals={evals} steps")
    every = steps // evals
    return [f"train.steps={steps}", f"train.warmup_steps={round(warmup_fraction * steps)}", f"train.eval_every={every}",
            f"train.checkpoint_every={max(every, steps // 4)}"]


def _tokens_text(tokens: int) -> str:
    return f"{tokens / 1e6:g}M"


def non_embedding_params(cfg) -> int:
    """Trainable numbers outside the embedding and LM head (the projections and norms), analytic."""
    from ..estimate import estimate

    e = estimate(cfg, cfg.model.vocab_size or 1)
    return e.params_linear + e.params_other


def load_ladder(path: str | Path, results: str | Path | None = None) -> Ladder:
    """Parse and check a scaling recipe; every run's config is validated before anything runs."""
    path = Path(path)
    data = _read_mapping(path, LADDER_KEYS, "scaling recipe", "bench/scaling.yaml")
    base = data.get("base") or {}
    if not isinstance(base, dict) or (base.get("config") is not None and not Path(base["config"]).is_file()):
        raise LostLMError(f"scaling recipe {path}: base must be a mapping whose config (if any) is an existing recipe file")
    raw_sizes = data.get("sizes")
    if not isinstance(raw_sizes, list) or len(raw_sizes) < 2:
        raise LostLMError(f"scaling recipe {path}: sizes must list at least 2 model shapes (4 or more for a useful fit)")
    sizes = [_shape(s, f"scaling recipe {path}: each sizes entry") for s in raw_sizes]
    held_out = _shape(data.get("held_out"), f"scaling recipe {path}: held_out")
    names = [s.name for s in [*sizes, held_out]]
    if len(set(names)) != len(names):
        raise LostLMError(f"scaling recipe {path}: shape names must be unique (got {names})")
    tokens = data.get("tokens")
    tokens = [tokens] if isinstance(tokens, int) else tokens
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) and t > 0 for t in tokens):
        raise LostLMError(f"scaling recipe {path}: tokens must be a positive integer or a list of them (tokens per run)")
    where = f"scaling recipe {path}"
    warmup = _number(data, "warmup_fraction", 0.1, 0, 0.5, where)
    evals = _number(data, "evals", 10, 2, 1000, where, int)
    bench = Recipe(name=str(data.get("name", path.stem)), base_config=base.get("config"),
                   base_overrides=_override_list(base.get("overrides"), "base.overrides"), seeds=_seeds(data, path), variants=[],
                   results=Path(results or data.get("results") or RESULTS_ROOT / str(data.get("name", path.stem))),
                   isolate=bool(data.get("isolate", True)), source=path, description=str(data.get("description", "")))
    methods = _variants(data, path)
    probe = Recipe(**{**bench.__dict__, "lr_from": _lr_from(data, path)})
    lrs = {m.name: _lr(m, data, probe, path) for m in methods}
    base_cfg = load_config(bench.base_config, bench.base_overrides)
    per_step = base_cfg.train.batch_size * base_cfg.data.seq_len
    ladder = Ladder(name=bench.name, description=bench.description, bench=bench, methods=methods, sizes=sizes,
                    held_out=held_out, tokens=sorted(tokens), lrs=lrs, fit=_fit(data.get("fit"), path))
    for m in methods:
        for shape in [*sizes, held_out]:
            for t in ladder.tokens:
                extra = [*shape.overrides(), *_budget_overrides(t, per_step, warmup, evals, where)]
                variant = Variant(f"{m.name}-{shape.name}-{_tokens_text(t)}", m.method, [*extra, *m.overrides])
                ladder.cells.append((m, shape, t, variant))
                bench.variants.append(variant)
    full = {s.name: non_embedding_params(run_config(bench, v, bench.seeds[0], lr=lrs[m.name][0]))  # validates every config
            for m, s, _, v in ladder.cells if m is methods[0]}
    if full[held_out.name] <= max(full[s.name] for s in sizes):
        raise LostLMError(f"scaling recipe {path}: held_out {held_out.name} must be larger than every fitted size "
                          f"({full[held_out.name]:,} non-embedding parameters vs {max(full.values()):,})")
    for m, s, _, v in ladder.cells:
        if m is not methods[0]:
            run_config(bench, v, bench.seeds[0], lr=lrs[m.name][0])
    return ladder


def ladder_runs(ladder: Ladder, only: list[str] | None = None) -> list[tuple[Variant, Shape, int, Variant, int]]:
    """(method, shape, tokens, bench variant, seed) of every run, in running order: method by
    method, then seed by seed (a cut-short ladder has every size at the first seed), shapes
    ascending with the held-out one last, budgets. ``only``: these method names."""
    return [(m, s, t, v, seed) for method in pick_variants(ladder.bench, only, ladder.methods) for seed in ladder.bench.seeds
            for m, s, t, v in ladder.cells if m is method]
