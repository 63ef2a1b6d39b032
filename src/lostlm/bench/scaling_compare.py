"""Where the fitted laws are used beyond the ladder: the paper's model sizes (an extrapolation),
and the size at which two methods reach equal loss, at equal trainable parameters and at equal
training memory.

N at a paper size is the analytic non-embedding parameter count of that preset under the
method (:func:`lostlm.estimate.estimate`, vocabulary 32000: the same formulas the tests check
against the real layers), D its recipe's token budget (``configs/<preset>.yaml``: steps × batch
× sequence length). Memory is the estimator's weights + gradients + Adam state in fp32 (what our
runs hold, :func:`lostlm.estimate.estimate_run`'s convention; activations depend on the batch,
not on the method, and are left out), along the family of the paper presets (60m … 7b): at a
memory M each method has the (log-log interpolated) N of its model of that memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..configs import PRESET_VOCAB, load_config
from ..errors import LostLMError
from .scaling_fit import Law, crossings, interval

PAPER_SIZES = ("60m", "130m", "350m", "1b")
FAMILY = ("60m", "130m", "350m", "1b", "7b")
PARAM_RANGE = (1e5, 1e11)  # the range searched for a crossing at equal trainable parameters


def preset_point(preset: str, method: str, overrides: list[str], configs: Path = Path("configs")) -> dict:
    """N (non-embedding, trainable), N total, D (the recipe's tokens) and fp32 state memory of a preset."""
    from ..estimate import estimate

    path = configs / f"{preset}.yaml"
    if not path.is_file():
        raise LostLMError(f"{path} is missing; run lostlm scaling from the repository root")
    cfg = load_config(path, [f"layer.method={method}", *overrides])
    e = estimate(cfg, PRESET_VOCAB, dtype="fp32")
    return {"preset": preset, "N": e.params_linear + e.params_other, "N_total": e.params_total,
            "D": cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len, "memory_bytes": e.state_bytes}


def paper_predictions(law: Law, boots: list[Law], method: str, overrides: list[str]) -> list[dict]:
    """Predicted final loss (and 95 % bootstrap interval) at each paper size: an extrapolation."""
    rows = []
    for p in PAPER_SIZES:
        pt = preset_point(p, method, overrides)
        lo, hi = interval([b.loss(pt["N"], pt["D"]) for b in boots])
        rows.append({**pt, "loss": float(law.loss(pt["N"], pt["D"])), "interval": [lo, hi], "extrapolation": True})
    return rows


def _params_diff(a: Law, b: Law, tokens_per_param: float) -> tuple[np.ndarray, np.ndarray]:
    """(log10 N, L_a - L_b) at equal trainable parameters N, each trained on tokens_per_param × N."""
    ns = np.geomspace(*PARAM_RANGE, 600)
    return np.log10(ns), a.loss(ns, tokens_per_param * ns) - b.loss(ns, tokens_per_param * ns)


def _memory_curve(method: str, overrides: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(log memory, log N) of the method's model at each preset of the family."""
    pts = [preset_point(p, method, overrides) for p in FAMILY]
    return np.log([p["memory_bytes"] for p in pts]), np.log([p["N"] for p in pts])


def _memory_diff(a: Law, b: Law, curve_a, curve_b, tokens_per_param: float) -> tuple[np.ndarray, np.ndarray]:
    """(log10 memory, L_a - L_b) at equal memory, both on the data budget of b's model of that memory."""
    lo, hi = max(curve_a[0][0], curve_b[0][0]), min(curve_a[0][-1], curve_b[0][-1])
    logm = np.linspace(lo, hi, 600)
    na, nb = np.exp(np.interp(logm, *curve_a)), np.exp(np.interp(logm, *curve_b))
    d = tokens_per_param * nb
    return logm / np.log(10), a.loss(na, d) - b.loss(nb, d)


def compare(name: str, method: dict, ref_name: str, reference: dict, tokens_per_param: float) -> dict:
    """Equal-loss sizes of ``method`` against ``reference`` (each {"law", "boots", "method", "overrides"}).

    Per comparison (``equal_params``: x = log10 N; ``equal_memory``: x = log10 bytes): the x of
    every crossing of the point fits, which method is lower at each end of the range searched,
    and over paired bootstrap refits the share that cross at least once and the interval of
    their first crossing."""
    curve_a = _memory_curve(method["method"], method["overrides"])
    curve_b = _memory_curve(reference["method"], reference["overrides"])
    out = {"method": name, "reference": ref_name, "tokens_per_param": tokens_per_param}
    finders = {"equal_params": lambda a, b: _params_diff(a, b, tokens_per_param),
               "equal_memory": lambda a, b: _memory_diff(a, b, curve_a, curve_b, tokens_per_param)}
    for key, find in finders.items():
        xs, diff = find(method["law"], reference["law"])
        boot = [crossings(*find(a, b)) for a, b in zip(method["boots"], reference["boots"])]
        first = [c[0] for c in boot if c]
        out[key] = {"range_log10": [float(xs[0]), float(xs[-1])], "crossings_log10": crossings(xs, diff),
                    "lower_at_start": name if diff[0] < 0 else ref_name, "lower_at_end": name if diff[-1] < 0 else ref_name,
                    "bootstrap_share": len(first) / len(boot) if boot else float("nan"),
                    "interval_log10": list(interval(first)) if first else [float("nan")] * 2}
    return out
