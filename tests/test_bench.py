"""`lostlm bench`: a 2-method x 1-seed recipe runs (in subprocesses), resumes, and writes a
well-formed table, JSON and PNGs; --report rebuilds them; bad recipes give one-line errors."""

import json

import pytest
import yaml

from lostlm.bench import load_recipe
from lostlm.cli import main


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
    main_table = table.split("Memory breakdown")[0]
    rows = [l for l in main_table.splitlines() if l.startswith("| full ") or l.startswith("| lost-g0.3 ")]
    assert len(rows) == 2 and all(r.count("|") == 11 for r in rows)
    assert "val ppl (mean ± std)" in table and "MiB" in table and "%" in rows[0]
    breakdown = [l for l in table.split("Memory breakdown")[1].splitlines() if l.startswith("| full ")]
    assert len(breakdown) == 1 and breakdown[0].count("|") == 9
    data = json.loads((results / "results.json").read_text())
    assert [v["name"] for v in data["variants"]] == ["full", "lost-g0.3"]
    full, lost = (v["aggregate"] for v in data["variants"])
    assert full["trainable_params"] > lost["trainable_params"] and full["state_bytes"] > lost["state_bytes"]
    assert all(a["val_ppl_mean"] > 1 and a["peak_memory_bytes_mean"] > 0 and a["tokens_per_s_mean"] > 0 and a["mfu_mean"] > 0
               for a in (full, lost))
    run = data["variants"][1]["runs"][0]
    assert run["summary"]["method"] == "lost" and run["summary"]["step"] == 4
    assert yaml.safe_load((results / "runs/lost-g0.3/seed0/config.yaml").read_text())["layer"]["gamma"] == 0.3
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


@pytest.mark.parametrize("methods, extra, fragment", [
    (["nope"], {}, "method 'nope'"),
    (["full", "full"], {}, "must be unique"),
    ([{"name": "x", "method": "lost", "overrides": {"layer.gamma": 3}}], {}, "variant x: config layer.gamma=3.0"),
    (["full"], {"seedz": [1]}, "unknown key(s) ['seedz']"),
])
def test_bad_recipes_are_one_line_errors(tmp_path, tiny_run, capsys, methods, extra, fragment):
    path = write_recipe(tmp_path, tiny_run, methods, **extra)
    assert main(["bench", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and err.count("\n") == 1, err


def test_report_of_an_empty_folder_is_an_error(tmp_path, capsys):
    assert main(["bench", "--report", str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_shipped_recipes_load():
    for name, seeds, count in (("tiny", 3, 7), ("ablations", 1, 12), ("speed-60m", 1, 7)):
        recipe = load_recipe(f"bench/{name}.yaml")
        assert len(recipe.seeds) == seeds and len(recipe.variants) == count
