"""`lostlm scaling`: the law fit recovers a known law, bad recipes are one-line errors, and a
micro ladder runs end to end into a report."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.optimize import approx_fprime

from lostlm.bench.ladder import load_ladder
from lostlm.bench.scaling_fit import Law, bootstrap, crossings, fit_law, interval, objective
from lostlm.cli import main

TRUE = Law(E=2.0, A=300.0, alpha=0.4, B=900.0, beta=0.45)


def synthetic_runs(law: Law, noise: float, seed: int = 0) -> list[np.ndarray]:
    """Eight "runs" (sizes 1e5..1e7), eight points each over a 4x token range, log-normal noise."""
    rng = np.random.default_rng(seed)
    runs = []
    for n in np.geomspace(1e5, 1e7, 8):
        d = np.geomspace(2.5e5, 1e6, 8)
        loss = law.loss(n, d) * np.exp(rng.normal(0.0, noise, d.shape))
        runs.append(np.stack([np.full_like(d, n), d, loss], axis=1))
    return runs


def test_objective_gradient_matches_finite_differences():
    pts = np.concatenate(synthetic_runs(TRUE, 0.01))
    x, z, y = np.log(pts[:, 0]), np.log(pts[:, 1]), np.log(pts[:, 2])
    theta = np.array([5.0, 0.5, 6.0, 0.4, 0.7])
    numeric = approx_fprime(theta, lambda t: objective(t, x, z, y, 1e-3)[0], 1e-7)
    np.testing.assert_allclose(objective(theta, x, z, y, 1e-3)[1], numeric, rtol=1e-4, atol=1e-9)


def test_noiseless_points_give_back_the_law():
    pts = np.concatenate(synthetic_runs(TRUE, 0.0))
    law, _ = fit_law(pts[:, 0], pts[:, 1], pts[:, 2])
    np.testing.assert_allclose(law.loss(pts[:, 0], pts[:, 1]), pts[:, 2], rtol=1e-4)
    for k in ("E", "alpha", "beta"):
        assert getattr(law, k) == pytest.approx(getattr(TRUE, k), rel=0.05), k


def test_noisy_fit_recovers_the_exponents_within_its_bootstrap_intervals():
    runs = synthetic_runs(TRUE, 0.005, seed=1)
    pts = np.concatenate(runs)
    law, _ = fit_law(pts[:, 0], pts[:, 1], pts[:, 2], starts=10)
    boots = bootstrap(runs, 30, seed=0, starts=2, centre=law)
    assert len(boots) >= 25
    for k in ("E", "alpha", "beta"):
        lo, hi = interval([getattr(b, k) for b in boots])
        assert lo <= getattr(TRUE, k) <= hi, (k, lo, hi)
        assert lo <= getattr(law, k) <= hi


def test_crossings_are_where_the_difference_changes_sign():
    xs = np.linspace(0.0, 10.0, 101)
    assert crossings(xs, (xs - 3.0) * (xs - 7.25)) == pytest.approx([3.0, 7.25], abs=1e-2)
    assert crossings(xs, xs + 1.0) == []


def write(tmp_path, tiny_run, **changes):
    recipe = {"name": "micro", "base": {"overrides": tiny_run("unused", train__batch_size=8)},
              "methods": ["full", "lost"], "seeds": [0], "lr": 3.0e-3, "results": str(tmp_path / "results"),
              "sizes": [{"name": "d16", "hidden_size": 16, "intermediate_size": 48, "num_heads": 2, "num_layers": 2, "rank": 4},
                        {"name": "d24", "hidden_size": 24, "intermediate_size": 64, "num_heads": 2, "num_layers": 2, "rank": 6}],
              "held_out": {"name": "d32", "hidden_size": 32, "intermediate_size": 96, "num_heads": 2, "num_layers": 2, "rank": 8},
              "tokens": 8 * 8 * 32, "evals": 4, "fit": {"bootstrap": 4, "starts": 3}}
    recipe.update(changes)
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("changes, fragment", [
    ({"sizes": []}, "at least 2 model shapes"),
    ({"held_out": {"name": "d8", "hidden_size": 8, "intermediate_size": 16, "num_heads": 2, "num_layers": 2, "rank": 2}},
     "held_out d8 must be larger"),
    ({"tokens": 1000}, "must be a multiple of batch_size"),
    ({"lr": None}, "no learning rate for full"),
    ({"sizez": 1}, "unknown key(s) ['sizez']"),
    ({"held_out": {"name": "x", "hidden_size": 32}}, "held_out must be a mapping with exactly"),
    ({"fit": {"drop_fraction": 2}}, "drop_fraction must be a number in [0, 0.9]"),
])
def test_bad_scaling_recipes_are_one_line_errors(tmp_path, tiny_run, capsys, changes, fragment):
    assert main(["scaling", str(write(tmp_path, tiny_run, **changes)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and err.count("\n") == 1, err


def test_micro_ladder_runs_fits_and_reports(tmp_path, tiny_run, capsys):
    path = write(tmp_path, tiny_run)
    assert main(["scaling", str(path)]) == 0
    results = tmp_path / "results"
    data = json.loads((results / "scaling.json").read_text())
    runs = data["runs"]["full"]
    assert [r["shape"] for r in runs] == ["d16", "d24", "d32"] and all(r["finished"] for r in runs)
    # N is the model's own count without embedding and head; the analytic estimate agrees
    assert all(r["N_total"] - r["N"] == 2 * 400 * r["hidden_size"] for r in runs)  # untied: vocab 400 × d, twice
    assert runs[0]["N"] < runs[1]["N"] < runs[2]["N"]
    assert all(len(r["curve"]) == 4 and r["curve"][-1][0] == 8 * 8 * 32 for r in runs)
    fit = data["fits"]["full"]
    assert fit["fitted_runs"] == 2 and fit["points"] == 2 * 3  # evaluations after the first 25 % of tokens
    (held,) = fit["held_out"]
    assert held["shape"] == "d32" and held["measured"] == runs[2]["final_loss"]
    assert held["abs_rel_error"] == pytest.approx(abs(held["predicted"] - held["measured"]) / held["measured"])
    assert [p["preset"] for p in fit["paper"]] == ["60m", "130m", "350m", "1b"]
    assert data["comparisons"][0]["method"] == "lost" and data["lrs"]["lost"]["source"] == "explicit in the recipe"
    text = (results / "scaling.md").read_text()
    assert "EXTRAPOLATION" in text and "| full | d32 |" in text and "abs rel error" in text
    assert (results / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["scaling", str(path)]) == 0  # resumes: nothing to run
    assert capsys.readouterr().out.count("done, skipped") == 6
    (results / "scaling.md").unlink()
    assert main(["scaling", "--report", str(results)]) == 0
    assert "## Fit" in (results / "scaling.md").read_text()


@pytest.mark.parametrize("path", sorted(p for p in Path("bench").glob("*.yaml") if "sizes" in yaml.safe_load(p.read_text())),
                         ids=lambda p: p.stem)
def test_shipped_scaling_recipes_load(path):
    """Every scaling recipe in bench/ loads (each run's config is checked), held-out size last."""
    raw = yaml.safe_load(path.read_text())
    ladder = load_ladder(path)
    assert [s.name for s in ladder.sizes] == [s["name"] for s in raw["sizes"]] and ladder.held_out.name == raw["held_out"]["name"]
    assert len(ladder.cells) == len(raw["methods"]) * (len(raw["sizes"]) + 1) * len(ladder.tokens)
