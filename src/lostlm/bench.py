"""Side-by-side benchmarks: methods (and named variants) × seeds on one base config.

    lostlm bench bench/tiny.yaml                         # run everything not finished yet
    lostlm bench bench/tiny.yaml --lock /tmp/lostlm-cpu.lock   # one run at a time on a shared box
    lostlm bench bench/tiny.yaml --dry-run               # list the runs and their folders
    lostlm bench --report bench/results/tiny             # rebuild table, JSON and plots
    lostlm bench --peak                                  # measure and store the matmul FLOP/s

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

Every variant × seed is one ``Trainer(cfg).train()`` in its own folder
``<results>/runs/<variant>/seed<k>/`` — by default in a fresh subprocess, so the measured peak
RSS belongs to that run alone (RSS is per process). A run whose ``summary.json`` exists is
skipped, so an interrupted bench resumes where it stopped (unfinished runs resume from their
last checkpoint). Same seed ⇒ same initial W0 and the same data order for every method.

Outputs in the results folder: ``results.md`` (the table), ``results.json`` (every run's
summary plus the aggregates), ``loss_vs_tokens.png``, ``loss_vs_time.png``,
``ppl_vs_memory.png``. MFU is against ``lostlm bench --peak`` (the measured bf16/fp32 matmul
rate of this machine, cached), model FLOPs from the analytic counter in :mod:`lostlm.costs`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .configs import METHODS, Config, load_config, save_config
from .errors import LostLMError
from .peak import cached_peak, measure_peak

RESULTS_ROOT = Path("bench/results")


# ---------------------------------------------------------------------------------------------
# recipes


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


def load_recipe(path: str | Path, results: str | Path | None = None) -> Recipe:
    """Parse and check a bench recipe (every variant's config is validated up front)."""
    path = Path(path)
    if not path.is_file():
        raise LostLMError(f"bench recipe {path} does not exist; pass a .yaml recipe such as bench/tiny.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise LostLMError(f"bench recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LostLMError(f"bench recipe {path} must be a mapping with base, seeds and methods")
    unknown = set(data) - {"name", "base", "seeds", "methods", "results", "isolate", "description"}
    if unknown:
        raise LostLMError(f"bench recipe {path} has unknown key(s) {sorted(unknown)}; "
                          "use name, description, base, seeds, methods, results, isolate")
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise LostLMError(f"bench recipe {path}: base must be a mapping with config and overrides")
    base_config = base.get("config")
    if base_config is not None and not Path(base_config).is_file():
        raise LostLMError(f"bench recipe {path}: base.config {base_config} does not exist; give a path to a "
                          "configs/*.yaml recipe relative to where lostlm runs")
    seeds = data.get("seeds", [0])
    if isinstance(seeds, int):
        seeds = [seeds]
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise LostLMError(f"bench recipe {path}: seeds must be a list of integers, e.g. [0, 1, 2]")
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
        extra = set(item) - {"name", "method", "overrides"}
        if extra:
            raise LostLMError(f"bench recipe {path}: variant {name} has unknown key(s) {sorted(extra)}; use name, method, overrides")
        variants.append(Variant(name, method, _override_list(item.get("overrides"), f"variant {name} overrides")))
    if not variants:
        raise LostLMError(f"bench recipe {path} lists no methods; add e.g. methods: [full, lost]")
    names = [v.name for v in variants]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise LostLMError(f"bench recipe {path}: variant names must be unique ({sorted(dup)} repeat); give each a name")
    name = str(data.get("name", path.stem))
    recipe = Recipe(name=name, base_config=base_config, base_overrides=_override_list(base.get("overrides"), "base.overrides"),
                    seeds=[int(s) for s in seeds], variants=variants,
                    results=Path(results or data.get("results") or RESULTS_ROOT / name),
                    isolate=bool(data.get("isolate", True)), source=path, description=str(data.get("description", "")))
    for variant in variants:  # fail before any run starts
        run_config(recipe, variant, recipe.seeds[0])
    return recipe


def run_dir(recipe: Recipe, variant: Variant, seed: int) -> Path:
    return recipe.results / "runs" / variant.name / f"seed{seed}"


def run_config(recipe: Recipe, variant: Variant, seed: int, peak_flops: float | None = None) -> Config:
    overrides = [*recipe.base_overrides, f"layer.method={variant.method}", *variant.overrides,
                 f"train.seed={seed}", f"train.out_dir={run_dir(recipe, variant, seed)}", "train.progress=false"]
    if peak_flops:
        overrides.append(f"train.peak_flops={peak_flops}")
    try:
        return load_config(recipe.base_config, overrides)
    except LostLMError as exc:
        raise LostLMError(f"bench variant {variant.name}: {exc}") from None


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---------------------------------------------------------------------------------------------
# running


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
        from .train import Trainer

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


def run_bench(recipe: Recipe, lock: str | None = None, log=print) -> dict:
    """Run every unfinished variant × seed, then write the report. Returns the results dict."""
    recipe.results.mkdir(parents=True, exist_ok=True)
    if recipe.source is not None:
        (recipe.results / "recipe.yaml").write_text(recipe.source.read_text())
    probe = run_config(recipe, recipe.variants[0], recipe.seeds[0])
    peak = cached_peak(probe)
    if peak is None:  # measuring is heavy: queue for the lock; reading the cache is not
        with _locked(lock):
            peak = measure_peak(probe)
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


# ---------------------------------------------------------------------------------------------
# report


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def collect(results_dir: Path, recipe: Recipe | None = None) -> list[dict]:
    """One entry per variant: its runs (summary + curves) and aggregates over seeds."""
    from .configs import config_from_dict, read_config_file
    from .estimate import estimate_run
    from .plots import read_metrics

    runs_root = Path(results_dir) / "runs"
    peak_info = _read_json(Path(results_dir) / "peak.json") or {}
    peak_override = peak_info.get("peak_flops_per_s")
    if recipe is not None:
        order = [(v.name, v.method) for v in recipe.variants]
    else:
        order = [(p.name, None) for p in sorted(runs_root.iterdir()) if p.is_dir()] if runs_root.is_dir() else []
    variants = []
    for name, method in order:
        runs = []
        for seed_dir in sorted((runs_root / name).glob("seed*"), key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else 0):
            summary = _read_json(seed_dir / "summary.json")
            if summary is None:
                continue
            train, evals = read_metrics(seed_dir / "metrics.jsonl")
            steady = [r["tok_per_s"] for r in train if r.get("step", 0) > 2 and r.get("tok_per_s")]
            if summary.get("tokens_per_s") and (steady or summary.get("tokens_per_s_median_step")):
                # the median step (the trainer's, over every step; else the logged steps after 2
                # warm-up steps): robust to compile time and to other processes stealing the CPU
                summary["tokens_per_s_steady"] = summary.get("tokens_per_s_median_step") or statistics.median(steady)
                summary["mfu_steady"] = summary["mfu"] * summary["tokens_per_s_steady"] / summary["tokens_per_s"]
                if peak_override:  # MFU against the bench's current peak (refreshed by --peak)
                    summary["mfu_steady"] *= summary["peak_flops_per_s"] / peak_override
            entry = {"seed": int(seed_dir.name[4:]), "folder": str(seed_dir), "summary": summary,
                     "eval_curve": [{k: r.get(k) for k in ("step", "tokens", "time", "val_loss")} for r in evals]}
            config_file = seed_dir / "config.yaml"
            if config_file.is_file():
                cfg = config_from_dict(read_config_file(config_file))
                micro = cfg.train.micro_batch_size or cfg.train.batch_size
                vocab = summary.get("vocab_size") or _vocab_from_params(cfg, summary)
                entry["estimate"] = estimate_run(cfg, vocab, micro).to_dict()
                entry["config"] = {"steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "seq_len": cfg.data.seq_len,
                                   "preset": cfg.model.preset, "precision": summary.get("precision")}
            runs.append(entry)
        if not runs:
            variants.append({"name": name, "method": method, "runs": []})
            continue
        s = [r["summary"] for r in runs]
        ppl = _mean_std([x["val_ppl"] for x in s])
        loss = _mean_std([x["val_loss"] for x in s])
        agg = {"seeds": [r["seed"] for r in runs], "val_ppl_mean": ppl[0], "val_ppl_std": ppl[1],
               "val_loss_mean": loss[0], "val_loss_std": loss[1],
               "trainable_params": s[0]["parameters"]["total"],
               "tokens": s[0]["tokens"],
               "peak_memory_bytes_mean": statistics.fmean(x["peak_memory_bytes"] for x in s),
               "tokens_per_s_mean": _mean_or_nan([x.get("tokens_per_s_steady", x.get("tokens_per_s")) for x in s]),
               "mfu_mean": _mean_or_nan([x.get("mfu_steady", x.get("mfu")) for x in s]),
               "tokens_per_s_session_mean": _mean_or_nan([x.get("tokens_per_s") for x in s])}
        if "estimate" in runs[0]:
            agg["state_bytes"] = runs[0]["estimate"]["state_bytes"]
            agg["estimate"] = runs[0]["estimate"]
        variants.append({"name": name, "method": method or s[0]["method"], "runs": runs, "aggregate": agg})
    return variants


def _vocab_from_params(cfg: Config, summary: dict) -> int:
    """The vocabulary of a finished run: embedding+head numbers / (2 d) (or d when tied)."""
    model = cfg.resolved_model()
    per = model.hidden_size * (1 if model.tie_embeddings else 2)
    return summary["parameters"]["embedding_and_head"] // per


def _mean_or_nan(values: list) -> float:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else float("nan")


def format_results(variants: list[dict], info: dict) -> str:
    lines = [f"# Bench {info.get('name', '')}", ""]
    if info.get("description"):
        lines += [info["description"], ""]
    machine = info.get("machine", {})
    peak = info.get("peak", {})
    lines.append(f"Machine: {machine.get('cpu', '?')} ({machine.get('cores', '?')} cores, torch {machine.get('torch', '?')}, "
                 f"{machine.get('torch_threads', '?')} threads). Peak matmul rate (MFU denominator): "
                 f"{peak.get('peak_flops_per_s', float('nan')) / 1e9:.1f} GFLOP/s {peak.get('dtype', '')}.")
    lines.append("")
    lines.append("| variant | method | seeds | val ppl (mean ± std) | val loss | trainable params | weights+grads+optim (analytic) | "
                 "peak memory (measured) | tokens/s | MFU |")
    lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for v in variants:
        a = v.get("aggregate")
        if a is None:
            lines.append(f"| {v['name']} | {v['method'] or '?'} | none finished | | | | | | | |")
            continue
        state = f"{a['state_bytes'] / 2**20:,.1f} MiB" if "state_bytes" in a else "?"
        lines.append(f"| {v['name']} | {v['method']} | {','.join(map(str, a['seeds']))} | {a['val_ppl_mean']:.2f} ± {a['val_ppl_std']:.2f} | "
                     f"{a['val_loss_mean']:.4f} | {a['trainable_params'] / 1e6:.2f}M | {state} | "
                     f"{a['peak_memory_bytes_mean'] / 2**20:,.0f} MiB | {a['tokens_per_s_mean']:,.0f} | {100 * a['mfu_mean']:.1f}% |")
    lines.append("")
    lines.append("Validation perplexity is token-weighted over the whole held-out set at the last step; std is over "
                 "seeds (sample std; 0 with one seed). Weights+grads+optim: fp32 master weights, fp32 grads, Adam's two "
                 "fp32 moments (GaLore: projected moments + projector), from the shapes (`lostlm.estimate`). Peak memory: "
                 "peak RSS of the run's own process on CPU (includes Python, torch, the data and activations), "
                 "max_memory_allocated on GPU. tokens/s: rate of the median training step (excludes evaluation, "
                 "checkpointing, compilation and load spikes; mean over seeds); MFU = analytic model FLOP/s at that rate (3× forward, "
                 "`lostlm.costs`) ÷ the measured peak above.")
    breakdown = [v for v in variants if v.get("aggregate", {}).get("estimate")]
    if breakdown:
        lines += ["", "Memory breakdown (MiB): analytic parts (fp32 weights and grads, fp32 Adam moments, bf16 activations "
                  "saved for backward over one micro-batch) next to the measured peak; the rest is the Python/torch "
                  "runtime, the data pipeline and transient buffers (logits' softmax, the optimizer's temporaries).", "",
                  "| variant | embedding+head W+G | linear layers+norms W+G | optimizer state | activations | analytic sum | "
                  "measured peak | rest |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for v in breakdown:
            e, a = v["aggregate"]["estimate"], v["aggregate"]
            per = e["weights_bytes"] / max(1, e["params_total"])  # bytes per number (4 in fp32)
            emb = 2 * per * e["params_embedding_head"]
            lin = 2 * per * (e["params_linear"] + e["params_other"])
            total = emb + lin + e["optimizer_bytes"] + e["activations_bytes"]
            mib = 2**20
            lines.append(f"| {v['name']} | {emb / mib:,.0f} | {lin / mib:,.0f} | {e['optimizer_bytes'] / mib:,.0f} | "
                         f"{e['activations_bytes'] / mib:,.0f} | {total / mib:,.0f} | {a['peak_memory_bytes_mean'] / mib:,.0f} | "
                         f"{(a['peak_memory_bytes_mean'] - total) / mib:,.0f} |")
    return "\n".join(lines) + "\n"


def _plots(variants: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for key, xlabel, fname, scale in (("tokens", "tokens (millions)", "loss_vs_tokens.png", 1e6),
                                      ("time", "training wall time (s, excluding evaluation)", "loss_vs_time.png", 1.0)):
        fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
        for i, v in enumerate(variants):
            for j, run in enumerate(v["runs"]):
                curve = [p for p in run["eval_curve"] if p.get(key) is not None]
                if curve:
                    ax.plot([p[key] / scale for p in curve], [p["val_loss"] for p in curve], "o-", ms=3,
                            color=colors[i % len(colors)], alpha=0.85 if j == 0 else 0.4,
                            label=v["name"] if j == 0 else None)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname)
        plt.close(fig)
        written.append(out / fname)
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for i, v in enumerate(variants):
        a = v.get("aggregate")
        if not a:
            continue
        color = colors[i % len(colors)]
        ax.errorbar([a["peak_memory_bytes_mean"] / 2**20], [a["val_ppl_mean"]], yerr=[a["val_ppl_std"]], fmt="o",
                    color=color, label=f"{v['name']} (measured peak)")
        if "state_bytes" in a:
            ax.plot([a["state_bytes"] / 2**20], [a["val_ppl_mean"]], "s", mfc="none", color=color)
    ax.set_xscale("log")
    ax.set_xlabel("memory (MiB, log): ● measured peak, □ analytic weights+grads+optimizer")
    ax.set_ylabel("validation perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ppl_vs_memory.png")
    plt.close(fig)
    written.append(out / "ppl_vs_memory.png")
    return written


def write_report(results_dir: Path, recipe: Recipe | None = None) -> dict:
    """(Re)build results.md, results.json and the PNGs from the finished runs in the folder."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise LostLMError(f"{results_dir} is not a bench results folder; pass the folder a bench wrote (e.g. bench/results/tiny)")
    if recipe is None and (results_dir / "recipe.yaml").is_file():
        with contextlib.suppress(LostLMError):
            recipe = load_recipe(results_dir / "recipe.yaml", results=results_dir)
    variants = collect(results_dir, recipe)
    if not any(v["runs"] for v in variants):
        raise LostLMError(f"{results_dir} holds no finished runs (no runs/*/seed*/summary.json); run `lostlm bench RECIPE` first")
    peak = _read_json(results_dir / "peak.json") or {}
    for v in variants if not peak else ():
        for r in v["runs"]:
            if "peak_flops_per_s" in r["summary"]:
                peak = {"peak_flops_per_s": r["summary"]["peak_flops_per_s"], "dtype": r["summary"].get("precision", "")}
                break
        if peak:
            break
    info = {"name": recipe.name if recipe else results_dir.name, "description": recipe.description if recipe else "",
            "machine": machine_info(), "peak": peak,
            "recipe": {"base_config": recipe.base_config, "base_overrides": recipe.base_overrides, "seeds": recipe.seeds}
            if recipe else None,
            "finished_runs": sum(len(v["runs"]) for v in variants),
            "planned_runs": len(recipe.variants) * len(recipe.seeds) if recipe else None}
    (results_dir / "results.md").write_text(format_results(variants, info))
    payload = {**info, "variants": variants}
    tmp = results_dir / "results.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1, default=_json_default))
    os.replace(tmp, results_dir / "results.json")
    _plots(variants, results_dir)
    return payload


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return str(obj)


# ---------------------------------------------------------------------------------------------
# command line


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


def cmd_bench(args: argparse.Namespace) -> int:
    if args.peak:
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
