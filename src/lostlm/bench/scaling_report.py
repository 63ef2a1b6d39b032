"""A scaling recipe's report, rebuilt from its finished runs: ``scaling.md``, ``scaling.json``
and ``scaling.png``.

Per method: every run's validation curve (``metrics.jsonl``); the law fitted on the fitted
sizes' points after the first ``fit.drop_fraction`` of each run's tokens
(:mod:`.scaling_fit`), with 95 % percentile intervals from refits on runs resampled with
replacement; the held-out run's predicted final loss (and interval) against the measured one;
the paper sizes' predicted losses (an extrapolation) and the equal-loss sizes against ``full``
(:mod:`.scaling_compare`).

N is a run's trainable parameters outside the embedding and the LM head (the model's own count,
``summary.json``): the embedding's numbers cost almost no compute per token and their share of
a small model is large (Kaplan et al. 2020 found the law tighter without them); the total is
reported next to it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..errors import LostLMError
from .ladder import Ladder, ladder_runs, non_embedding_params
from .recipe import run_config, run_dir
from .scaling_compare import compare, paper_predictions
from .scaling_fit import Law, bootstrap, fit_law, interval

PARAMS = ("E", "A", "alpha", "B", "beta")
REFERENCE = "full"


def collect_runs(ladder: Ladder) -> dict[str, list[dict]]:
    """Per method name, every planned run: shape, seed, N, its validation curve, final loss."""
    from ..plots import read_metrics

    out: dict[str, list[dict]] = {m.name: [] for m in ladder.methods}
    for m, shape, tokens, variant, seed in ladder_runs(ladder):
        cfg = run_config(ladder.bench, variant, seed, lr=ladder.lrs[m.name][0])
        folder = Path(cfg.train.out_dir)
        run = {"method": m.name, "shape": shape.name, "hidden_size": shape.hidden_size, "budget_tokens": tokens,
               "seed": seed, "held_out": shape is ladder.held_out, "folder": str(folder), "finished": False,
               "N": non_embedding_params(cfg), "N_total": None, "curve": [], "final_loss": None, "train_seconds": None}
        try:
            summary = json.loads((folder / "summary.json").read_text())
        except (OSError, ValueError):
            summary = None
        _, evals = read_metrics(folder / "metrics.jsonl")
        run["curve"] = [[r["tokens"], r["val_loss"]] for r in evals if r.get("val_loss") is not None and math.isfinite(r["val_loss"])]
        if summary is not None and summary.get("val_loss") is not None and math.isfinite(summary["val_loss"]):
            p = summary["parameters"]
            run.update(finished=True, N=p["total"] - p["embedding_and_head"], N_total=p["total"], final_loss=summary["val_loss"],
                       final_tokens=summary["tokens"], train_seconds=evals[-1].get("time") if evals else None)
        out[m.name].append(run)
    return out


def fit_points(run: dict, drop_fraction: float) -> np.ndarray:
    """(N, D, L) rows of a finished run's evaluations after the first ``drop_fraction`` of its tokens."""
    rows = [(run["N"], d, loss) for d, loss in run["curve"] if d > drop_fraction * run["final_tokens"]]
    return np.array(rows, dtype=float).reshape(-1, 3)


def _fit_method(ladder: Ladder, runs: list[dict]) -> dict:
    s = ladder.fit
    fitted = [r for r in runs if r["finished"] and not r["held_out"]]
    arrays = [a for a in (fit_points(r, s.drop_fraction) for r in fitted) if len(a)]
    sizes = {r["shape"] for r in fitted}
    out = {"fitted_runs": len(fitted), "fitted_sizes": len(sizes), "points": int(sum(len(a) for a in arrays))}
    if len(sizes) < 2 or out["points"] < 5:
        out["skipped"] = f"{len(sizes)} finished fitted size(s), {out['points']} point(s): a fit needs 2 sizes and 5 points"
        return out
    pts = np.concatenate(arrays)
    law, value = fit_law(pts[:, 0], pts[:, 1], pts[:, 2], s.huber_delta, s.starts)
    boots = bootstrap(arrays, s.bootstrap, 0, s.huber_delta, min(2, s.starts), centre=law)
    resid = np.log(law.loss(pts[:, 0], pts[:, 1])) - np.log(pts[:, 2])
    out.update(law=law, boots=boots, objective=value, rms_log_residual=float(np.sqrt(np.mean(resid**2))),
               intervals={k: list(interval([getattr(b, k) for b in boots])) for k in PARAMS}, bootstrap_fits=len(boots))
    held = [r for r in runs if r["held_out"]]
    out["held_out"] = []
    for r in held:
        d = r["final_tokens"] if r["finished"] else r["budget_tokens"]
        pred = float(law.loss(r["N"], d))
        row = {"shape": r["shape"], "seed": r["seed"], "N": r["N"], "D": d, "predicted": pred,
               "interval": list(interval([b.loss(r["N"], d) for b in boots])), "measured": r["final_loss"]}
        if r["final_loss"] is not None:
            row["abs_rel_error"] = abs(pred - r["final_loss"]) / r["final_loss"]
            row["in_interval"] = bool(row["interval"][0] <= r["final_loss"] <= row["interval"][1])
        out["held_out"].append(row)
    return out


def analyse(ladder: Ladder, runs: dict[str, list[dict]]) -> dict:
    """Fits, held-out predictions, paper sizes and comparisons with ``full`` for every method."""
    fits = {m.name: _fit_method(ladder, runs[m.name]) for m in ladder.methods}
    variants = {m.name: m for m in ladder.methods}
    for name, f in fits.items():
        if "law" in f:
            v = variants[name]
            f["paper"] = paper_predictions(f["law"], f["boots"], v.method, v.overrides)
    comparisons = []
    ref = fits.get(REFERENCE)
    for name, f in fits.items():
        if name != REFERENCE and ref is not None and "law" in f and "law" in ref:
            mine = {**f, "method": variants[name].method, "overrides": variants[name].overrides}
            theirs = {**ref, "method": variants[REFERENCE].method, "overrides": variants[REFERENCE].overrides}
            comparisons.append(compare(name, mine, REFERENCE, theirs, ladder.fit.tokens_per_param))
    return {"fits": fits, "comparisons": comparisons}


def _plot_data(ladder: Ladder, runs: dict[str, list[dict]], fits: dict) -> list[dict]:
    panels = []
    for name, method_runs in runs.items():
        law = fits[name].get("law")
        curves = []
        for r in method_runs:
            if not r["curve"]:
                continue
            ds = np.array([d for d, _ in r["curve"]], dtype=float)
            grid = np.geomspace(max(ds.min(), 1.0), ds.max(), 50)
            curves.append({"label": f"{r['shape']} (N={r['N'] / 1e6:.2f}M)" + (", held out" if r["held_out"] else ""),
                           "held_out": r["held_out"], "curve": r["curve"],
                           "drop_tokens": ladder.fit.drop_fraction * r.get("final_tokens", r["budget_tokens"]),
                           "fitted": [[float(d), float(law.loss(r["N"], d))] for d in grid] if law else []})
        panels.append({"title": name, "runs": curves})
    return panels


def _jsonable(obj):
    if isinstance(obj, Law):
        return obj.to_dict()
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items() if k != "boots"}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (np.floating, np.integer)):
        return _jsonable(obj.item())
    return obj


def write_scaling_report(ladder: Ladder) -> dict:
    """(Re)build scaling.md, scaling.json and scaling.png in the ladder's results folder."""
    from ..plots import plot_scaling
    from ..runtime import atomic_write_text
    from .report import machine_info
    from .scaling_text import format_scaling

    runs = collect_runs(ladder)
    if not any(r["finished"] for rs in runs.values() for r in rs):
        raise LostLMError(f"{ladder.results} holds no finished scaling runs; run `lostlm scaling RECIPE` first")
    analysis = analyse(ladder, runs)
    payload = {"name": ladder.name, "description": ladder.description, "machine": machine_info(),
               "lrs": {k: {"lr": lr, "source": src} for k, (lr, src) in ladder.lrs.items()},
               "fit_settings": ladder.fit.__dict__, "runs": runs, **analysis}
    ladder.results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ladder.results / "scaling.md", format_scaling(ladder, payload))
    atomic_write_text(ladder.results / "scaling.json", json.dumps(_jsonable(payload), indent=1))
    plot_scaling(_plot_data(ladder, runs, analysis["fits"]), ladder.results / "scaling.png")
    return payload
