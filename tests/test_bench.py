"""`lostlm bench`: a 2-method x 1-seed recipe runs (in subprocesses), resumes, and writes a
well-formed table, JSON and PNGs; --report rebuilds them; bad recipes give one-line errors."""

import json
import os
from pathlib import Path

import pytest
import yaml

from lostlm.bench import load_recipe
from lostlm.bench.recipe import run_dir
from lostlm.cli import main
from lostlm.runlock import RunLock


def write_recipe(tmp_path, tiny_run, methods, **extra):
    recipe = {"name": "mini", "base": {"overrides": tiny_run("unused", train__steps=4, train__eval_every=2)},
              "seeds": [0], "methods": methods, "results": str(tmp_path / "results"), **extra}
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_bench_runs_writes_table_json_plots_and_resumes(tmp_path, tiny_run, capsys):
    path = write_recipe(tmp_path, tiny_run, ["full", {"name": "lost-g0.3", "method": "lost", "overrides": {"layer.gamma": 0.3}}])
    assert main(["bench", str(path)]) == 0
    results = tmp_path / "results"
    table = (results / "results.md").read_text()
    main_table, breakdown_table = table.split("Validation perplexity is token-weighted")[0], table.split("Memory breakdown")[1]
    header = next(l for l in main_table.splitlines() if l.startswith("| variant |"))
    rows = [l for l in main_table.splitlines() if l.startswith("| full ") or l.startswith("| lost-g0.3 ")]
    assert len(rows) == 2 and all(r.count("|") == header.count("|") for r in rows)  # every column filled
    assert "val ppl (mean ± std)" in table and "MiB" in table and "%" in rows[0]
    header = next(l for l in breakdown_table.splitlines() if l.startswith("| variant |"))
    breakdown = [l for l in breakdown_table.splitlines() if l.startswith("| full ")]
    assert len(breakdown) == 1 and breakdown[0].count("|") == header.count("|")
    data = json.loads((results / "results.json").read_text())
    assert [v["name"] for v in data["variants"]] == ["full", "lost-g0.3"]
    full, lost = (v["aggregate"] for v in data["variants"])
    assert full["trainable_params"] > lost["trainable_params"] and full["state_bytes"] > lost["state_bytes"]
    assert all(a["val_ppl_mean"] > 1 and a["peak_memory_bytes_mean"] > 0 and a["tokens_per_s_mean"] > 0 and a["mfu_mean"] > 0
               for a in (full, lost))
    # paired statistics against the default reference (full): one shared seed, d = lost - full, no verdict
    (pair,) = data["paired"]
    losses = [v["runs"][0]["summary"]["val_loss"] for v in data["variants"]]
    assert pair["reference"] == "full" and pair["diffs"] == [losses[1] - losses[0]] and pair["verdict"] == "one seed"
    assert "Paired difference of validation loss against `full`" in table
    run = data["variants"][1]["runs"][0]
    assert run["summary"]["method"] == "lost" and run["summary"]["step"] == 4
    (config,) = results.glob("runs/lost-g0.3/lr0.003-*/seed0/config.yaml")  # runs/<variant>/lr<lr>-<maths hash>/seed<k>
    assert yaml.safe_load(config.read_text())["layer"]["gamma"] == 0.3
    # the analytic parameter count of the estimator equals the real model's
    assert run["estimate"]["params_trainable"] == run["summary"]["parameters"]["total"]
    for png in ("loss_vs_tokens.png", "loss_vs_time.png", "ppl_vs_memory.png"):
        assert (results / png).read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    # a second invocation skips the finished runs; --report rebuilds from the folder alone
    assert main(["bench", str(path)]) == 0
    assert capsys.readouterr().out.count("done, skipped") == 2
    (results / "results.md").unlink()
    assert main(["bench", "--report", str(results)]) == 0
    assert (results / "results.md").read_text() == table


def test_a_run_another_bench_is_training_is_skipped_and_its_folder_left_alone(tmp_path, tiny_run, capsys):
    path = write_recipe(tmp_path, tiny_run, ["full"])
    recipe = load_recipe(path)
    folder = run_dir(recipe, recipe.variants[0], 0)
    with RunLock(folder):  # as a trainer of another bench process holds it
        assert main(["bench", str(path)]) == 0  # not a failure: someone is training it
        out = capsys.readouterr().out
        assert f"runs/full lr 0.003 seed 0: skipped, train.out_dir={folder} is in use by another trainer (pid {os.getpid()})" in out
        assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # no config, no log written into it
    assert main(["bench", str(path)]) == 0  # released: the next bench trains it
    assert (folder / "summary.json").is_file()


def test_runs_from_reuses_a_finished_run_of_the_same_key_elsewhere(tmp_path, tiny_run, capsys):
    first = write_recipe(tmp_path, tiny_run, ["full"])
    assert main(["bench", str(first)]) == 0
    shared = run_dir(load_recipe(first), load_recipe(first).variants[0], 0)
    (tmp_path / "b").mkdir()
    second = write_recipe(tmp_path / "b", tiny_run, ["full", "lost"], runs_from=[str(tmp_path / "results")])
    capsys.readouterr()
    assert main(["bench", str(second)]) == 0
    out = capsys.readouterr().out
    assert "runs/full lr 0.003 seed 0: done, skipped" in out  # trained once, in the first results folder
    own = tmp_path / "b" / "results"
    assert not (own / "runs" / "full").exists() and (next(own.glob("runs/lost/*/seed0")) / "summary.json").is_file()
    data = json.loads((own / "results.json").read_text())
    full = data["variants"][0]["runs"][0]
    assert full["summary"]["val_loss"] == json.loads((shared / "summary.json").read_text())["val_loss"]


def test_one_seed_variants_get_the_promoted_seeds_only_if_they_beat_the_reference(tmp_path, tiny_run, capsys):
    """``promote_seeds``: a one-seed variant that beats the reference at its seed also runs the
    promoted seeds; one that ties it does not. ``--dry-run --methods`` lists only the named
    variants and says which promotions wait, ran or were refused."""
    still = {"train.lr": 1e-7}  # the reference barely trains; "same" is the very same job under another name
    methods = [{"name": "still", "method": "full", "overrides": still},
               {"name": "fast", "method": "full", "seeds": [0], "overrides": {"train.lr": 1e-2}},
               {"name": "same", "method": "full", "seeds": [0], "overrides": still}]
    path = write_recipe(tmp_path, tiny_run, methods, seeds=[0, 1], promote_seeds=[1], reference="still", isolate=False)
    assert main(["bench", str(path), "--dry-run", "--methods", "fast"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [l.split()[:2] for l in lines] == [["todo", "fast"], ["wait", "fast"]]
    assert lines[1].endswith("seeds 1 if it beats still at seed 0")
    assert main(["bench", str(path)]) == 0
    capsys.readouterr()
    results = tmp_path / "results"
    recipe = load_recipe(path)
    summaries = {v.name: {s: run_dir(recipe, v, s) / "summary.json" for s in (0, 1)} for v in recipe.variants}
    loss = {name: {s: json.loads(f.read_text())["val_loss"] for s, f in files.items() if f.is_file()}
            for name, files in summaries.items()}
    assert loss["fast"][0] < loss["still"][0] and loss["same"][0] == loss["still"][0]  # the premise of the test
    assert sorted(loss["fast"]) == [0, 1] and sorted(loss["same"]) == [0] and sorted(loss["still"]) == [0, 1]
    fast = next(p for p in json.loads((results / "results.json").read_text())["paired"] if p["variant"] == "fast")
    assert fast["diffs"] == pytest.approx([loss["fast"][s] - loss["still"][s] for s in (0, 1)])
    assert main(["bench", str(path), "--dry-run", "--methods", "same,fast"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [l.split()[:2] for l in lines] == [["done", "same"], ["skip", "same"], ["done", "fast"], ["done", "fast"]]
    assert lines[1].endswith("seeds 1: did not beat still at seed 0") and lines[3].endswith("(promoted: beat still at its seed)")


@pytest.mark.parametrize("methods, extra, fragment", [
    (["nope"], {}, "method 'nope'"),
    (["full", "full"], {}, "must be unique"),
    ([{"name": "x", "method": "lost", "overrides": {"layer.gamma": 3}}], {}, "variant x: config layer.gamma=3.0"),
    (["full"], {"seedz": [1]}, "unknown key(s) ['seedz']"),
    (["full", "lost"], {"subject": "cola"}, "subject 'cola' is not one of the variants (full, lost)"),
    (["full"], {"runs_from": 3}, "runs_from must be a results folder or a list of them"),
])
def test_bad_recipes_are_one_line_errors(tmp_path, tiny_run, capsys, methods, extra, fragment):
    path = write_recipe(tmp_path, tiny_run, methods, **extra)
    assert main(["bench", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and err.count("\n") == 1, err


def test_report_of_an_empty_folder_is_an_error(tmp_path, capsys):
    assert main(["bench", "--report", str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err


def is_scaling_recipe(path: Path) -> bool:
    return "sizes" in (yaml.safe_load(path.read_text()) or {})  # `lostlm scaling`'s (tests/test_scaling.py)


@pytest.mark.parametrize("path", sorted(p for p in Path("bench").glob("*.yaml") if not is_scaling_recipe(p)), ids=lambda p: p.stem)
def test_shipped_recipes_load(path):
    """Every recipe in bench/ loads (each variant's config is checked), with the seeds and the
    variants the YAML file lists, in its order."""
    raw = yaml.safe_load(path.read_text())
    recipe = load_recipe(path)
    seeds = raw.get("seeds", [0])
    assert recipe.seeds == ([seeds] if isinstance(seeds, int) else seeds)
    names = [m if isinstance(m, str) else m.get("name", m.get("method")) for m in raw["methods"]]
    assert [v.name for v in recipe.variants] == names and recipe.name == raw.get("name", path.stem)
