"""Memory benchmark of the levers (chunked loss, activation checkpointing, 8-bit AdamW).

    PYTHONPATH=src python bench/memory.py                 # every planned run not yet in the results
    PYTHONPATH=src python bench/memory.py --only 60m-full-plain
    PYTHONPATH=src python bench/memory.py --list

One run per process (peak RSS is per process): the parent starts ``bench/memory.py --one NAME``
for each planned run whose name is not yet in ``bench/results/memory.json`` and appends the
child's result as soon as it finishes, so an interrupted benchmark resumes where it stopped.
A run builds the real :class:`lostlm.train.Trainer` (model, conversion, optimizer, levers) and
times ``steps`` optimizer steps through the trainer's own step (no evaluation and no checkpoint
save, whose serialisation buffers would otherwise set the peak). It records the peak RSS of its
own process (``ru_maxrss``) before and after the steps, tokens/s of the fastest step after the
first, and :func:`lostlm.estimate.estimate_run`'s parts for the same config.

Runs marked ``cap`` run under ``prlimit --as`` (address-space limit): a run that needs more
fails with an allocation error instead of meeting the kernel's OOM killer (which would hit
other processes on a shared machine); its run folder holds only config.yaml and is reusable.

Data: a corpus made of this repository's own text (content does not matter for memory or
speed), a 4096-token BPE, and ``model.vocab_size=32000`` (the paper vocabulary) so the LM head
and the loss have the real width.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "memory.json"
WORK = Path(os.environ.get("LOSTLM_BENCH_WORK", "/tmp/lostlm-memory-bench"))

ALL = {"train.loss_impl": "chunked", "train.activation_checkpointing": 1, "train.optimizer": "adamw8bit"}
PLAIN = {"train.loss_impl": "plain", "train.activation_checkpointing": 0, "train.optimizer": "adamw"}
LEVERS = {
    "plain": PLAIN,
    "chunked": {**PLAIN, "train.loss_impl": "chunked"},
    "chunked+ckpt": {**PLAIN, "train.loss_impl": "chunked", "train.activation_checkpointing": 1},
    "all": ALL,
}
SHAPES = {"60m": dict(batch=16, micro=16, steps=2), "350m": dict(batch=1, micro=1, steps=2),
          "1b": dict(batch=1, micro=1, steps=2)}
EVERY = ["full", "lowrank", "lowrank-svd", "cola", "sltrain", "galore", "lost"]


def _levers(method: str, name: str) -> dict:
    levers = dict(LEVERS[name])
    if method == "galore" and levers["train.optimizer"] == "adamw8bit":
        levers["train.optimizer"] = "adamw"  # GaLoreAdamW8bit needs CUDA (lostlm refuses the pair)
    return levers


def plan() -> list[dict]:
    """The runs, in the order they are worth having if time runs out."""
    runs = []

    def add(preset, method, lever, cap=None):
        runs.append({"name": f"{preset}-{method}-{lever}", "preset": preset, "method": method, "lever": lever,
                     "cap_gib": cap, **SHAPES[preset]})

    add("60m", "full", "plain")
    add("60m", "full", "all")
    add("60m", "lost", "plain")
    add("60m", "lost", "all")
    add("350m", "full", "all")
    add("350m", "lost", "all")
    add("1b", "full", "all")
    add("350m", "cola", "all")
    add("350m", "galore", "all")
    add("1b", "lost", "all")
    for method in EVERY:
        if method not in ("full", "lost"):
            add("60m", method, "plain")
            add("60m", method, "all")
    for method in EVERY:
        add("60m", method, "chunked")
        add("60m", method, "chunked+ckpt")
    for method in ("full", "lost"):
        add("1b", method, "plain", cap=22)
    return runs


def _corpus() -> Path:
    path = WORK / "corpus.jsonl"
    if not path.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        files = sorted([*ROOT.glob("docs/*.md"), *ROOT.glob("src/lostlm/**/*.py"), *ROOT.glob("tests/*.py")])
        lines = [json.dumps({"text": f.read_text()}) for f in files] * 4
        path.write_text("\n".join(lines) + "\n")
    return path


def overrides(run: dict) -> list[str]:
    values = {"model.preset": run["preset"], "model.vocab_size": 32000, "layer.method": run["method"],
              "data.source": "files", "data.paths": f"[{_corpus()}]", "data.cache_dir": str(WORK / "cache"),
              "data.bpe_vocab_size": 4096, "data.seq_len": 256, "data.val_tokens": 512,
              "train.batch_size": run["batch"], "train.micro_batch_size": run["micro"], "train.steps": run["steps"],
              "train.threads": 2, "train.progress": False, "train.peak_flops": 1e9, "train.checkpoint_every": 0,
              "train.out_dir": str(WORK / "runs" / run["name"]), "train.resume": "never",
              **_levers(run["method"], run["lever"])}
    return [f"{k}={v}" for k, v in values.items()]


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_one(run: dict) -> dict:
    import shutil

    from lostlm.configs import load_config
    from lostlm.estimate import estimate_run
    from lostlm.summary import Session
    from lostlm.train import Trainer

    shutil.rmtree(WORK / "runs" / run["name"], ignore_errors=True)
    cfg = load_config(None, overrides(run))
    start = time.perf_counter()
    trainer = Trainer(cfg)
    built, rss_built = time.perf_counter() - start, rss_bytes()
    times, losses, session = [], [], Session()
    while trainer.step < cfg.train.steps:
        stats, elapsed = trainer._timed_step(session)
        times.append(elapsed)
        losses.append(stats["loss"])
    tokens = cfg.train.batch_size * cfg.data.seq_len
    est = estimate_run(cfg, 32000, trainer.micro_batch, amp=trainer.amp_dtype is not None).to_dict()
    return {"peak_rss_bytes": rss_bytes(), "rss_after_build_bytes": rss_built, "build_s": built,
            "step_s": times, "tokens_per_s": tokens / min(times[1:] or times), "losses": losses,
            "precision": str(trainer.amp_dtype or "fp32"), "threads": cfg.train.threads, "estimate": est,
            "optimizer": cfg.train.optimizer, "overrides": overrides(run)}


def machine() -> dict:
    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (StopIteration, OSError):
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": model, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version()}


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {"machine": machine(), "runs": {}}


def save_results(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, RESULTS)


def report(results: dict) -> str:
    """Markdown table of the finished runs: measured peak beside the estimator's parts."""
    mib = 2**20
    lines = ["| run | precision, threads | measured peak (MiB) | estimate: W+G / optimizer / activations / "
             "buffers (MiB) | estimate sum (MiB) | measured / estimate | runtime base (MiB) | "
             "(measured − base) / estimate | tokens/s (contended) |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for name, r in results["runs"].items():
        if "error" in r:
            lines.append(f"| {name} | | {r.get('peak_rss_bytes', 0) / mib:,.0f} (failed) | {r['error'][:80]} | | | | | |")
            continue
        e = r["estimate"]
        base = r["rss_after_build_bytes"] - e["weights_bytes"]  # Python, torch, data: RSS after build less the weights
        parts = " / ".join(f"{e[k] / mib:,.0f}" for k in ("grads_bytes", "optimizer_bytes", "activations_bytes",
                                                         "transient_bytes"))
        parts = f"{(e['weights_bytes'] + e['grads_bytes']) / mib:,.0f} / " + parts.split(" / ", 1)[1]
        lines.append(f"| {name} | {r['precision']}, {r['threads']} | {r['peak_rss_bytes'] / mib:,.0f} | {parts} | "
                     f"{e['total_bytes'] / mib:,.0f} | {r['peak_rss_bytes'] / e['total_bytes']:.2f} | "
                     f"{base / mib:,.0f} | {(r['peak_rss_bytes'] - base) / e['total_bytes']:.2f} | {r['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help="run this planned run in this process and print its JSON")
    parser.add_argument("--only", action="append", help="run only these names (repeatable)")
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    parser.add_argument("--report", action="store_true", help="print the results as a markdown table and exit")
    args = parser.parse_args()
    runs = {r["name"]: r for r in plan()}
    if args.report:
        print(report(load_results()))
        return 0
    if args.list:
        print("\n".join(runs))
        return 0
    if args.one:
        try:
            out = run_one(runs[args.one])
        except (MemoryError, RuntimeError) as exc:  # the cap, or torch's allocator refusing
            out = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}", "peak_rss_bytes": rss_bytes()}
        print("RESULT " + json.dumps(out))
        return 0
    results = load_results()
    for name, run in runs.items():
        if name in results["runs"] or (args.only and name not in args.only):
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name]
        if run["cap_gib"]:
            cmd = ["prlimit", f"--as={run['cap_gib'] * 2**30}", *cmd]
        print(f"[memory] {name} ...", flush=True)
        start = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        out = json.loads(lines[-1][7:]) if lines else {"error": f"exit {proc.returncode}: {proc.stderr[-500:]}"}
        out.update(run, wall_s=round(time.time() - start, 1), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        results = load_results()
        results["runs"][name] = out
        save_results(results)
        peak = out.get("peak_rss_bytes", 0) / 2**20
        print(f"[memory] {name}: peak {peak:,.0f} MiB, {out.get('tokens_per_s', 0):,.0f} tok/s {out.get('error', '')}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
