"""Fit a scaling law L(N, D) = E + A / N^alpha + B / D^beta to (N, D, loss) points.

Chinchilla's approach 3 (Hoffmann et al., 2022, appendix D.2), as written there: with
``x = log N``, ``z = log D`` and ``E = exp(e)``, ``A = exp(a)``, ``B = exp(b)``, the law is

    log L = LSE(a - alpha x, b - beta z, e)

and (a, alpha, b, beta, e) minimise the sum of Huber losses (delta = 1e-3) of
``LSE(...) - log L_observed`` over every point. scipy's L-BFGS-B does the minimising (bounds:
alpha, beta in [0, 5]), started from a grid of initialisations: the objective is evaluated at
every point of :data:`GRID` (vectorised) and L-BFGS runs from the ``starts`` best of them
(Chinchilla runs it from all 4500 of theirs; the best few reach the same minimum at a fraction
of the cost, which the bootstrap needs), plus any ``extra`` starting vectors; the lowest
minimum wins. L-BFGS-B minimises the sum divided by n delta^2 (same minimiser): its stopping
test is absolute below 1, and the raw sum is of order delta^2.

:func:`bootstrap` refits on runs resampled with replacement (a run's points stay together:
points of one run share its noise, so resampling points would understate the spread) and
:func:`interval` turns the refits into percentile intervals. :func:`crossings` finds where two
curves of one variable meet. Pure numpy/scipy: the tests fit synthetic data drawn from a known
law.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import LostLMError

# Chinchilla's grid for a, b, alpha, beta; e reaches 2 (E up to 7.4 nats: small models on a
# small corpus sit far above the 1.7 of Chinchilla's fit).
GRID = {"a": np.arange(0.0, 26.0, 5.0), "alpha": np.arange(0.0, 2.01, 0.5), "b": np.arange(0.0, 26.0, 5.0),
        "beta": np.arange(0.0, 2.01, 0.5), "e": np.arange(-1.0, 2.01, 0.5)}
ORDER = ("a", "alpha", "b", "beta", "e")
BOUNDS = [(None, None), (0.0, 5.0), (None, None), (0.0, 5.0), (None, None)]


def _scipy():
    try:
        import scipy.optimize
        import scipy.special
        import threadpoolctl  # noqa: F401
    except ImportError:
        raise LostLMError("the scaling-law fit needs scipy and threadpoolctl; install them with "
                          "`pip install 'lostlm[scaling]'`") from None
    return scipy


def _one_blas_thread():
    """L-BFGS-B's BLAS calls on 5-vectors: a multi-threaded OpenBLAS spends 50x longer waking its
    threads than computing (4 ms instead of 0.08 ms a step on a busy 2-core machine)."""
    import threadpoolctl

    return threadpoolctl.threadpool_limits(1, user_api="blas")


@dataclass
class Law:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float

    @classmethod
    def from_vector(cls, theta: np.ndarray) -> Law:
        a, alpha, b, beta, e = (float(t) for t in theta)
        return cls(E=float(np.exp(e)), A=float(np.exp(a)), alpha=alpha, B=float(np.exp(b)), beta=beta)

    def vector(self) -> np.ndarray:
        return np.array([np.log(self.A), self.alpha, np.log(self.B), self.beta, np.log(self.E)])

    def loss(self, N, D):
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    def to_dict(self) -> dict:
        return asdict(self)


def _terms(theta: np.ndarray, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """The three exponents of the LSE, shape (..., 3, points) for theta of shape (..., 5)."""
    a, alpha, b, beta, e = (theta[..., i, None] for i in range(5))
    return np.stack([a - alpha * x, b - beta * z, np.broadcast_to(e, (a * x).shape)], axis=-2)


def _lse(t: np.ndarray) -> np.ndarray:
    """log(exp t0 + exp t1 + exp t2) over axis -2 (numpy's ufunc: scipy's logsumexp costs ~1 ms a call)."""
    return np.logaddexp(np.logaddexp(t[..., 0, :], t[..., 1, :]), t[..., 2, :])


def objective(theta: np.ndarray, x: np.ndarray, z: np.ndarray, y: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
    """Sum of Huber(LSE - y) and its gradient in theta = (a, alpha, b, beta, e)."""
    sp = _scipy()
    t = _terms(theta, x, z)
    lse = _lse(t)
    r = lse - y
    w = np.exp(t - lse)  # softmax weights: d LSE / d term
    dr = np.clip(r, -delta, delta)  # Huber'(r)
    grad = np.array([np.sum(dr * w[0]), -np.sum(dr * w[0] * x), np.sum(dr * w[1]), -np.sum(dr * w[1] * z),
                     np.sum(dr * w[2])])
    return float(np.sum(sp.special.huber(delta, r))), grad


def _grid() -> np.ndarray:
    return np.array(list(itertools.product(*(GRID[k] for k in ORDER))))


def _grid_values(x: np.ndarray, z: np.ndarray, y: np.ndarray, delta: float) -> np.ndarray:
    sp = _scipy()
    grid = _grid()
    lse = _lse(_terms(grid, x, z))
    return grid, np.sum(sp.special.huber(delta, lse - y), axis=-1)


def fit_law(N, D, L, delta: float = 1e-3, starts: int = 20, extra: list[np.ndarray] = ()) -> tuple[Law, float]:
    """The law that minimises the Huber loss on log L (module docstring); returns (law, loss)."""
    sp = _scipy()
    N, D, L = (np.asarray(v, dtype=float) for v in (N, D, L))
    if len(L) < 5 or np.any(L <= 0) or np.any(N <= 0) or np.any(D <= 0):
        raise LostLMError(f"a scaling-law fit needs at least 5 points with positive N, D and loss (got {len(L)}); "
                          "finish more runs or lower fit.drop_fraction")
    x, z, y = np.log(N), np.log(D), np.log(L)
    grid, values = _grid_values(x, z, y, delta)
    inits = [grid[i] for i in np.argsort(values)[:starts]] + [np.asarray(v, dtype=float) for v in extra]
    # L-BFGS-B stops when an iteration gains less than ~2e-9 in absolute terms (its relative test
    # divides by max(|f|, 1)); the raw sum is ~delta^2 per point, so it would stop at once. The
    # same objective divided by n delta^2 (same minimiser) is of order one.
    scale = 1.0 / (len(y) * delta**2)

    def scaled(theta):
        value, grad = objective(theta, x, z, y, delta)
        return value * scale, grad * scale

    best = None
    with _one_blas_thread():
        for init in inits:
            res = sp.optimize.minimize(scaled, init, jac=True, method="L-BFGS-B", bounds=BOUNDS)
            if best is None or res.fun < best.fun:
                best = res
    return Law.from_vector(best.x), float(best.fun / scale)


def bootstrap(runs: list[np.ndarray], samples: int, seed: int = 0, delta: float = 1e-3, starts: int = 5,
              centre: Law | None = None) -> list[Law]:
    """Refits on the runs resampled with replacement (each run an (n, 3) array of N, D, L).
    Each refit starts from the ``starts`` best grid points and from ``centre`` (the full fit)."""
    rng = np.random.default_rng(seed)
    extra = [centre.vector()] if centre is not None else []
    laws = []
    for _ in range(samples):
        pick = rng.integers(0, len(runs), len(runs))
        points = np.concatenate([runs[i] for i in pick])
        if len(np.unique(points[:, 0])) < 2:  # one size only: N's term is not identified
            continue
        try:
            laws.append(fit_law(points[:, 0], points[:, 1], points[:, 2], delta, starts, extra)[0])
        except LostLMError:
            continue
    return laws


def interval(values, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the bootstrap values (nan when there are none)."""
    values = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if not len(values):
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def crossings(xs: np.ndarray, diff: np.ndarray) -> list[float]:
    """The x where ``diff`` (sampled at increasing ``xs``) changes sign, by linear
    interpolation between the two samples around each change."""
    out = []
    for i in range(len(xs) - 1):
        d0, d1 = diff[i], diff[i + 1]
        if not (np.isfinite(d0) and np.isfinite(d1)):
            continue
        if d0 == 0 and i > 0 and diff[i - 1] * d1 < 0:  # a sample lies exactly on the crossing
            out.append(float(xs[i]))
        elif d0 * d1 < 0:
            out.append(float(xs[i] + (xs[i + 1] - xs[i]) * d0 / (d0 - d1)))
    return out
