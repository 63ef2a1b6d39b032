"""``lostlm bench``: the sub-command's arguments and what each mode does."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..configs import load_config
from ..errors import LostLMError
from ..peak import measure_peak
from .recipe import load_recipe, pick_variants, run_config, run_dir
from .report import write_report
from .runner import _locked, promotion, run_bench
from .sweep import chosen_lr, kept_variants, run_loss, stage_one, sweep_record


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a methods x seeds benchmark recipe and write table + plots")
    p.add_argument("recipe", nargs="?", help="bench recipe .yaml (see bench/)")
    p.add_argument("--report", metavar="RESULTS_DIR", help="only rebuild results.md/.json/PNGs from finished runs")
    p.add_argument("--peak", action="store_true", help="measure this machine's matmul FLOP/s in the training dtype and store "
                   "it (in the data cache, and in the results folder of RECIPE / --results)")
    p.add_argument("--results", help="results folder (default: the recipe's, bench/results/<name>)")
    p.add_argument("--lock", help="flock this file around each run (queue behind other heavy jobs on a shared machine)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.add_argument("--threads", type=int, help="train.threads of every run (not part of a run's key: results stay comparable)")
    p.add_argument("--stage", choices=("all", "one", "two"), default="all",
                   help="a recipe with a sweep: block: run stage one (lr choice), stage two (chosen lr x seeds), or both")
    p.add_argument("--methods", help="comma-separated variant (or method) names: run only theirs, in that order "
                   "(e.g. two lanes in parallel); the report still covers every finished run")
    p.set_defaults(func=cmd_bench)


def _cmd_peak(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.results) if args.recipe else None
    cfg = run_config(recipe, recipe.variants[0], recipe.seeds[0]) if recipe else load_config(None, [])
    with _locked(args.lock):
        peak = measure_peak(cfg, force=True)
    print(json.dumps(peak, indent=1))
    folder = recipe.results if recipe else Path(args.results) if args.results else None
    if folder is not None:  # MFU of that bench's report is recomputed against this peak
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "peak.json").write_text(json.dumps(peak, indent=1))
        print(f"stored in {folder / 'peak.json'}; `lostlm bench --report {folder}` recomputes MFU")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.peak:
        return _cmd_peak(args)
    if args.report:
        _refresh_sweep(Path(args.report))
        payload = write_report(Path(args.report))
        print((Path(args.report) / "results.md").read_text())
        print(f"{payload['finished_runs']} finished run(s); wrote {args.report}/results.md, results.json, *.png")
        return 0
    if not args.recipe:
        raise LostLMError("lostlm bench needs a recipe (e.g. bench/tiny.yaml), --report RESULTS_DIR or --peak")
    recipe = load_recipe(args.recipe, args.results)
    if args.threads:
        recipe.base_overrides.append(f"train.threads={args.threads}")
    only = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    variants = pick_variants(recipe, only)  # an unknown name fails here, before any run starts
    if args.dry_run:
        _dry_run(recipe, variants)
        return 0
    run_bench(recipe, args.lock, log=lambda m: print(m, flush=True), stage=args.stage, only=only)
    if (recipe.results / "results.md").is_file():
        print((recipe.results / "results.md").read_text())
    return 0


def _refresh_sweep(folder: Path) -> None:
    """Rewrite a sweep's ``sweep.json`` from its finished runs (the recipe copy in the folder)."""
    try:
        recipe = load_recipe(folder / "recipe.yaml", results=folder) if (folder / "recipe.yaml").is_file() else None
    except LostLMError:
        return
    if recipe is not None and recipe.sweep is not None:
        (folder / "sweep.json").write_text(json.dumps(sweep_record(recipe), indent=1))


def _dry_run(recipe, variants) -> None:
    """List what ``lostlm bench`` would do for ``variants`` (``--methods``, default all): stage
    one's state (a sweep), every stage-two run that can be named now, and the promoted seeds of
    one-seed variants (``promote_seeds``) as far as their first seed has decided them."""
    def state(folder):
        loss = run_loss(folder)
        return "todo" if loss is None else "done"

    if recipe.sweep is not None:
        for v in variants:
            st = stage_one(recipe, v)
            points = " ".join(f"{lr:.3g}:{loss:.4f}" for lr, loss in sorted(st["points"].items()))
            what = f"next lr {st['next']:.3g}" if "next" in st else f"chosen lr {st['chosen']}" + (" (AT EDGE)" if st["at_edge"] else "")
            print(f"sweep  {v.name:24s} {what}   finished: {points or 'none'}")
    kept = kept_variants(recipe) if recipe.sweep is not None and recipe.sweep.per_method else None
    for v in variants:
        if kept is not None and kept[v.method] != v.name:
            why = "another variant of its method has not finished stage one" if kept[v.method] is None else \
                f"not kept: {kept[v.method]} has the lower stage-one loss"
            print(f"{'wait' if kept[v.method] is None else 'skip'}   {v.name:24s} {why}")
            continue
        try:
            lr = chosen_lr(recipe, v)
        except LostLMError as exc:
            print(f"wait   {v.name:24s} {exc}")
            continue
        if recipe.sweep is not None and lr is None:
            print(f"wait   {v.name:24s} stage one has not chosen an lr")
            continue
        for seed in recipe.seeds_of(v):
            folder = run_dir(recipe, v, seed, lr=lr)
            print(f"{state(folder)}   {v.name:24s} seed {seed}  {folder}  {' '.join(v.overrides)}")
        decided = promotion(recipe, v)
        seeds = ",".join(map(str, recipe.promote_seeds))
        if decided == "promoted":
            for seed in recipe.promote_seeds:
                folder = run_dir(recipe, v, seed, lr=lr)
                print(f"{state(folder)}   {v.name:24s} seed {seed}  {folder}  (promoted: beat {recipe.reference} at its seed)")
        elif decided == "wait":
            print(f"wait   {v.name:24s} seeds {seeds} if it beats {recipe.reference} at seed {recipe.seeds_of(v)[0]}")
        elif decided == "not promoted":
            print(f"skip   {v.name:24s} seeds {seeds}: did not beat {recipe.reference} at seed {recipe.seeds_of(v)[0]}")
