"""Learning-rate sweeps: the choice rule and grid extension on hand-made points, and a whole
two-stage sweep on a tiny model (stage one picks, extends at an edge, stage two runs the choice
at every seed, a rerun skips everything, the report shows the sweep and paired statistics)."""

import json
import math

import pytest
import yaml

from lostlm.bench import load_recipe
from lostlm.bench.recipe import run_config
from lostlm.bench.runkey import key_folder, run_key
from lostlm.bench.sweep import decide
from lostlm.cli import main

GRID = [1e-3, 2e-3, 4e-3]


def test_interior_best_is_chosen_without_extension():
    assert decide({1e-3: 5.0, 2e-3: 4.0, 4e-3: 4.5}, GRID, 2.0, 3) == {"chosen": 2e-3, "at_edge": False, "extensions": []}


def test_missing_grid_points_come_first():
    assert decide({1e-3: 5.0}, GRID, 2.0, 3) == {"next": 2e-3}


@pytest.mark.parametrize("points, expected", [
    ({1e-3: 5.0, 2e-3: 4.0, 4e-3: 3.0}, {"next": 8e-3}),             # best at the top: ×2
    ({1e-3: 3.0, 2e-3: 4.0, 4e-3: 5.0}, {"next": 5e-4}),             # best at the bottom: ÷2
    ({1e-3: 3.0, 2e-3: 4.0, 4e-3: 5.0, 5e-4: 3.5}, {"chosen": 1e-3, "at_edge": False, "extensions": [5e-4]}),
    ({1e-3: 5.0, 2e-3: 4.0, 4e-3: 3.0, 8e-3: math.inf}, {"chosen": 4e-3, "at_edge": False, "extensions": [8e-3]}),
])
def test_edge_extends_until_interior(points, expected):
    assert decide(points, GRID, 2.0, 3) == expected


def test_extensions_stop_at_the_limit_and_flag_the_edge():
    points = {1e-3: 5.0, 2e-3: 4.0, 4e-3: 3.0, 8e-3: 2.0}
    assert decide(points, GRID, 2.0, 1) == {"chosen": 8e-3, "at_edge": True, "extensions": [8e-3]}


def test_all_diverged_chooses_nothing_and_ties_go_to_the_smaller_lr():
    assert decide({lr: math.inf for lr in GRID}, GRID, 2.0, 0)["chosen"] is None
    assert decide({1e-3: 4.0, 2e-3: 3.0, 4e-3: 3.0, 8e-3: 5.0}, GRID, 2.0, 3)["chosen"] == 2e-3


def _recipe(tmp_path, tiny_run, **extra):
    recipe = {"name": "mini-sweep", "base": {"overrides": tiny_run("unused", train__steps=4, train__eval_every=4,
                                                                   train__checkpoint_every=0)},
              "seeds": [0, 1], "methods": ["full", "lost"], "results": str(tmp_path / "results"), "isolate": False, **extra}
    path = tmp_path / "mini-sweep.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_run_key_changes_with_the_maths_only(tmp_path, tiny_run):
    recipe = load_recipe(_recipe(tmp_path, tiny_run))
    full, lost = recipe.variants
    a = run_config(recipe, lost, 0)
    b = run_config(recipe, lost, 1)            # another seed: same key, another folder
    assert key_folder(a) == key_folder(b) and a.train.out_dir != b.train.out_dir
    a.train.threads, a.train.log_every = 1, 7  # bookkeeping does not move the key
    assert run_key(a)["hash"] == run_key(b)["hash"]
    b.layer.gamma = 0.25                       # maths does
    assert run_key(a)["hash"] != run_key(b)["hash"]
    f = run_config(recipe, full, 0)            # full-rank ignores the factorised layers' knobs
    g = run_config(recipe, full, 0)
    g.layer.gamma = 0.25
    assert run_key(f)["hash"] == run_key(g)["hash"]
    assert key_folder(f).startswith("lr0.003-")
    c = run_config(recipe, full, 0)            # cola reads no gamma/density: a LOST knob does not move it
    c.layer.method = "cola"
    d = run_config(recipe, full, 0)
    d.layer.method, d.layer.gamma, d.layer.density = "cola", 0.25, 0.2
    assert run_key(c)["hash"] == run_key(d)["hash"]
    d.layer.rank = 4
    assert run_key(c)["hash"] != run_key(d)["hash"]


def test_two_stage_sweep_resumes_and_reports(tmp_path, tiny_run, capsys):
    sweep = {"grid": [3e-4, 1e-3, 3e-3], "seed": 0, "overrides": {"train.steps": 3, "train.eval_every": 3},
             "factor": 3, "max_extensions": 1}
    path = _recipe(tmp_path, tiny_run, sweep=sweep)
    assert main(["bench", str(path)]) == 0
    results = tmp_path / "results"
    record = json.loads((results / "sweep.json").read_text())
    for name in ("full", "lost"):
        v = record["variants"][name]
        losses = {p["lr"]: p["val_loss"] for p in v["points"]}
        assert v["done"] and set(sweep["grid"]) <= set(losses)
        assert v["chosen_lr"] == min(losses, key=lambda lr: (losses[lr], lr))   # the rule, recomputed
        best_at_edge = v["chosen_lr"] in (min(losses), max(losses))
        assert v["at_edge"] == best_at_edge
        grid_losses = {lr: losses[lr] for lr in sweep["grid"]}
        grid_best = min(grid_losses, key=lambda lr: (grid_losses[lr], lr))
        if grid_best == max(sweep["grid"]):       # best at the top of the grid: one point ×3 was added
            assert v["extensions"] == [pytest.approx(grid_best * 3)]
        elif grid_best == min(sweep["grid"]):
            assert v["extensions"] == [pytest.approx(grid_best / 3)]
        else:
            assert v["extensions"] == []
        # stage one ran the short budget; stage two the chosen lr at both seeds with the full one
        for p in v["points"]:
            folder = next((results / "sweep" / name).glob(f"lr{p['lr']:.3g}-*/seed0"))
            assert json.loads((folder / "summary.json").read_text())["step"] == 3
        for seed in (0, 1):
            folder = next((results / "runs" / name).glob(f"lr{v['chosen_lr']:.3g}-*/seed{seed}"))
            assert json.loads((folder / "summary.json").read_text())["step"] == 4
    table = (results / "results.md").read_text()
    assert "Learning-rate sweep" in table and "Paired difference" in table and "| lost |" in table
    assert (results / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((results / "results.json").read_text())
    (pair,) = data["paired"]
    assert pair["variant"] == "lost" and pair["seeds"] == [0, 1]
    loss = {v["name"]: {r["seed"]: r["summary"]["val_loss"] for r in v["runs"]} for v in data["variants"]}
    assert pair["diffs"] == pytest.approx([loss["lost"][s] - loss["full"][s] for s in (0, 1)])
    capsys.readouterr()
    assert main(["bench", str(path)]) == 0  # everything is done: nothing runs again
    out = capsys.readouterr().out
    assert ": running in " not in out and out.count("done, skipped") == 2 * 2
    assert out.count("sweep/full: chosen lr") == out.count("sweep/lost: chosen lr") == 1


def test_code_fingerprint_follows_what_each_method_reaches(tmp_path):
    """Editing the random factor init (CoLA/lowrank's) moves cola, lowrank and sltrain to new keys, not
    lost or full; a docstring or comment edit moves nothing."""
    from lostlm.bench import runkey

    for name in (*runkey.SHARED_MODULES, *runkey.METHOD_MODULES):
        (tmp_path / name).write_text((runkey.PACKAGE / name).read_text())
    methods = ("full", "galore", "lost", "lowrank-svd", "cola", "lowrank", "sltrain")
    before = {m: runkey.code_fingerprint(m, tmp_path) for m in methods}
    layers = tmp_path / "layers.py"
    text = layers.read_text()
    layers.write_text(text.replace("def random_factors(", "# a comment\ndef random_factors(", 1))
    assert {m: runkey.code_fingerprint(m, tmp_path) for m in methods} == before
    marker = "def random_factors("
    head, tail = text.split(marker, 1)
    body_start = tail.index(":\n") + 2
    layers.write_text(head + marker + tail[:body_start] + "    std = std * 2\n" + tail[body_start:])
    after = {m: runkey.code_fingerprint(m, tmp_path) for m in methods}
    moved = {m for m in methods if after[m] != before[m]}
    assert moved == {"cola", "lowrank", "lowrank-svd", "sltrain"}  # lowrank-svd shares LowRankLinear


def test_a_started_run_resumes_at_its_own_thread_count(tmp_path):
    """--threads is not part of a run's key, but the trainer refuses a thread change on resume:
    the runner keeps the started run's count instead of failing it."""
    from lostlm.bench.runner import _keep_started_threads
    from lostlm.configs import Config, save_config

    started = Config()
    started.train.threads = 2
    save_config(started, tmp_path / "config.yaml")
    now = Config()
    now.train.threads = 1
    messages = []
    assert _keep_started_threads(now, tmp_path, messages.append).train.threads == 2
    assert len(messages) == 1 and "train.threads=2" in messages[0]
    assert _keep_started_threads(now, tmp_path / "fresh", messages.append).train.threads == 1


def test_a_partial_sweep_records_every_finished_grid_point(tmp_path, tiny_run):
    """Points past an unfinished grid lr are still listed (and still not a choice)."""
    from lostlm.bench.recipe import run_dir
    from lostlm.bench.sweep import stage_one, sweep_record

    sweep = {"grid": [3e-4, 1e-3, 3e-3], "seed": 0, "overrides": {"train.steps": 3}, "factor": 3, "max_extensions": 1}
    recipe = load_recipe(_recipe(tmp_path, tiny_run, sweep=sweep))
    lost = recipe.variants[1]
    for lr, loss in ((1e-3, 5.5), (3e-3, 5.25)):          # 3e-4 (the first grid point) is not finished
        folder = run_dir(recipe, lost, 0, lr=lr, stage="sweep")
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({"val_loss": loss}))
    state = stage_one(recipe, lost)
    assert state["next"] == 3e-4 and state["points"] == {1e-3: 5.5, 3e-3: 5.25}
    entry = sweep_record(recipe)["variants"]["lost"]
    assert [p["lr"] for p in entry["points"]] == [1e-3, 3e-3] and not entry["done"] and entry["chosen_lr"] is None


def test_methods_flag_runs_only_the_named_variants_and_rejects_unknown_names(tmp_path, tiny_run, capsys):
    """``--methods lost --stage one``: lost's grid points run, full's do not; a name the recipe
    lacks is a one-line error before anything runs."""
    sweep = {"grid": [3e-4, 1e-3, 3e-3], "seed": 0, "overrides": {"train.steps": 2, "train.eval_every": 2},
             "max_extensions": 0}
    path = _recipe(tmp_path, tiny_run, sweep=sweep)
    assert main(["bench", str(path), "--methods", "lost,colla"]) == 2
    err = capsys.readouterr().err
    assert "--methods colla is not in" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "results" / "sweep").exists()
    assert main(["bench", str(path), "--stage", "one", "--methods", "lost"]) == 0
    finished = list((tmp_path / "results" / "sweep").glob("*/*/seed0/summary.json"))
    assert {p.parents[2].name for p in finished} == {"lost"}
    assert sorted(p.parents[1].name.split("-")[0] for p in finished) == ["lr0.0003", "lr0.001", "lr0.003"]
    record = json.loads((tmp_path / "results" / "sweep.json").read_text())["variants"]
    assert record["lost"]["chosen_lr"] in sweep["grid"] and record["full"]["points"] == []


def test_run_key_follows_the_precision_auto_resolves_to(tmp_path, tiny_run, monkeypatch):
    """A machine with native bf16 trains ``auto`` in bf16: its runs get other folders than the fp32
    runs of the same recipe on a machine without it; fp32 keeps the key ``auto`` always had."""
    recipe = load_recipe(_recipe(tmp_path, tiny_run))
    _, lost = recipe.variants
    keys = {}
    for native_bf16 in (False, True):
        monkeypatch.setattr("lostlm.runtime.cpu_supports_bf16", lambda native=native_bf16: native)
        for precision in ("auto", "fp32", "bf16"):
            cfg = run_config(recipe, lost, 0)
            cfg.train.device, cfg.train.precision = "cpu", precision
            keys[native_bf16, precision] = run_key(cfg)["hash"]
    assert keys[False, "auto"] == keys[False, "fp32"] == keys[True, "fp32"]   # fp32 everywhere
    assert keys[True, "auto"] == keys[True, "bf16"] == keys[False, "bf16"]    # bf16 autocast everywhere
    assert keys[False, "auto"] != keys[True, "auto"]


def _write_points(recipe, variant, points):
    from lostlm.bench.recipe import run_dir

    for lr, loss in points.items():
        folder = run_dir(recipe, variant, 0, lr=lr, stage="sweep")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "summary.json").write_text(json.dumps({"val_loss": loss}))


def test_per_method_keeps_the_variant_with_the_lowest_chosen_point(tmp_path, tiny_run):
    """kept_variants on hand-made stage-one points: undecided while a sibling is unfinished, then
    the lowest chosen point wins, a tie goes to the variant listed first, divergence counts as +inf."""
    from lostlm.bench.recipe import run_dir
    from lostlm.bench.sweep import DIVERGED, kept_variants, sweep_record

    sweep = {"grid": GRID, "seed": 0, "overrides": {"train.steps": 3}, "max_extensions": 0, "per_method": True}
    methods = ["full", {"name": "full-u4", "method": "full", "overrides": {"train.untargeted_lr_scale": 4}}, "lost"]
    recipe = load_recipe(_recipe(tmp_path, tiny_run, sweep=sweep, methods=methods))
    full, full_u4, lost = recipe.variants
    _write_points(recipe, full, {1e-3: 5.0, 2e-3: 4.9, 4e-3: 5.1})
    _write_points(recipe, full_u4, {1e-3: 4.7, 2e-3: 4.6})            # 4e-3 not finished yet
    assert kept_variants(recipe) == {"full": None, "lost": None}
    _write_points(recipe, full_u4, {4e-3: 4.8})
    _write_points(recipe, lost, {1e-3: 4.5, 2e-3: 4.4, 4e-3: 4.45})
    assert kept_variants(recipe) == {"full": "full-u4", "lost": "lost"}
    record = sweep_record(recipe)["variants"]
    assert (record["full"]["kept"], record["full-u4"]["kept"], record["lost"]["kept"]) == (False, True, True)
    _write_points(recipe, full_u4, {1e-3: 4.95, 2e-3: 4.9, 4e-3: 4.95})   # 4.9 against full's 4.9: the first listed
    assert kept_variants(recipe)["full"] == "full"
    for lr in GRID:                                                   # every lr of full diverged: +inf
        (run_dir(recipe, full, 0, lr=lr, stage="sweep") / DIVERGED).write_text("{}")
    assert kept_variants(recipe)["full"] == "full-u4"


def test_per_method_sweep_runs_stage_two_of_the_kept_variants_only(tmp_path, tiny_run, capsys):
    sweep = {"grid": [3e-4, 1e-3, 3e-3], "seed": 0, "overrides": {"train.steps": 3, "train.eval_every": 3},
             "max_extensions": 0, "per_method": True}
    methods = ["full", {"name": "full-u4", "method": "full", "overrides": {"train.untargeted_lr_scale": 4}}, "lost"]
    path = _recipe(tmp_path, tiny_run, sweep=sweep, methods=methods, subject="lost")
    assert main(["bench", str(path)]) == 0
    results = tmp_path / "results"
    record = json.loads((results / "sweep.json").read_text())["variants"]
    best = {name: min(p["val_loss"] for p in record[name]["points"]) for name in ("full", "full-u4")}
    kept = min(("full", "full-u4"), key=lambda n: (best[n], n != "full"))
    dropped = ({"full", "full-u4"} - {kept}).pop()
    assert record[kept]["kept"] is True and record[dropped]["kept"] is False
    assert sorted(p.name for p in (results / "runs").iterdir()) == sorted([kept, "lost"])
    out = capsys.readouterr().out
    assert f"{dropped}: not kept, {kept} has the lower stage-one loss for full" in out
    data = json.loads((results / "results.json").read_text())
    per = data["per_method"]
    assert per["kept"] == {"full": kept, "lost": "lost"} and per["reference"] == kept
    loss = {v["name"]: {r["seed"]: r["summary"]["val_loss"] for r in v["runs"]} for v in data["variants"]}
    (pair,) = per["paired"]
    assert pair["variant"] == "lost" and pair["diffs"] == pytest.approx([loss["lost"][s] - loss[kept][s] for s in (0, 1)])
    (subject,) = per["subject_paired"]
    assert subject["reference"] == kept and subject["diffs"] == pytest.approx(pair["diffs"])
    table = (results / "results.md").read_text()
    assert "## Each method at its kept setting" in table and f"| full | {kept} |" in table
    assert "not kept (another variant of its method is lower)" in table
