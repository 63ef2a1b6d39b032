"""Paired statistics of a bench: each variant against a reference variant, seed by seed.

Runs that share a seed share the initial W0 (before each method's own factorisation) and the
data order, so the comparison is per seed: d_i = loss(variant, seed i) - loss(reference, seed i)
over the seeds both finished. Reported: n, mean(d), the sample std s (n - 1 in the denominator),
the standard error SE = s / sqrt(n), and a verdict:

* ``better``        mean(d) + 2 SE < 0  (lower validation loss than the reference by more than 2 SE),
* ``worse``         mean(d) - 2 SE > 0,
* ``within noise``  otherwise (|mean(d)| <= 2 SE),
* ``one seed``      n = 1: no spread to judge by (the sign of d is shown, no verdict).

|mean(d)| > 2 SE is |t| > 2 for the paired t statistic t = mean(d) / SE (scipy's
``ttest_rel``); with 3 seeds (2 degrees of freedom) that is a two-sided p of about 0.18, so it
flags clear differences only, not a significance test at 5 %. Pure Python: no numpy needed.
"""

from __future__ import annotations

import math
import statistics

VERDICT_RULE = ("d = loss(variant) − loss(reference) per shared seed; SE = std(d)/√n (sample std); better if "
                "mean(d) + 2·SE < 0, worse if mean(d) − 2·SE > 0, else within noise (|mean| ≤ 2 SE, i.e. |t| ≤ 2 "
                "for the paired t statistic); with one seed no verdict.")


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def paired(values: dict[int, float], reference: dict[int, float]) -> dict:
    """Paired difference of ``values`` (seed -> loss) against ``reference`` (seed -> loss)."""
    seeds = sorted(s for s in values if s in reference and _finite(values[s]) and _finite(reference[s]))
    diffs = [values[s] - reference[s] for s in seeds]
    n = len(diffs)
    out = {"seeds": seeds, "n": n, "diffs": diffs, "mean": float("nan"), "std": float("nan"), "se": float("nan"),
           "t": float("nan"), "verdict": "no shared seed"}
    if n == 0:
        return out
    out["mean"] = statistics.fmean(diffs)
    if n == 1:
        out.update(std=float("nan"), se=float("nan"), verdict="one seed")
        return out
    std = statistics.stdev(diffs)
    se = std / math.sqrt(n)
    out.update(std=std, se=se, t=out["mean"] / se if se > 0 else math.copysign(math.inf, out["mean"]) if out["mean"] else 0.0)
    out["verdict"] = verdict(out["mean"], se)
    return out


def verdict(mean: float, se: float) -> str:
    """better / worse / within noise at two standard errors (lower loss is better)."""
    if mean + 2 * se < 0:
        return "better"
    if mean - 2 * se > 0:
        return "worse"
    return "within noise"


def _losses(variants: list[dict]) -> dict[str, dict[int, float]]:
    return {v["name"]: {r["seed"]: r["summary"]["val_loss"] for r in v["runs"]} for v in variants}


def paired_table(variants: list[dict], reference: str) -> list[dict]:
    """One :func:`paired` entry per variant other than ``reference`` (variants as the report's
    :func:`collect` gives them: ``name`` and ``runs`` with ``seed`` and ``summary.val_loss``)."""
    by_name = _losses(variants)
    if reference not in by_name:
        return []
    ref = by_name[reference]
    return [{"variant": v["name"], "reference": reference, **paired(by_name[v["name"]], ref)}
            for v in variants if v["name"] != reference and v["runs"]]


def subject_table(variants: list[dict], subject: str) -> list[dict]:
    """``subject`` against every other finished variant: d = loss(subject) − loss(other) per shared
    seed (the recipe's ``subject``, e.g. LOST against each baseline and each control)."""
    by_name = _losses(variants)
    if not by_name.get(subject):
        return []
    return [{"variant": subject, "reference": v["name"], **paired(by_name[subject], by_name[v["name"]])}
            for v in variants if v["name"] != subject and v["runs"]]


def leader(variants: list[dict]) -> str | None:
    """The variant with the lowest mean validation loss among those that finished the most seeds
    (a variant with fewer seeds could lead by luck), or None when none finished. The report pairs it
    against every other variant when it is not the recipe's ``subject``, so a table written to show
    one method never hides that another one is lower."""
    by_name = {name: [x for x in losses.values() if _finite(x)] for name, losses in _losses(variants).items()}
    finished = {name: xs for name, xs in by_name.items() if xs}
    if not finished:
        return None
    most = max(len(xs) for xs in finished.values())
    return min((statistics.fmean(xs), name) for name, xs in finished.items() if len(xs) == most)[1]


def format_paired(rows: list[dict], reference: str | None = None, subject: str | None = None,
                  level: str = "##", why: str = "") -> list[str]:
    """The Markdown section (heading ``level``) of the paired statistics: every variant against
    ``reference``, or ``subject`` against every other variant (then the first column names the other one);
    ``why`` is added to the heading after the subject's name."""
    if not rows:
        return []
    title = f"against `{reference}`" if subject is None else f"of `{subject}`{why} against each other variant"
    column, key = ("variant", "variant") if subject is None else ("against", "reference")
    lines = [f"{level} Paired difference of validation loss {title}", "", VERDICT_RULE, "",
             f"| {column} | seeds | per-seed d (nats) | mean d ± std | SE | t | verdict |", "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        per = ", ".join(f"{d:+.4f}" for d in r["diffs"])
        std = f" ± {r['std']:.4f}" if r["n"] > 1 else ""
        se = f"{r['se']:.4f}" if r["n"] > 1 else "–"
        t = f"{r['t']:+.2f}" if r["n"] > 1 else "–"
        mean = f"{r['mean']:+.4f}{std}" if r["n"] else "–"
        lines.append(f"| {r[key]} | {','.join(map(str, r['seeds'])) or 'none'} | {per} | {mean} | {se} | {t} | {r['verdict']} |")
    return lines
