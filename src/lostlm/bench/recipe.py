"""Bench recipes: parse and check a YAML recipe, and derive each run's folder and config.

A recipe (YAML)::

    name: tiny                       # results go to bench/results/<name> unless `results:` is set
    base:
      config: configs/tiny.yaml      # any recipe; the same for every variant
      overrides: {train.steps: 250}  # mapping of section.key (or a list of "section.key=value")
    seeds: [0, 1, 2]
    methods:
      - full                         # a bare method name is a variant named after it
      - name: lost-gamma0.25         # a named variant: a method plus overrides (an ablation)
        method: lost
        overrides: {layer.gamma: 0.25}
        seeds: [0]                   # optional: this variant's own seeds
    reference: full                  # paired statistics against this variant (default: full, else the first)
    subject: lost                    # optional: also this variant against every other one (d = subject - other)
    promote_seeds: [1, 2]            # optional: variants run at one seed that beat the reference there get these too
    sweep:                           # optional: tune train.lr per variant first (docs/benchmarks.md)
      grid: [1.0e-2, 5.0e-3, 2.5e-3, 1.0e-3, 5.0e-4]
      grids: {galore: [1.0e-2, 5.0e-3, 1.0e-3, 5.0e-4, 1.0e-4]}   # per variant (or method) name
      seed: 0                        # stage one runs at this seed only
      overrides: {train.steps: 63}   # stage one's short budget, on top of base.overrides
      factor: 2                      # best at an edge: extend the grid by this factor that way ...
      max_extensions: 3              # ... at most this many times per variant
      per_method: true               # optional: variants of one method are settings of it; stage one
                                     # also keeps the best variant per method, stage two runs only that
    lr_from:                         # optional, instead of sweep: take each variant's lr from another sweep
      results: bench/results/tuned-tiny
      variant: lost                  # optional: every variant takes this variant's chosen lr
    runs_from: [bench/results/tuned-tiny]   # optional: a finished run of the same variant name and key
                                     # there is used as it is, not trained again (same key = same maths)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..configs import METHODS, Config, load_config
from ..errors import LostLMError
from .runkey import key_folder

RESULTS_ROOT = Path("bench/results")
RECIPE_KEYS = ("name", "description", "base", "seeds", "methods", "results", "isolate", "reference", "subject",
               "promote_seeds", "sweep", "lr_from", "runs_from")
VARIANT_KEYS = ("name", "method", "overrides", "seeds")
SWEEP_KEYS = ("grid", "grids", "seed", "overrides", "factor", "max_extensions", "per_method")


@dataclass
class Variant:
    name: str
    method: str
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] | None = None
    """This variant's seeds (None: the recipe's)."""


@dataclass
class Sweep:
    """Stage one of a learning-rate sweep (see :mod:`.sweep`)."""

    grid: list[float]
    grids: dict[str, list[float]]
    seed: int
    overrides: list[str]
    factor: float = 2.0
    max_extensions: int = 3
    per_method: bool = False
    """Variants of one method are settings of its hyperparameters (e.g. ``train.untargeted_lr_scale``):
    after each variant's lr is chosen, stage one also keeps, per method, the variant whose chosen
    point has the lowest stage-one loss, and stage two runs only the kept ones (:mod:`.sweep`)."""

    def grid_of(self, variant: Variant) -> list[float]:
        return sorted(self.grids.get(variant.name, self.grids.get(variant.method, self.grid)))


@dataclass
class Recipe:
    name: str
    base_config: str | None
    base_overrides: list[str]
    seeds: list[int]
    variants: list[Variant]
    results: Path
    isolate: bool = True
    source: Path | None = None
    description: str = ""
    reference: str | None = None
    subject: str | None = None
    promote_seeds: list[int] = field(default_factory=list)
    sweep: Sweep | None = None
    lr_from: dict | None = None
    runs_from: list[Path] = field(default_factory=list)
    """Other results folders whose finished runs of the same variant name and key count as this
    recipe's (a run's key covers its maths, so the run would come out the same)."""

    def seeds_of(self, variant: Variant) -> list[int]:
        return variant.seeds if variant.seeds is not None else self.seeds


def pick_variants(recipe: Recipe, only: list[str] | None, variants: list[Variant] | None = None) -> list[Variant]:
    """``--methods a,b``: the variants (of ``variants``, default the recipe's) named ``a`` and
    ``b`` (by variant name, else every variant of that method), in that order; all when ``only``
    is empty."""
    variants = recipe.variants if variants is None else variants
    if not only:
        return list(variants)
    picked: list[Variant] = []
    for name in only:
        match = [v for v in variants if v.name == name] or [v for v in variants if v.method == name]
        if not match:
            raise LostLMError(f"--methods {name} is not in {recipe.source or recipe.name}; use some of "
                              f"{', '.join(v.name for v in variants)}")
        picked += [v for v in match if v not in picked]
    return picked


def _override_list(value: Any, where: str) -> list[str]:
    """A mapping {section.key: value} / {section: {key: value}} or a list of "k=v" -> ["k=v"]."""
    if value is None:
        return []
    if isinstance(value, list):
        if not all(isinstance(v, str) and "=" in v for v in value):
            raise LostLMError(f"{where} must be a list of 'section.key=value' strings or a mapping")
        return list(value)
    if not isinstance(value, dict):
        raise LostLMError(f"{where} must be a mapping of section.key: value (e.g. train.steps: 250)")
    out = []
    for key, val in value.items():
        if isinstance(val, dict) and "." not in str(key):
            out += _override_list({f"{key}.{k}": v for k, v in val.items()}, where)
            continue
        text = val if isinstance(val, str) else json.dumps(val)
        out.append(f"{key}={text}")
    return out


def _read_mapping(path: Path, keys: tuple[str, ...] = RECIPE_KEYS, kind: str = "bench recipe",
                  example: str = "bench/tiny.yaml") -> dict:
    """The recipe file as a mapping with known top-level keys only."""
    if not path.is_file():
        raise LostLMError(f"{kind} {path} does not exist; pass a .yaml recipe such as {example}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise LostLMError(f"{kind} {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LostLMError(f"{kind} {path} must be a mapping of {', '.join(keys)}")
    unknown = set(data) - set(keys)
    if unknown:
        raise LostLMError(f"{kind} {path} has unknown key(s) {sorted(unknown)}; use {', '.join(keys)}")
    return data


def _seeds(data: dict, path: Path, key: str = "seeds", default: Any = (0,)) -> list[int]:
    seeds = data.get(key, list(default))
    if isinstance(seeds, int):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds and key == "seeds" or not all(isinstance(s, int) for s in seeds):
        raise LostLMError(f"bench recipe {path}: {key} must be a list of integers, e.g. [0, 1, 2]")
    return [int(s) for s in seeds]


def _lrs(value: Any, where: str) -> list[float]:
    if not isinstance(value, list) or len(value) < 3 or not all(isinstance(v, (int, float)) and v > 0 for v in value):
        raise LostLMError(f"{where} must be a list of at least 3 positive learning rates, e.g. [1.0e-2, 3.0e-3, 1.0e-3]")
    return sorted(float(v) for v in value)


def _sweep(data: dict, path: Path) -> Sweep | None:
    raw = data.get("sweep")
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - set(SWEEP_KEYS):
        raise LostLMError(f"bench recipe {path}: sweep must be a mapping with keys {', '.join(SWEEP_KEYS)}")
    grids = raw.get("grids") or {}
    if not isinstance(grids, dict):
        raise LostLMError(f"bench recipe {path}: sweep.grids must map a variant or method name to a grid")
    factor, max_ext = raw.get("factor", 2.0), raw.get("max_extensions", 3)
    if not isinstance(factor, (int, float)) or factor <= 1 or not isinstance(max_ext, int) or max_ext < 0:
        raise LostLMError(f"bench recipe {path}: sweep.factor must be > 1 and sweep.max_extensions an integer >= 0")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int):
        raise LostLMError(f"bench recipe {path}: sweep.seed must be an integer")
    per_method = raw.get("per_method", False)
    if not isinstance(per_method, bool):
        raise LostLMError(f"bench recipe {path}: sweep.per_method must be true or false")
    return Sweep(grid=_lrs(raw.get("grid"), f"bench recipe {path}: sweep.grid"),
                 grids={str(k): _lrs(v, f"bench recipe {path}: sweep.grids.{k}") for k, v in grids.items()},
                 seed=seed, overrides=_override_list(raw.get("overrides"), "sweep.overrides"), factor=float(factor),
                 max_extensions=max_ext, per_method=per_method)


def _lr_from(data: dict, path: Path) -> dict | None:
    raw = data.get("lr_from")
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"results": raw}
    if not isinstance(raw, dict) or "results" not in raw or set(raw) - {"results", "variant"}:
        raise LostLMError(f"bench recipe {path}: lr_from must be a results folder or a mapping with results (and variant)")
    if data.get("sweep") is not None:
        raise LostLMError(f"bench recipe {path}: use sweep or lr_from, not both")
    return {"results": str(raw["results"]), "variant": raw.get("variant")}


def _runs_from(data: dict, path: Path) -> list[Path]:
    raw = data.get("runs_from") or []
    raw = [raw] if isinstance(raw, str) else raw
    if not isinstance(raw, list) or not all(isinstance(r, str) for r in raw):
        raise LostLMError(f"bench recipe {path}: runs_from must be a results folder or a list of them")
    return [Path(r) for r in raw]


def _variants(data: dict, path: Path) -> list[Variant]:
    variants = []
    for item in data.get("methods") or []:
        if isinstance(item, str):
            item = {"name": item, "method": item}
        if not isinstance(item, dict) or "method" not in item and "name" not in item:
            raise LostLMError(f"bench recipe {path}: each methods entry is a method name or a mapping with name/method/overrides")
        method = item.get("method", item.get("name"))
        name = str(item.get("name", method))
        if method not in METHODS:
            raise LostLMError(f"bench recipe {path}: method {method!r} (variant {name}) is not valid; use one of {', '.join(METHODS)}")
        extra = set(item) - set(VARIANT_KEYS)
        if extra:
            raise LostLMError(f"bench recipe {path}: variant {name} has unknown key(s) {sorted(extra)}; use name, method, overrides")
        seeds = _seeds(item, path, "seeds") if "seeds" in item else None
        variants.append(Variant(name, method, _override_list(item.get("overrides"), f"variant {name} overrides"), seeds))
    if not variants:
        raise LostLMError(f"bench recipe {path} lists no methods; add e.g. methods: [full, lost]")
    names = [v.name for v in variants]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise LostLMError(f"bench recipe {path}: variant names must be unique ({sorted(dup)} repeat); give each a name")
    return variants


def load_recipe(path: str | Path, results: str | Path | None = None) -> Recipe:
    """Parse and check a bench recipe (every variant's config is validated up front)."""
    path = Path(path)
    data = _read_mapping(path)
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise LostLMError(f"bench recipe {path}: base must be a mapping with config and overrides")
    base_config = base.get("config")
    if base_config is not None and not Path(base_config).is_file():
        raise LostLMError(f"bench recipe {path}: base.config {base_config} does not exist; give a path to a "
                          "configs/*.yaml recipe relative to where lostlm runs")
    seeds = _seeds(data, path)
    variants = _variants(data, path)
    name = str(data.get("name", path.stem))
    recipe = Recipe(name=name, base_config=base_config, base_overrides=_override_list(base.get("overrides"), "base.overrides"),
                    seeds=seeds, variants=variants,
                    results=Path(results or data.get("results") or RESULTS_ROOT / name),
                    isolate=bool(data.get("isolate", True)), source=path, description=str(data.get("description", "")),
                    promote_seeds=_seeds(data, path, "promote_seeds", ()), sweep=_sweep(data, path), lr_from=_lr_from(data, path),
                    runs_from=_runs_from(data, path))
    names = [v.name for v in variants]
    reference = data.get("reference", "full" if "full" in names else variants[0].name)
    for key, value in (("reference", reference), ("subject", data.get("subject", reference))):
        if value not in names:
            raise LostLMError(f"bench recipe {path}: {key} {value!r} is not one of the variants ({', '.join(names)})")
    recipe.reference = str(reference)
    recipe.subject = str(data["subject"]) if data.get("subject") is not None else None
    for variant in variants:  # fail before any run starts
        run_config(recipe, variant, recipe.seeds_of(variant)[0])
        if recipe.sweep:
            run_config(recipe, variant, recipe.sweep.seed, lr=recipe.sweep.grid_of(variant)[0], stage="sweep")
    return recipe


def run_dir(recipe: Recipe, variant: Variant, seed: int, lr: float | None = None, stage: str = "runs") -> Path:
    """``<results>/<stage>/<variant>/lr<lr>-<hash>/seed<k>``: one run's folder (:mod:`.runkey`)."""
    return Path(run_config(recipe, variant, seed, lr=lr, stage=stage).train.out_dir)


def run_config(recipe: Recipe, variant: Variant, seed: int, peak_flops: float | None = None, lr: float | None = None,
               stage: str = "runs") -> Config:
    """The full config of one variant × seed: base, the variant's overrides, stage one's budget
    (``stage="sweep"``), the learning rate ``lr`` (None: the recipe's), seed and folder."""
    overrides = [*recipe.base_overrides, f"layer.method={variant.method}", *variant.overrides]
    if stage == "sweep" and recipe.sweep is not None:
        overrides += recipe.sweep.overrides
    if lr is not None:
        overrides.append(f"train.lr={lr!r}")
    overrides += [f"train.seed={seed}", "train.progress=false"]
    if peak_flops:
        overrides.append(f"train.peak_flops={peak_flops}")
    try:
        cfg = load_config(recipe.base_config, overrides)
    except LostLMError as exc:
        raise LostLMError(f"bench variant {variant.name}: {exc}") from None
    own = Path(stage) / variant.name / key_folder(cfg) / f"seed{seed}"
    cfg.train.out_dir = str(recipe.results / own)
    if not (recipe.results / own / "summary.json").is_file():
        shared = [r / own for r in recipe.runs_from if (r / own / "summary.json").is_file()]
        if shared:
            cfg.train.out_dir = str(shared[0])
    return cfg
