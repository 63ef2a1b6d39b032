"""``scaling.md``: the scaling report as Markdown tables (from :mod:`.scaling_report`'s payload)."""

from __future__ import annotations

import math

from .ladder import Ladder

GOAL = 0.03  # issue 12's target for the held-out prediction's absolute relative error


def _g(x, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}g}"


def _iv(lo_hi, digits: int = 3) -> str:
    lo, hi = lo_hi
    return f"[{_g(lo, digits)}, {_g(hi, digits)}]"


def _runs_table(payload: dict) -> list[str]:
    lines = ["| method | shape | N non-emb | N total | tokens | seed | final val loss | training s | status |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, runs in payload["runs"].items():
        for r in runs:
            status = "held out" if r["held_out"] else "fitted"
            status = status if r["finished"] else f"NOT FINISHED ({len(r['curve'])} evals logged)"
            total = f"{r['N_total'] / 1e6:.3f}M" if r["N_total"] else "–"
            secs = f"{r['train_seconds']:,.0f}" if r["train_seconds"] else "–"
            lines.append(f"| {name} | {r['shape']} | {r['N'] / 1e6:.3f}M | {total} | {r['budget_tokens']:,} | {r['seed']} | "
                         f"{_g(r['final_loss'], 4)} | {secs} | {status} |")
    lines.append("")
    for name, runs in payload["runs"].items():
        done = [r for r in runs if r["finished"] and r["train_seconds"]]
        lines.append(f"- {name}: {len(done)} of {len(runs)} runs finished, "
                     f"{sum(r['train_seconds'] for r in done) / 3600:.2f} h of training time (evaluations excluded).")
    return lines


def _fit_table(payload: dict) -> list[str]:
    lines = ["| method | lr (source) | runs | points | E | A | α | B | β | rms log residual |",
             "|---|---|---:|---:|---|---|---|---|---|---:|"]
    for name, f in payload["fits"].items():
        lr = payload["lrs"][name]
        head = f"| {name} | {lr['lr']:.3g} ({lr['source']}) | {f['fitted_runs']} | {f['points']} |"
        if "law" not in f:
            lines.append(head + f" {f['skipped']} | | | | | |")
            continue
        law, iv = f["law"], f["intervals"]
        cells = [f"{_g(getattr(law, k), 4)} {_iv(iv[k])}" for k in ("E", "A", "alpha", "B", "beta")]
        lines.append(head + " " + " | ".join(cells) + f" | {f['rms_log_residual']:.4f} |")
    return lines


def _held_out_table(payload: dict) -> list[str]:
    lines = ["| method | shape (seed) | N non-emb | D | predicted [95 %] | measured | abs rel error | ≤ 3 %? | measured in interval? |",
             "|---|---|---:|---:|---|---:|---:|---|---|"]
    for name, f in payload["fits"].items():
        for h in f.get("held_out", []):
            err = h.get("abs_rel_error")
            lines.append(f"| {name} | {h['shape']} ({h['seed']}) | {h['N'] / 1e6:.3f}M | {h['D']:,} | {h['predicted']:.4f} {_iv(h['interval'], 4)} | "
                         f"{_g(h['measured'], 4)} | {'–' if err is None else f'{100 * err:.2f} %'} | "
                         f"{'–' if err is None else 'yes' if err <= GOAL else 'NO'} | "
                         f"{'–' if err is None else 'yes' if h['in_interval'] else 'no'} |")
    return lines


def _paper_table(payload: dict) -> list[str]:
    lines = ["| method | preset | N non-emb | N total | tokens D | predicted loss [95 %] |", "|---|---|---:|---:|---:|---|"]
    for name, f in payload["fits"].items():
        for p in f.get("paper", []):
            lines.append(f"| {name} | {p['preset']} | {p['N'] / 1e6:,.1f}M | {p['N_total'] / 1e6:,.1f}M | {p['D'] / 1e9:.2f}B | "
                         f"{p['loss']:.3f} {_iv(p['interval'])} (extrapolation) |")
    return lines


def _comparison_lines(payload: dict) -> list[str]:
    lines = []
    for c in payload["comparisons"]:
        for key, what, unit in (("equal_params", "equal trainable non-embedding parameters N (D = {tpp:g} N)", "N"),
                                ("equal_memory", "equal training memory (estimator: fp32 weights + grads + Adam; paper "
                                 "presets 60m–7b; D = {tpp:g} × N of full's model of that memory)", "bytes")):
            e = c[key]
            where = ", ".join(f"{10**x:.3g} {unit}" for x in e["crossings_log10"]) or "none"
            lo, hi = e["interval_log10"]
            iv = f"[{10**lo:.3g}, {10**hi:.3g}]" if math.isfinite(lo) else "–"
            lines.append(f"- {c['method']} vs {c['reference']} at {what.format(tpp=c['tokens_per_param'])}: searched "
                         f"{10**e['range_log10'][0]:.3g}–{10**e['range_log10'][1]:.3g} {unit}; lower loss at the small end: "
                         f"{e['lower_at_start']}, at the large end: {e['lower_at_end']}; equal loss at: {where}. Bootstrap: "
                         f"{100 * e['bootstrap_share']:.0f} % of paired refits cross, first crossing in {iv} {unit}.")
    return lines or ["- no comparison: needs fits of full and another method."]


def format_scaling(ladder: Ladder, payload: dict) -> str:
    m = payload["machine"]
    s = ladder.fit
    fitted = ", ".join(f"{x.name} (d={x.hidden_size}, {x.num_layers} layers)" for x in ladder.sizes)
    lines = [f"# Scaling {ladder.name}", "", *([ladder.description, ""] if ladder.description else []),
             f"Machine: {m.get('cpu', '?')} ({m.get('cores', '?')} cores, torch {m.get('torch', '?')}). Fitted shapes: {fitted}; "
             f"held out: {ladder.held_out.name} (d={ladder.held_out.hidden_size}). Token budget(s) per run: "
             f"{', '.join(f'{t:,}' for t in ladder.tokens)}; seeds {ladder.bench.seeds}.", "",
             "## Runs", "", *_runs_table(payload), "",
             "## Fit: L(N, D) = E + A / N^α + B / D^β", "",
             f"Chinchilla's approach 3: Huber (δ = {s.huber_delta:g}) on log L, log-sum-exp parametrisation, scipy L-BFGS-B "
             f"from the {s.starts} best points of a grid of initialisations. Points: every validation point after the first "
             f"{100 * s.drop_fraction:.0f} % of a run's tokens, final ones included. N = trainable parameters outside the "
             f"embedding and LM head (total in the runs table); D = tokens seen. Intervals: 95 % percentiles of "
             f"{s.bootstrap} refits on the fitted runs resampled with replacement (a resample with a single size is skipped).",
             "", *_fit_table(payload), "",
             "## Prediction of the held-out size", "",
             "Final validation loss of the larger held-out run, predicted by the law fitted on the smaller sizes "
             "(interval: the bootstrap refits' predictions; seed noise is not in it).", "", *_held_out_table(payload), "",
             "## Paper sizes: EXTRAPOLATION", "",
             "The laws above evaluated at the paper presets (N from the analytic counter with vocabulary 32000, D = the "
             "preset recipe's tokens). Far outside the fitted range (a different corpus and tokenizer from the paper's C4, "
             "shapes of another depth): orders of magnitude of extrapolation, not results.", "", *_paper_table(payload), "",
             "## Where the methods reach equal loss", "", *_comparison_lines(payload), "",
             "Plot: `scaling.png` (validation loss vs tokens per size, fitted curves, the held-out run; faint points were "
             "dropped from the fit).", ""]
    return "\n".join(lines)
