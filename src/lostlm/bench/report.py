"""A bench's report, rebuilt from the finished runs in its folder: ``results.md`` (the table),
``results.json`` (every run's summary, eval curve and analytic estimate, plus the aggregates
over seeds) and the PNGs (drawn by :func:`lostlm.plots.plot_bench`)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
from pathlib import Path
from typing import Any

from ..configs import Config
from ..errors import LostLMError
from .recipe import Recipe, load_recipe


def machine_info() -> dict:
    """CPU model, cores, torch version and threads, Python, platform (and the GPU's name)."""
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


# -- collecting the runs -----------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _mean_or_nan(values: list) -> float:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else float("nan")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _vocab_from_params(cfg: Config, summary: dict) -> int:
    """The vocabulary of a finished run: embedding+head numbers / (2 d) (or d when tied)."""
    model = cfg.resolved_model()
    per = model.hidden_size * (1 if model.tie_embeddings else 2)
    return summary["parameters"]["embedding_and_head"] // per


def _seed_dirs(variant_dir: Path) -> list[Path]:
    return sorted(variant_dir.glob("seed*"), key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else 0)


def _collect_run(seed_dir: Path, peak_override: float | None) -> dict | None:
    """One finished run (None when it has no summary.json yet): summary with the steady rate
    and MFU added, validation curve, and the analytic estimate of its config."""
    from ..configs import config_from_dict, read_config_file
    from ..estimate import estimate_run
    from ..plots import read_metrics

    summary = _read_json(seed_dir / "summary.json")
    if summary is None:
        return None
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
    return entry


def _aggregate(runs: list[dict]) -> dict:
    """Means (and std of the validation numbers) over a variant's seeds."""
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
    return agg


def collect(results_dir: Path, recipe: Recipe | None = None) -> list[dict]:
    """One entry per variant: its runs (summary + curves) and aggregates over seeds."""
    runs_root = Path(results_dir) / "runs"
    peak_info = _read_json(Path(results_dir) / "peak.json") or {}
    peak_override = peak_info.get("peak_flops_per_s")
    if recipe is not None:
        order = [(v.name, v.method) for v in recipe.variants]
    else:
        order = [(p.name, None) for p in sorted(runs_root.iterdir()) if p.is_dir()] if runs_root.is_dir() else []
    variants = []
    for name, method in order:
        runs = [r for r in (_collect_run(d, peak_override) for d in _seed_dirs(runs_root / name)) if r is not None]
        if not runs:
            variants.append({"name": name, "method": method, "runs": []})
            continue
        variants.append({"name": name, "method": method or runs[0]["summary"]["method"], "runs": runs,
                         "aggregate": _aggregate(runs)})
    return variants


# -- the Markdown table ------------------------------------------------------------------------

TABLE_NOTE = ("Validation perplexity is token-weighted over the whole held-out set at the last step; std is over "
              "seeds (sample std; 0 with one seed). Weights+grads+optim: fp32 master weights, fp32 grads, Adam's two "
              "fp32 moments (GaLore: projected moments + projector), from the shapes (`lostlm.estimate`). Peak memory: "
              "peak RSS of the run's own process on CPU (includes Python, torch, the data and activations), "
              "max_memory_allocated on GPU. tokens/s: rate of the median training step (excludes evaluation, "
              "checkpointing, compilation and load spikes; mean over seeds); MFU = analytic model FLOP/s at that rate (3× forward, "
              "`lostlm.costs`) ÷ the measured peak above.")

BREAKDOWN_NOTE = ("Memory breakdown (MiB): analytic parts (fp32 weights and grads, fp32 Adam moments, bf16 activations "
                  "saved for backward over one micro-batch, plus the loss's or a recomputed block's transient buffers) next "
                  "to the measured peak; the rest is the Python/torch runtime, the data pipeline and other temporaries.")


def _main_table(variants: list[dict]) -> list[str]:
    lines = ["| variant | method | seeds | val ppl (mean ± std) | val loss | trainable params | weights+grads+optim (analytic) | "
             "peak memory (measured) | tokens/s | MFU |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v in variants:
        a = v.get("aggregate")
        if a is None:
            lines.append(f"| {v['name']} | {v['method'] or '?'} | none finished | | | | | | | |")
            continue
        state = f"{a['state_bytes'] / 2**20:,.1f} MiB" if "state_bytes" in a else "?"
        lines.append(f"| {v['name']} | {v['method']} | {','.join(map(str, a['seeds']))} | {a['val_ppl_mean']:.2f} ± {a['val_ppl_std']:.2f} | "
                     f"{a['val_loss_mean']:.4f} | {a['trainable_params'] / 1e6:.2f}M | {state} | "
                     f"{a['peak_memory_bytes_mean'] / 2**20:,.0f} MiB | {a['tokens_per_s_mean']:,.0f} | {100 * a['mfu_mean']:.1f}% |")
    return lines


def _breakdown_table(variants: list[dict]) -> list[str]:
    breakdown = [v for v in variants if v.get("aggregate", {}).get("estimate")]
    if not breakdown:
        return []
    lines = ["", BREAKDOWN_NOTE, "",
             "| variant | embedding+head W+G | linear layers+norms W+G | optimizer state | activations | analytic sum | "
             "measured peak | rest |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    mib = 2**20
    for v in breakdown:
        e, a = v["aggregate"]["estimate"], v["aggregate"]
        per = e["weights_bytes"] / max(1, e["params_total"])  # bytes per number (4 in fp32)
        emb = 2 * per * e["params_embedding_head"]
        lin = 2 * per * (e["params_linear"] + e["params_other"])
        total = emb + lin + e["optimizer_bytes"] + e["activations_bytes"] + e.get("transient_bytes", 0)
        lines.append(f"| {v['name']} | {emb / mib:,.0f} | {lin / mib:,.0f} | {e['optimizer_bytes'] / mib:,.0f} | "
                     f"{e['activations_bytes'] / mib:,.0f} | {total / mib:,.0f} | {a['peak_memory_bytes_mean'] / mib:,.0f} | "
                     f"{(a['peak_memory_bytes_mean'] - total) / mib:,.0f} |")
    return lines


def format_results(variants: list[dict], info: dict) -> str:
    """results.md: a header with the machine and peak rate, the table, its notes, the memory breakdown."""
    lines = [f"# Bench {info.get('name', '')}", ""]
    if info.get("description"):
        lines += [info["description"], ""]
    machine = info.get("machine", {})
    peak = info.get("peak", {})
    lines.append(f"Machine: {machine.get('cpu', '?')} ({machine.get('cores', '?')} cores, torch {machine.get('torch', '?')}, "
                 f"{machine.get('torch_threads', '?')} threads). Peak matmul rate (MFU denominator): "
                 f"{peak.get('peak_flops_per_s', float('nan')) / 1e9:.1f} GFLOP/s {peak.get('dtype', '')}.")
    lines.append("")
    lines += _main_table(variants)
    lines.append("")
    lines.append(TABLE_NOTE)
    lines += _breakdown_table(variants)
    return "\n".join(lines) + "\n"


# -- writing the report ------------------------------------------------------------------------


def _report_peak(results_dir: Path, variants: list[dict]) -> dict:
    """The bench's peak.json, else the peak rate the first finished run recorded."""
    peak = _read_json(results_dir / "peak.json") or {}
    if peak:
        return peak
    for v in variants:
        for r in v["runs"]:
            if "peak_flops_per_s" in r["summary"]:
                return {"peak_flops_per_s": r["summary"]["peak_flops_per_s"], "dtype": r["summary"].get("precision", "")}
    return peak


def write_report(results_dir: Path, recipe: Recipe | None = None) -> dict:
    """(Re)build results.md, results.json and the PNGs from the finished runs in the folder."""
    from ..plots import plot_bench
    from ..runtime import atomic_write_text

    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise LostLMError(f"{results_dir} is not a bench results folder; pass the folder a bench wrote (e.g. bench/results/tiny)")
    if recipe is None and (results_dir / "recipe.yaml").is_file():
        with contextlib.suppress(LostLMError):
            recipe = load_recipe(results_dir / "recipe.yaml", results=results_dir)
    variants = collect(results_dir, recipe)
    if not any(v["runs"] for v in variants):
        raise LostLMError(f"{results_dir} holds no finished runs (no runs/*/seed*/summary.json); run `lostlm bench RECIPE` first")
    info = {"name": recipe.name if recipe else results_dir.name, "description": recipe.description if recipe else "",
            "machine": machine_info(), "peak": _report_peak(results_dir, variants),
            "recipe": {"base_config": recipe.base_config, "base_overrides": recipe.base_overrides, "seeds": recipe.seeds}
            if recipe else None,
            "finished_runs": sum(len(v["runs"]) for v in variants),
            "planned_runs": len(recipe.variants) * len(recipe.seeds) if recipe else None}
    (results_dir / "results.md").write_text(format_results(variants, info))
    payload = {**info, "variants": variants}
    atomic_write_text(results_dir / "results.json", json.dumps(payload, indent=1, default=_json_default))
    plot_bench(variants, results_dir)
    return payload


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return str(obj)
