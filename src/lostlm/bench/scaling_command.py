"""``lostlm scaling``: run a scaling recipe's ladder through the bench machinery, then fit and report.

    lostlm scaling bench/scaling.yaml --threads 2              # every run not finished yet, then the report
    lostlm scaling bench/scaling.yaml --methods full --threads 1   # one method's ladder (others in parallel)
    lostlm scaling bench/scaling.yaml --dry-run                # each run's state, folder, N and lr (with its source)
    lostlm scaling --report bench/results/scaling              # refit and rewrite scaling.md/.json/.png

The recipe format is :mod:`.ladder`'s; the fit :mod:`.scaling_fit`'s; the report
:mod:`.scaling_report`'s. docs/scaling.md says what is fitted and its limits.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LostLMError
from .ladder import Ladder, ladder_runs, load_ladder
from .runner import _bench_peak, _train
from .sweep import run_loss


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scaling", help="fit L(N, D) per method on a ladder of model sizes, predict a held-out size")
    p.add_argument("recipe", nargs="?", help="scaling recipe .yaml (see bench/scaling.yaml)")
    p.add_argument("--report", metavar="RESULTS_DIR", help="only refit and rewrite scaling.md/.json/.png from finished runs")
    p.add_argument("--results", help="results folder (default: the recipe's, bench/results/<name>)")
    p.add_argument("--lock", help="flock this file around each run (queue behind other heavy jobs on a shared machine)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.add_argument("--threads", type=int, help="train.threads of every run (not part of a run's key)")
    p.add_argument("--methods", help="comma-separated method names: run only their ladders")
    p.set_defaults(func=cmd_scaling)


def _report(ladder: Ladder, log) -> None:
    from .scaling_report import write_scaling_report

    try:
        write_scaling_report(ladder)
        log(f"  report: {ladder.results / 'scaling.md'}")
    except LostLMError as exc:
        log(f"  report not written: {exc}")


def _dry_run(ladder: Ladder, only: list[str] | None) -> None:
    from .ladder import non_embedding_params
    from .recipe import run_config

    for name, (lr, source) in ladder.lrs.items():
        print(f"lr     {name:10s} {lr:.3g}  ({source})")
    if len(ladder.sizes) < 4:
        print(f"note   {len(ladder.sizes)} fitted sizes: fewer than 4 gives a weak fit (see docs/scaling.md)")
    for m, shape, tokens, variant, seed in ladder_runs(ladder, only):
        cfg = run_config(ladder.bench, variant, seed, lr=ladder.lrs[m.name][0])
        state = "todo" if run_loss(Path(cfg.train.out_dir)) is None else "done"
        role = "held-out" if shape is ladder.held_out else "fitted"
        print(f"{state}   {m.name:10s} {shape.name:8s} {role:8s} N={non_embedding_params(cfg) / 1e6:.3f}M tokens={tokens:,} "
              f"seed {seed}  {cfg.train.out_dir}")


def cmd_scaling(args: argparse.Namespace) -> int:
    if args.report:
        folder = Path(args.report)
        if not (folder / "recipe.yaml").is_file():
            raise LostLMError(f"{folder} is not a scaling results folder (no recipe.yaml); pass the folder `lostlm scaling` wrote")
        ladder = load_ladder(folder / "recipe.yaml", results=folder)
        from .scaling_report import write_scaling_report

        write_scaling_report(ladder)
        print((folder / "scaling.md").read_text())
        return 0
    if not args.recipe:
        raise LostLMError("lostlm scaling needs a recipe (e.g. bench/scaling.yaml) or --report RESULTS_DIR")
    ladder = load_ladder(args.recipe, args.results)
    only = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    if args.threads:
        ladder.bench.base_overrides.append(f"train.threads={args.threads}")
    if args.dry_run:
        _dry_run(ladder, only)
        return 0
    run_ladder(ladder, only, args.lock, log=lambda m: print(m, flush=True))
    print((ladder.results / "scaling.md").read_text() if (ladder.results / "scaling.md").is_file() else "no report yet")
    return 0


def run_ladder(ladder: Ladder, only: list[str] | None = None, lock: str | None = None, log=print) -> None:
    """Train every unfinished run (one subprocess each, :func:`.runner._train`), method by
    method; the report is rewritten after each method's ladder and at the end."""
    runs = ladder_runs(ladder, only)
    ladder.results.mkdir(parents=True, exist_ok=True)
    (ladder.results / "recipe.yaml").write_text(ladder.bench.source.read_text())
    peak = _bench_peak(ladder.bench, lock)
    log(f"scaling {ladder.name}: {len(runs)} runs -> {ladder.results}")
    failures: list[str] = []
    for i, (m, shape, tokens, variant, seed) in enumerate(runs):
        _train(ladder.bench, variant, seed, ladder.lrs[m.name][0], "runs", peak, lock, log, failures)
        if i + 1 == len(runs) or runs[i + 1][0] is not m:
            _report(ladder, log)
    if failures:
        raise LostLMError(f"{len(failures)} scaling run(s) failed, first: {failures[0]}; fix it and rerun (finished runs are kept)")


__all__ = ["cmd_scaling", "register", "run_ladder"]
