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
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..configs import METHODS, Config, load_config
from ..errors import LostLMError

RESULTS_ROOT = Path("bench/results")
RECIPE_KEYS = ("name", "description", "base", "seeds", "methods", "results", "isolate")
VARIANT_KEYS = ("name", "method", "overrides")


@dataclass
class Variant:
    name: str
    method: str
    overrides: list[str] = field(default_factory=list)


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


def _read_mapping(path: Path) -> dict:
    """The recipe file as a mapping with known top-level keys only."""
    if not path.is_file():
        raise LostLMError(f"bench recipe {path} does not exist; pass a .yaml recipe such as bench/tiny.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise LostLMError(f"bench recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LostLMError(f"bench recipe {path} must be a mapping with base, seeds and methods")
    unknown = set(data) - set(RECIPE_KEYS)
    if unknown:
        raise LostLMError(f"bench recipe {path} has unknown key(s) {sorted(unknown)}; "
                          "use name, description, base, seeds, methods, results, isolate")
    return data


def _seeds(data: dict, path: Path) -> list[int]:
    seeds = data.get("seeds", [0])
    if isinstance(seeds, int):
        seeds = [seeds]
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise LostLMError(f"bench recipe {path}: seeds must be a list of integers, e.g. [0, 1, 2]")
    return [int(s) for s in seeds]


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
        variants.append(Variant(name, method, _override_list(item.get("overrides"), f"variant {name} overrides")))
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
                    isolate=bool(data.get("isolate", True)), source=path, description=str(data.get("description", "")))
    for variant in variants:  # fail before any run starts
        run_config(recipe, variant, recipe.seeds[0])
    return recipe


def run_dir(recipe: Recipe, variant: Variant, seed: int) -> Path:
    """``<results>/runs/<variant>/seed<k>``: one run's folder."""
    return recipe.results / "runs" / variant.name / f"seed{seed}"


def run_config(recipe: Recipe, variant: Variant, seed: int, peak_flops: float | None = None) -> Config:
    """The full config of one variant × seed (base, the variant's overrides, seed and folder)."""
    overrides = [*recipe.base_overrides, f"layer.method={variant.method}", *variant.overrides,
                 f"train.seed={seed}", f"train.out_dir={run_dir(recipe, variant, seed)}", "train.progress=false"]
    if peak_flops:
        overrides.append(f"train.peak_flops={peak_flops}")
    try:
        return load_config(recipe.base_config, overrides)
    except LostLMError as exc:
        raise LostLMError(f"bench variant {variant.name}: {exc}") from None
