"""``lostlm bench``: the sub-command's arguments and what each mode does."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..configs import load_config
from ..errors import LostLMError
from ..peak import measure_peak
from .recipe import load_recipe, run_config, run_dir
from .report import write_report
from .runner import _locked, run_bench


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a methods x seeds benchmark recipe and write table + plots")
    p.add_argument("recipe", nargs="?", help="bench recipe .yaml (see bench/)")
    p.add_argument("--report", metavar="RESULTS_DIR", help="only rebuild results.md/.json/PNGs from finished runs")
    p.add_argument("--peak", action="store_true", help="measure this machine's matmul FLOP/s in the training dtype and store "
                   "it (in the data cache, and in the results folder of RECIPE / --results)")
    p.add_argument("--results", help="results folder (default: the recipe's, bench/results/<name>)")
    p.add_argument("--lock", help="flock this file around each run (queue behind other heavy jobs on a shared machine)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
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
        payload = write_report(Path(args.report))
        print((Path(args.report) / "results.md").read_text())
        print(f"{payload['finished_runs']} finished run(s); wrote {args.report}/results.md, results.json, *.png")
        return 0
    if not args.recipe:
        raise LostLMError("lostlm bench needs a recipe (e.g. bench/tiny.yaml), --report RESULTS_DIR or --peak")
    recipe = load_recipe(args.recipe, args.results)
    if args.dry_run:
        for seed in recipe.seeds:
            for v in recipe.variants:
                folder = run_dir(recipe, v, seed)
                state = "done" if (folder / "summary.json").is_file() else "todo"
                print(f"{state}  {v.name:24s} seed {seed}  {folder}  {' '.join(v.overrides)}")
        return 0
    run_bench(recipe, args.lock, log=lambda m: print(m, flush=True))
    print((recipe.results / "results.md").read_text())
    return 0
