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
    # all levers + glibc returning freed buffers, set by the trainer (train.release_freed_memory):
    # what the -mmap1m runs get from the environment
    "all+release": {**ALL, "train.release_freed_memory": True},
}
SHAPES = {"60m": dict(batch=16, micro=16, steps=2), "350m": dict(batch=1, micro=1, steps=2),
          "1b": dict(batch=1, micro=1, steps=2)}
CAPS = {"60m": 8, "350m": 10, "1b": 18}  # hard memory cap of each run's process (GiB), see memcap()
# glibc with a fixed 1 MiB mmap threshold: every buffer of 1 MiB or more is its own mapping,
# returned to the kernel when freed, so the RSS peak is the peak of live memory (by default the
# threshold grows to 32 MiB and freed heap blocks stay resident; see docs/results.md (f)).
MMAP_1M = {"MALLOC_MMAP_THRESHOLD_": "1048576"}
EVERY = ["full", "lowrank", "lowrank-svd", "cola", "sltrain", "galore", "lost"]


def _levers(method: str, name: str) -> dict:
    levers = dict(LEVERS[name])
    if method == "galore" and levers["train.optimizer"] == "adamw8bit":
        levers["train.optimizer"] = "adamw"  # GaLoreAdamW8bit needs CUDA (lostlm refuses the pair)
    return levers


def plan() -> list[dict]:
    """The runs, in the order they are worth having if time runs out."""
    runs = []

    def add(preset, method, lever, cap=None, malloc=False, suffix=""):
        # LOST's initialisation SVDs at 350m/1b take 20-90 min on 2 contended cores: memory runs
        # there use a stand-in SVD of the same shapes (the values do not change the memory)
        svd = "stand-in" if preset != "60m" and method in ("lost", "lowrank-svd") else "real"
        runs.append({"name": f"{preset}-{method}-{lever}" + ("-mmap1m" if malloc else "") + suffix, "preset": preset,
                     "method": method, "lever": lever, "cap_gib": cap or CAPS[preset], "svd": svd,
                     "env": MMAP_1M if malloc else {}, **SHAPES[preset]})

    add("60m", "full", "all")
    add("60m", "lost", "all")
    add("60m", "full", "plain")
    for method in ("full", "lost", "cola", "galore"):
        add("350m", method, "all")
    for method in ("lost", "full"):
        add("1b", method, "all")
    for method in ("lost", "full"):  # what the 1b ratio is once glibc returns freed buffers
        add("1b", method, "all", malloc=True)
    for method in ("lost", "full"):  # the trainer's own allocator setting (added with it, 2026-12-03)
        add("350m", method, "all+release")
        add("1b", method, "all+release")
    for method in ("lost", "full"):
        add("1b", method, "plain", cap=17)
    add("60m", "full", "plain", cap=1.0, suffix="-cap1g")  # killed on purpose: is its run folder usable?
    for method in ("full", "lost"):
        add("60m", method, "all", malloc=True)
        add("60m", method, "plain", malloc=True)
    add("60m", "lost", "plain")
    for method in EVERY:
        if method not in ("full", "lost"):
            add("60m", method, "plain")
            add("60m", method, "all")
    for method in EVERY:
        add("60m", method, "chunked")
        add("60m", method, "chunked+ckpt")
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
              # fp32 on every machine (every recorded run is fp32): `auto` is bf16 where the CPU has native bf16
              "train.precision": "fp32",
              "train.out_dir": str(WORK / "runs" / run["name"]), "train.resume": "never",
              # the logged steps' diagnostics copy the weights (update ratios): not what is measured here
              "train.diagnostics": "false",
              **_levers(run["method"], run["lever"])}
    return [f"{k}={v}" for k, v in values.items()]


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_bytes(key: str) -> int:
    """VmHWM (peak RSS since the last reset) or VmRSS of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5), so the next peak is per phase."""
    Path("/proc/self/clear_refs").write_text("5")


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if isinstance(t, __import__("torch").Tensor) and t.device.type == "cpu":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _malloc_bytes() -> dict:
    """glibc's own account (``mallinfo2``, all arenas): bytes in use (heap + mmapped blocks)
    and free bytes it keeps in its heaps (resident unless trimmed), or {} elsewhere."""
    import ctypes

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = Mallinfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return {}
    return {"malloc_in_use_bytes": info.uordblks + info.hblkhd, "malloc_free_kept_bytes": info.fordblks}


def _phase_hooks(trainer, phases: list) -> None:
    """Record, per step, the peak RSS of forward (model + loss), backward (+ clipping) and the
    optimizer update, with the RSS and the live grads / optimizer-state bytes at each boundary."""
    model, optimizer = trainer.train_model, trainer.optimizer

    def mark(phase):
        def hook(*_):
            params = list(trainer.model.parameters())
            state = [v for st in optimizer.state.values() for v in (st.values() if isinstance(st, dict) else [])]
            phases.append({"step": trainer.step, "phase": phase, "peak_bytes": _status_bytes("VmHWM"),
                           "rss_end_bytes": _status_bytes("VmRSS"),
                           "grads_bytes": _storage_bytes(p.grad for p in params if p.grad is not None),
                           "optimizer_state_bytes": _storage_bytes(state), **_malloc_bytes()})
            _reset_peak()
        return hook

    model.register_forward_hook(mark("forward"))
    optimizer.register_step_pre_hook(mark("backward"))
    optimizer.register_step_post_hook(mark("optimizer"))


def _stand_in_svd(weight, dtype="float32"):
    """Cheap factors of the shapes ``torch.linalg.svd(weight, full_matrices=False)`` returns."""
    import torch

    m, n = weight.shape
    k = min(m, n)
    return torch.eye(m, k), torch.linspace(1.0, 0.1, k), torch.eye(k, n)


def run_one(run: dict) -> dict:
    import shutil

    from lostlm.configs import load_config
    from lostlm.estimate import estimate_run
    from lostlm.summary import Session
    from lostlm.train import Trainer

    if run.get("svd") == "stand-in":
        import lostlm.layers

        lostlm.layers._svd = _stand_in_svd
    shutil.rmtree(WORK / "runs" / run["name"], ignore_errors=True)
    cfg = load_config(None, overrides(run))
    start = time.perf_counter()
    trainer = Trainer(cfg)
    built, rss_built = time.perf_counter() - start, rss_bytes()
    phases: list = []
    _phase_hooks(trainer, phases)
    _reset_peak()
    times, losses, session = [], [], Session()
    while trainer.step < cfg.train.steps:
        stats, elapsed = trainer._timed_step(session)
        times.append(elapsed)
        losses.append(stats["loss"])
    tokens = cfg.train.batch_size * cfg.data.seq_len
    est = estimate_run(cfg, 32000, trainer.micro_batch, amp=trainer.amp_dtype is not None).to_dict()
    peak = max([rss_bytes(), rss_built, *(ph["peak_bytes"] for ph in phases)])  # clear_refs resets ru_maxrss too
    return {"peak_rss_bytes": peak, "rss_after_build_bytes": rss_built, "build_s": built,
            "step_s": times, "tokens_per_s": tokens / min(times[1:] or times), "losses": losses,
            "precision": str(trainer.amp_dtype or "fp32"), "threads": cfg.train.threads, "estimate": est,
            "optimizer": cfg.train.optimizer, "overrides": overrides(run), "phases": phases,
            "weights_bytes_measured": _storage_bytes(trainer.model.parameters())}


def memcap(cmd: list[str], gib: float):
    """``(cmd, preexec_fn, cleanup)`` running ``cmd`` under a hard memory limit of ``gib`` GiB.

    A cgroup (v1 memory controller, or v2) made under this process's own memory cgroup, with
    ``memory.limit_in_bytes`` (v2: ``memory.max``): on overflow the kernel's OOM killer acts
    inside that cgroup only, so nothing else on the machine is touched. Where no cgroup is
    writable, ``prlimit --as`` (an address-space limit: allocations fail with an error, but it
    counts reserved virtual memory, not resident memory, so it is a cruder cap)."""
    limit = int(gib * 2**30)
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        v1 = "memory" in controllers.split(",")
        base = Path("/sys/fs/cgroup/memory" + path) if v1 else Path("/sys/fs/cgroup/unified" + path) if not controllers else None
        if base is None or not base.is_dir():
            continue
        group = base / f"lostlm-bench-{os.getpid()}-{time.monotonic_ns()}"
        try:
            group.mkdir()
            (group / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(str(limit))
            if v1 and (group / "memory.memsw.limit_in_bytes").exists():
                (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
        except OSError:
            group.rmdir() if group.is_dir() else None
            continue

        def enter(procs=group / "cgroup.procs"):
            procs.write_text(str(os.getpid()))

        def cleanup(group=group, v1=v1):
            events = {}
            for name in ("memory.oom_control", "memory.failcnt", "memory.max_usage_in_bytes", "memory.events"):
                if (group / name).exists():
                    events[name] = (group / name).read_text().strip()
            for _ in range(50):
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
            return {"kind": "cgroup-v1" if v1 else "cgroup-v2", "limit_bytes": limit, **events}

        return cmd, enter, cleanup
    return ["prlimit", f"--as={limit}", *cmd], None, lambda: {"kind": "prlimit-as", "limit_bytes": limit}


class quiet:
    """Context manager: hold ``quiet_cmd`` (a wrapper that pauses other work while its command
    runs, such as a sweep-pausing script) around a timed section of *this* process. The
    wrapper's command waits on a flag file, and gives up by itself after ``max_s`` seconds or
    when this process is gone."""

    def __init__(self, quiet_cmd: str | None, max_s: int = 280):
        self.quiet_cmd, self.max_s, self.proc = quiet_cmd, max_s, None

    def __enter__(self):
        if not self.quiet_cmd:
            return self
        WORK.mkdir(parents=True, exist_ok=True)
        self.flag = WORK / f"quiet-{os.getpid()}.flag"
        self.started = WORK / f"quiet-{os.getpid()}.on"
        self.started.unlink(missing_ok=True)
        self.flag.touch()
        script = (f"touch {self.started}; while [ -e {self.flag} ] && kill -0 {os.getpid()} 2>/dev/null "
                  f"&& [ $SECONDS -lt {self.max_s} ]; do sleep 0.2; done")
        self.proc = subprocess.Popen([self.quiet_cmd, "bash", "-c", script])
        while not self.started.exists() and self.proc.poll() is None:
            time.sleep(0.1)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.flag.unlink(missing_ok=True)
            self.proc.wait()
            self.started.unlink(missing_ok=True)
            self.seconds = time.perf_counter() - self.t0
        return False


def speed_slice(lever: str, methods: list[str], rounds: int, quiet_cmd: str | None) -> dict:
    """Tokens/s of ``methods`` at one lever setting, side by side in this process: every
    Trainer is built first (not quiet), then under ``quiet_cmd`` each takes one warm-up step
    (not timed) and ``rounds`` round-robin timed steps. The figure per method is its
    fastest timed step (all see the same machine state within the slice)."""
    import shutil

    from lostlm.configs import load_config
    from lostlm.summary import Session
    from lostlm.train import Trainer

    trainers, session, out = {}, Session(), {}
    for method in methods:
        run = {"name": f"speed-60m-{method}-{lever}", "preset": "60m", "method": method, "lever": lever, **SHAPES["60m"]}
        run["steps"] = 1 + rounds
        shutil.rmtree(WORK / "runs" / run["name"], ignore_errors=True)
        cfg = load_config(None, overrides(run))
        start = time.perf_counter()
        trainers[method] = Trainer(cfg)
        out[method] = {"build_s": time.perf_counter() - start, "step_s": [], "optimizer": cfg.train.optimizer,
                       "overrides": overrides(run)}
        print(f"[speed] {lever} {method}: built", flush=True)
    tokens = SHAPES["60m"]["batch"] * 256
    load_before = os.getloadavg()
    busy_before = subprocess.run(["ps", "-eo", "pcpu,args", "--sort=-pcpu"], capture_output=True,
                                 text=True).stdout.splitlines()[1:8]
    with quiet(quiet_cmd) as q:  # one warm-up step each (first touch, optimizer state), then the timed rounds
        for method, trainer in trainers.items():
            out[method]["warmup_step_s"] = trainer._timed_step(session)[1]
        for _ in range(rounds):
            for method, trainer in trainers.items():
                _, elapsed = trainer._timed_step(session)
                out[method]["step_s"].append(elapsed)
    for method in methods:
        out[method]["tokens_per_s"] = tokens / min(out[method]["step_s"])
        trainers[method].close()
    result = {"lever": lever, "rounds": rounds, "tokens_per_step": tokens, "quiet_cmd": quiet_cmd,
              "quiet_s": getattr(q, "seconds", None), "quiet_expired": getattr(q, "seconds", 0) > q.max_s,
              "busy_before": busy_before, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "threads": 2, "precision": "fp32", "methods": out}
    if "lost" in out:
        result["lost_over"] = {m: out["lost"]["tokens_per_s"] / r["tokens_per_s"] for m, r in out.items()}
    return result


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
    """Markdown tables: measured peak beside the estimator's parts (runtime base = RSS after the
    Trainer is built, less the weights: Python, torch, tokenizer, data), then the speed slices.
    The estimate is recomputed from each run's overrides with today's estimator."""
    from lostlm.configs import load_config
    from lostlm.estimate import estimate_run

    mib = 2**20
    bases = {}
    for r in results["runs"].values():
        if r.get("method") == "full" and "error" not in r:
            bases.setdefault(r["preset"], []).append(r["rss_after_build_bytes"] - r["estimate"]["weights_bytes"])
    bases = {preset: sum(b) / len(b) for preset, b in bases.items()}
    lines = ["| run | measured peak (MiB) | peak in | runtime base (MiB) | estimate W+G / optimizer / activations / "
             "buffers / update (MiB) | estimate peak (MiB) | base + estimate (MiB) | measured / (base + estimate) |",
             "|---|---:|---|---:|---|---:|---:|---:|"]
    for name, r in results["runs"].items():
        if "error" in r:
            lines.append(f"| {name} | killed at the {r.get('cap_gib', 0):.1f} GiB cap ({r['error'][:60]}) | | | | | | |")
            continue
        e = estimate_run(load_config(None, r["overrides"]), 32000, r["micro"], amp=r["precision"] != "fp32").to_dict()
        # The runtime (Python, torch, tokenizer, data) does not depend on the method; a converted
        # model's build peak also holds the dense model it came from, so the other methods use the
        # mean base of the preset's full-rank runs (whose build holds only the runtime and weights).
        own = r["rss_after_build_bytes"] - e["weights_bytes"]
        base = own if r["method"] == "full" else bases.get(r["preset"], own)
        phases = r.get("phases") or []
        where = max(phases, key=lambda ph: ph["peak_bytes"]) if phases else None
        where = f"step {where['step']} {where['phase']}" if where and where["peak_bytes"] >= r["peak_rss_bytes"] else "build"
        parts = " / ".join(f"{v / mib:,.0f}" for v in (e["weights_bytes"] + e["grads_bytes"], e["optimizer_bytes"],
                                                        e["activations_bytes"], e["transient_bytes"], e.get("update_bytes", 0)))
        total = e["total_bytes"]
        lines.append(f"| {name} | {r['peak_rss_bytes'] / mib:,.0f} | {where if phases else 'n/a'} | {base / mib:,.0f} | "
                     f"{parts} | {total / mib:,.0f} | {(base + total) / mib:,.0f} | {r['peak_rss_bytes'] / (base + total):.2f} |")
    for lever, sl in results.get("speed", {}).items():
        if "methods" not in sl:
            lines += ["", f"speed slice {lever}: {sl.get('error', '')[:200]}"]
            continue
        lines += ["", f"Speed slice `{lever}` ({sl.get('finished', '')}; {sl['tokens_per_step']} tokens/step, {sl['precision']}, {sl['threads']} threads, "
                      f"{sl['rounds']} timed rounds; quiet {sl['quiet_s'] or 0:.0f} s{' (quiet wrapper expired)' if sl.get('quiet_expired') else ''}; "
                      f"load average before {sl['loadavg_before'][0]:.1f}, after {sl['loadavg_after'][0]:.1f}):", "",
                  "| method | warm-up step (s) | timed steps (s) | tokens/s (fastest step) | LOST ÷ this method |",
                  "|---|---:|---|---:|---:|"]
        for method, m in sl["methods"].items():
            steps = ", ".join(f"{t:.1f}" for t in m["step_s"])
            lines.append(f"| {method} | {m.get('warmup_step_s', 0):.1f} | {steps} | {m['tokens_per_s']:,.0f} | "
                         f"{sl.get('lost_over', {}).get(method, float('nan')):.2f} |")
    return "\n".join(lines)


def _child(cmd: list[str], cap_gib: float, env: dict | None = None) -> dict:
    """Run a ``--one``/``--speed-one`` child under a hard memory cap; its RESULT line, or the error."""
    available = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemAvailable:"))
    cap_gib = min(cap_gib, available / 2**30 - 1.5)  # never more than the machine has free now
    cmd, enter, cleanup = memcap(cmd, cap_gib)
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=enter,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})
    cap = cleanup()
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    out = json.loads(lines[-1][7:]) if lines else {"error": f"exit {proc.returncode}: {proc.stderr[-500:]}"}
    out["cap"] = cap
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help="run this planned run in this process and print its JSON")
    parser.add_argument("--only", action="append", help="run only these names (repeatable)")
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    parser.add_argument("--report", action="store_true", help="print the results as a markdown table and exit")
    parser.add_argument("--speed", action="append", choices=tuple(LEVERS),
                        help="tokens/s of every method (--methods) at this lever, one process, round-robin (repeatable)")
    parser.add_argument("--speed-one", choices=tuple(LEVERS), help=argparse.SUPPRESS)
    parser.add_argument("--methods", nargs="+", default=EVERY, choices=EVERY, help="methods of a --speed slice")
    parser.add_argument("--rounds", type=int, default=2, help="timed steps per method in a --speed slice")
    parser.add_argument("--quiet-cmd", help="wrapper that pauses other work while the timed steps run")
    args = parser.parse_args()
    runs = {r["name"]: r for r in plan()}
    if args.report:
        print(report(load_results()))
        return 0
    if args.list:
        print("\n".join(runs))
        return 0
    if args.speed_one:
        print("RESULT " + json.dumps(speed_slice(args.speed_one, args.methods, args.rounds, args.quiet_cmd)))
        return 0
    if args.speed:
        for lever in args.speed:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--speed-one", lever, "--rounds", str(args.rounds),
                   "--methods", *args.methods, *(["--quiet-cmd", args.quiet_cmd] if args.quiet_cmd else [])]
            out = _child(cmd, 12)
            out.update(machine=machine(), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
            results = load_results()
            # one entry per lever, methods and rounds: a narrower rerun does not replace a wider one
            results.setdefault("speed", {})[f"{lever} ({', '.join(args.methods)}; {args.rounds} rounds)"] = out
            save_results(results)
            print(f"[speed] {lever}: " + ", ".join(f"{m} {r['tokens_per_s']:,.0f}" for m, r in out.get("methods", {}).items())
                  + f" tok/s {out.get('error', '')}", flush=True)
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
        print(f"[memory] {name} ...", flush=True)
        start = time.time()
        out = _child([sys.executable, str(Path(__file__).resolve()), "--one", name], run["cap_gib"], run["env"])
        out.update(run, wall_s=round(time.time() - start, 1), finished=time.strftime("%Y-%m-%d %H:%M:%S"),
                   machine=machine())  # per run: the sessions that fill this file do not all get the same CPU
        if "error" in out:  # killed (the cap): what it left, and whether a new trainer can take the folder
            from lostlm.runlock import RunLock

            folder = WORK / "runs" / name
            out["run_folder_after"] = sorted(p.name for p in folder.iterdir())
            try:
                RunLock(folder).acquire().release()
                out["run_folder_lock_free"] = True
            except Exception as exc:  # noqa: BLE001 - recorded, not raised
                out["run_folder_lock_free"] = f"{type(exc).__name__}: {exc}"
        results = load_results()
        results["runs"][name] = out
        save_results(results)
        peak = out.get("peak_rss_bytes", 0) / 2**20
        print(f"[memory] {name}: peak {peak:,.0f} MiB, {out.get('tokens_per_s', 0):,.0f} tok/s {out.get('error', '')}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
