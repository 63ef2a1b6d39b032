"""Running a bench: every unfinished variant × seed, one ``lostlm train`` per run.

Each run trains in its own folder ``<results>/runs/<variant>/seed<k>/``, by default in a fresh
subprocess so that the measured peak RSS belongs to that run alone (RSS is per process). A run
whose ``summary.json`` exists is skipped, so an interrupted bench resumes where it stopped
(unfinished runs resume from their last checkpoint). ``lock`` (a file) is flocked around each
run and around a peak measurement, so heavy jobs on a shared machine queue between runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..configs import Config, save_config
from ..errors import LostLMError
from ..peak import cached_peak, measure_peak
from .recipe import Recipe, run_config, run_dir
from .report import write_report


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


def run_bench(recipe: Recipe, lock: str | None = None, log=print) -> dict:
    """Run every unfinished variant × seed, then write the report. Returns the results dict."""
    recipe.results.mkdir(parents=True, exist_ok=True)
    if recipe.source is not None:
        (recipe.results / "recipe.yaml").write_text(recipe.source.read_text())
    peak = _bench_peak(recipe, lock)
    (recipe.results / "peak.json").write_text(json.dumps(peak, indent=1))
    log(f"bench {recipe.name}: peak {peak['peak_flops_per_s'] / 1e9:.1f} GFLOP/s ({peak['dtype']}, {peak['threads']} threads); "
        f"{len(recipe.variants)} variants x {len(recipe.seeds)} seeds -> {recipe.results}")
    failures = []
    for seed in recipe.seeds:  # seed-major: a partial bench has every method at seed 0 first
        for variant in recipe.variants:
            folder = run_dir(recipe, variant, seed)
            if (folder / "summary.json").is_file():
                log(f"  {variant.name} seed {seed}: done, skipped")
                continue
            cfg = run_config(recipe, variant, seed, peak["peak_flops_per_s"])
            start = time.time()
            with _locked(lock):
                if (folder / "summary.json").is_file():  # another bench finished it while we queued
                    log(f"  {variant.name} seed {seed}: done meanwhile, skipped")
                    continue
                log(f"  {variant.name} seed {seed}: running ...")
                ok, message = _run_one(cfg, folder, recipe.isolate)
            if ok:
                log(f"  {variant.name} seed {seed}: finished in {time.time() - start:.0f} s")
            else:
                failures.append(f"{variant.name} seed {seed}: {message}")
                log(f"  {variant.name} seed {seed}: FAILED {message}")
            write_report(recipe.results, recipe)  # partial results are always on disk
    results = write_report(recipe.results, recipe)
    if failures:
        raise LostLMError(f"{len(failures)} bench run(s) failed, first: {failures[0]}; fix it and rerun (finished runs are kept)")
    return results
