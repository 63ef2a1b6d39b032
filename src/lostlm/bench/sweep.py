"""Learning-rate sweeps: stage one picks each variant's lr, stage two runs it at every seed.

Stage one trains each variant at every lr of its grid, at ``sweep.seed`` only, with the short
budget of ``sweep.overrides``, in ``<results>/sweep/<variant>/lr<lr>-<hash>/seed<k>/``. The
chosen lr is the one with the lowest final validation loss (a run that diverged — non-finite
loss — counts as +inf; ties go to the smaller lr). If the best lr is the largest tried, the
next point is ``largest × factor``; if it is the smallest, ``smallest ÷ factor``; this repeats
until the best point is interior or ``max_extensions`` points were added for that variant (the
choice is then flagged ``at_edge``). The state is not stored: it is recomputed from the
finished runs, so a stopped sweep resumes, and ``sweep.json`` in the results folder is only a
record (grid, every point, extensions, choice).

Stage two runs the chosen lr at the recipe's seeds with the full budget, like a plain bench.
With ``sweep.per_method``, the variants of one method are settings of that method (e.g. its
embedding/head lr multiple): stage one then also keeps, per method, the variant whose chosen
point has the lowest stage-one loss (:func:`kept_variants`), and stage two runs only that one,
so every hyperparameter of the comparison is chosen by the same rule on the same short runs.
A recipe with ``lr_from`` instead reads the choice from another results folder's
``sweep.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import LostLMError
from .recipe import Recipe, Variant, run_dir

DIVERGED = "diverged.json"  # written into a run folder whose loss became non-finite


def run_loss(folder: Path) -> float | None:
    """Final validation loss of a finished run, +inf if it diverged, None if not finished."""
    if (folder / DIVERGED).is_file():
        return math.inf
    try:
        loss = json.loads((folder / "summary.json").read_text())["val_loss"]
    except (OSError, ValueError, KeyError):
        return None
    return float(loss) if loss is not None and math.isfinite(float(loss)) else math.inf


def decide(points: dict[float, float], grid: list[float], factor: float, max_extensions: int) -> dict:
    """Given finished stage-one points (lr -> loss), either the next lr to try or the choice.

    Returns ``{"next": lr}`` or ``{"chosen": lr or None, "at_edge": bool, "extensions": [...]}``
    (None when every point diverged). Pure: the tests call it with hand-made points.
    """
    grid = sorted(grid)
    extensions = sorted(lr for lr in points if not any(math.isclose(lr, g, rel_tol=1e-9) for g in grid))
    if any(not any(math.isclose(g, p, rel_tol=1e-9) for p in points) for g in grid):
        missing = [g for g in grid if not any(math.isclose(g, p, rel_tol=1e-9) for p in points)]
        return {"next": missing[0]}
    lrs = sorted(points)
    best = min(lrs, key=lambda lr: (points[lr], lr))
    if not math.isfinite(points[best]):
        return {"chosen": None, "at_edge": False, "extensions": extensions}
    room = len(extensions) < max_extensions
    if best == lrs[-1] and room:
        return {"next": lrs[-1] * factor}
    if best == lrs[0] and room:
        return {"next": lrs[0] / factor}
    return {"chosen": best, "at_edge": best in (lrs[0], lrs[-1]), "extensions": extensions}


def stage_one(recipe: Recipe, variant: Variant) -> dict:
    """This variant's stage one as far as its finished runs go: points, and the next lr or the choice."""
    sweep = recipe.sweep
    grid = sweep.grid_of(variant)
    points: dict[float, float] = {}
    for lr in grid:  # every finished grid point, also those past a gap (a partial sweep shows them all)
        loss = run_loss(run_dir(recipe, variant, sweep.seed, lr=lr, stage="sweep"))
        if loss is not None:
            points[lr] = loss
    while True:
        state = decide(points, grid, sweep.factor, sweep.max_extensions)
        if "next" not in state:
            return {**state, "grid": grid, "points": points}
        lr = state["next"]
        loss = run_loss(run_dir(recipe, variant, sweep.seed, lr=lr, stage="sweep"))
        if loss is None:  # not run yet (or unfinished): that is the next run
            return {"next": lr, "grid": grid, "points": points}
        points[lr] = loss


def pending_stage_one(recipe: Recipe) -> list[tuple[Variant, float]]:
    """Every stage-one run that can start now: the grid points not finished yet, else the one
    extension each variant needs. Variant by variant in the recipe's order (a partial sweep has
    whole sweeps of the first variants: list the ones to decide first), each grid from the
    middle outwards (a cut-short sweep still has the central points)."""
    out = []
    for v in recipe.variants:
        state = stage_one(recipe, v)
        if "next" not in state:
            continue
        grid = state["grid"]
        mid = (len(grid) - 1) / 2
        order = sorted(range(len(grid)), key=lambda i: (abs(i - mid), -i))
        todo = [grid[i] for i in order if run_loss(run_dir(recipe, v, recipe.sweep.seed, lr=grid[i], stage="sweep")) is None]
        out += [(v, lr) for lr in (todo or [state["next"]])]
    return out


def kept_variants(recipe: Recipe, states: dict[str, dict] | None = None) -> dict[str, str | None]:
    """``sweep.per_method``: per method, the name of the variant its stage two runs, the one
    whose chosen lr has the lowest stage-one loss (ties: the first listed; a variant whose every
    lr diverged counts as +inf), or None while one of that method's variants has not chosen.
    ``states``: :func:`stage_one` of every variant by name, if the caller has them."""
    states = states or {v.name: stage_one(recipe, v) for v in recipe.variants}

    def chosen_loss(v: Variant) -> float:
        state = states[v.name]
        return state["points"][state["chosen"]] if state.get("chosen") is not None else math.inf

    kept: dict[str, str | None] = {}
    for method in dict.fromkeys(v.method for v in recipe.variants):
        mine = [v for v in recipe.variants if v.method == method]
        undecided = any("next" in states[v.name] for v in mine)
        kept[method] = None if undecided else min(mine, key=chosen_loss).name
    return kept


def sweep_record(recipe: Recipe) -> dict:
    """``sweep.json``: per variant its grid, every finished point, extensions and the choice
    (with ``sweep.per_method``, also whether stage two keeps it for its method)."""
    states = {v.name: stage_one(recipe, v) for v in recipe.variants}
    kept = kept_variants(recipe, states) if recipe.sweep.per_method else None
    variants = {}
    for v in recipe.variants:
        state = states[v.name]
        variants[v.name] = {"method": v.method, "grid": state["grid"],
                            "points": [{"lr": lr, "val_loss": None if not math.isfinite(loss) else loss,
                                        "diverged": not math.isfinite(loss)} for lr, loss in sorted(state["points"].items())],
                            "done": "next" not in state, "chosen_lr": state.get("chosen"),
                            "at_edge": state.get("at_edge"), "extensions": state.get("extensions", [])}
        if kept is not None:
            variants[v.name]["kept"] = None if kept[v.method] is None else kept[v.method] == v.name
    return {"seed": recipe.sweep.seed, "overrides": recipe.sweep.overrides, "factor": recipe.sweep.factor,
            "max_extensions": recipe.sweep.max_extensions, "per_method": recipe.sweep.per_method, "variants": variants}


def chosen_lr(recipe: Recipe, variant: Variant) -> float | None:
    """The lr stage two of ``variant`` runs at: its sweep's choice, ``lr_from``'s, or None (the
    recipe's own lr). Raises when the choice is not available yet."""
    if recipe.sweep is not None:
        state = stage_one(recipe, variant)
        return state.get("chosen")
    if recipe.lr_from is None:
        return None
    folder = Path(recipe.lr_from["results"])
    try:
        record = json.loads((folder / "sweep.json").read_text())
    except (OSError, ValueError):
        raise LostLMError(f"lr_from: {folder}/sweep.json is missing; run that sweep's recipe first "
                          f"(lostlm bench <its recipe>)") from None
    name = recipe.lr_from.get("variant") or variant.name
    entry = record.get("variants", {}).get(name)
    if not entry or entry.get("chosen_lr") is None:
        raise LostLMError(f"lr_from: {folder}/sweep.json has no chosen lr for {name!r} yet; finish its stage one first")
    return float(entry["chosen_lr"])
