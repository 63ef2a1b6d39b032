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
from .recipe import Recipe, load_recipe, run_dir
from .stats import format_paired, leader, paired_table, subject_table


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


def _collect_run(seed_dir: Path) -> dict | None:
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
        # against the peak measured on the machine that ran it (its summary's): a bench resumed on
        # another kind of machine must not divide one machine's rate by another's peak
        summary["mfu_steady"] = summary["mfu"] * summary["tokens_per_s_steady"] / summary["tokens_per_s"]
    entry = {"seed": int(seed_dir.name[4:]), "folder": str(seed_dir), "summary": summary,
             "eval_curve": [{k: r.get(k) for k in ("step", "tokens", "time", "val_loss")} for r in evals]}
    config_file = seed_dir / "config.yaml"
    if config_file.is_file():
        cfg = config_from_dict(read_config_file(config_file))
        micro = cfg.train.micro_batch_size or cfg.train.batch_size
        vocab = summary.get("vocab_size") or _vocab_from_params(cfg, summary)
        entry["estimate"] = estimate_run(cfg, vocab, micro).to_dict()
        entry["config"] = {"lr": cfg.train.lr, "steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "seq_len": cfg.data.seq_len,
                           "preset": cfg.model.preset, "precision": summary.get("precision")}
    return entry


def _aggregate(runs: list[dict]) -> dict:
    """Means (and std of the validation numbers) over a variant's seeds."""
    s = [r["summary"] for r in runs]
    ppl = _mean_std([x["val_ppl"] for x in s])
    loss = _mean_std([x["val_loss"] for x in s])
    agg = {"seeds": [r["seed"] for r in runs], "lr": runs[0].get("config", {}).get("lr"), "val_ppl_mean": ppl[0], "val_ppl_std": ppl[1],
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


def _variant_entry(name: str, method: str | None, seed_dirs: list[Path]) -> dict:
    runs = [r for r in (_collect_run(d) for d in seed_dirs) if r is not None]
    if not runs:
        return {"name": name, "method": method, "runs": []}
    return {"name": name, "method": method or runs[0]["summary"]["method"], "runs": runs, "aggregate": _aggregate(runs)}


def _recipe_seed_dirs(recipe: Recipe, variant) -> tuple[list[Path], list[str]]:
    """The variant's current run folders (its chosen lr, current maths key) and the stale ones:
    finished runs of the same variant under another key (other lr or other maths)."""
    from .sweep import chosen_lr

    try:
        lr = chosen_lr(recipe, variant)
    except LostLMError:
        lr = None
    if recipe.sweep is not None and lr is None:  # stage one has not chosen yet
        current = []
    else:
        seeds = list(dict.fromkeys([*recipe.seeds_of(variant), *recipe.promote_seeds]))
        current = [run_dir(recipe, variant, s, lr=lr) for s in seeds]
    keys = {d.parent for d in current}
    root = recipe.results / "runs" / variant.name
    stale = sorted(str(p.parent) for p in root.glob("*/seed*/summary.json") if p.parent.parent not in keys) if root.is_dir() else []
    return current, stale


def collect(results_dir: Path, recipe: Recipe | None = None) -> list[dict]:
    """One entry per variant: its runs (summary + curves) and aggregates over seeds. With a
    recipe, only the runs of the current maths key (:mod:`.runkey`) at the variant's lr count;
    finished runs under other keys are listed in ``stale_runs``. Without one, every key folder
    under ``runs/<variant>/`` is its own entry."""
    runs_root = Path(results_dir) / "runs"
    variants = []
    if recipe is not None:
        for v in recipe.variants:
            current, stale = _recipe_seed_dirs(recipe, v)
            entry = _variant_entry(v.name, v.method, [d for d in current if d.is_dir()])
            entry["stale_runs"] = stale
            variants.append(entry)
        return variants
    for vdir in sorted(p for p in runs_root.iterdir() if p.is_dir()) if runs_root.is_dir() else []:
        keys = sorted(p for p in vdir.iterdir() if p.is_dir() and not p.name.startswith("seed"))
        for key in keys:
            name = vdir.name if len(keys) == 1 else f"{vdir.name} ({key.name})"
            variants.append(_variant_entry(name, None, _seed_dirs(key)))
    return variants


# -- the Markdown table ------------------------------------------------------------------------

LEADER_WHY = " (lowest mean loss among the variants with the most seeds)"
TABLE_NOTE = ("Validation perplexity is token-weighted over the whole held-out set at the last step; std is over "
              "seeds (sample std; 0 with one seed). Weights+grads+optim: fp32 master weights, fp32 grads, Adam's two "
              "fp32 moments (GaLore: projected moments + projector), from the shapes (`lostlm.estimate`). Peak memory: "
              "peak RSS of the run's own process on CPU (includes Python, torch, the data and activations), "
              "max_memory_allocated on GPU. tokens/s: rate of the median training step (excludes evaluation, "
              "checkpointing, compilation and load spikes; mean over seeds); MFU = analytic model FLOP/s at that rate (3× forward, "
              "`lostlm.costs`) ÷ the peak matmul rate measured on the machine that ran it (its summary's). A bench "
              "resumed in several sessions may have runs from different kinds of machine: tokens/s then compares "
              "machines as much as methods (the peaks line above shows whether it does); speed comparisons belong "
              "to `bench/memory.py --speed` and `bench/step_speed.py`, which time every method in one process.")

BREAKDOWN_NOTE = ("Memory breakdown (MiB): analytic parts (fp32 weights and grads, fp32 Adam moments, bf16 activations "
                  "saved for backward over one micro-batch, plus the loss's or a recomputed block's transient buffers) next "
                  "to the measured peak; the rest is the Python/torch runtime, the data pipeline and other temporaries.")


def _main_table(variants: list[dict]) -> list[str]:
    lines = ["| variant | method | lr | seeds | val ppl (mean ± std) | val loss | trainable params | weights+grads+optim (analytic) | "
             "peak memory (measured) | tokens/s | MFU |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v in variants:
        a = v.get("aggregate")
        if a is None:
            lines.append(f"| {v['name']} | {v['method'] or '?'} | | none finished | | | | | | | |")
            continue
        state = f"{a['state_bytes'] / 2**20:,.1f} MiB" if "state_bytes" in a else "?"
        lr = f"{a['lr']:.3g}" if a.get("lr") else "?"
        lines.append(f"| {v['name']} | {v['method']} | {lr} | {','.join(map(str, a['seeds']))} | {a['val_ppl_mean']:.2f} ± {a['val_ppl_std']:.2f} | "
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
    peaks = sorted({r["summary"]["peak_flops_per_s"] for v in variants for r in v["runs"]
                    if isinstance(r["summary"].get("peak_flops_per_s"), (int, float))})
    lines.append(f"Machine of this report: {machine.get('cpu', '?')} ({machine.get('cores', '?')} cores, torch "
                 f"{machine.get('torch', '?')}, {machine.get('torch_threads', '?')} threads); peak matmul rate measured when the bench last started "
                 f"{peak.get('peak_flops_per_s', float('nan')) / 1e9:.1f} GFLOP/s {peak.get('dtype', '')}. Peak rates "
                 f"recorded by the runs (their MFU denominators): "
                 f"{', '.join(f'{x / 1e9:.1f}' for x in peaks) or 'none'} GFLOP/s.")
    lines.append("")
    if info.get("planned_runs") is not None:
        lines += [f"Finished runs: {info['finished_runs']} of {info['planned_runs']} planned (variants without a row, or "
                  "with fewer seeds than the recipe, did not finish).", ""]
    lines += _main_table(variants)
    lines.append("")
    lines.append(TABLE_NOTE)
    reference = info.get("reference")
    if reference and info.get("paired"):
        lines += ["", *format_paired(info["paired"], reference)]
    if info.get("subject_paired"):
        lines += ["", *format_paired(info["subject_paired"], subject=info["subject"])]
    if info.get("leader_paired"):
        lines += ["", *format_paired(info["leader_paired"], subject=info["leader"], why=LEADER_WHY)]
    if info.get("per_method"):
        lines += ["", *_per_method_section(variants, info["per_method"])]
    if info.get("sweep"):
        lines += ["", *_sweep_section(info["sweep"])]
    stale = [(v["name"], r) for v in variants for r in v.get("stale_runs", [])]
    if stale:
        lines += ["", f"Stale runs (not in the table: another lr or other maths, see docs/benchmarks.md): {len(stale)}; "
                  + ", ".join(r for _, r in stale[:12]) + (" ..." if len(stale) > 12 else "")]
    lines += _breakdown_table(variants)
    return "\n".join(lines) + "\n"


def _per_method(recipe: Recipe, variants: list[dict]) -> dict:
    """``sweep.per_method``: each method's kept variant and the paired statistics among those
    (the recipe's reference and subject stand for their methods)."""
    from .sweep import kept_variants

    kept = kept_variants(recipe)
    method_of = {v.name: v.method for v in recipe.variants}
    entries = [v for v in variants if v["name"] in kept.values()]
    reference = kept.get(method_of[recipe.reference])
    subject = kept.get(method_of[recipe.subject]) if recipe.subject else None
    return {"kept": kept, "reference": reference, "subject": subject,
            "paired": paired_table(entries, reference) if reference else [],
            "subject_paired": subject_table(entries, subject) if subject else [], **_leader(entries, subject, reference)}


def _leader(variants: list[dict], *paired_already: str | None) -> dict:
    """``leader`` (the lowest variant, :func:`stats.leader`) and its paired rows against every
    other variant, unless it is the subject or the reference (whose rows the report has already)."""
    top = leader(variants)
    if top is None or top in paired_already:
        return {"leader": top, "leader_paired": []}
    return {"leader": top, "leader_paired": subject_table(variants, top)}


def _per_method_section(variants: list[dict], per: dict) -> list[str]:
    """The table of each method at the variant stage one kept for it, and its paired statistics."""
    by_name = {v["name"]: v for v in variants}
    lines = ["## Each method at its kept setting (`sweep.per_method`)", "",
             "Stage one chose each variant's lr and, per method, kept the variant with the lowest stage-one loss at "
             "its chosen lr; only kept variants run stage two. The paired statistics below compare kept variants only.", "",
             "| method | kept variant | lr | seeds | val loss (mean ± std) |", "|---|---|---:|---|---:|"]
    for method, name in per["kept"].items():
        a = by_name.get(name, {}).get("aggregate") if name else None
        if a is None:
            state = "stage one not finished" if name is None else "no stage-two run finished"
            lines.append(f"| {method} | {name or '–'} | | {state} | |")
            continue
        lines.append(f"| {method} | {name} | {a['lr']:.3g} | {','.join(map(str, a['seeds']))} | "
                     f"{a['val_loss_mean']:.4f} ± {a['val_loss_std']:.4f} |")
    if per["paired"]:
        lines += ["", *format_paired(per["paired"], per["reference"], level="###")]
    if per["subject_paired"]:
        lines += ["", *format_paired(per["subject_paired"], subject=per["subject"], level="###")]
    if per["leader_paired"]:
        lines += ["", *format_paired(per["leader_paired"], subject=per["leader"], level="###", why=LEADER_WHY)]
    return lines


def _sweep_section(sweep: dict) -> list[str]:
    """Stage one of the lr sweep: every point per variant, the chosen lr, edge and extensions."""
    lrs = sorted({p["lr"] for v in sweep["variants"].values() for p in v["points"]}, reverse=True)
    lines = ["## Learning-rate sweep (stage one)", "",
             f"Seed {sweep['seed']}, budget overrides {' '.join(sweep['overrides']) or '(none)'}; chosen lr = lowest final "
             f"validation loss (diverged = +inf); best at an edge extends the grid ×{sweep['factor']:g} / "
             f"÷{sweep['factor']:g}, at most {sweep['max_extensions']} times. Plot: `sweep.png`.", "",
             "| variant | " + " | ".join(f"{lr:.3g}" for lr in lrs) + " | chosen lr | note |",
             "|---|" + "---:|" * len(lrs) + "---:|---|"]
    for name, v in sweep["variants"].items():
        by_lr = {p["lr"]: p for p in v["points"]}
        cells = []
        for lr in lrs:
            p = by_lr.get(lr)
            text = "" if p is None else "diverged" if p["diverged"] else f"{p['val_loss']:.4f}"
            cells.append(f"**{text}**" if p is not None and v["chosen_lr"] == lr else text)
        note = ("not finished" if not v["done"] else "all diverged" if v["chosen_lr"] is None else
                "AT EDGE (max extensions reached)" if v["at_edge"] else "interior")
        if v["extensions"]:
            note += "; extended to " + ", ".join(f"{e:.3g}" for e in v["extensions"])
        if v.get("kept") is not None:
            note += "; kept for its method" if v["kept"] else "; not kept (another variant of its method is lower)"
        chosen = f"{v['chosen_lr']:.3g}" if v["chosen_lr"] else "–"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {chosen} | {note} |")
    return lines


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
    from ..plots import plot_bench, plot_sweep
    from ..runtime import atomic_write_text

    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise LostLMError(f"{results_dir} is not a bench results folder; pass the folder a bench wrote (e.g. bench/results/tiny)")
    if recipe is None and (results_dir / "recipe.yaml").is_file():
        with contextlib.suppress(LostLMError):
            recipe = load_recipe(results_dir / "recipe.yaml", results=results_dir)
    variants = collect(results_dir, recipe)
    sweep = _read_json(results_dir / "sweep.json")
    if not any(v["runs"] for v in variants) and not sweep:
        raise LostLMError(f"{results_dir} holds no finished runs (no runs/*/seed*/summary.json); run `lostlm bench RECIPE` first")
    info = {"name": recipe.name if recipe else results_dir.name, "description": recipe.description if recipe else "",
            "machine": machine_info(), "peak": _report_peak(results_dir, variants),
            "recipe": {"base_config": recipe.base_config, "base_overrides": recipe.base_overrides, "seeds": recipe.seeds}
            if recipe else None,
            "finished_runs": sum(len(v["runs"]) for v in variants),
            "planned_runs": sum(len(recipe.seeds_of(v)) for v in recipe.variants) if recipe else None,
            "reference": _reference(recipe, variants), "sweep": sweep}
    info["paired"] = paired_table(variants, info["reference"]) if info["reference"] else []
    info["subject"] = recipe.subject if recipe else None
    info["subject_paired"] = subject_table(variants, info["subject"]) if info["subject"] else []
    info.update(_leader(variants, info["subject"], info["reference"]))
    if recipe is not None and recipe.sweep is not None and recipe.sweep.per_method:
        info["per_method"] = _per_method(recipe, variants)
    (results_dir / "results.md").write_text(format_results(variants, info))
    payload = {**info, "variants": variants}
    atomic_write_text(results_dir / "results.json", json.dumps(payload, indent=1, default=_json_default))
    plot_bench(variants, results_dir)
    if sweep:
        plot_sweep(sweep, results_dir / "sweep.png")
    return payload


def _reference(recipe: Recipe | None, variants: list[dict]) -> str | None:
    if recipe is not None:
        return recipe.reference
    names = [v["name"] for v in variants]
    return "full" if "full" in names else names[0] if names else None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return str(obj)
