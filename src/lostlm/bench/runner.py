"""Running a bench: every unfinished variant × seed, one ``lostlm train`` per run.

Each run trains in its own folder ``<results>/runs/<variant>/lr<lr>-<hash>/seed<k>/`` (stage
one of a sweep: ``sweep/`` instead of ``runs/``; the hash is :mod:`.runkey`'s), by default in a
fresh subprocess so that the measured peak RSS belongs to that run alone (RSS is per process).
A run whose ``summary.json`` (or ``diverged.json``) exists is skipped, so an interrupted bench
resumes where it stopped (unfinished runs resume from their last checkpoint). ``lock`` (a file) is flocked around each
run and around a peak measurement, so heavy jobs on a shared machine queue between runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..configs import Config, read_config_file, save_config
from ..errors import LostLMError
from ..peak import cached_peak, measure_peak
from ..rundir import CONFIG_FILE
from ..runlock import RunInUse, RunLock
from .recipe import Recipe, Variant, pick_variants, run_config, run_dir
from .report import write_report
from .sweep import DIVERGED, chosen_lr, kept_variants, pending_stage_one, run_loss, stage_one, sweep_record


@contextlib.contextmanager
def _locked(lock: str | None):
    """Hold an exclusive flock on ``lock`` (None: no lock) — heavy jobs on a shared box queue."""
    if not lock:
        yield
        return
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_one(cfg: Config, folder: Path, isolate: bool) -> tuple[bool, str]:
    """Train one config; in a subprocess when ``isolate`` (own RSS peak). Returns (ok, message)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not isolate:
        from ..train import Trainer

        try:
            Trainer(cfg).train()
        except LostLMError as exc:
            return False, str(exc)
        return True, ""
    config_path = folder / "bench-config.yaml"
    save_config(cfg, config_path)
    log_path = folder / "train.log"
    env = dict(os.environ)
    if sys.platform.startswith("linux"):
        # Transparent huge pages for glibc's big (mmap'ed) blocks: every step allocates a few
        # logits-sized buffers (16×256×32000 fp32 = 0.5 GB), and first-touch faults on 4 KiB pages
        # made zero-filling one cost ~4× more than with 2 MiB pages on our CPU box.
        env.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    with open(log_path, "a") as log:
        proc = subprocess.run([sys.executable, "-m", "lostlm", "train", str(config_path)], stdout=log, stderr=subprocess.STDOUT,
                              env=env)
    if proc.returncode != 0:
        tail = [l for l in log_path.read_text(errors="replace").splitlines() if l.strip()][-1:] or ["no output"]
        return False, f"exit status {proc.returncode}: {tail[0]} (log: {log_path})"
    return True, ""


def _bench_peak(recipe: Recipe, lock: str | None) -> dict:
    """The cached peak rate for the recipe's device and dtype, measured (under the lock) if missing."""
    probe = run_config(recipe, recipe.variants[0], recipe.seeds[0])
    peak = cached_peak(probe)
    if peak is None:  # measuring is heavy: queue for the lock; reading the cache is not
        with _locked(lock):
            peak = measure_peak(probe)
    return peak


def _keep_started_threads(cfg: Config, folder: Path, log) -> Config:
    """A started run resumes at the thread count it began with: the trainer refuses another one
    (intra-op reductions would sum in another order), while ``--threads`` is not part of a run's key."""
    saved = folder / CONFIG_FILE
    if not saved.is_file():
        return cfg
    try:
        threads = read_config_file(saved).get("train", {}).get("threads")
    except LostLMError:
        return cfg  # an unreadable config: the trainer names the problem
    if isinstance(threads, int) and threads != cfg.train.threads:
        log(f"  {folder}: started with train.threads={threads}; resuming with it")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, threads=threads))
    return cfg


def _train(recipe: Recipe, variant: Variant, seed: int, lr: float | None, stage: str, peak: dict, lock: str | None,
           log, failures: list[str]) -> None:
    """One run, unless it is finished (or diverged): queue for the lock, train, record failures."""
    cfg = run_config(recipe, variant, seed, peak["peak_flops_per_s"], lr=lr, stage=stage)
    folder = Path(cfg.train.out_dir)
    cfg = _keep_started_threads(cfg, folder, log)
    label = f"{stage}/{variant.name} lr {cfg.train.lr:g} seed {seed}"
    if run_loss(folder) is not None:
        log(f"  {label}: done, skipped")
        return
    start = time.time()
    with _locked(lock):
        if run_loss(folder) is not None:  # another bench finished it while we queued
            log(f"  {label}: done meanwhile, skipped")
            return
        try:  # another bench process is training this run: leave its folder (config, log) alone
            RunLock(folder).acquire().release()
        except RunInUse as exc:
            log(f"  {label}: skipped, {exc}")
            return
        log(f"  {label}: running in {folder} ...")
        ok, message = _run_one(cfg, folder, recipe.isolate)
    if ok:
        log(f"  {label}: finished in {time.time() - start:.0f} s")
    elif "loss became" in message:  # diverged: a finished result (+inf), not retried
        (folder / DIVERGED).write_text(json.dumps({"message": message}))
        log(f"  {label}: DIVERGED {message}")
    else:
        failures.append(f"{label}: {message}")
        log(f"  {label}: FAILED {message}")


def _report(recipe: Recipe) -> dict:
    if recipe.sweep is not None:
        (recipe.results / "sweep.json").write_text(json.dumps(sweep_record(recipe), indent=1))
    try:
        return write_report(recipe.results, recipe)
    except LostLMError:  # nothing finished in stage two yet
        return {}


def _run_sweep(recipe: Recipe, variants: list[Variant], peak: dict, lock: str | None, log, failures: list[str]) -> None:
    """Stage one of ``variants``: rounds of the runs that can start, until each has chosen (or failed)."""
    while True:
        pending = [(v, lr) for v, lr in pending_stage_one(recipe) if v in variants]
        before = len(failures)
        for variant, lr in pending:
            _train(recipe, variant, recipe.sweep.seed, lr, "sweep", peak, lock, log, failures)
            _report(recipe)
        if not pending or len(failures) > before:  # done, or a run failed: do not loop on it
            break
    for v in variants:
        st = stage_one(recipe, v)
        if "next" in st:
            log(f"  sweep/{v.name}: stage one not finished (next lr {st['next']:g})")
        elif st["chosen"] is None:
            log(f"  sweep/{v.name}: every lr diverged; widen the grid downwards")
        else:
            edge = " AT THE EDGE of the grid after the maximum extensions" if st["at_edge"] else ""
            log(f"  sweep/{v.name}: chosen lr {st['chosen']:g}{edge} from {len(st['points'])} points")


def _kept_only(recipe: Recipe, ready: list[Variant], log) -> list[Variant]:
    """``sweep.per_method``: of the variants ready for stage two, those kept for their method."""
    kept = kept_variants(recipe)
    for v in ready:
        if kept[v.method] is None:
            log(f"  {v.name}: another {v.method} variant has not finished stage one; its stage two waits")
        elif kept[v.method] != v.name:
            log(f"  {v.name}: not kept, {kept[v.method]} has the lower stage-one loss for {v.method}; no stage two")
    return [v for v in ready if kept[v.method] == v.name]


def promotion(recipe: Recipe, variant: Variant) -> str | None:
    """Whether a one-seed variant earns ``recipe.promote_seeds``: ``"promoted"`` (its loss at
    that seed is below the reference's), ``"not promoted"`` (equal or above), ``"wait"`` (either
    run has not finished), or None where promotion does not apply (no promote_seeds, the
    reference itself, a variant with several seeds of its own)."""
    if not recipe.promote_seeds or variant.name == recipe.reference or len(recipe.seeds_of(variant)) != 1:
        return None
    seed = recipe.seeds_of(variant)[0]
    ref = next(v for v in recipe.variants if v.name == recipe.reference)
    mine = run_loss(run_dir(recipe, variant, seed, lr=chosen_lr(recipe, variant)))
    theirs = run_loss(run_dir(recipe, ref, seed, lr=chosen_lr(recipe, ref)))
    if mine is None or theirs is None:
        return "wait"
    return "promoted" if mine < theirs else "not promoted"


def run_bench(recipe: Recipe, lock: str | None = None, log=print, stage: str = "all",
              only: list[str] | None = None) -> dict:
    """Run every unfinished run (stage one of a sweep first, if any), then write the report.
    ``stage``: ``all``, ``one`` (stage one only) or ``two`` (stage two only); ``only``: these
    variant names (or methods) alone, in that order (the report still covers every variant)."""
    variants = pick_variants(recipe, only)
    recipe.results.mkdir(parents=True, exist_ok=True)
    if recipe.source is not None:
        (recipe.results / "recipe.yaml").write_text(recipe.source.read_text())
    peak = _bench_peak(recipe, lock)
    (recipe.results / "peak.json").write_text(json.dumps(peak, indent=1))
    log(f"bench {recipe.name}: peak {peak['peak_flops_per_s'] / 1e9:.1f} GFLOP/s ({peak['dtype']}, {peak['threads']} threads); "
        f"{len(recipe.variants)} variants x {len(recipe.seeds)} seeds -> {recipe.results}")
    failures: list[str] = []
    if recipe.sweep is not None and stage in ("all", "one"):
        _run_sweep(recipe, variants, peak, lock, log, failures)
    if stage in ("all", "two"):
        lrs = {v.name: chosen_lr(recipe, v) for v in variants}
        ready = [v for v in variants if recipe.sweep is None or lrs[v.name] is not None]
        for v in variants:
            if v not in ready:
                log(f"  {v.name}: stage one has not chosen an lr yet; its stage two waits")
        if recipe.sweep is not None and recipe.sweep.per_method:
            ready = _kept_only(recipe, ready, log)
        seeds = sorted({s for v in ready for s in recipe.seeds_of(v)})
        for seed in seeds:  # seed-major: a partial bench has every variant at the first seed first
            for variant in ready:
                if seed in recipe.seeds_of(variant):
                    _train(recipe, variant, seed, lrs[variant.name], "runs", peak, lock, log, failures)
                    _report(recipe)
        for variant in ready:
            if promotion(recipe, variant) == "promoted":
                log(f"  {variant.name}: beat {recipe.reference} at its one seed; running seeds {recipe.promote_seeds}")
                for seed in recipe.promote_seeds:
                    _train(recipe, variant, seed, lrs[variant.name], "runs", peak, lock, log, failures)
                    _report(recipe)
    results = _report(recipe)
    if failures:
        raise LostLMError(f"{len(failures)} bench run(s) failed, first: {failures[0]}; fix it and rerun (finished runs are kept)")
    return results
